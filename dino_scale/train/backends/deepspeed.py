"""DeepSpeed: the student wrapped by `deepspeed.initialize` with the recipe's `deepspeed` block (ZeRO 0-3).

The teacher stays a plain replicated module beside the engine. Its EMA reads the student's fp32 weights one
block at a time: the parameters themselves under `torch_autocast` with ZeRO 0-2 (they are full fp32 replicas),
`GatheredParameters` per block under ZeRO-3, and DeepSpeed's fp32 master copies (`safe_get_full_fp32_param`)
when the block uses DeepSpeed's own bf16/fp16 modes, whose module weights are low precision.

Gradient clipping, as official DINO, is ours (DeepSpeed's global `gradient_clipping` is then 0 in the engine's
config): after the last backward and before the engine's step, each parameter's reduced gradient is clipped on its
own, from this rank's piece of it (ZeRO-0: the whole `.grad`; ZeRO-1/2: its fragments of the flat partitions;
ZeRO-3: its partition, through deepspeed.utils' local-gradient API) and one all-reduce of the squared norms of all
parameters. The frozen last layer: its gradients dropped on plain ZeRO-0 (as DDP); elsewhere lr 0, then its
optimizer state reset to a fresh one after each frozen step (`_reset_last_layer_state`), which gives the same numbers.

Checkpoints are DeepSpeed's sharded ones (`deepspeed/` in the checkpoint folder). For ZeRO 0-2 the folder also
holds the student's full weights and optimizer state keyed by parameter name (`student_full.pt`): that is what
lets a run resume on another number of processes, or on one process with the local backend. ZeRO-3 runs resume
on the same number of processes. DeepSpeed's files are read with torch's weights-only unpickler (its engine would
unpickle anything) and checked for other pickled classes on every rank before DeepSpeed reads any of them; a full
disk during DeepSpeed's own writes is recorded and raised on every rank after its save, not halfway through it.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dino_scale import run_dir as layout
from dino_scale.config import BatchPlan, TrainConfig
from dino_scale.devices import resolve_device
from dino_scale.errors import CheckpointError, ConfigError, Unavailable, WriteFailed
from dino_scale.io import write_failure
from dino_scale.train.backends.base import (
    Backend,
    StepResult,
    check_portable_state,
    clip_coefficients,
    clip_each_,
    clip_module_gradients,
    commit_checkpoint_dir,
    drop_gradients,
    launch_environment,
    load_named_optimizer_state,
    missing_portable_state,
    named_optimizer_state,
    portable_student_state,
    read_trainer_state,
    require_launcher,
    settle_writes,
    split_single_file,
    squared_norms,
    stage_checkpoint_dir,
    sync_batch_norm,
    weight_blocks,
)
from dino_scale.train.checkpoint import IncompatibleCheckpoint, one_line
from dino_scale.train.optim import (
    LAST_LAYER_PREFIX,
    create_optimizer,
    last_layer_parameters,
    set_hyperparameters,
)

log = logging.getLogger("dino_scale")

NATIVE_SUBDIR = "deepspeed"
# Keys of the deepspeed block that would take the optimizer or its schedule away from our loop.
_REFUSED_KEYS = ("optimizer", "scheduler")


def _import_deepspeed(device: torch.device) -> Any:
    if device.type == "cpu":
        # DeepSpeed picks its accelerator at import; without this it may pick CUDA on a GPU host run with device=cpu.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed 0.19 calls collectives that torch 2.14 deprecates, one FutureWarning per call site and rank.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    try:
        import deepspeed
    except ImportError as error:
        raise Unavailable(
            f"backend=deepspeed needs the deepspeed package ({error}); install it with "
            "`pip install 'dino-scale[deepspeed]'`, or use backend=fsdp / ddp"
        ) from None
    return deepspeed


class DeepSpeedBackend(Backend):
    """The engine applies `torch_autocast` to the student itself; the inherited forward_context gives the teacher,
    which runs outside the engine, the same precision."""

    name = "deepspeed"

    def __init__(self, cfg: TrainConfig, batch: BatchPlan) -> None:
        super().__init__(cfg, batch)
        env = launch_environment()
        require_launcher(self.name, env)
        refused = [key for key in _REFUSED_KEYS if key in cfg.deepspeed]
        if refused:
            raise ConfigError(
                f"deepspeed.{refused[0]}: remove it from the recipe; the optimizer and its lr / weight-decay "
                "schedules come from the `optim` section and are applied by dino-scale every step"
            )
        offload = ((cfg.deepspeed.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
        # An optimizer state swapped out to NVMe cannot be reset in place: the frozen last layer keeps lr 0 only.
        self._resets_last_layer = offload != "nvme"
        if self.clips_per_parameter and offload not in (None, "none"):
            raise ConfigError(
                f"optim.clip_mode=per_param cannot clip the gradients DeepSpeed offloads "
                f"(deepspeed.zero_optimization.offload_optimizer, device {offload}); set optim.clip_mode=global"
            )
        self.device = resolve_device(cfg.device, env.local_rank)
        self.deepspeed = _import_deepspeed(self.device)
        self.deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo", verbose=False)
        self.rank, self.world_size = env.rank, env.world_size
        self.engine: Any = None
        self._group_names: list[list[str]] = []
        self._optimizer: torch.optim.Optimizer | None = None  # ours, which DeepSpeed may wrap
        self._gradients = ""  # where this rank's gradients are at the step: see _gradient_pieces

    @property
    def clips_per_parameter(self) -> bool:
        return self.cfg.optim.clip_mode == "per_param" and self.cfg.clip_grad > 0

    @property
    def _plain_zero0(self) -> bool:
        """ZeRO-0 with fp32 weights (fp32 or torch_autocast): the engine steps our optimizer itself, over whole
        gradients in `.grad`, so this backend clips and freezes exactly as DDP does (DeepSpeed's clipping off)."""
        return self.zero_stage == 0 and not self._low_precision_weights()

    def engine_config(self) -> dict[str, Any]:
        """The recipe's block with the batch sizes resolved for this world size and our optimizer allowed. DeepSpeed's
        own `gradient_clipping` (global) is 0 where this backend clips (per parameter, or plain ZeRO-0 in any mode)."""
        config = copy.deepcopy(self.cfg.deepspeed)
        if self.clips_per_parameter or self._plain_zero0:
            config["gradient_clipping"] = 0.0
        config["train_micro_batch_size_per_gpu"] = self.batch.micro_batch
        config["gradient_accumulation_steps"] = self.batch.accumulation_steps
        config["train_batch_size"] = self.batch.global_batch
        config.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW: ZeRO handles it like its own
        config.setdefault("steps_per_print", 2**31 - 1)  # we log; DeepSpeed's own step prints would interleave
        config.setdefault("wall_clock_breakdown", False)
        return config

    @property
    def zero_stage(self) -> int:
        return self.cfg.zero_stage

    def prepare(self, student: nn.Module) -> nn.Module:
        student = sync_batch_norm(student, self.device)
        self._student = student.to(self.device)
        optimizer = self._optimizer = create_optimizer(student, self.cfg.optim, self.device, fused_by_default=False)
        names = {id(p): name for name, p in student.named_parameters()}
        self._group_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        try:
            self.engine, _, _, _ = self.deepspeed.initialize(
                model=student, optimizer=optimizer, config=self.engine_config()
            )
        except Exception as error:  # DeepSpeed raises assorted types for a bad block; name the block in all cases
            raise ConfigError(
                f"DeepSpeed rejected the recipe's deepspeed block {self.cfg.deepspeed}: {type(error).__name__}: {error}"
            ) from error
        self._install_checkpoint_io()
        self._gradients = self._gradient_location()
        return self.engine

    def _gradient_location(self) -> str:
        """Where the reduced gradients wait between the last backward and the engine's step: "module" (whole, in
        each parameter's `.grad`: ZeRO-0), "zero12" (each rank's fragments of the flat partitions, ZeRO-1/2),
        "zero3" (each rank's partition, read and written through deepspeed.utils' local-gradient API). Refuses
        per-parameter clipping where none of these holds."""
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        optimizer = self.engine.optimizer
        location = ""
        if optimizer is self._optimizer or (self.zero_stage == 0 and not isinstance(optimizer, DeepSpeedZeroOptimizer)):
            location = "module"
        elif isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
            location = "zero3"
        elif type(optimizer) is DeepSpeedZeroOptimizer and not optimizer.cpu_offload:
            trainable = [p for p in self.student.parameters() if p.requires_grad]
            # bf16 weights with fp32 gradient accumulation keep padded "compact" buffers that the fragments do not map
            compact = getattr(optimizer, "_use_compact_grad_partition_buffer", lambda _: False)
            if all(hasattr(p, "_hp_mapping") for p in trainable) and not any(
                compact(index) for index in range(len(optimizer.bit16_groups))
            ):
                location = "zero12"
        if self._plain_zero0 and optimizer is not self._optimizer:
            raise RuntimeError(f"DeepSpeed wrapped the optimizer of a plain ZeRO-0 engine ({type(optimizer).__name__})")
        if not location and self.clips_per_parameter:
            raise ConfigError(
                f"optim.clip_mode=per_param cannot reach the gradients of DeepSpeed's {type(optimizer).__name__} (ZeRO "
                f"stage {self.zero_stage} with this deepspeed block's precision settings); set optim.clip_mode=global"
            )
        return location

    def backward(self, loss: torch.Tensor, sync_gradients: bool) -> None:
        # The loop already divided the loss by the accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not sync_gradients:
            # DeepSpeed counts micro-steps in step(); off the accumulation boundary it only advances the counter.
            self.engine.step()

    @property
    def can_skip_steps(self) -> bool:
        # The engine's step cannot be left out (it keeps DeepSpeed's micro-step accounting), and outside fp16 loss
        # scaling it would apply non-finite gradients; so a non-finite step stops the run.
        return self.cfg.fp16

    def optimizer_step(
        self, lr: float, weight_decay: float, freeze_last_layer: bool, flags: dict[str, torch.Tensor]
    ) -> StepResult:
        # The last layer's lr is 0 while it is frozen: what freezes it where its gradient cannot be dropped.
        set_hyperparameters(self.engine.optimizer, lr, weight_decay, freeze_last_layer)
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("optimizer_step() called off DeepSpeed's gradient accumulation boundary")
        own_norm = self._clip()  # None where DeepSpeed clips (globally) inside its step and reports the norm
        if freeze_last_layer and self._plain_zero0:
            drop_gradients(last_layer_parameters(self.student))  # our AdamW skips it, as in official DINO
        if own_norm is not None:
            flags = {**flags, "gradient_norm": ~torch.isfinite(own_norm)}
        # Read at once (before the engine's step, which would apply them): DeepSpeed's step reads its own overflow
        # and norm on the host every step anyway, so a deferred verdict would save nothing here.
        names, vector = self.reduce_flags(flags)
        values = vector.tolist()
        expected = ("gradient_norm",) if self.skips_non_finite_steps else ()
        result = StepResult(torch.tensor(float("nan")), names, torch.tensor(values), expected=expected)
        bad = result.verdict(values)[0]
        if bad and not self.cfg.fp16:
            norm = own_norm if own_norm is not None else result.grad_norm
            return replace(result, grad_norm=norm, applied=False, recoverable=False)
        self.engine.step()
        if freeze_last_layer and not self._plain_zero0 and self._resets_last_layer:
            self._reset_last_layer_state()
        if own_norm is not None:  # fp16 `bad`: the loss scaler skipped it
            return replace(result, grad_norm=own_norm.detach(), applied=not bad)
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed reported no gradient norm for this step")
        grad_norm = torch.as_tensor(float(norm))
        if bad:  # fp16: the loss scaler saw the overflow and skipped the update
            return replace(result, grad_norm=grad_norm, applied=False)
        if not self.cfg.fp16 and not bool(torch.isfinite(grad_norm)):  # a host float already: no extra sync
            return replace(result, grad_norm=grad_norm, applied=False, recoverable=False, failure="gradient_norm")
        return replace(result, grad_norm=grad_norm)

    def _last_layer_partitions(self) -> list[torch.Tensor]:
        """The tensors DeepSpeed's inner (torch) optimizer steps for the head's last layer: the fp32 flat partitions
        of its param groups on this rank (ZeRO 1-3; ZeRO-3 one per sub-group), or its fp32 master copies (ZeRO-0 with
        DeepSpeed's bf16 / fp16). Our param groups keep their `last_layer` flag inside DeepSpeed."""
        wrapper = self.engine.optimizer
        inner = wrapper.optimizer
        frozen = {index for index, group in enumerate(inner.param_groups) if group.get("last_layer", False)}
        if hasattr(wrapper, "sub_group_to_group_id"):  # ZeRO-3: the groups hold their flats only while stepping
            flats = wrapper.fp32_partitioned_groups_flat
            return [flat for sub, flat in enumerate(flats) if wrapper.sub_group_to_group_id[sub] in frozen]
        return [p for index in frozen for p in inner.param_groups[index]["params"]]

    def _reset_last_layer_state(self) -> None:
        """Where DeepSpeed flattens the gradients (so the last layer's cannot be dropped alone), its lr of 0 leaves
        its weights exactly as they were (AdamW's decay is lr * wd too); its optimizer state is then reset to that of
        a fresh optimizer (every tensor zero: moments, step count, momentum buffers), which is what AdamW / SGD /
        LARS start from. So the first update after the freeze is that of official DINO, whose optimizer never saw
        the last layer during it."""
        inner = self.engine.optimizer.optimizer
        for partition in self._last_layer_partitions():
            for value in inner.state.get(partition, {}).values():
                if torch.is_tensor(value):
                    value.zero_()

    def _clip(self) -> torch.Tensor | None:
        """Clip this step's reduced gradients before the engine's step, where this backend does: per parameter
        (official DINO) with one all-reduce of their squared norms over all parameters wherever the gradients are
        partitioned, or globally on plain ZeRO-0. Returns the norm of all gradients together before clipping (true
        units), or None where DeepSpeed clips (globally) and measures inside its step."""
        clip = self.cfg.clip_grad
        if self._plain_zero0:
            scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
            if scaler is not None and scaler.is_enabled():
                scaler.unscale_(self.engine.optimizer)  # its step() knows, and skips on an overflow it saw here
            return clip_module_gradients(self.student, self.cfg, self.device)
        if not self.clips_per_parameter:
            return None
        parameters, pieces = self._gradient_pieces()
        scale = self._gradient_scale()
        if self._gradients != "zero3":  # views of the gradients DeepSpeed will step with: scaled in place
            reduce = None if self._gradients == "module" else self._all_reduce
            return clip_each_(pieces, clip, self.device, reduce=reduce, scale=scale)
        from deepspeed.utils import safe_set_local_grad

        squared = squared_norms(pieces, self.device)
        self._all_reduce(squared)
        for parameter, piece, coefficient in zip(
            parameters, pieces, clip_coefficients(squared, clip, scale).unbind(), strict=True
        ):
            safe_set_local_grad(parameter, piece * coefficient)
        return squared.sum().sqrt() / scale

    def _gradient_pieces(self) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
        """The trainable parameters that have a gradient on this rank, and this rank's piece of each: the same
        parameters in the same order on every rank wherever the pieces are partitioned (an empty piece where this rank
        holds none of a parameter)."""
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        if self._gradients == "module":
            with_grad = [p for p in trainable if p.grad is not None]
            return with_grad, [p.grad for p in with_grad]
        if self._gradients == "zero3":
            from deepspeed.utils import safe_get_local_grad

            return trainable, [safe_get_local_grad(p) for p in trainable]  # fp32, every trainable parameter
        pieces = []
        for p in trainable:
            mapping = p._hp_mapping
            if mapping is None:  # none of it in this rank's partition
                pieces.append(torch.zeros(0, device=self.device))
                continue
            piece = mapping.get_lp_grad_fragment(p._index_in_param_group)
            if piece.numel() != mapping.lp_fragment_address.numel:
                raise RuntimeError(
                    f"DeepSpeed's ZeRO gradient fragment of a parameter holds {piece.numel()} values, its address "
                    f"{mapping.lp_fragment_address.numel}: this DeepSpeed version lays out ZeRO-1/2 gradients "
                    "differently; set optim.clip_mode=global"
                )
            pieces.append(piece)
        return trainable, pieces

    def _gradient_scale(self) -> float:
        """The loss scale this step's reduced gradients still carry (fp16 only; 1 otherwise)."""
        if not self.cfg.fp16:
            return 1.0
        optimizer = self.engine.optimizer
        scaler = getattr(optimizer, "torch_autocast_gradscaler", None)  # ZeRO with torch_autocast fp16
        if scaler is not None and not getattr(optimizer, "custom_loss_scaler", False):
            return float(scaler.get_scale())
        return float(getattr(optimizer, "loss_scale", 1.0))

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        if self.distributed:
            dist.all_reduce(tensor)

    def _low_precision_weights(self) -> bool:
        return any(self.cfg.deepspeed.get(key, {}).get("enabled", False) for key in ("bf16", "fp16"))

    def student_weight_groups(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        from deepspeed.utils import safe_get_full_fp32_param

        for block in weight_blocks(self.student):
            if self._low_precision_weights():
                # fp32 master weights live in the optimizer's partitions (a collective per tensor).
                yield [(name, p.detach() if not p.requires_grad else safe_get_full_fp32_param(p)) for name, p in block]
            elif self.zero_stage == 3:
                with self.deepspeed.zero.GatheredParameters([p for _, p in block], modifier_rank=None):
                    yield [(name, p.detach()) for name, p in block]
            else:
                yield [(name, p.detach()) for name, p in block]

    # --- checkpoints ------------------------------------------------------------------------------------------

    def _install_checkpoint_io(self) -> None:
        """Route DeepSpeed's checkpoint reads through a weights-only loader, and make its writes record an OSError
        (a full disk) instead of raising it: DeepSpeed's save runs collectives between its writes, so a rank that
        raised halfway would leave the others waiting; every rank finishes the save and they fail together."""
        engine, files = self.engine, self.engine.checkpoint_engine
        write_save, write_makedirs, copy_scripts = files.save, files.makedirs, engine._copy_recovery_script
        self._write_failures: list[WriteFailed] = []

        def save(state_dict: Any, path: str) -> None:
            if self._write_failures:
                return
            try:
                write_save(state_dict, path)
            except OSError as error:
                Path(path).unlink(missing_ok=True)
                self._write_failures.append(write_failure(path, error, self._checkpoint_bytes()))

        def makedirs(path: str, exist_ok: bool = False) -> None:
            try:
                write_makedirs(path, exist_ok=exist_ok)
            except OSError as error:
                self._write_failures.append(write_failure(path, error, self._checkpoint_bytes()))

        def copy_recovery_scripts(save_path: str) -> None:
            if self._write_failures:
                return
            try:
                copy_scripts(save_path)
            except OSError as error:
                self._write_failures.append(write_failure(save_path, error, self._checkpoint_bytes()))

        files.load, files.save, files.makedirs = _weights_only_load, save, makedirs
        engine._copy_recovery_script = copy_recovery_scripts

    def _checkpoint_bytes(self) -> int:
        """About what a checkpoint takes on disk, for the message of a full disk: the student's fp32 weights about
        eight times over (DeepSpeed's module and master weights and Adam's two moments, the name-keyed copy, the
        teacher)."""
        return 8 * 4 * sum(int(getattr(p, "ds_numel", p.numel())) for p in self.student.parameters())

    def save(self, run_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
        staging = stage_checkpoint_dir(run_dir, step, self)
        self._write_failures.clear()
        self.engine.save_checkpoint(str(staging), tag=NATIVE_SUBDIR, client_state={}, save_latest=False)
        error: Exception | None = self._write_failures[0] if self._write_failures else None
        main_files = {layout.TRAINER_STATE_FILE: state}
        if self.zero_stage <= 2:
            main_files[layout.PORTABLE_STUDENT_FILE] = self._portable_state()  # a collective: every rank joins
        settle_writes(self, staging, error, main_files)  # any rank failed: the staging folder goes, every rank raises
        return commit_checkpoint_dir(run_dir, step, staging, self, keep_last)

    def _partitioned(self) -> bool:
        return any(hasattr(p, "_hp_mapping") for p in self.student.parameters())

    def _portable_state(self) -> dict[str, Any]:
        """Full fp32 weights and optimizer state keyed by parameter name (the format of local checkpoints)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        optimizer = self.engine.optimizer
        if not self._partitioned():  # ZeRO-0 in fp32 / torch_autocast: the engine's optimizer is ours, unwrapped
            weights = _cpu(self.student.state_dict())
            return {"student": weights, "optimizer": named_optimizer_state(self.student, optimizer)}
        base = optimizer.optimizer  # torch's AdamW over this rank's flat fp32 partitions
        # ZeRO 1/2 link each parameter to its slice of the optimizer state right after stepping the first param
        # group, when the other groups have no state yet (DeepSpeed 0.19); relink now that all groups have it.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
        # Each param group is one flat partition with its own step count (the last layer's restarts after its freeze);
        # one that has never been stepped (every step so far skipped by the fp16 loss scaler) has no state: its
        # parameters get none either, as with a torch optimizer.
        group_states = [base.state.get(group["params"][0], {}) for group in base.param_groups]
        stepped = [state for state in group_states if "step" in state]
        keys = [k for k, v in (stepped[0] if stepped else {}).items() if torch.is_tensor(v) and v.dim() > 0]
        steps = {
            name: state["step"]
            for state, names in zip(group_states, self._group_names, strict=True)
            if "step" in state
            for name in names
        }
        weights = _cpu(self.student.state_dict())
        named_state: dict[str, Any] = {}
        for name, parameter in self.student.named_parameters():
            if not parameter.requires_grad:
                continue
            weights[name] = safe_get_full_fp32_param(parameter).detach().cpu()
            if name not in steps:
                continue
            named_state[name] = {"step": steps[name].detach().cpu().clone()}
            for key in keys:
                named_state[name][key] = safe_get_full_optimizer_state(parameter, key).detach().cpu()
        groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "params": names}
            for group, names in zip(optimizer.param_groups, self._group_names, strict=True)
        ]
        return {"student": weights, "optimizer": {"state": named_state, "param_groups": groups}}

    def load(self, path: Path) -> dict[str, Any]:
        state = read_trainer_state(path)
        position = state.get("data_position")
        saved_world = int(position.get("world_size", -1)) if isinstance(position, dict) else -1
        saved_stage = _zero_stage_of(state)
        native = path / NATIVE_SUBDIR
        if native.is_dir() and saved_world == self.world_size and saved_stage == self.zero_stage:
            self._load_native(path)
            return state
        portable = split_single_file(state) if path.is_file() else portable_student_state(path)
        if portable is None and native.is_dir() and saved_stage <= 2 and state.get("backend") == "deepspeed":
            raise missing_portable_state(path, state)
        if portable is None or self.zero_stage == 3:
            raise IncompatibleCheckpoint(
                f"{path} was written by {saved_world} process(es) with ZeRO stage {saved_stage}; this run has "
                f"{self.world_size} with stage {self.zero_stage}. Resume ZeRO-3 checkpoints on the same number of "
                "processes and stage; ZeRO 0-2, DDP and local checkpoints resume on any process count"
            )
        log.info("resuming %s through its name-keyed copy (process count or ZeRO stage changed)", path)
        check_portable_state(self.student, portable, path)  # before anything is loaded
        self._load_portable(portable, path)
        return state

    def _load_native(self, path: Path) -> None:
        """DeepSpeed's own sharded files, same process count and stage. Every rank first checks a share of the files
        for pickled code (reading only their pickles, not the tensors), and all of them refuse together: a file
        that failed on one rank inside DeepSpeed's load would leave the others waiting in its collectives."""
        native = path / NATIVE_SUBDIR
        files = sorted(p for p in native.rglob("*") if p.is_file())
        problem = next(filter(None, (_unsafe_problem(f) for f in files[self.rank :: self.world_size])), None)
        problems = [p for p in self.gather_objects(problem) if p is not None]
        if problems:
            raise CheckpointError(problems[0])
        try:
            loaded, _ = self.engine.load_checkpoint(
                str(path), tag=NATIVE_SUBDIR, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        except CheckpointError:
            raise
        except Exception as error:  # DeepSpeed raises assorted types for files that do not fit
            raise CheckpointError(f"{native}: DeepSpeed could not read it: {one_line(error)}") from error
        if loaded is None:
            raise CheckpointError(f"{native}: DeepSpeed could not read this checkpoint")

    def _load_portable(self, portable: dict[str, Any], path: Path) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self.student.load_state_dict(portable["student"])  # the module's (possibly low-precision) weights
        optimizer = self.engine.optimizer
        if not self._partitioned():
            load_named_optimizer_state(self.student, optimizer, portable["optimizer"], path)
            return
        named = portable["optimizer"]["state"]
        base = optimizer.optimizer
        if not base.state:
            # The base optimizer creates its state lazily at the first step; create it now (zeros, then filled
            # below through DeepSpeed's own per-parameter setters) so that the fp32 partitions can be written. Each
            # param group (one flat partition) takes its own step count; a group none of whose parameters has a state
            # (the last layer, saved during its freeze by a backend that skips it) starts fresh: zeros, step 0.
            example = next(iter(named.values()))
            for group, names in zip(base.param_groups, self._group_names, strict=True):
                flat = group["params"][0]
                saved = next((named[name] for name in names if name in named), None)
                base.state[flat] = {k: torch.zeros_like(flat) for k in example if k != "step"}
                step = saved["step"] if saved is not None else torch.zeros_like(example["step"])
                base.state[flat]["step"] = step.clone().to(flat.device)
            optimizer._lazy_init_hp_params_optimizer_state()
        for name, parameter in self.student.named_parameters():
            if not parameter.requires_grad:
                continue
            safe_set_full_fp32_param(parameter, portable["student"][name].to(self.device))
            if name not in named:
                if name.startswith(LAST_LAYER_PREFIX):  # frozen when saved: a fresh state, as official DINO's
                    continue
                raise CheckpointError(f"{path}: no optimizer state for parameter {name!r}")
            for key, value in named[name].items():
                if key != "step":
                    safe_set_full_optimizer_state(parameter, value.to(self.device), key)


def _cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state_dict.items()}


def _zero_stage_of(state: dict[str, Any]) -> int:
    config = state.get("config")
    deepspeed = config.get("deepspeed") if isinstance(config, dict) else None
    zero = deepspeed.get("zero_optimization") if isinstance(deepspeed, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return stage if isinstance(stage, int) else -1


def _safe_deepspeed_globals() -> list[Any]:
    """The classes DeepSpeed 0.19 pickles into its checkpoint files besides tensors and containers, all plain values:
    the loss scalers (attribute bags, rebuilt with __new__ + __dict__ update), the ZeRO stage enum (called with
    its value) and fragment_address (a dataclass of two ints, in ZeRO-1/2 optimizer states). None defines
    __setstate__ or __reduce__, so allowing them cannot run code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _unsafe_problem(path: Path) -> str | None:
    """Why a DeepSpeed checkpoint file must not be loaded (globals outside the allowlist, not a torch zip file),
    found without unpickling it; None when its pickle only names allowed classes."""
    try:
        with torch.serialization.safe_globals(_safe_deepspeed_globals()):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as error:  # not a zip, no data.pkl, an opcode the scanner refuses: not loadable safely
        return f"cannot read DeepSpeed checkpoint file {path}: {one_line(error)}"
    if unsafe:
        return f"refusing to load DeepSpeed checkpoint file {path}: it pickles {', '.join(sorted(unsafe)[:3])}"
    return None


def _weights_only_load(path: str, map_location: Any = None) -> Any:
    """DeepSpeed's checkpoint engine unpickles with weights_only=False; ours allows tensors, containers and the few
    plain value classes that DeepSpeed's files hold (`_safe_deepspeed_globals`)."""
    with torch.serialization.safe_globals(_safe_deepspeed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:
            raise CheckpointError(f"cannot read DeepSpeed checkpoint file {path}: {one_line(error)}") from error
