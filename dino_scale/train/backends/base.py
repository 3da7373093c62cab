"""The one small interface between the training loop and the hardware, plus what every backend shares.

The loop calls only `Backend` methods and never asks which backend it has. A backend owns the student's wrapper,
optimizer and precision, and hands out the student's full fp32 weights one block at a time for the teacher's
EMA (so a sharded backend never gathers the whole model at once).

Checkpoint layout (all backends): ``run_dir/checkpoints/step_XXXXXXXX.pt`` (one file: local, ddp) or
``run_dir/checkpoints/step_XXXXXXXX/`` (a folder: deepspeed, fsdp) holding ``trainer_state.pt`` (teacher, center,
step, data position, RNG of every rank) beside the backend's own sharded files. ``latest.json`` names the newest.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dino_scale import run_dir as layout
from dino_scale.config import BatchPlan, TrainConfig
from dino_scale.errors import CheckpointError, NonFiniteError, Unavailable
from dino_scale.io import load_checkpoint
from dino_scale.train import checkpoint

log = logging.getLogger("dino_scale")


@dataclass(frozen=True)
class LaunchEnvironment:
    """What the launcher (torchrun, the deepspeed launcher, SLURM + torchrun, or nothing) put in the environment."""

    launcher: str  # "none", "torchrun", "deepspeed" or "env" (RANK/WORLD_SIZE set by hand or by another tool)
    rank: int
    world_size: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.launcher != "none"


def launch_environment() -> LaunchEnvironment:
    env = os.environ
    has_rendezvous = all(key in env for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if not has_rendezvous:
        return LaunchEnvironment("none", 0, 1, 0)
    if "CROSS_RANK" in env and "LOCAL_SIZE" in env:  # set by deepspeed/launcher/launch.py only
        launcher = "deepspeed"
    elif "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    else:
        launcher = "env"
    return LaunchEnvironment(launcher, int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))


def require_launcher(backend: str, env: LaunchEnvironment) -> None:
    if not env.distributed:
        raise Unavailable(
            f"backend={backend} needs a launcher environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and none "
            "is set. Launch with `deepspeed -m dino_scale.train ...` or `torchrun --nproc_per_node N -m "
            "dino_scale.train ...` (N may be 1), or drop `backend` to train in this one process"
        )


def init_process_group(device: torch.device) -> None:
    """NCCL on GPUs, gloo on CPUs; a no-op when a group already exists (e.g. DeepSpeed made it)."""
    if dist.is_initialized():
        return
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=30)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)


def sync_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch, as with one process: SyncBatchNorm across ranks (CUDA only in torch).

    On CPU the statistics stay per process, which is the official DINO behaviour without SyncBN; the teacher's
    running statistics then differ across ranks, and the final teacher digests will say so.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    if device.type != "cuda":
        log.warning("BatchNorm statistics are per process on %s (SyncBatchNorm needs CUDA)", device)
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def autocast_context(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, cfg.autocast_dtype))


class Backend(ABC):
    """The seam between the training loop and DeepSpeed / FSDP2 / DDP / a single process."""

    name: str
    device: torch.device
    rank: int = 0
    world_size: int = 1

    def __init__(self, cfg: TrainConfig, batch: BatchPlan) -> None:
        self.cfg = cfg
        self.batch = batch
        self._student: nn.Module | None = None  # set by prepare()

    # --- training ---------------------------------------------------------------------------------------------

    @abstractmethod
    def prepare(self, student: nn.Module) -> nn.Module:
        """Wrap the student and create its optimizer; returns the module to call forward on."""

    def forward_context(self, sync_gradients: bool) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward passes (teacher and student) of one micro-batch. `sync_gradients` is
        False for all but the last micro-batch of an optimizer step, so that backends may skip the reduction."""
        return autocast_context(self.cfg, self.device)

    def prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """Place the teacher (never wrapped or sharded) on this process's device. With several processes its
        BatchNorm, if any, sees the global batch too (SyncBatchNorm), as in official DINO."""
        if self.world_size > 1:
            teacher = sync_batch_norm(teacher, self.device)
        return teacher.to(self.device)

    @abstractmethod
    def backward(self, loss: torch.Tensor, sync_gradients: bool) -> None:
        """Accumulate gradients of one micro-batch's loss (already divided by the accumulation steps)."""

    @abstractmethod
    def optimizer_step(self, lr: float, weight_decay: float, freeze_last_layer: bool) -> torch.Tensor:
        """One optimizer step with the scheduled lr / wd, clipping at `gradient_clipping`, the last layer's lr at 0
        while it is frozen; gradients are zeroed afterwards. Returns the global gradient norm before clipping."""

    @property
    def skips_non_finite_steps(self) -> bool:
        """fp16 loss scaling: a step whose scaled gradients overflow is skipped (and the scale lowered) by the loss
        scaler (torch's GradScaler, DeepSpeed's), so a non-finite gradient norm is expected there, not an error."""
        return self.cfg.fp16

    def raise_if_non_finite(self, step: int, flags: dict[str, torch.Tensor]) -> None:
        """Stop training if any process saw a non-finite quantity in this optimizer step (`flags`: name -> 0-dim bool
        tensor, True where it went NaN / inf). One collective and one host read per optimizer step; every rank
        raises at the same step, so none is left waiting in a collective."""
        if self.skips_non_finite_steps:
            flags = {name: flag for name, flag in flags.items() if name != "gradient_norm"}
        if not flags:
            return
        vector = torch.stack([flag.to(self.device, torch.float32) for flag in flags.values()])
        if self.distributed:
            dist.all_reduce(vector, op=dist.ReduceOp.MAX)
        bad = [name for name, value in zip(flags, vector.tolist(), strict=True) if value]
        if bad:
            raise NonFiniteError(
                f"step {step}: non-finite {', '.join(bad)}; stopping (the last checkpoint is untouched)"
            )

    @abstractmethod
    def student_weight_groups(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The student's full fp32 weights as (name, tensor) groups, one block at a time, identical on every rank.
        A tensor is only valid until the next group is requested (a sharded backend frees it)."""

    @property
    def student(self) -> nn.Module:
        """The unwrapped student module (its parameters may be shards; use student_weight_groups for values)."""
        if self._student is None:
            raise RuntimeError("Backend.prepare() has not been called")
        return self._student

    # --- checkpoints ------------------------------------------------------------------------------------------

    @abstractmethod
    def save(self, run_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
        """Write a checkpoint of the student, its optimizer and `state` (teacher, center, ...; the same on every
        rank, written once). Every rank calls this. Returns the checkpoint's path."""

    @abstractmethod
    def load(self, path: Path) -> dict[str, Any]:
        """Restore the student and its optimizer from a checkpoint of any backend this one can read; returns the
        rest of its state. Every rank calls this."""

    # --- collectives (no-ops on one process) ------------------------------------------------------------------

    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a small tensor over ranks (for logging: the loss every rank saw, not just rank 0's)."""
        if not self.distributed:
            return value
        total = value.detach().float().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over ranks, as a new tensor (the input is left as it is)."""
        total = value.clone()
        if self.distributed:
            dist.all_reduce(total)
        return total

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        if self.distributed:
            dist.barrier()
            dist.destroy_process_group()


# --- checkpoint helpers shared by the backends ---------------------------------------------------------------


def weight_blocks(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The model's parameters grouped by block: each element of a ModuleList / Sequential (ViT blocks, ResNet
    bottlenecks, head layers) is one group, and every other parameter joins the group of its parent module.

    Sharded backends gather one group at a time for the EMA, so peak memory grows by one block, not the model.
    """
    containers = {name for name, module in model.named_modules() if isinstance(module, (nn.ModuleList, nn.Sequential))}
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:-1])
        for depth in range(1, len(parts)):
            if ".".join(parts[:depth]) in containers:
                key = ".".join(parts[: depth + 1])
                break
        groups.setdefault(key, []).append((name, parameter))
    return list(groups.values())


def stage_checkpoint_dir(run_dir: Path, step: int, backend: Backend) -> Path:
    """A fresh, empty staging folder for a folder checkpoint; renamed into place by `commit_checkpoint_dir`."""
    staging = layout.staging_path(run_dir, step)
    if backend.is_main_process():
        if staging.exists():  # left by a run killed during a save
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    backend.barrier()
    return staging


def commit_checkpoint_dir(run_dir: Path, step: int, staging: Path, backend: Backend, keep_last: int) -> Path:
    """After every rank has written its part: rank 0 renames the folder into place and moves latest.json."""
    backend.barrier()
    final = layout.checkpoint_path(run_dir, step, folder=True)
    if backend.is_main_process():
        checkpoint.commit_checkpoint_dir(staging, final, keep_last=keep_last)
    backend.barrier()
    return final


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The loop's part of a checkpoint: the single file itself, or trainer_state.pt inside a folder."""
    return load_checkpoint(path / layout.TRAINER_STATE_FILE if path.is_dir() else path)


def portable_student_state(path: Path) -> dict[str, Any] | None:
    """The name-keyed student + optimizer state of a checkpoint, when it has one (see run_dir.PORTABLE_STUDENT_FILE)."""
    if path.is_file():
        state = load_checkpoint(path)
        return {key: state[key] for key in ("student", "optimizer", "grad_scaler") if key in state}
    portable = path / layout.PORTABLE_STUDENT_FILE
    return load_checkpoint(portable) if portable.is_file() else None


def named_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with parameter names instead of positions, so it loads into another wrapping or
    process count: {"state": {name: {...}}, "param_groups": [{..., "params": [names]}]}."""
    names = {id(p): name for name, p in module.named_parameters()}
    positional = optimizer.state_dict()
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[index]: value for index, value in positional["state"].items()},
        "param_groups": [
            {**group, "params": [order[index] for index in group["params"]]} for group in positional["param_groups"]
        ],
    }


def load_named_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, Any], source: Path
) -> None:
    """Inverse of `named_optimizer_state`; names must match the optimizer's parameters exactly."""
    names = {id(p): name for name, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    position = {name: index for index, name in enumerate(order)}
    saved = [name for group in named["param_groups"] for name in group["params"]]
    if sorted(saved) != sorted(order):
        missing, unexpected = sorted(set(order) - set(saved)), sorted(set(saved) - set(order))
        raise CheckpointError(
            f"{source}: optimizer state does not match the student (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); was it written for another model?"
        )
    optimizer.load_state_dict(
        {
            "state": {position[name]: value for name, value in named["state"].items()},
            "param_groups": [
                {**group, "params": [position[name] for name in group["params"]]} for group in named["param_groups"]
            ],
        }
    )
