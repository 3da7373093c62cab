"""benchmarks/augment_compile_probe.py: the compiled hue draws the same views as the eager one, and a tiny run of both
measurements (backend "eager": dynamo's tracing without code generation, so the test needs no C++ compiler)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import torch
from support import load_benchmark, photo

from dino_scale.data import augment
from dino_scale.data.augment import MultiCropAugmentation

probe = load_benchmark("augment_compile_probe")


def test_the_compiled_hue_takes_each_view_s_own_factor() -> None:
    """Through the tensor factor, every view gets its own hue shift (a factor frozen into the graph would not)."""
    aug = MultiCropAugmentation(32, 16, 4)
    image = photo(80, 60)
    eager = aug(image, torch.Generator().manual_seed(3))
    compiled = probe._hue_with_tensor_factor(torch.compile(augment._adjust_hue, backend="eager", dynamic=False))
    with mock.patch.object(augment, "_adjust_hue", compiled):
        views = aug(image, torch.Generator().manual_seed(3))
    assert any(p.jitter for p in aug.sample_params(60, 80, torch.Generator().manual_seed(3)))  # hue ran
    for a, b in zip(eager, views, strict=True):
        assert (a.int() - b.int()).abs().max() <= 1  # the same op: at most a rounding apart


def test_a_tiny_run_reports_both_measurements(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    report = probe.main(
        ["--backend", "eager", "--op-sizes", "16", "--setups", "32/16/2", "--images", "4", "--batch", "2",
         "--op-seconds", "0.01", "--seconds", "0.05", "--rounds", "1", "--json", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text()) == report
    assert [r["op"] for r in report["ops"]] == ["brightness", "contrast", "saturation", "hue", "blur + rounding"]
    assert all(r["eager_ms"] > 0 and r["compiled_ms"] > 0 and r["max_level_difference"] <= 1 for r in report["ops"])
    (row,) = report["data"]
    assert row["setup"] == "32/16 px, 2 + 2 crops"
    assert set(row["img_per_s"]) == set(probe.VARIANTS) and all(v > 0 for v in row["img_per_s"].values())
    assert row["ratio_eager"] == row["img_per_s"]["ours, eager"] / row["img_per_s"]["official-style"]
    assert "| hue | 16 |" in probe.markdown(report)
