"""optim.implementation: torch's fused AdamW / SGD by default where torch has the kernel (what skips a non-finite
step on the device), the choice kept when a checkpoint written with another kernel is loaded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dino_scale.config import load_config
from dino_scale.errors import ConfigError
from dino_scale.train.backends.base import load_named_optimizer_state, named_optimizer_state, skips_on_device
from dino_scale.train.optim import create_optimizer, optimizer_kernel

CPU = torch.device("cpu")


def optim_cfg(*overrides: str):
    return load_config("tiny-test.json", list(overrides)).optim


@pytest.mark.parametrize(
    ("overrides", "kernel"),
    [
        ((), {"fused": True}),
        (("optim.implementation=foreach",), {"foreach": True}),
        (("optim.implementation=for_loop",), {"foreach": False}),
        (("optim.name=sgd",), {"fused": True}),
        (("optim.name=lars",), {}),
    ],
)
def test_the_kernel_each_choice_gives(overrides: tuple[str, ...], kernel: dict) -> None:
    assert optimizer_kernel(optim_cfg(*overrides), CPU) == kernel


def test_deepspeed_keeps_torchs_default_and_a_device_without_the_kernel_is_refused() -> None:
    assert optimizer_kernel(optim_cfg(), CPU, fused_by_default=False) == {}
    with pytest.raises(ConfigError, match="optim.implementation=fused.*meta"):
        optimizer_kernel(optim_cfg("optim.implementation=fused"), torch.device("meta"))
    with pytest.raises(ConfigError, match="optim: implementation=foreach: timm's LARS"):
        optim_cfg("optim.name=lars", "optim.implementation=foreach")  # refused with the recipe, before any work


def test_loading_a_state_written_by_another_kernel_keeps_this_runs_kernel() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    for_loop = create_optimizer(model, optim_cfg("optim.implementation=for_loop"))
    model(torch.randn(4, 3)).sum().backward()
    for group in for_loop.param_groups:
        group["lr"] = 0.1
    for_loop.step()
    saved = named_optimizer_state(model, for_loop)
    fused = create_optimizer(model, optim_cfg())
    assert skips_on_device(fused) and not skips_on_device(for_loop)
    load_named_optimizer_state(model, fused, saved, source="test")
    assert all(group["fused"] for group in fused.param_groups)
    assert all(float(state["step"]) == 1.0 for state in fused.state.values())
    fused.found_inf, fused.grad_scale = torch.tensor(1.0), None  # the fused step takes the device flag
    before = [p.detach().clone() for p in model.parameters()]
    fused.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
