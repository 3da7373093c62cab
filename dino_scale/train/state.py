"""The train state: everything a run carries from step to step besides the student and its optimizer (which the
backend owns), as one Stateful object (`state_dict()` / `load_state_dict()`, as torchtitan's TrainState).

    step                    optimizer steps taken
    data position           epoch and optimizer step within it (stored in steps, so a run can resume on another
                            number of processes as long as the global batch is the same)
    teacher, center         the EMA teacher's weights and the loss's center
    rng                     every rank's torch RNG state (drop-path masks)
    skipped_samples         unreadable samples skipped so far

A checkpoint is `backend.save(run_dir, step, state.state_dict(), ...)`: the backend adds the student and optimizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_scale import run_dir as layout
from dino_scale.config import TrainConfig
from dino_scale.data.loaders import stable_seed
from dino_scale.errors import ConfigError
from dino_scale.train.backends import Backend
from dino_scale.train.loss import DINOLoss

log = logging.getLogger("dino_scale")


@dataclass
class DataPlan:
    urls: list[str]
    samples_per_epoch: int
    global_batch: int
    steps_per_epoch: int


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainState:
    """Step, data position, teacher, center, RNG and skip count of a run (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, backend: Backend, teacher: nn.Module, loss: DINOLoss, plan: DataPlan) -> None:
        self.cfg, self.backend, self.teacher, self.loss, self.plan = cfg, backend, teacher, loss, plan
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.skipped_samples = 0

    @property
    def first_micro_batch(self) -> int:
        """Where in the current epoch the data loader starts, in micro-batches of this process."""
        return self.step_in_epoch * self.backend.batch.accumulation_steps

    def count_skipped(self, keys: list[str]) -> None:
        if keys:
            self.skipped_samples += len(keys)
            log.warning("skipped %d unreadable sample(s): %s", len(keys), ", ".join(keys))

    def finish_step(self) -> None:
        """One optimizer step done: advance the step and the data position (rolling over at the epoch's end)."""
        self.step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == self.plan.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    # --- Stateful ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The loop's part of a checkpoint. Every rank calls it (the RNG states are gathered from all of them)."""
        return {
            "teacher": self.teacher.state_dict(),
            "center": self.loss.center,
            "step": self.step,
            "data_position": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "samples_seen": self.step * self.plan.global_batch,
                "global_batch": self.plan.global_batch,
                "world_size": self.backend.world_size,
            },
            "rng": self.backend.gather_objects(rng_state()),
            "skipped_samples": self.skipped_samples,
            "backend": self.backend.name,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.loss.center.copy_(state["center"])
        self.step = int(state["step"])
        self.skipped_samples = int(state.get("skipped_samples", 0))
        self.epoch, self.step_in_epoch = self._position(state["data_position"])
        self._restore_rng(state["rng"])

    def _position(self, position: dict[str, Any]) -> tuple[int, int]:
        """(epoch, optimizer step in epoch) to continue from; the global batch must be the one that wrote them."""
        saved_global = int(position.get("global_batch", self.plan.global_batch))
        if saved_global != self.plan.global_batch:
            raise ConfigError(
                f"the checkpoint was written with a global batch of {saved_global}, this run has "
                f"{self.plan.global_batch}: the lr schedule and the data position depend on it. Set "
                f"deepspeed.train_batch_size to {saved_global} (accumulation steps then follow the number of processes)"
            )
        if "step_in_epoch" in position:
            return int(position["epoch"]), int(position["step_in_epoch"])
        # Written before step_in_epoch existed: a micro-batch index of this process.
        return int(position["epoch"]), int(position["batch"]) // self.backend.batch.accumulation_steps

    def _restore_rng(self, saved: Any) -> None:
        """Each rank continues its own RNG stream (drop-path masks). After a change of process count the streams
        cannot continue, so every rank starts a fresh one derived from (seed, step, rank)."""
        per_rank = saved if isinstance(saved, list) else [saved]
        if len(per_rank) == self.backend.world_size:
            set_rng_state(per_rank[self.backend.rank])
            return
        log.warning(
            "checkpoint holds RNG states of %d process(es), this run has %d: drop-path masks restart from a fresh "
            "seed",
            len(per_rank),
            self.backend.world_size,
        )
        torch.manual_seed(stable_seed("train-rng", self.cfg.seed, self.step, self.backend.rank))

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def save(self, run_dir: Path) -> None:
        path = self.backend.save(run_dir, self.step, self.state_dict(), self.cfg.keep_checkpoints)
        log.info("checkpoint %s", path)

    def resume(self, run_dir: Path) -> bool:
        """Continue from the run's latest checkpoint; False when it has none (the run starts from scratch)."""
        latest = layout.find_latest_checkpoint(run_dir)
        if latest is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", run_dir)
            return False
        self.load_state_dict(self.backend.load(latest))
        log.info("resumed from %s at step %d (epoch %d, step %d)", latest, self.step, self.epoch, self.step_in_epoch)
        return True
