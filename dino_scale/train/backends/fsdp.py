"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded over processes.

Each transformer block (or ResNet stage) of the backbone is one FSDP unit, the head another, and the root holds the
rest (patch embedding, tokens, final norm). A unit's parameters are all-gathered just before it runs and freed after;
its gradients are reduce-scattered after its backward. Between steps every parameter is a dim-0 `DTensor` shard in
fp32, which is what the optimizer updates and what `student_weight_groups` gathers, one unit at a time, for the EMA.

Checkpoints are folders: ``dcp/`` (torch.distributed.checkpoint, one file per rank plus metadata; DCP reshards on
load, so a run may resume on another number of processes) beside ``trainer_state.pt``. Single-file checkpoints of the
local / ddp backends, and folders with ``student_full.pt``, load too (full, name-keyed state, sharded on the fly).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from dino_scale import run_dir as layout
from dino_scale.config import BatchPlan, TrainConfig
from dino_scale.devices import resolve_device
from dino_scale.errors import CheckpointError, Unavailable
from dino_scale.io import atomic_torch_save
from dino_scale.train.backends.base import (
    Backend,
    commit_checkpoint_dir,
    init_process_group,
    launch_environment,
    portable_student_state,
    read_trainer_state,
    require_launcher,
    stage_checkpoint_dir,
    sync_batch_norm,
)
from dino_scale.train.optim import create_optimizer, set_hyperparameters

log = logging.getLogger("dino_scale")

DCP_SUBDIR = "dcp"
"""The folder inside a checkpoint that holds the DCP shards and their metadata."""

# Top-level stages of CNN backbones, in forward order: timm ResNets (layer1..4) and ConvNeXt / others (stages.N).
_CNN_STAGE_ATTRIBUTES = ("layer1", "layer2", "layer3", "layer4")


def shard_units(student: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules that become FSDP units, as (name in `student`, module), bottom-up order not required (they
    are disjoint): each backbone block (ViT `blocks`, ResNet `layer1..4`, or `stages`), then the head. Whatever
    no unit covers stays with the root unit. A backbone without a known block structure is left to the root."""
    backbone = getattr(student, "backbone", None)
    candidates: list[nn.Module] = []
    if isinstance(backbone, nn.Module):
        blocks = getattr(backbone, "blocks", None)
        stages = getattr(backbone, "stages", None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0:
            candidates.extend(blocks)
        elif any(isinstance(getattr(backbone, attr, None), nn.Module) for attr in _CNN_STAGE_ATTRIBUTES):
            candidates.extend(getattr(backbone, attr) for attr in _CNN_STAGE_ATTRIBUTES if hasattr(backbone, attr))
        elif isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages) > 0:
            candidates.extend(stages)
        else:
            log.warning(
                "fsdp: %s has no blocks / layer1..4 / stages; its parameters are sharded as part of the root unit "
                "(correct, but the whole backbone is gathered at once)",
                type(backbone).__name__,
            )
    head = getattr(student, "head", None)
    if isinstance(head, nn.Module):
        candidates.append(head)
    names = {id(module): name for name, module in student.named_modules()}
    # Only modules that own parameters: FSDP units without parameters would just add hooks.
    return [(names[id(m)], m) for m in candidates if any(True for _ in m.parameters())]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank: all-gathers a DTensor shard, returns a plain tensor as is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class FSDPBackend(Backend):
    """FSDP2 with per-block units, optional bf16 parameters in compute (fp32 shards, fp32 gradient reduction)."""

    name = "fsdp"

    def __init__(self, cfg: TrainConfig, batch: BatchPlan) -> None:
        super().__init__(cfg, batch)
        if cfg.fp16:
            # A GradScaler would need its inf/NaN check all-reduced over the shards (every rank must skip the same
            # steps); torch's ShardedGradScaler is written for FSDP1. bf16 needs no loss scaling at all.
            raise Unavailable(
                "backend=fsdp does not support fp16 (loss scaling over sharded gradients); use bf16 instead "
                '(deepspeed.bf16 = {"enabled": true}, or deepspeed.torch_autocast with dtype bfloat16), or train '
                "fp16 with backend=ddp or backend=deepspeed"
            )
        env = launch_environment()
        require_launcher(self.name, env)
        self.device = resolve_device(cfg.device, env.local_rank)
        init_process_group(self.device)
        self.rank, self.world_size = env.rank, env.world_size
        self.optimizer: torch.optim.Optimizer | None = None
        self._groups: list[list[str]] = []

    @property
    def _module(self) -> FSDPModule:
        module = self.student
        assert isinstance(module, FSDPModule)
        return module

    # --- training ---------------------------------------------------------------------------------------------

    def prepare(self, student: nn.Module) -> nn.Module:
        """Shard the student in place (blocks, head, root) and create the optimizer over the shards."""
        student = student.to(self.device)
        student = sync_batch_norm(student, self.device)  # before sharding
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        options: dict[str, Any] = {"mesh": mesh}
        if self.cfg.autocast_dtype is not None:
            # Parameters are all-gathered already cast (half the traffic); the shards, the gradients' reduction
            # and the optimizer stay fp32, so the EMA reads fp32 weights.
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=getattr(torch, self.cfg.autocast_dtype), reduce_dtype=torch.float32
            )
        units = shard_units(student)
        for _, unit in units:
            fully_shard(unit, **options)
        fully_shard(student, **options)
        self._student = student
        self._groups = self._weight_groups(student, [name for name, _ in units])
        self.optimizer = create_optimizer(student, self.cfg.optim)  # after sharding: over the DTensor shards
        log.info(
            "fsdp: %d units + root on %d process(es), compute dtype %s",
            len(units),
            self.world_size,
            self.cfg.autocast_dtype or "float32",
        )
        return student

    @staticmethod
    def _weight_groups(student: nn.Module, unit_names: list[str]) -> list[list[str]]:
        """Parameter names grouped as the FSDP units hold them: one group per unit, then the root's own."""
        groups: dict[str, list[str]] = {unit: [] for unit in unit_names}
        rest: list[str] = []
        for name, _ in student.named_parameters():
            owner = next((unit for unit in unit_names if name.startswith(unit + ".")), None)
            (groups[owner] if owner is not None else rest).append(name)
        return [names for names in (*groups.values(), rest) if names]

    def backward(self, loss: torch.Tensor, sync_gradients: bool) -> None:
        # Off for all but the last micro-batch: gradients accumulate unsharded locally, one reduce-scatter per step.
        self._module.set_requires_gradient_sync(sync_gradients)
        loss.backward()

    def optimizer_step(self, lr: float, weight_decay: float, freeze_last_layer: bool) -> torch.Tensor:
        assert self.optimizer is not None
        set_hyperparameters(self.optimizer, lr, weight_decay, freeze_last_layer)
        parameters = [p for p in self.student.parameters() if p.grad is not None]
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else float("inf")
        # On DTensor gradients the norm is global: local shard norms combined over the mesh.
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _full(grad_norm).detach()

    @torch.no_grad()
    def student_weight_groups(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        # One unit gathered at a time (a collective per tensor, the same order on every rank); each group's full
        # tensors are dropped when the next group is requested.
        parameters = dict(self.student.named_parameters())
        for names in self._groups:
            yield [(name, _full(parameters[name].detach())) for name in names]

    # --- checkpoints ------------------------------------------------------------------------------------------

    def save(self, run_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
        assert self.optimizer is not None
        staging = stage_checkpoint_dir(run_dir, step, self)
        sharded = {
            "model": get_model_state_dict(self.student),
            "optimizer": get_optimizer_state_dict(self.student, self.optimizer),
        }
        dcp.save(sharded, checkpoint_id=staging / DCP_SUBDIR)  # every rank writes its shards; rank 0 the metadata
        if self.is_main_process():
            atomic_torch_save(state, staging / layout.TRAINER_STATE_FILE)
        return commit_checkpoint_dir(run_dir, step, staging, self, keep_last)

    def load(self, path: Path) -> dict[str, Any]:
        assert self.optimizer is not None
        path = Path(path)
        if (path / DCP_SUBDIR).is_dir():
            self._load_sharded(path)
        else:
            self._load_full(path)
        return read_trainer_state(path)

    def _load_sharded(self, path: Path) -> None:
        """DCP: each rank reads the slices its shards need, whatever process count wrote them."""
        assert self.optimizer is not None
        # The templates tell DCP which slices to read; they are overwritten in place.
        sharded = {
            "model": get_model_state_dict(self.student),
            "optimizer": get_optimizer_state_dict(self.student, self.optimizer),
        }
        # Trust note: DCP's FileSystemReader unpickles the `.metadata` file itself (plain pickle, in torch); tensor
        # data is read with torch.load(weights_only=True) or as raw bytes. Only point this at checkpoints you wrote.
        try:
            dcp.load(sharded, checkpoint_id=path / DCP_SUBDIR)
        except Exception as error:  # DCP raises CheckpointException / RuntimeError on missing or mismatched keys
            raise CheckpointError(f"{path}: cannot load the FSDP checkpoint: {error}") from error
        set_model_state_dict(self.student, sharded["model"])
        set_optimizer_state_dict(self.student, self.optimizer, sharded["optimizer"])

    def _load_full(self, path: Path) -> None:
        """A name-keyed full student + optimizer state (local / ddp file, or a folder with student_full.pt)."""
        assert self.optimizer is not None
        portable = portable_student_state(path) if path.exists() else None
        if portable is None or "student" not in portable or "optimizer" not in portable:
            raise CheckpointError(
                f"{path} is a checkpoint backend=fsdp cannot read (no {DCP_SUBDIR}/ folder, no "
                f"{layout.PORTABLE_STUDENT_FILE} nor a single-file student state); resume it with "
                f"backend={self._writer_of(path)}, which wrote it"
            )
        # Every rank reads the file (it must be visible to all of them anyway) and keeps only its own slices.
        options = StateDictOptions(full_state_dict=True, strict=True)
        try:
            set_model_state_dict(self.student, portable["student"], options=options)
            set_optimizer_state_dict(self.student, self.optimizer, portable["optimizer"], options=options)
        except (RuntimeError, KeyError, ValueError) as error:
            raise CheckpointError(
                f"{path}: its student / optimizer state does not fit this model and optimizer: {error}"
            ) from error
        if portable.get("grad_scaler"):
            log.warning("%s: ignoring its fp16 loss-scaler state (backend=fsdp trains in bf16 or fp32)", path)

    @staticmethod
    def _writer_of(path: Path) -> str:
        """The backend named in a checkpoint's trainer state, or a hint when it cannot be read."""
        try:
            return str(read_trainer_state(path).get("backend", "unknown"))
        except (OSError, CheckpointError):
            return "<unknown: no readable trainer_state.pt>"
