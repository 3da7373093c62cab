"""The DINO self-distillation loss with centering and sharpening."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LossStats:
    """Collapse diagnostics for one step (0-dim detached tensors: read them with .item() only when logging, so
    the GPU is not synchronised every step).

    teacher_entropy: mean over teacher rows of H(P_t). Uniform collapse drives it to log K; collapse onto one
        dimension drives it to 0.
    kl: mean over the loss pairs of KL(P_t || P_s) = CE(P_t, P_s) - H(P_t). Both collapses drive it to 0, since the
        student then matches the teacher trivially.
    """

    teacher_entropy: torch.Tensor
    kl: torch.Tensor


class DINOLoss(nn.Module):
    """L = mean over pairs (i, j), i a teacher global view, j a student view, j != i, of
    -sum_k P_t^(i)[k] log P_s^(j)[k], averaged over the batch, where

        P_s = softmax(s / student_temp),   P_t = softmax((t - c) / teacher_temp).

    The center follows an EMA of the teacher outputs' mean over the global batch (all ranks, all micro-batches
    of one optimizer step), applied by `update_center()` once per optimizer step:
        c <- m c + (1 - m) mean_{ranks, micro-batches, rows}(t).
    Deferring it to the step makes the result independent of how the global batch is split into processes and
    accumulation steps (one process with 2 micro-batches == 2 processes with one each).
    Centering stops one dimension from dominating; sharpening (a low teacher_temp) stops the uniform collapse
    that centering alone would cause.
    """

    def __init__(
        self,
        out_dim: int,
        n_global_views: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.n_global_views = n_global_views
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        # The training backend's sum over processes (a collective); None: this process is the whole job.
        self.sum_over_ranks = sum_over_ranks
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Teacher row sums and row count (last column) of the micro-batches seen since the last update_center().
        self.register_buffer("pending_sums", torch.zeros(1, out_dim + 1), persistent=False)

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float
    ) -> tuple[torch.Tensor, LossStats]:
        """student_output: [n_views * B, K]; teacher_output: [n_global_views * B, K], rows ordered view by view."""
        student_log_probs = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        teacher_logits = (teacher_output.float() - self.center) / teacher_temp
        teacher_probs = F.softmax(teacher_logits, dim=-1).detach()
        n_student_views = student_output.shape[0] // (teacher_output.shape[0] // self.n_global_views)
        student_views = student_log_probs.chunk(n_student_views)
        teacher_views = teacher_probs.chunk(self.n_global_views)

        total = student_output.new_zeros((), dtype=torch.float32)
        n_pairs = 0
        for i, teacher_view in enumerate(teacher_views):
            for j, student_view in enumerate(student_views):
                if i == j:  # the same crop seen by both networks carries no learning signal
                    continue
                total = total + torch.sum(-teacher_view * student_view, dim=-1).mean()
                n_pairs += 1
        loss = total / n_pairs

        with torch.no_grad():
            # Each teacher view is paired with the same number of student views, so the pair-mean of H(P_t)
            # equals the row-mean, and KL = CE - H exactly.
            entropy = -(teacher_probs * F.log_softmax(teacher_logits, dim=-1)).sum(dim=-1).mean()
            stats = LossStats(teacher_entropy=entropy, kl=loss.detach() - entropy)
            self.pending_sums[:, :-1] += teacher_output.float().sum(dim=0, keepdim=True)
            self.pending_sums[:, -1] += teacher_output.shape[0]
        return loss, stats

    @torch.no_grad()
    def update_center(self, applied: torch.Tensor | bool = True) -> None:
        """c <- m c + (1 - m) * (sum of pending teacher rows over all ranks) / (their count over all ranks), where
        `applied` (the optimizer step's verdict, a device flag: no host read) says the step was kept; a dropped
        step's teacher rows are forgotten and the center stays."""
        sums_and_count = self.pending_sums.clone()
        if self.sum_over_ranks is not None:
            sums_and_count = self.sum_over_ranks(sums_and_count)  # one collective: the row count rides along
        self.pending_sums.zero_()
        if applied is False:
            return
        count = sums_and_count[:, -1:]
        batch_center = sums_and_count[:, :-1] / count
        updated = torch.add(self.center * self.center_momentum, batch_center, alpha=1.0 - self.center_momentum)
        keep = count > 0 if applied is True else (count > 0) & applied
        self.center.copy_(torch.where(keep, updated, self.center))
