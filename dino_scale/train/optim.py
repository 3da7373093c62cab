"""Optimizer construction for the student: parameter groups, AdamW / SGD / LARS, last-layer freezing."""

from __future__ import annotations

import torch
from timm.optim import Lars
from torch import nn

from dino_scale.config import OptimConfig

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


def create_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """lr and weight decay are placeholders here: the schedules set them before every step."""
    groups = parameter_groups(model)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum)
    # LARS (large-batch ResNet recipe) from timm: with always_adapt=False it applies the trust ratio only to groups
    # with non-zero weight decay, so biases and norms (group 1) are excluded, as in the official DINO LARS.
    return Lars(groups, lr=0.0, momentum=cfg.momentum)


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
