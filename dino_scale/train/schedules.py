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
    """The official DINO schedule (utils.cosine_scheduler): a linear warmup from warmup_start to base_value over
    `warmup_steps` steps, its last step the peak (the endpoint is included), then

        v(t) = final + (base - final) * (1 + cos(pi * t / T)) / 2,   t = 0 .. T-1,   T = total_steps - warmup_steps,

    which stops one step short of final_value (v(T-1) = final + (base - final) * (1 + cos(pi (T-1)/T)) / 2). The
    result always has `total_steps` entries.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warmup = np.linspace(warmup_start, base_value, warmup_steps)
    decay_steps = total_steps - warmup_steps
    progress = np.arange(decay_steps) / max(decay_steps, 1)
    decay = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * progress))
    return np.concatenate([warmup, decay]).astype(np.float64)


def linear_warmup_then_constant(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """start -> end linearly over `warmup_steps` (the last warmup step is `end`), then constant `end`."""
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    ramp = np.linspace(start, end, warmup_steps) if warmup_steps > 1 else np.full(warmup_steps, end)
    return np.concatenate([ramp, np.full(total_steps - warmup_steps, end)]).astype(np.float64)


def teacher_temperatures(cfg: TrainConfig, steps_per_epoch: int) -> np.ndarray:
    """One teacher temperature per optimizer step. By default as the official code: a linear ramp (endpoint
    included) from warmup_teacher_temp to teacher_temp over round(warmup_teacher_temp_epochs) epochs, then constant,
    with one value per epoch (every step of an epoch uses it). `dino.teacher_temp_per = "step"` ramps every step."""
    dino, total = cfg.dino, cfg.epochs * steps_per_epoch
    if dino.teacher_temp_per == "step":
        warmup = round(dino.warmup_teacher_temp_epochs * steps_per_epoch)
        return linear_warmup_then_constant(dino.warmup_teacher_temp, dino.teacher_temp, warmup, total)
    warmup_epochs = min(round(dino.warmup_teacher_temp_epochs), cfg.epochs)
    per_epoch = np.concatenate(
        [
            np.linspace(dino.warmup_teacher_temp, dino.teacher_temp, warmup_epochs),
            np.full(cfg.epochs - warmup_epochs, dino.teacher_temp),
        ]
    )
    return np.repeat(per_epoch, steps_per_epoch).astype(np.float64)


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
    """The paper's schedules, per optimizer step, with the official code's semantics (see cosine_schedule): lr =
    optim.lr * global_batch / 256 after a linear warmup from 0, cosine to min_lr; weight decay cosine 0.04 -> 0.4;
    teacher momentum cosine momentum_teacher -> 1; teacher temperature (see teacher_temperatures)."""
    total = cfg.epochs * steps_per_epoch
    peak_lr = cfg.optim.lr * global_batch_size / 256.0
    return Schedules(
        lr=cosine_schedule(
            peak_lr, cfg.optim.min_lr, total, warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch)
        ),
        weight_decay=cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        momentum=cosine_schedule(cfg.dino.momentum_teacher, 1.0, total),
        teacher_temp=teacher_temperatures(cfg, steps_per_epoch),
    )
