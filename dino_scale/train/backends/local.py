"""One process on one device, and DDP (the same, replicated over processes with gradients all-reduced)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dino_scale import run_dir as layout
from dino_scale.config import BatchPlan, TrainConfig
from dino_scale.devices import resolve_device
from dino_scale.errors import Unavailable
from dino_scale.io import load_checkpoint
from dino_scale.train.backends.base import (
    Backend,
    StepResult,
    agree,
    apply_if_finite,
    check_portable_state,
    clip_module_gradients,
    drop_gradients,
    init_process_group,
    launch_environment,
    load_named_optimizer_state,
    missing_portable_state,
    named_optimizer_state,
    portable_student_state,
    read_trainer_state,
    require_launcher,
    split_single_file,
    sync_batch_norm,
)
from dino_scale.train.checkpoint import save_checkpoint
from dino_scale.train.optim import create_optimizer, last_layer_parameters, set_hyperparameters

log = logging.getLogger("dino_scale")


class LocalBackend(Backend):
    """Plain PyTorch on one device with autocast (bf16, or fp16 with loss scaling)."""

    name = "local"

    def __init__(self, cfg: TrainConfig, batch: BatchPlan) -> None:
        super().__init__(cfg, batch)
        env = launch_environment()
        if env.world_size > 1 and self.name == "local":
            raise Unavailable(
                f"backend=local cannot run in a job of WORLD_SIZE={env.world_size} processes; launch one process, "
                "or pick a distributed backend (ddp, deepspeed, fsdp)"
            )
        self.device = resolve_device(cfg.device, env.local_rank)
        self.optimizer: torch.optim.Optimizer | None = None
        # Loss scaling only matters for fp16; GradScaler(enabled=False) is a no-op pass-through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.fp16)

    def prepare(self, student: nn.Module) -> nn.Module:
        self._student = student.to(self.device)
        self.optimizer = create_optimizer(student, self.cfg.optim, self.device)
        return student

    def backward(self, loss: torch.Tensor, sync_gradients: bool) -> None:
        self.scaler.scale(loss).backward()

    def optimizer_step(
        self, lr: float, weight_decay: float, freeze_last_layer: bool, flags: dict[str, torch.Tensor]
    ) -> StepResult:
        assert self.optimizer is not None
        set_hyperparameters(self.optimizer, lr, weight_decay, freeze_last_layer)
        self.scaler.unscale_(self.optimizer)  # clipping sees true gradients (a no-op without fp16)
        grad_norm = clip_module_gradients(self.student, self.cfg, self.device)
        if freeze_last_layer:
            drop_gradients(last_layer_parameters(self.student))
        result = apply_if_finite(self, self.optimizer, grad_norm, flags, lambda: self.scaler.step(self.optimizer))
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return result

    def student_weight_groups(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        # Replicated fp32 weights (autocast never changes parameter dtype): one group, no copies.
        yield list(self.student.named_parameters())

    def save(self, run_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
        assert self.optimizer is not None
        path = layout.checkpoint_path(run_dir, step, folder=False)
        error: Exception | None = None
        if self.is_main_process():
            full_state = dict(state)
            full_state["student"] = self.student.state_dict()
            full_state["optimizer"] = named_optimizer_state(self.student, self.optimizer)
            full_state["grad_scaler"] = self.scaler.state_dict()
            try:
                path = save_checkpoint(run_dir, step, full_state, keep_last=keep_last)
            except Exception as caught:  # a full disk (WriteFailed): every rank stops with it
                error = caught
        agree(self, error)  # also the barrier: no rank runs ahead of the checkpoint
        return path

    def load(self, path: Path) -> dict[str, Any]:
        assert self.optimizer is not None
        if path.is_dir():
            state = read_trainer_state(path)
            portable = portable_student_state(path)
        else:  # one file holds both: read it once
            state = load_checkpoint(path)
            portable = split_single_file(state)
        if portable is None:
            raise missing_portable_state(path, state)
        check_portable_state(self.student, portable, path)  # before anything is loaded
        self.student.load_state_dict(portable["student"])
        load_named_optimizer_state(self.student, self.optimizer, portable["optimizer"], path)
        if portable.get("grad_scaler"):
            self.scaler.load_state_dict(portable["grad_scaler"])
        return state


class DDPBackend(LocalBackend):
    """DistributedDataParallel: a full replica per process, gradients averaged by all-reduce during backward."""

    name = "ddp"

    def __init__(self, cfg: TrainConfig, batch: BatchPlan) -> None:
        env = launch_environment()
        require_launcher(self.name, env)
        super().__init__(cfg, batch)
        init_process_group(self.device)
        self.rank, self.world_size = env.rank, env.world_size
        self._wrapped: DistributedDataParallel | None = None

    def prepare(self, student: nn.Module) -> nn.Module:
        super().prepare(sync_batch_norm(student, self.device))
        self._wrapped = DistributedDataParallel(
            self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )
        return self._wrapped

    def forward_context(self, sync_gradients: bool) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(super().forward_context(sync_gradients))
        if not sync_gradients:  # DDP decides in forward whether the coming backward all-reduces
            assert self._wrapped is not None
            stack.enter_context(self._wrapped.no_sync())
        return stack
