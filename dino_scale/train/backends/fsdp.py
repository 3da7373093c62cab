"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded over processes.

Each transformer block (or ResNet stage) of the backbone is one FSDP unit, the head another, and the root holds the
rest (patch embedding, tokens, final norm). A unit's parameters are all-gathered just before it runs and freed after;
its gradients are reduce-scattered after its backward. Between steps every parameter is a dim-0 `DTensor` shard in
fp32, which is what the optimizer updates and what `student_weight_groups` gathers, one unit at a time, for the EMA.
Per-parameter clipping (official DINO) takes each gradient's norm from its shards' squared norms, all parameters in
one all-reduce, and scales each rank's shards in place; the frozen last layer's shards lose their gradients.

Checkpoints are folders: ``dcp/`` (torch.distributed.checkpoint, one file per rank plus metadata; DCP reshards on
load, so a run may resume on another number of processes) beside ``trainer_state.pt``. Single-file checkpoints of the
local / ddp backends, and folders with ``student_full.pt``, load too (full, name-keyed state, sharded on the fly).
DCP's own reader unpickles its metadata with plain pickle and its planner the non-tensor values with
weights_only=False; ours (SafeFileSystemReader, WeightsOnlyLoadPlanner) unpickle nothing but plain values.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import pathlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.futures import Future

from dino_scale import run_dir as layout
from dino_scale.config import BatchPlan, TrainConfig
from dino_scale.devices import resolve_device
from dino_scale.errors import CheckpointError, Unavailable, WriteFailed
from dino_scale.io import write_failure
from dino_scale.train.backends.base import (
    Backend,
    StepResult,
    apply_if_finite,
    check_portable_state,
    clip_each_,
    commit_checkpoint_dir,
    drop_gradients,
    init_process_group,
    launch_environment,
    portable_student_state,
    read_trainer_state,
    require_launcher,
    settle_writes,
    split_single_file,
    stage_checkpoint_dir,
    sync_batch_norm,
)
from dino_scale.train.checkpoint import IncompatibleCheckpoint, one_line
from dino_scale.train.optim import (
    LAST_LAYER_PREFIX,
    create_optimizer,
    kernel_kept,
    last_layer_parameters,
    set_hyperparameters,
)

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


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a dim-0 sharded DTensor (a view: scaling it in place scales the DTensor's part). Anything
    else (a replicated gradient would be counted once per rank by the sum over the mesh) is refused."""
    placements = tensor.placements if isinstance(tensor, DTensor) else "a plain tensor"
    if placements != (Shard(0),):
        raise RuntimeError(f"fsdp: expected gradients sharded on dim 0 over a 1-D mesh, got {placements}")
    return tensor.to_local()


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
        self._mesh: DeviceMesh | None = None

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
        mesh = self._mesh = init_device_mesh(self.device.type, (self.world_size,))
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
        self.optimizer = create_optimizer(student, self.cfg.optim, self.device)  # after sharding: the DTensor shards
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

    def optimizer_step(
        self, lr: float, weight_decay: float, freeze_last_layer: bool, flags: dict[str, torch.Tensor]
    ) -> StepResult:
        assert self.optimizer is not None
        set_hyperparameters(self.optimizer, lr, weight_decay, freeze_last_layer)
        parameters = [p for p in self.student.parameters() if p.grad is not None]
        if self.cfg.optim.clip_mode == "per_param":
            # Each gradient is a dim-0 DTensor shard: the squared norms of this rank's shards, summed over the mesh
            # in one all-reduce, are those of the whole gradients; each rank then scales its own shards.
            group = self._mesh.get_group() if self._mesh is not None else None
            grad_norm = clip_each_(
                [_local(p.grad) for p in parameters],
                self.cfg.clip_grad,
                self.device,
                reduce=lambda squared: dist.all_reduce(squared, group=group),
            )
        else:
            max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else float("inf")
            # On DTensor gradients the norm is global: local shard norms combined over the mesh.
            grad_norm = _full(torch.nn.utils.clip_grad_norm_(parameters, max_norm)).detach()
        if freeze_last_layer:
            drop_gradients(last_layer_parameters(self.student))  # the shards' gradients, on every rank
        result = apply_if_finite(self, self.optimizer, grad_norm, flags, self.optimizer.step)
        self.optimizer.zero_grad(set_to_none=True)
        return result

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
        error: BaseException | None = None
        try:  # every rank writes its shards, rank 0 the metadata; DCP raises the same CheckpointException on all
            dcp.save(sharded, checkpoint_id=staging / DCP_SUBDIR)
        except (Exception, CheckpointException) as caught:  # CheckpointException is a BaseException
            error = _write_error(staging / DCP_SUBDIR, caught, self._checkpoint_bytes())
        # Any rank failed: the staging folder goes, every rank raises.
        settle_writes(self, staging, error, {layout.TRAINER_STATE_FILE: state})
        return commit_checkpoint_dir(run_dir, step, staging, self, keep_last)

    def _checkpoint_bytes(self) -> int:
        """About what a checkpoint takes on disk (for a full disk's message): weights, Adam's two moments, teacher."""
        return 4 * 4 * sum(p.numel() for p in self.student.parameters())

    def load(self, path: Path) -> dict[str, Any]:
        assert self.optimizer is not None
        path = Path(path)
        state = read_trainer_state(path)
        if (path / DCP_SUBDIR).is_dir():
            self._load_sharded(path)
        else:
            self._load_full(path, state)
        return state

    def _load_sharded(self, path: Path) -> None:
        """DCP: each rank reads the slices its shards need, whatever process count wrote them. Nothing is unpickled
        beyond plain values: the metadata through an allowlist of DCP's own classes, the tensors and the
        optimizer's hyperparameters with torch's weights-only unpickler (see SafeFileSystemReader)."""
        assert self.optimizer is not None
        # The templates tell DCP which slices to read; they are overwritten in place.
        sharded = {
            "model": get_model_state_dict(self.student),
            "optimizer": get_optimizer_state_dict(self.student, self.optimizer),
        }
        reader = SafeFileSystemReader(path / DCP_SUBDIR)
        metadata = reader.read_metadata()  # every rank: refused or unreadable metadata stops all with one clear line
        saved = metadata.state_dict_metadata
        fresh = [
            name
            for name in sharded["optimizer"]["state"]
            if name.startswith(LAST_LAYER_PREFIX) and not any(k.startswith(f"optimizer.state.{name}.") for k in saved)
        ]
        for name in fresh:  # saved while frozen: nothing to read for it
            del sharded["optimizer"]["state"][name]
        try:
            dcp.load(sharded, storage_reader=reader, planner=WeightsOnlyLoadPlanner(reader))
        except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
            raise CheckpointError(f"{path}: cannot load the FSDP checkpoint: {one_line(error)}") from error
        set_model_state_dict(self.student, sharded["model"])
        options = StateDictOptions(strict=not fresh)
        with kernel_kept(self.optimizer):
            set_optimizer_state_dict(self.student, self.optimizer, sharded["optimizer"], options=options)
        self._forget_state(fresh)

    def _forget_state(self, names: list[str]) -> None:
        """Leave these parameters without optimizer state, as a fresh optimizer: the head's last layer in a
        checkpoint saved while it was frozen (official DINO's optimizer has not seen it then; torch's state-dict
        loader would otherwise leave the placeholder state of its template, a step already counted)."""
        assert self.optimizer is not None
        parameters = dict(self.student.named_parameters())
        for name in names:
            self.optimizer.state.pop(parameters[name], None)

    def _load_full(self, path: Path, state: dict[str, Any]) -> None:
        """A name-keyed full student + optimizer state (local / ddp file, or a folder with student_full.pt)."""
        assert self.optimizer is not None
        portable = split_single_file(state) if path.is_file() else portable_student_state(path)
        if portable is None:
            writer = str(state.get("backend", "unknown"))
            if writer == "fsdp":
                raise CheckpointError(f"{path} has no {DCP_SUBDIR}/ folder, which backend=fsdp writes (damaged?)")
            raise IncompatibleCheckpoint(
                f"{path} is a checkpoint backend=fsdp cannot read (no {DCP_SUBDIR}/ folder, no "
                f"{layout.PORTABLE_STUDENT_FILE} nor a single-file student state); resume it with "
                f"backend={writer}, which wrote it"
            )
        check_portable_state(self.student, portable, path)  # before anything is loaded
        # Every rank reads the file (it must be visible to all of them anyway) and keeps only its own slices.
        options = StateDictOptions(full_state_dict=True, strict=True)
        missing = [
            name
            for name, p in self.student.named_parameters()
            if p.requires_grad and name not in portable["optimizer"]["state"]
        ]
        fresh = missing if all(name.startswith(LAST_LAYER_PREFIX) for name in missing) else []  # saved while frozen
        try:
            set_model_state_dict(self.student, portable["student"], options=options)
            optimizer_options = dataclasses.replace(options, strict=not fresh)
            with kernel_kept(self.optimizer):
                set_optimizer_state_dict(self.student, self.optimizer, portable["optimizer"], options=optimizer_options)
        except (RuntimeError, KeyError, ValueError) as error:
            raise CheckpointError(
                f"{path}: its student / optimizer state does not fit this model and optimizer: {one_line(error)}"
            ) from error
        self._forget_state(fresh)
        if portable.get("grad_scaler"):
            log.warning("%s: ignoring its fp16 loss-scaler state (backend=fsdp trains in bf16 or fp32)", path)


# --- reading DCP checkpoints without unpickling code -------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` (written with plain pickle, protocol 4, which torch's weights-only unpickler does not
    read) allowing only the classes DCP puts there: its metadata dataclasses and enum, torch.Size, dtypes and layouts,
    and paths. They are plain values: their constructors and `__setstate__` only store what they are given."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _metadata_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return allowed[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in DCP metadata")


@functools.cache
def _metadata_globals() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint import metadata

    classes = (
        metadata.Metadata,
        metadata.TensorStorageMetadata,
        metadata.BytesStorageMetadata,
        metadata.ChunkStorageMetadata,
        metadata.TensorProperties,
        metadata.StorageMeta,
        metadata.MetadataIndex,
        metadata._MEM_FORMAT_ENCODING,
        _StorageInfo,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
    )
    allowed: dict[tuple[str, str], Any] = {(c.__module__, c.__qualname__): c for c in classes}
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout)):
            allowed[("torch", name)] = value
    return allowed


def _plain_file_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader, except that nothing it reads can run code: the metadata is unpickled through an
    allowlist (torch's own reader uses plain pickle), its storage entries may only name files in the folder, and a
    file that fails is named in the error."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError as error:
            raise CheckpointError(f"{path} is missing") from error
        except Exception as error:
            raise CheckpointError(f"refusing to read {path}: {one_line(error)}") from error
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise CheckpointError(f"{path} does not hold DCP checkpoint metadata")
        for info in metadata.storage_data.values():
            if not isinstance(info, _StorageInfo) or not _plain_file_name(info.relative_path):
                raise CheckpointError(f"{path} names a data file outside its folder or a malformed entry")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, list[Any]] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in by_file.items():  # one file at a time, so that an error can name it
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except CheckpointError:
                raise
            except Exception as error:
                raise CheckpointError(f"cannot read {Path(self.path) / name}: {one_line(error)}") from error
        done: Future[None] = Future()
        done.set_result(None)
        return done


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor values (the optimizer's hyperparameters) are unpickled with
    torch's weights-only unpickler; the default planner calls torch.load(weights_only=False) on them."""

    def __init__(self, reader: SafeFileSystemReader) -> None:
        super().__init__()
        self.reader = reader

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as error:
            info = self.reader.storage_data.get(read_item.storage_index)
            where = Path(self.reader.path) / info.relative_path if info is not None else Path(self.reader.path)
            raise CheckpointError(
                f"refusing to unpickle {read_item.dest_index.fqn} in {where}: {one_line(error)}"
            ) from error
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _write_error(path: Path, error: BaseException, needed: int) -> BaseException:
    """A failed dcp.save as one line: WriteFailed when an OSError (a full disk) is behind it on any rank."""
    pending = [error]
    while pending:
        current = pending.pop()
        if isinstance(current, WriteFailed):
            return current
        if isinstance(current, OSError):
            return write_failure(path, current, needed)
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending.extend(inner for inner, _ in failures.values() if isinstance(inner, BaseException))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return CheckpointError(f"cannot write {path}: {one_line(error)}")
