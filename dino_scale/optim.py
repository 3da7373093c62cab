"""Optimizer construction for the student: parameter groups, AdamW / SGD / LARS, last-layer freezing."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.optim import Lars
from torch import nn

from dino_scale.config import OptimConfig

LAST_LAYER_PREFIX = "head.last_layer."


def parameter_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights that are decayed, and biases / norm parameters (every 1-d tensor) that are not.

    Group 0 is the decayed one: the training loop writes the weight-decay schedule into it and keeps group 1 at 0.
    """
    decayed, not_decayed = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.endswith(".bias") or parameter.ndim <= 1:
            not_decayed.append(parameter)
        else:
            decayed.append(parameter)
    return [
        {"params": decayed, "apply_weight_decay": True},
        {"params": not_decayed, "weight_decay": 0.0, "apply_weight_decay": False},
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


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_weight_decay", True):
            group["weight_decay"] = weight_decay


def last_layer_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if name.startswith(LAST_LAYER_PREFIX)]


def drop_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Setting .grad to None (not zero) makes AdamW skip the parameter entirely, so its moments don't move."""
    for parameter in parameters:
        parameter.grad = None
