"""Per-iteration schedules for learning rate, weight decay, teacher momentum and teacher temperature.

Each schedule is a plain float array with one value per optimizer step, computed once up front: the training loop
indexes it, checkpoints need not store it, and tests can check endpoints and shape directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dino_scale.config import TrainConfig


def cosine_schedule(
    base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warmup warmup_start -> base_value over `warmup_steps`, then
    v(t) = final + (base - final) * (1 + cos(pi * t / T)) / 2 for t = 0..T-1, T = total_steps - warmup_steps.

    The last value is exactly `final_value` when T > 1; the result always has `total_steps` entries.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warmup = np.linspace(warmup_start, base_value, warmup_steps, endpoint=False)
    decay_steps = total_steps - warmup_steps
    # t / (T - 1) so that the final step lands on final_value (max(...) guards T == 1).
    progress = np.arange(decay_steps) / max(decay_steps - 1, 1)
    decay = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * progress))
    return np.concatenate([warmup, decay]).astype(np.float64)


def linear_warmup_then_constant(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """start -> end linearly over `warmup_steps` (the last warmup step is `end`), then constant `end`."""
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    ramp = np.linspace(start, end, warmup_steps) if warmup_steps > 1 else np.full(warmup_steps, end)
    return np.concatenate([ramp, np.full(total_steps - warmup_steps, end)]).astype(np.float64)


@dataclass
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @property
    def total_steps(self) -> int:
        return len(self.lr)


def build_schedules(cfg: TrainConfig, steps_per_epoch: int, global_batch_size: int) -> Schedules:
    """The paper's schedules, per optimizer step: lr = optim.lr * global_batch / 256 after linear warmup, cosine to
    min_lr; weight decay cosine 0.04 -> 0.4; teacher momentum cosine momentum_teacher -> 1; teacher temperature
    linear warmup_teacher_temp -> teacher_temp, then constant."""
    total = cfg.epochs * steps_per_epoch
    peak_lr = cfg.optim.lr * global_batch_size / 256.0
    return Schedules(
        lr=cosine_schedule(
            peak_lr, cfg.optim.min_lr, total, warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch)
        ),
        weight_decay=cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        momentum=cosine_schedule(cfg.dino.momentum_teacher, 1.0, total),
        teacher_temp=linear_warmup_then_constant(
            cfg.dino.warmup_teacher_temp,
            cfg.dino.teacher_temp,
            round(cfg.dino.warmup_teacher_temp_epochs * steps_per_epoch),
            total,
        ),
    )
