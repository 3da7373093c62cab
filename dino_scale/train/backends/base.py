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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dino_scale import run_dir as layout
from dino_scale.config import BatchPlan, TrainConfig
from dino_scale.errors import CheckpointError, Unavailable, WriteFailed
from dino_scale.io import atomic_torch_save, load_checkpoint, write_failure
from dino_scale.train import checkpoint
from dino_scale.train.optim import kernel_kept

log = logging.getLogger("dino_scale")


STOP_REQUESTED = "stop_requested"
"""The name of the preemption flag among an optimizer step's flags (see Backend.reduce_flags)."""


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did, as the device knows it: nothing here is read back to the host until the train
    state settles its pending steps at a log or checkpoint step (TrainState.settle), so a step costs no host sync.

    `flags`: one value per name in `flag_names`, the maximum over ranks, non-zero where that quantity went NaN / inf
    in this step (STOP_REQUESTED, always last when present: a preemption signal reached some rank). `applied`: False
    (a 0-dim bool tensor, or a plain bool where the backend had to read it at once) where the update was dropped,
    leaving the weights and optimizer state as they were. `expected`: names whose non-finite values are no error
    (fp16 loss scaling skips such steps and lowers the scale). `failure`: what went wrong on the host, reported with
    the flags (an update that raised an overflow in the optimizer's float arithmetic); `recoverable` False: the
    weights may be touched, the run must stop."""

    grad_norm: torch.Tensor
    flag_names: tuple[str, ...] = ()
    flags: torch.Tensor | None = None
    applied: torch.Tensor | bool = True
    expected: tuple[str, ...] = ()
    recoverable: bool = True
    failure: str | None = None

    def verdict(self, values: Sequence[float] | None = None) -> tuple[list[str], bool]:
        """(the quantities that went non-finite, whether a stop was requested) from the flags' `values` (read by the
        caller, many steps at once) or, without them, read now."""
        if values is None:
            values = [] if self.flags is None else self.flags.tolist()
        raised = [name for name, value in zip(self.flag_names, values, strict=True) if value]
        bad = [name for name in raised if name != STOP_REQUESTED and name not in self.expected]
        if self.failure is not None:
            bad.append(self.failure)
        return bad, STOP_REQUESTED in raised


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
    stop_requested: bool = False
    """Whether a preemption signal reached any rank by the last settled optimizer step (set by TrainState.settle)."""

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
    def optimizer_step(
        self, lr: float, weight_decay: float, freeze_last_layer: bool, flags: dict[str, torch.Tensor]
    ) -> StepResult:
        """One optimizer step with the scheduled lr / wd; gradients are zeroed afterwards.

        As official DINO: the gradients (unscaled, with fp16) are clipped at `gradient_clipping` (0: off) each on its
        own (`optim.clip_mode` "per_param"; "global": their norm together), then, while `freeze_last_layer`, the
        head's last layer's gradients are dropped so that the optimizer skips it (no update, no weight decay, its
        moments and step count untouched). Where DeepSpeed keeps the gradients flattened (ZeRO 1-3, its own bf16 /
        fp16 modes) the last layer's lr is 0 instead and its optimizer state is reset to a fresh one after the step,
        which gives the same numbers. `StepResult.grad_norm` is the L2 norm of all gradients together before
        clipping (last layer included), the same on every rank.

        `flags` (name -> 0-dim bool tensor, True where that quantity went NaN / inf in this step's micro-batches)
        are reduced over ranks together with the gradient norm before the update (one collective, `reduce_flags`):
        a step that is non-finite on any rank updates nothing on every rank (`StepResult.applied` False). Where the
        optimizer can skip on the device, nothing is read back (see `apply_if_finite`)."""

    @property
    def skips_non_finite_steps(self) -> bool:
        """fp16 loss scaling: a step whose scaled gradients overflow is skipped (and the scale lowered) by the loss
        scaler (torch's GradScaler, DeepSpeed's), so a non-finite gradient norm is expected there, not an error."""
        return self.cfg.fp16

    @property
    def can_skip_steps(self) -> bool:
        """Whether a non-finite step can be dropped without touching the weights or the optimizer state (the
        `skip_nonfinite_steps` budget): every backend that checks before it updates."""
        return True

    def reduce_flags(self, flags: dict[str, torch.Tensor]) -> tuple[tuple[str, ...], torch.Tensor]:
        """(names, values): the flags (name -> 0-dim bool tensor) stacked into one float vector on the device, the
        maximum over processes (one collective, no host read), STOP_REQUESTED moved last. Every rank gets the same
        vector, so all of them drop the same steps."""
        names = tuple(sorted(flags, key=lambda name: name == STOP_REQUESTED))
        # non_blocking: a host flag (the preemption request) must not wait for the device's queue on its way there.
        vector = torch.stack([flags[name].to(self.device, torch.float32, non_blocking=True) for name in names])
        if self.distributed:
            dist.all_reduce(vector, op=dist.ReduceOp.MAX)
        return names, vector

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
        rank, written once), its manifest last, then move latest.json to it (dino_scale.train.checkpoint). Every
        rank calls this. A write that fails on any rank (a full disk) raises WriteFailed on every rank, leaving the
        previous checkpoint the latest and nothing of this one. Returns the checkpoint's path."""

    @abstractmethod
    def load(self, path: Path) -> dict[str, Any]:
        """Restore the student and its optimizer from a checkpoint of any backend this one can read (already
        verified against its manifest by the caller); returns the rest of its state. Every rank calls this. Nothing
        is unpickled beyond plain values; a checkpoint that does not fit raises CheckpointError before the student is
        touched where the backend can tell, IncompatibleCheckpoint where this configuration cannot resume it at all
        (no older checkpoint of the run would do either)."""

    # --- collectives (no-ops on one process) ------------------------------------------------------------------

    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

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
        """The end of a run: every rank is done (a barrier). NCCL's group is destroyed, as torch asks; gloo's (CPU) is
        left to the process's exit, because destroying it raced with its threads at exit ("terminate called without
        an active exception", a rank aborting after the run was complete: seen on the preempted path in 2 of 16 tries
        and once in a CI run of the two-process FSDP test). Not destroying it made that rarer, not impossible, so
        `python -m dino_scale.train` also ends a gloo rank without the interpreter's teardown
        (dino_scale.train.command.leave_gloo_job)."""
        if self.distributed:
            dist.barrier()
            if dist.get_backend() != "gloo":
                dist.destroy_process_group()


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step takes a `found_inf` flag (torch's fused Adam / AdamW / SGD, the flag GradScaler
    uses): its kernel then skips a flagged update on the device, weights, moments and step count untouched."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def apply_if_finite(
    backend: Backend,
    optimizer: torch.optim.Optimizer,
    grad_norm: torch.Tensor,
    flags: dict[str, torch.Tensor],
    step: Callable[[], Any],
) -> StepResult:
    """The optimizer's update, applied only when `flags` and the gradient norm are finite on every rank.

    With an optimizer that skips on the device (`skips_on_device`), the verdict never leaves the device: it goes into
    the fused kernel as `found_inf`, and `StepResult.applied` is a device flag for the center and teacher updates. Any
    other optimizer (LARS, torch's for-loop / foreach kernels) needs it on the host first: one read per step, then
    `step` (the backend's update, e.g. through its GradScaler). An update that raises an overflow (an lr too large
    for the optimizer's float arithmetic) is reported as a failure that may have touched the optimizer state."""
    names, vector = backend.reduce_flags({**flags, "gradient_norm": ~torch.isfinite(grad_norm)})
    expected = ("gradient_norm",) if backend.skips_non_finite_steps else ()
    quantities = vector[: len(names) - (STOP_REQUESTED in names)]  # a view: no index tensor to copy to the device
    try:
        if skips_on_device(optimizer):
            finite = quantities.amax() == 0
            optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
            optimizer.grad_scale = None  # type: ignore[attr-defined]  # gradients are already unscaled
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
            return StepResult(grad_norm, names, vector, applied=finite, expected=expected)
        values = vector.tolist()  # the one host read of a step with such an optimizer
        if any(values[: len(quantities)]):
            return StepResult(grad_norm, names, torch.tensor(values), applied=False, expected=expected)
        step()
    except RuntimeError as error:
        if "overflow" not in str(error).lower():
            raise
        return StepResult(
            grad_norm, names, vector, applied=False, recoverable=False, failure=f"optimizer update ({error})"
        )
    return StepResult(grad_norm, names, torch.tensor(values), expected=expected)


# --- gradient clipping shared by the backends ---------------------------------------------------------------------

CLIP_EPSILON = 1e-6
"""Official DINO's clip coefficient is clip / (norm + 1e-6), applied where it is below 1."""


def squared_norms(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Each tensor's squared L2 norm, computed in fp32, as one fp32 vector (an empty tensor gives 0)."""
    if not tensors:
        return torch.zeros(0, device=device)
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32)).pow(2)


def clip_coefficients(squared: torch.Tensor, clip: float, scale: float = 1.0) -> torch.Tensor:
    """Official DINO's per-parameter clipping factors: min(1, clip / (norm + 1e-6)) for each parameter, where
    `squared` holds each parameter's squared gradient norm over the whole parameter (summed over ranks for shards)
    and `scale` the loss scale those gradients still carry (fp16), so that `clip` applies to the true gradient.
    Exactly 1 where the norm is within the clip (the gradient is left as it is, a zero gradient stays zero)."""
    return torch.clamp(clip / (squared.sqrt() / scale + CLIP_EPSILON), max=1.0)


def clip_each_(
    grads: Sequence[torch.Tensor],
    clip: float,
    device: torch.device,
    reduce: Callable[[torch.Tensor], Any] | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Clip each gradient on its own at `clip` (0: off), in place, as official DINO's `clip_gradients`; returns the
    L2 norm of all of them together before clipping (true units). `grads` may be this rank's pieces of each
    parameter's gradient (shards, ZeRO partitions), in the same parameter order on every rank: `reduce` then sums the
    vector of their squared norms over the ranks, in place (ONE collective for all parameters). No host sync."""
    squared = squared_norms(grads, device)
    if reduce is not None:
        reduce(squared)
    if clip > 0:
        for grad, coefficient in zip(grads, clip_coefficients(squared, clip, scale).unbind(), strict=True):
            grad.mul_(coefficient)
    return squared.sum().sqrt() / scale


def clip_module_gradients(module: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """Clip the whole (unsharded, already averaged over ranks) gradients of `module` at `cfg.clip_grad` as
    `cfg.optim.clip_mode` says; returns the norm of all of them together before clipping."""
    parameters = [p for p in module.parameters() if p.grad is not None]
    if cfg.optim.clip_mode == "per_param":  # under DDP each gradient is already the global one: nothing to reduce
        return clip_each_([p.grad for p in parameters], cfg.clip_grad, device)
    max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm).detach()


def drop_gradients(parameters: Sequence[torch.Tensor]) -> None:
    """Official DINO's `cancel_gradients_last_layer`: without a gradient, a parameter is skipped by the optimizer (no
    update, no weight decay, its moments and step count left as they are)."""
    for parameter in parameters:
        parameter.grad = None


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


def agree(backend: Backend, error: BaseException | None, cleanup: Callable[[], None] | None = None) -> None:
    """Fail on every rank together: each rank says whether it failed (one collective); when any did, the main
    process runs `cleanup` and every rank raises (its own error, or the first rank's as WriteFailed or
    CheckpointError). So no rank is left waiting in a collective for one that gave up."""
    mine = None if error is None else (isinstance(error, WriteFailed), checkpoint.one_line(error))
    failures = [failure for failure in backend.gather_objects(mine) if failure is not None]
    if not failures:
        return
    if backend.is_main_process() and cleanup is not None:
        cleanup()
    if error is not None:
        raise error
    write, message = failures[0]
    raise WriteFailed(message) if write else CheckpointError(message)


def stage_checkpoint_dir(run_dir: Path, step: int, backend: Backend) -> Path:
    """A fresh, empty staging folder for a folder checkpoint; renamed into place by `commit_checkpoint_dir`."""
    staging = layout.staging_path(run_dir, step)
    error = None
    if backend.is_main_process():
        try:
            if staging.exists():  # left by a run killed during a save
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        except OSError as caught:
            error = write_failure(staging, caught)
    agree(backend, error, cleanup=lambda: shutil.rmtree(staging, ignore_errors=True))
    return staging


def settle_writes(
    backend: Backend, staging: Path, error: BaseException | None, main_files: dict[str, Any] | None = None
) -> None:
    """After every rank wrote its files into `staging`: the main process adds `main_files` (file name -> state, saved
    with torch; skipped once a rank failed), then, when any rank failed (a full disk: WriteFailed), the staging folder
    is removed and every rank raises; the previous checkpoint and latest.json stay as they were."""
    if backend.is_main_process() and error is None:
        try:
            for name, state in (main_files or {}).items():
                atomic_torch_save(state, staging / name)
        except Exception as caught:  # WriteFailed on a full disk
            error = caught
    agree(backend, error, cleanup=lambda: shutil.rmtree(staging, ignore_errors=True))


def commit_checkpoint_dir(run_dir: Path, step: int, staging: Path, backend: Backend, keep_last: int) -> Path:
    """After every rank has written its part (`settle_writes`): each rank fsyncs and hashes its share of the files,
    then rank 0 writes the manifest, renames the folder into place and moves latest.json."""
    final = layout.checkpoint_path(run_dir, step, folder=True)
    error: BaseException | None = None
    digests: dict[str, Any] = {}
    try:
        names = layout.checkpoint_files(staging)
        digests = checkpoint.digest_files(staging, names[backend.rank :: backend.world_size], fsync=True)
    except OSError as caught:
        error = write_failure(staging, caught)
    shares = backend.gather_objects(digests)
    settle_writes(backend, staging, error)
    if backend.is_main_process():
        merged = {name: entry for share in shares for name, entry in share.items()}
        try:
            checkpoint.commit_checkpoint_dir(staging, final, keep_last=keep_last, digests=merged)
        except Exception as caught:
            error = caught
    agree(backend, error)
    return final


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The loop's part of a checkpoint: the single file itself, or trainer_state.pt inside a folder."""
    return load_checkpoint(path / layout.TRAINER_STATE_FILE if path.is_dir() else path)


def split_single_file(state: dict[str, Any]) -> dict[str, Any]:
    """The student part (student, optimizer, grad scaler) of a single-file checkpoint's contents."""
    return {key: state[key] for key in ("student", "optimizer", "grad_scaler") if key in state}


def portable_student_state(path: Path) -> dict[str, Any] | None:
    """The name-keyed student + optimizer state of a checkpoint, when it has one (see run_dir.PORTABLE_STUDENT_FILE)."""
    if path.is_file():
        return split_single_file(load_checkpoint(path))
    portable = path / layout.PORTABLE_STUDENT_FILE
    return load_checkpoint(portable) if portable.is_file() else None


def missing_portable_state(path: Path, state: dict[str, Any]) -> CheckpointError:
    """The error for a folder checkpoint without the name-keyed student: damaged where its writer always writes one
    (DeepSpeed ZeRO 0-2), else a checkpoint only the backend and process count that wrote it can resume."""
    writer = str(state.get("backend", "unknown"))
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    stage = ((config.get("deepspeed") or {}).get("zero_optimization") or {}).get("stage", 0)
    if writer == "deepspeed" and isinstance(stage, int) and stage <= 2:
        return CheckpointError(f"{path} has no {layout.PORTABLE_STUDENT_FILE}, which ZeRO-{stage} writes (damaged?)")
    return checkpoint.IncompatibleCheckpoint(
        f"{path} holds a sharded checkpoint of backend={writer} without {layout.PORTABLE_STUDENT_FILE}: resume it "
        "with the backend and number of processes that wrote it (see config.json in the run directory)"
    )


def check_portable_state(module: nn.Module, portable: dict[str, Any], source: Path) -> None:
    """Refuse (CheckpointError naming `source`) a name-keyed student + optimizer state that does not fit `module`,
    before any of it is loaded: missing parts, other parameter names or shapes, a malformed optimizer state."""
    student, optimizer = portable.get("student"), portable.get("optimizer")
    if not isinstance(student, dict) or not isinstance(optimizer, dict):
        missing = "student" if not isinstance(student, dict) else "optimizer"
        raise CheckpointError(f"{source} has no {missing} state of ours (a foreign checkpoint?)")
    expected = module.state_dict()
    if set(student) != set(expected):
        missing, unexpected = sorted(set(expected) - set(student)), sorted(set(student) - set(expected))
        raise CheckpointError(
            f"{source}: its student does not match this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in expected.items():
        saved = student[name]
        if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != tuple(tensor.shape):
            shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise CheckpointError(f"{source}: its student's {name} is {shape}, this model's is {tuple(tensor.shape)}")
    groups, state = optimizer.get("param_groups"), optimizer.get("state")
    well_formed = (
        isinstance(groups, list)
        and isinstance(state, dict)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
        and all(isinstance(name, str) for g in groups for name in g["params"])
    )
    if not well_formed:
        raise CheckpointError(f"{source}: its optimizer state is not keyed by parameter name (a foreign checkpoint?)")


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
    with kernel_kept(optimizer):
        optimizer.load_state_dict(
            {
                "state": {position[name]: value for name, value in named["state"].items()},
                "param_groups": [
                    {**group, "params": [position[name] for name in group["params"]]} for group in named["param_groups"]
                ],
            }
        )
