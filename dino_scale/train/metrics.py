"""What training reports: a JSON record per logged step (metrics.jsonl, and the same numbers as TensorBoard scalars
in tensorboard/ where the `tensorboard` package is installed), a progress bar or log line, and the non-finite watch.
Between log steps nothing leaves the device: the loss is summed there and read once per log step.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from numbers import Real
from pathlib import Path
from typing import Any

import torch

from dino_scale import run_dir as layout
from dino_scale.progress import Progress
from dino_scale.train.backends import Backend
from dino_scale.train.loss import LossStats
from dino_scale.train.schedules import Schedules

log = logging.getLogger("dino_scale")


def setup_logging(main_process: bool) -> None:
    """INFO on the main process, warnings only on the others, so N ranks don't print N copies."""
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


class TensorBoardScalars:
    """Every number of a metrics.jsonl record as a TensorBoard scalar, so runs can be compared live in TensorBoard.

    A step record's fields become ``train/<field>`` at the record's step, an event's (``final_knn``) become
    ``<event>/<field>``; lists and strings are left out. It only mirrors records that are already on the host, so it
    adds no device synchronisation. TensorBoard is optional: without it nothing is written, not even the folder.
    """

    def __init__(self, folder: Path, first_step: int = 0) -> None:
        self.folder = folder
        self._writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as error:  # not installed (ImportError) or broken (protobuf clashes): training goes on
            log.info("TensorBoard event files are not written (%s); pip install -e .[tensorboard] for them", error)
            return
        # A resumed run starts a new event file in the same folder; purge_step hides the earlier part's records
        # past the checkpoint, which this run logs again (metrics.jsonl keeps both: it is the raw log).
        self._writer = SummaryWriter(log_dir=str(folder), purge_step=first_step + 1 if first_step else None)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def write(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        prefix = record.get("event", "train")
        step = record.get("step")
        for name, value in record.items():
            # bool is an int, but a flag is no curve; "step" is the x axis itself.
            if name != "step" and isinstance(value, Real) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}/{name}", float(value), global_step=step)
        self._writer.flush()  # a record per log step only: keep TensorBoard as current as metrics.jsonl

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MetricsWriter:
    """Appends one JSON object per line and flushes it, so `tail -f` and crash forensics see every record; with
    ``tensorboard`` (a folder) mirrors each record there as TensorBoard scalars (:class:`TensorBoardScalars`)."""

    def __init__(self, path: Path | None, tensorboard: Path | None = None, first_step: int = 0) -> None:
        self.path = path
        self._file = None
        self.tensorboard = TensorBoardScalars(tensorboard, first_step) if tensorboard is not None else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tensorboard is not None:
            self.tensorboard.close()


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on a GPU, the resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # POSIX only; the CPU number is informational

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class NonFiniteWatch:
    """Device-side flags of the quantities that went NaN / inf during one optimizer step's micro-batches.

    `observe` only queues tensor ops (no host synchronisation); `take` hands the flags to the backend, which checks
    them with the gradient norm once per optimizer step, before the update (one collective; read at log steps).
    """

    def __init__(self) -> None:
        self._flags: dict[str, torch.Tensor] = {}

    def observe(self, **tensors: torch.Tensor) -> None:
        for name, tensor in tensors.items():
            bad = ~torch.isfinite(tensor.detach()).all()
            self._flags[name] = bad if name not in self._flags else self._flags[name] | bad

    def take(self) -> dict[str, torch.Tensor]:
        """This step's flags, in observation order; the watch starts over."""
        flags, self._flags = self._flags, {}
        return flags


class StepMetrics:
    """Step logging: the loss summed on the device between log steps, and at every `log_every`-th step (and the
    last) a record in metrics.jsonl (main process) plus the progress bar or log line.

    Loss, teacher entropy and KL are means over all processes (one small collective per logged step).
    """

    def __init__(
        self,
        path: Path,
        backend: Backend,
        schedules: Schedules,
        global_batch: int,
        last_step: int,
        first_step: int,
        log_every: int,
    ) -> None:
        main = backend.is_main_process()
        self.backend, self.schedules, self.global_batch = backend, schedules, global_batch
        self.last_step, self.log_every = last_step, log_every
        # Only the main process writes: metrics.jsonl and, beside it, the TensorBoard event files.
        tensorboard = path.parent / layout.TENSORBOARD_SUBDIR
        self.writer = MetricsWriter(path, tensorboard, first_step) if main else MetricsWriter(None)
        self.progress = Progress(last_step, "step", initial=first_step, enabled=main)
        # float64: the sum of micro-batch losses / accumulation steps, as a Python float sum would give it.
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=backend.device)
        self._steps = 0
        self._window_start = time.monotonic()
        self.last_record: dict[str, Any] = {}

    def add_micro_batch(self, loss: torch.Tensor, accumulation: int) -> None:
        """Add one micro-batch's loss, weighted 1 / accumulation (device-side)."""
        self._loss_sum += loss.detach().double() / accumulation

    def step_done(
        self,
        step: int,
        epoch: int,
        stats: LossStats,
        grad_norm: torch.Tensor,
        rank_counts: dict[str, int],
        skipped_steps: int,
    ) -> dict[str, Any] | None:
        """After optimizer step `step` (1-based) of `epoch`: at a log step, write a record and return it (the same
        figures on every rank); None otherwise. `rank_counts` (this rank's skip counts) are summed over ranks."""
        self._steps += 1
        if step % self.log_every and step != self.last_step:
            return None
        elapsed = time.monotonic() - self._window_start
        window_loss = (self._loss_sum / self._steps).float()
        local = [window_loss, stats.teacher_entropy.float(), stats.kl.float()]
        local += [torch.tensor(float(count), device=window_loss.device) for count in rank_counts.values()]
        # One small collective: the means of loss / entropy / KL and the sums of the counts over ranks.
        summed = self.backend.sum_over_ranks(torch.stack(local).double()).tolist()
        loss, entropy, kl = (value / self.backend.world_size for value in summed[:3])
        counts = {name: round(value) for name, value in zip(rank_counts, summed[3:], strict=True)}
        images_per_s = self._steps * self.global_batch / max(elapsed, 1e-9)
        peak_memory = self.backend.gather_objects(round(peak_memory_gb(self.backend.device), 3))
        record = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": float(self.schedules.lr[step - 1]),
            "wd": float(self.schedules.weight_decay[step - 1]),
            "momentum": float(self.schedules.momentum[step - 1]),
            "teacher_temp": float(self.schedules.teacher_temp[step - 1]),
            "teacher_entropy": entropy,
            "kl": kl,
            "grad_norm": grad_norm.item(),
            "images_per_s": images_per_s,
            "images_per_s_per_device": images_per_s / self.backend.world_size,
            "step_time_s": elapsed / self._steps,
            "peak_memory_gb": max(peak_memory),
            "peak_memory_gb_per_rank": peak_memory,
            **counts,
            "skipped_steps": skipped_steps,
        }
        self.writer.write(record)
        summary = {"epoch": epoch, "loss": f"{loss:.4f}", "img/s": f"{images_per_s:.1f}", "H(Pt)": f"{entropy:.3f}"}
        self.progress.update(self._steps, {**summary, "KL": f"{kl:.4f}"})
        self.last_record = record
        self._loss_sum.zero_()
        self._steps, self._window_start = 0, time.monotonic()
        return record

    def event(self, step: int, event: str, **fields: Any) -> None:
        """A non-step record (`final`, `final_knn`)."""
        self.writer.write({"step": step, "event": event, **fields})

    def close(self) -> None:
        self.progress.close()
        self.writer.close()
