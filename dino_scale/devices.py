"""Which torch device a command or a training process runs on."""

from __future__ import annotations

import torch

from dino_scale.errors import InputError, Unavailable


def resolve_device(requested: str, local_rank: int | None = None) -> torch.device:
    """``auto`` (the GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    With ``local_rank`` (a training process started by a launcher) CUDA means this process's GPU, ``cuda:local_rank``,
    which is also made the current device.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise Unavailable(f"device {requested!r} was asked for, but torch sees no CUDA GPU here", argument="device")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise InputError(f"device {requested!r} is not one of auto, cpu, cuda, cuda:N", argument="device") from None
    if device.type == "cuda" and local_rank is not None:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return device
