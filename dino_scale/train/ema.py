"""The teacher: an exponential moving average of the student, and a digest that proves replicas identical."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

EMA_CHUNK = 16
"""Parameters updated per foreach call of the EMA: bounds its temporary to ~16 tensors (a few blocks' worth)."""


@torch.no_grad()
def update_teacher(
    teacher: nn.Module,
    student_weight_groups: Iterable[list[tuple[str, torch.Tensor]]],
    momentum: float,
    applied: torch.Tensor | bool = True,
) -> None:
    """theta_t <- momentum * theta_t + (1 - momentum) * theta_s, one group (block) of student weights at a time, as
    the official code computes it: the student's share is its own product, then added.

    `applied` is the optimizer step's verdict: False (or a 0-dim bool tensor, read only by the device) leaves the
    teacher as it is, so a dropped non-finite step needs no host read here either. Taking groups rather than the
    whole model lets a sharded backend gather one block at a time.
    """
    if applied is False:
        return
    # On the device, a dropped step becomes momentum 1 and share 0 (Python scalars: nothing is copied to the device).
    keep = momentum if applied is True else torch.where(applied, momentum, 1.0)
    share = 1.0 - momentum if applied is True else torch.where(applied, 1.0 - momentum, 0.0)
    teacher_parameters = dict(teacher.named_parameters())
    for group in student_weight_groups:
        targets = [teacher_parameters[name] for name, _ in group]
        sources = [weight.detach().to(target.dtype) for (_, weight), target in zip(group, targets, strict=True)]
        # The student's share is a temporary copy: made EMA_CHUNK tensors at a time, not the whole group at once.
        for start in range(0, len(targets), EMA_CHUNK):
            chunk = targets[start : start + EMA_CHUNK]
            torch._foreach_mul_(chunk, keep)
            torch._foreach_add_(chunk, torch._foreach_mul(sources[start : start + EMA_CHUNK], share))


def teacher_digest(teacher: nn.Module) -> str:
    """sha256 over the teacher's parameters and buffers: equal digests on all ranks mean bit-identical replicas."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
