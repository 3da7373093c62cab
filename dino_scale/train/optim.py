"""Optimizer construction for the student: parameter groups, AdamW / SGD / LARS, last-layer freezing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from timm.optim import Lars
from torch import nn

from dino_scale.config import OptimConfig
from dino_scale.errors import ConfigError

LAST_LAYER_PREFIX = "head.last_layer."


def parameter_groups(model: nn.Module) -> list[dict]:
    """Weights that are decayed, and biases / norm parameters (every 1-d tensor) that are not; the head's last layer
    gets groups of its own (flag `last_layer`).

    While the last layer is frozen, the backends drop its gradients after clipping, as official DINO does, so that the
    optimizer skips it (no update, no decay, no moments or step count) where they can (local, DDP, FSDP2, plain
    ZeRO-0). Where DeepSpeed flattens the gradients into its partitions, the group of its own is what freezes it
    instead: an lr of 0 on it (`set_hyperparameters`; AdamW's decoupled decay is lr * wd too, so the weights stay
    exactly as they were), then its optimizer state reset to a fresh one after every frozen step.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = not (name.endswith(".bias") or parameter.ndim <= 1)
        groups.setdefault((decay, name.startswith(LAST_LAYER_PREFIX)), []).append(parameter)
    return [
        {
            "params": params,
            "weight_decay": 0.0,
            "apply_weight_decay": decay,
            "last_layer": last_layer,
        }
        for (decay, last_layer), params in sorted(groups.items(), key=lambda item: (item[0][1], not item[0][0]))
    ]


def optimizer_kernel(cfg: OptimConfig, device: torch.device, fused_by_default: bool = True) -> dict[str, bool]:
    """torch's kernel keyword for AdamW / SGD as `optim.implementation` says (LARS has one implementation).

    "auto" is the fused kernel wherever torch has one for the device (and `fused_by_default`: DeepSpeed keeps torch's
    default, since its own step reads the host every step anyway): one kernel launch for every parameter, and a
    dropped non-finite step skipped inside it without a host read (train.backends.base.apply_if_finite)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if cfg.name == "lars":
        if cfg.implementation != "auto":
            raise ConfigError(f"optim.implementation={cfg.implementation}: timm's LARS has one implementation (auto)")
        return {}
    fused_here = device.type in _get_fused_kernels_supported_devices()
    choice = cfg.implementation
    if choice == "auto":
        choice = "fused" if fused_here and fused_by_default else "default"
    if choice == "fused" and not fused_here:
        raise ConfigError(f"optim.implementation=fused: torch has no fused {cfg.name} kernel for {device.type}")
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}.get(choice, {})


def create_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device | None = None, fused_by_default: bool = True
) -> torch.optim.Optimizer:
    """lr and weight decay are placeholders here: the schedules set them before every step. `device`: where the
    parameters live (the first parameter's device when None)."""
    groups = parameter_groups(model)
    if device is None:
        device = next(model.parameters()).device
    kernel = optimizer_kernel(cfg, device, fused_by_default)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, **kernel)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, **kernel)
    # LARS (large-batch ResNet recipe) from timm: with always_adapt=False it applies the trust ratio only to groups
    # with non-zero weight decay, so biases and norms (group 1) are excluded, as in the official DINO LARS.
    return Lars(groups, lr=0.0, momentum=cfg.momentum)


_KERNEL_KEYS = ("fused", "foreach")


@contextlib.contextmanager
def kernel_kept(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Load an optimizer state inside this: loading replaces each param group's settings, the kernel choice of the
    run that wrote it included (fused / foreach), and this run's must stay (a fused step is what skips a non-finite
    update on the device). A fused kernel wants its step counts on the parameters' device: moved there."""
    kept = [{key: group[key] for key in _KERNEL_KEYS if key in group} for group in optimizer.param_groups]
    yield
    for group, kernel in zip(optimizer.param_groups, kept, strict=True):
        group.update(kernel)
        if kernel.get("fused"):
            for parameter in group["params"]:
                state = optimizer.state.get(parameter, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(parameter.device, torch.float32)


def set_hyperparameters(
    optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, freeze_last_layer: bool = False
) -> None:
    """The scheduled lr and weight decay on every group; the last layer's lr is 0 while it is frozen (a no-op where
    its gradients are dropped, the freeze itself where DeepSpeed's partitions keep them)."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if freeze_last_layer and group.get("last_layer", False) else lr
        group["weight_decay"] = weight_decay if group.get("apply_weight_decay", True) else 0.0


def last_layer_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if name.startswith(LAST_LAYER_PREFIX)]
