"""Autocast that a CPU can only emulate (no native bf16 / fp16 kernels) is slower than fp32: the run says so at its
start, naming the recipe block that turns it off."""

from __future__ import annotations

import logging

import pytest
import torch

from dino_scale import devices
from dino_scale.config import load_config
from dino_scale.train.backends import make_backend
from dino_scale.train.loop import build_networks

AUTOCAST = {
    None: 'deepspeed.torch_autocast={"enabled": false}',
    "bfloat16": 'deepspeed.torch_autocast={"enabled": true, "dtype": "bfloat16"}',
    "float16": 'deepspeed.torch_autocast={"enabled": true, "dtype": "float16"}',
}


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16"])
def test_emulated_cpu_autocast_is_warned_about_at_the_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, dtype: str | None, native: bool
) -> None:
    monkeypatch.setattr(devices, "_native_cpu_kernels", lambda _dtype: native)
    cfg = load_config("tiny-test.json", ["device=cpu", "backend=local", AUTOCAST[dtype]])
    assert cfg.autocast_dtype == dtype
    with caplog.at_level(logging.WARNING, logger="dino_scale"):
        build_networks(cfg, make_backend(cfg))
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision:")]
    if dtype is None or native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and f"precision: {dtype} on this CPU is emulated" in warnings[0]
        assert "enabled=false to train in fp32" in warnings[0]


def test_only_a_cpu_without_the_kernels_emulates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "_native_cpu_kernels", lambda _dtype: False)
    assert devices.autocast_is_emulated(torch.device("cpu"), "bfloat16")
    assert not devices.autocast_is_emulated(torch.device("cpu"), None)
    assert not devices.autocast_is_emulated(torch.device("cuda"), "bfloat16")  # a GPU's autocast is its own


def test_the_kernel_check_is_onednns() -> None:
    assert devices._native_cpu_kernels("bfloat16") == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert devices._native_cpu_kernels("float16") == torch.ops.mkldnn._is_mkldnn_fp16_supported()
