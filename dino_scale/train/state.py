"""The train state: everything a run carries from step to step besides the student and its optimizer (which the
backend owns), as one Stateful object (`state_dict()` / `load_state_dict()`, as torchtitan's TrainState).

    step                    optimizer steps taken
    data position           epoch and optimizer step within it (stored in steps, so a run can resume on another
                            number of processes as long as the global batch is the same)
    teacher, center         the EMA teacher's weights and the loss's center
    rng                     every rank's torch RNG state (drop-path masks)
    counts                  each rank's unreadable samples and damaged shards skipped so far, and the non-finite
                            optimizer steps dropped (the `skip_nonfinite_steps` budget)

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
from dino_scale.errors import ConfigError, InputError, NonFiniteError
from dino_scale.train import checkpoint
from dino_scale.train.backends import Backend
from dino_scale.train.backends.base import StepResult
from dino_scale.train.loss import DINOLoss

log = logging.getLogger("dino_scale")


@dataclass
class DataPlan:
    urls: list[str]
    samples_per_epoch: int
    global_batch: int
    steps_per_epoch: int
    skipped_shards: int = 0
    """Shards left out before the first step because they cannot be read (see data.shards.survey_shards)."""


# The skipped-sample fraction is judged once this many samples were read: one bad image in the first batch is not a
# verdict on the data set.
MIN_SAMPLES_FOR_SKIP_VERDICT = 1000


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
        self.run_dir = cfg.resolved_output_dir()
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        # This rank's counts (summed over ranks at log steps); the survey's skipped shards are counted once, on rank 0.
        self.skipped_samples = 0
        self.skipped_shards = plan.skipped_shards if backend.is_main_process() else 0
        self.skipped_steps = 0  # the same on every rank
        self.skipped_examples: list[str] = []
        self._checkpoint_pending = False
        self._last_good_step: int | None = None  # the latest settled step whose update was applied
        self._pending: list[tuple[int, StepResult]] = []  # (1-based step, result) not yet read by settle()

    @property
    def first_micro_batch(self) -> int:
        """Where in the current epoch the data loader starts, in micro-batches of this process."""
        return self.step_in_epoch * self.backend.batch.accumulation_steps

    def count_skipped(self, keys: list[str], shards: list[str]) -> None:
        """Unreadable samples and damaged shards the loader dropped while assembling a batch (already logged)."""
        if keys:
            self.skipped_samples += len(keys)
            self.skipped_examples = (self.skipped_examples + keys)[:5]
            log.warning("skipped %d unreadable sample(s): %s", len(keys), ", ".join(keys))
        self.skipped_shards += len(shards)

    def counts(self) -> dict[str, int]:
        """This rank's skip counts, summed over ranks at log steps."""
        return {"skipped_samples": self.skipped_samples, "skipped_shards": self.skipped_shards}

    def finish_step(self, result: StepResult, last_step: int) -> None:
        """One optimizer step done (applied, or dropped as non-finite): advance the step and the data position
        (rolling over at the epoch's end), and keep its verdict, which stays on the device until `settle` reads the
        pending ones together: at log steps, checkpoint steps and the last step (the same steps on every rank)."""
        self._pending.append((self.step + 1, result))
        self.step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == self.plan.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.step % self.cfg.checkpoint_every == 0:
            self._checkpoint_pending = True
        # A verdict already on the host that dropped the step (DeepSpeed, the optimizers without a device skip) is
        # judged at once: it costs nothing, and DeepSpeed cannot go on after a step it did not take.
        on_host_dropped = not result.recoverable or result.applied is False
        if self.step % self.cfg.log_every == 0 or self.step == last_step or self._checkpoint_pending or on_host_dropped:
            self.settle()

    def settle(self) -> None:
        """Read the pending steps' verdicts (one host read for all of them) and act on each in order: a non-finite
        step stops the run unless the `skip_nonfinite_steps` budget allows dropping it (its update was already
        dropped on the device); the error names the step as the log numbers it (1-based). A preemption signal on any
        rank sets `backend.stop_requested`. Between settles the run goes on: a step found non-finite here stops the
        run at the next log or checkpoint step, before anything of it is saved."""
        pending, self._pending = self._pending, []
        flagged = [(step, result) for step, result in pending if result.flags is not None]
        values = torch.cat([r.flags.reshape(-1) for _, r in flagged]).tolist() if flagged else []  # type: ignore[union-attr]
        offset = 0
        for step, result in pending:
            width = len(result.flag_names) if result.flags is not None else 0
            non_finite, stop = result.verdict(values[offset : offset + width])
            offset += width
            if stop:
                self.backend.stop_requested = True
            if non_finite:
                budget_left = self.cfg.skip_nonfinite_steps - self.skipped_steps
                if not result.recoverable or budget_left <= 0 or not self.backend.can_skip_steps:
                    raise NonFiniteError(self._non_finite_message(step, non_finite, result.recoverable))
                self.skipped_steps += 1
                log.warning(
                    "step %d: non-finite %s; the update was dropped (%d of skip_nonfinite_steps=%d used)",
                    step,
                    ", ".join(non_finite),
                    self.skipped_steps,
                    self.cfg.skip_nonfinite_steps,
                )
            else:
                self._last_good_step = step

    def _non_finite_message(self, step: int, non_finite: list[str], recoverable: bool) -> str:
        latest = layout.find_latest_checkpoint(self.run_dir)
        where = f"the last checkpoint is {latest} (resume with --resume)" if latest else "no checkpoint was written"
        if not recoverable:
            why = "stopping"
        elif not self.backend.can_skip_steps:
            why = f"stopping (backend={self.backend.name} cannot drop a step outside fp16 loss scaling)"
        elif self.cfg.skip_nonfinite_steps:
            why = f"stopping: the skip_nonfinite_steps budget of {self.cfg.skip_nonfinite_steps} is used up"
        else:
            why = "stopping (set skip_nonfinite_steps to drop such steps instead)"
        return f"step {step}: non-finite {', '.join(non_finite)}; {why}; {where}"

    def checkpoint_due(self, last_step: int) -> bool:
        """Every `checkpoint_every` steps, but only after an applied (finite) step: a due checkpoint whose step was
        dropped as non-finite waits for the next finite one. The end of the run is always saved (after a dropped
        last step the weights are those of the last finite step)."""
        if self.step == last_step:
            self._checkpoint_pending = False
            return True
        if self._checkpoint_pending and self._last_good_step == self.step:
            self._checkpoint_pending = False
            return True
        return False

    def check_skipped_fraction(self, record: dict[str, Any]) -> None:
        """Stop when more than `data.max_skipped_fraction` of the samples read so far were unreadable (`record`: a
        log step's metrics, whose skip count is summed over ranks; every rank decides the same)."""
        limit = self.cfg.data.max_skipped_fraction
        skipped = int(record.get("skipped_samples", 0))
        read = self.step * self.plan.global_batch + skipped
        if limit >= 1.0 or read < MIN_SAMPLES_FOR_SKIP_VERDICT:
            return
        if skipped > limit * read:
            examples = ", ".join(self.skipped_examples) or "see the warnings above"
            raise InputError(
                f"step {self.step}: {skipped} of {read} samples read ({skipped / read:.1%}) were unreadable and "
                f"skipped, more than data.max_skipped_fraction={limit}; e.g. {examples}. Repair or drop them "
                "(`dino-scale shard` re-encodes an image folder), or raise data.max_skipped_fraction"
            )

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
            "counts": self.backend.gather_objects(self.counts()),
            "skipped_steps": self.skipped_steps,
            "backend": self.backend.name,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.loss.center.copy_(state["center"])
        self.step = int(state["step"])
        self._last_good_step = self.step
        self._restore_counts(state)
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

    def _restore_counts(self, state: dict[str, Any]) -> None:
        """Each rank continues its own counts; on another process count, rank 0 carries the totals."""
        per_rank = state.get("counts") or [{"skipped_samples": int(state.get("skipped_samples", 0))}]
        if len(per_rank) == self.backend.world_size:
            mine = per_rank[self.backend.rank]
        elif self.backend.is_main_process():
            mine = {key: sum(int(c.get(key, 0)) for c in per_rank) for key in ("skipped_samples", "skipped_shards")}
        else:
            mine = {}
        self.skipped_samples = int(mine.get("skipped_samples", 0))
        self.skipped_shards = int(mine.get("skipped_shards", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def _restore_rng(self, saved: Any) -> None:
        """Each rank continues its own RNG stream (drop-path masks). After a change of process count the streams
        cannot continue, so every rank starts a fresh one derived from (seed, step, rank)."""
        per_rank = saved if isinstance(saved, list) else [saved]
        if len(per_rank) == self.backend.world_size:
            set_rng_state(per_rank[self.backend.rank])
            return
        log.warning(
            "checkpoint holds RNG states of %d process(es), this run has %d: drop-path masks restart from a fresh seed",
            len(per_rank),
            self.backend.world_size,
        )
        torch.manual_seed(stable_seed("train-rng", self.cfg.seed, self.step, self.backend.rank))

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def save(self, run_dir: Path) -> None:
        path = self.backend.save(run_dir, self.step, self.state_dict(), self.cfg.keep_checkpoints)
        log.info("checkpoint %s", path)

    def resume(self, run_dir: Path) -> bool:
        """Continue from the run's newest usable checkpoint; False when it has none (the run starts from scratch).

        Each checkpoint is verified against its manifest before anything of it is loaded; a damaged or foreign one
        is reported (a warning naming it and why) and the previous one is tried, the same one on every rank
        (checkpoint.resume_newest). When none is usable the run stops with one line listing what was tried."""

        def load(path: Path) -> None:
            state = self.backend.load(path)
            checkpoint.check_trainer_state(state, self.teacher, self.loss.center, path)  # before the teacher is touched
            self.load_state_dict(state)

        found = checkpoint.resume_newest(
            run_dir, load, self.backend.gather_objects, self.backend.rank, self.backend.world_size
        )
        if found is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", run_dir)
            return False
        path, _ = found
        log.info("resumed from %s at step %d (epoch %d, step %d)", path, self.step, self.epoch, self.step_in_epoch)
        return True
