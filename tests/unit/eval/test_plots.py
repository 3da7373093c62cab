"""`dino-scale plot`: the curves figure from hand-written metrics.jsonl files (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dino_scale.config import MonitorConfig
from dino_scale.errors import NotFound
from dino_scale.eval.plots import PANELS, build_figure, plot_run, read_step_records

K = 256


def step_record(step: int, **changes: Any) -> dict[str, Any]:
    """A record with the fields StepMetrics.step_done writes."""
    record = {
        "step": step,
        "epoch": step // 10,
        "loss": 5.0 - 0.1 * step,
        "lr": 1e-4 * step,
        "wd": 0.04 + 0.01 * step,
        "momentum": 0.996 + 1e-4 * step,
        "teacher_temp": 0.04,
        "teacher_entropy": 3.0 + 0.01 * step,
        "kl": 1.0 / step,
        "grad_norm": 2.0,
        "images_per_s": 90.0 + step,
        "images_per_s_per_device": 90.0 + step,
        "step_time_s": 0.35,
        "peak_memory_gb": 1.0,
        "peak_memory_gb_per_rank": [1.0],
        "skipped_samples": 0,
        "skipped_shards": 0,
        "skipped_steps": 0,
    }
    record.update(changes)
    return record


def make_run(root: Path, lines: list[str], config: dict[str, Any] | None = None) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if config is not None:
        (run / "config.json").write_text(json.dumps(config))
    return run


def curve(axes: Any) -> tuple[list[float], list[float]]:
    """The data of an axes' first line (the curve; reference lines come after it)."""
    line = axes.get_lines()[0]
    return list(line.get_xdata()), list(line.get_ydata())


def texts(axes: Any) -> list[str]:
    return [text.get_text() for text in axes.texts]


def test_every_panel_draws_its_field_against_the_step_with_log_k_and_the_thresholds() -> None:
    records = [step_record(step) for step in range(1, 41)]
    figure = build_figure(records, out_dim=K, monitor=MonitorConfig(low_entropy=0.1, high_entropy=0.9))
    panels = figure.axes[: len(PANELS)]
    # Six panels, and a right-hand axis for weight decay and for the teacher temperature.
    assert len(figure.axes) == len(PANELS) + 2
    assert [a.get_title() for a in panels] == [p.title for p in PANELS]
    for axes, panel in zip(panels, PANELS, strict=True):
        steps, values = curve(axes)
        assert steps == list(range(1, 41)), panel.field
        assert values == pytest.approx([r[panel.field] for r in records]), panel.field
        assert axes.get_xlabel() == "optimizer step"
    entropy = panels[1]
    references = sorted(line.get_ydata()[0] for line in entropy.get_lines()[1:])
    assert references == pytest.approx([0.1 * math.log(K), 0.9 * math.log(K), math.log(K)])
    assert "--" in [line.get_linestyle() for line in entropy.get_lines()]  # log K dashed
    twins = figure.axes[len(PANELS) :]
    assert sorted(curve(t)[1][-1] for t in twins) == pytest.approx([0.04, 0.04 + 0.4])  # teacher_temp, wd


def test_a_field_not_recorded_leaves_its_panel_saying_so() -> None:
    records = [
        {k: v for k, v in step_record(step).items() if k not in ("images_per_s", "wd", "teacher_temp")}
        for step in (1, 2)
    ]
    figure = build_figure(records, out_dim=None)
    assert len(figure.axes) == len(PANELS)  # no right-hand axes: nothing to draw on them
    by_field = dict(zip([p.field for p in PANELS], figure.axes, strict=False))
    assert texts(by_field["images_per_s"]) == ["images_per_s: not recorded"]
    assert not by_field["images_per_s"].get_lines()
    assert "wd not recorded" in by_field["lr"].get_title()
    assert texts(by_field["loss"]) == [] and len(by_field["teacher_entropy"].get_lines()) == 1  # no K: no log K


def test_truncated_line_events_and_a_resumed_part_are_read_as_a_crash_leaves_them(tmp_path: Path) -> None:
    lines = [json.dumps(step_record(step, loss=10.0 + step)) for step in (1, 2, 3, 4)]
    # Resumed from the step-2 checkpoint: steps 3 and 4 are logged again, then the run ends.
    lines += [json.dumps(step_record(step, loss=20.0 + step)) for step in (3, 4, 5)]
    lines += [json.dumps({"step": 5, "event": "final", "teacher_sha256_per_rank": ["ab"]})]
    lines += [json.dumps({"step": 5, "event": "final_knn", "knn_top1_teacher": 60.0})]
    lines += [json.dumps(step_record(6))[:40]]  # cut short by a crash
    run = make_run(tmp_path, lines)
    records = read_step_records(run / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0), (5, 25.0)]


def test_plot_run_writes_one_png_with_a_single_record(tmp_path: Path) -> None:
    config = {"name": "tiny", "model": {"out_dim": K}, "monitor": {"collapse": "warn"}}
    run = make_run(tmp_path, [json.dumps(step_record(7))], config)
    out = plot_run(run)
    assert out == run / "curves.png"
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert pixels.shape == (800, 1500, 3)  # figsize 15 x 8 at 100 dpi
    # The one point of each panel is drawn: the curve colour (C0, #1f77b4) appears.
    assert (np.abs(pixels.astype(int) - [0x1F, 0x77, 0xB4]).sum(axis=2) < 30).sum() > 50
    other = plot_run(run, tmp_path / "elsewhere" / "c.png")
    assert other.is_file() and Image.open(other).size == (1500, 800)


def test_missing_metrics_is_one_line_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="metrics.jsonl does not exist") as caught:
        plot_run(tmp_path)
    assert str(tmp_path / "metrics.jsonl") in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "curves.png").exists()
