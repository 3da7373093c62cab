"""How the student is trained on the hardware at hand, behind one small interface.

The training loop only ever calls the methods of `Backend`; it never asks which backend it has. A backend owns
the student's optimizer state and precision handling and knows how to hand out the student's full fp32 weights
(block by block, so a sharded backend never has to gather the whole model) for the teacher's EMA.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_scale import checkpoint as ckpt
from dino_scale.config import TrainConfig
from dino_scale.optim import create_optimizer, drop_gradients, last_layer_parameters, set_hyperparameters


class Backend(ABC):
    """The seam between the training loop and DeepSpeed / FSDP / DDP / a single process."""

    name: str
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @abstractmethod
    def prepare(self, student: nn.Module) -> nn.Module:
        """Wrap the student and create its optimizer; returns the module to call forward on."""

    @abstractmethod
    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context for forward passes."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of one micro-batch's loss (already divided by the accumulation steps)."""

    @abstractmethod
    def optimizer_step(self, lr: float, weight_decay: float, freeze_last_layer: bool) -> torch.Tensor:
        """Apply one optimizer step with the scheduled lr / wd, clip, drop the last layer's gradients when
        frozen, zero the gradients. Returns the gradient norm before clipping."""

    @abstractmethod
    def student_weight_groups(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The student's full-precision weights as (name, tensor) groups, one group per block, for the EMA."""

    @abstractmethod
    def save(self, run_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
        """Write a checkpoint holding the student, the optimizer and `state` (teacher, center, ...)."""

    @abstractmethod
    def load(self, path: Path) -> dict[str, Any]:
        """Restore the student and the optimizer from a checkpoint; returns the rest of its state."""

    @property
    @abstractmethod
    def student(self) -> nn.Module:
        """The unwrapped student module (for evaluation and export)."""

    def is_main_process(self) -> bool:
        return self.rank == 0


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but torch.cuda.is_available() is False")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class LocalBackend(Backend):
    """One process, one device: plain PyTorch with autocast (bf16, or fp16 with loss scaling)."""

    name = "local"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self._student: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        # Loss scaling only matters for fp16; GradScaler(enabled=False) is a no-op pass-through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.fp16)

    @property
    def student(self) -> nn.Module:
        if self._student is None:
            raise RuntimeError("Backend.prepare() has not been called")
        return self._student

    def prepare(self, student: nn.Module) -> nn.Module:
        self._student = student.to(self.device)
        self.optimizer = create_optimizer(student, self.cfg.optim)
        return student

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.cfg.fp16:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def optimizer_step(self, lr: float, weight_decay: float, freeze_last_layer: bool) -> torch.Tensor:
        assert self.optimizer is not None
        set_hyperparameters(self.optimizer, lr, weight_decay)
        self.scaler.unscale_(self.optimizer)
        parameters = [p for p in self.student.parameters() if p.grad is not None]
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if freeze_last_layer:
            drop_gradients(last_layer_parameters(self.student))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    def student_weight_groups(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        # Weights are already full fp32 tensors here (autocast never changes parameter dtype): one group.
        yield list(self.student.named_parameters())

    def save(self, run_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
        assert self.optimizer is not None
        full_state = dict(state)
        full_state["student"] = self.student.state_dict()
        full_state["optimizer"] = self.optimizer.state_dict()
        full_state["grad_scaler"] = self.scaler.state_dict()
        return ckpt.save_checkpoint(run_dir, step, full_state, keep_last=keep_last)

    def load(self, path: Path) -> dict[str, Any]:
        assert self.optimizer is not None
        state = ckpt.load_checkpoint(path)
        self.student.load_state_dict(state.pop("student"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        scaler_state = state.pop("grad_scaler", None)
        if scaler_state:
            self.scaler.load_state_dict(scaler_state)
        return state


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_backend(cfg: TrainConfig) -> Backend:
    """`auto` picks from how the process was launched: one process -> local."""
    backend = cfg.backend
    if backend == "auto":
        backend = "local" if launched_world_size() == 1 else "ddp"
    if backend == "local":
        if launched_world_size() > 1:
            raise RuntimeError(
                f"backend=local cannot run in a job of WORLD_SIZE={launched_world_size()} processes; "
                "launch one process, or pick a distributed backend"
            )
        return LocalBackend(cfg)
    raise NotImplementedError(
        f"backend={backend!r} is not available in this version of dino-scale yet; use backend=local "
        "(one process, GPU when present)"
    )
