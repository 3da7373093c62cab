"""`dino-scale plot RUN`: a run's training curves from its metrics.jsonl, in one PNG.

Six panels against the optimizer step: the loss; the teacher's entropy H(P_t) with log K (the uniform distribution's
entropy) dashed and the collapse monitor's thresholds dotted; KL(P_t || P_s) with the monitor's threshold; the
learning rate (weight decay on a second axis); the teacher momentum (teacher temperature on a second axis); the
throughput in images/s. A field the run did not record leaves its panel saying so.

metrics.jsonl is read as a crash leaves it: a line cut short is skipped, event records (``final``, ``final_knn``)
are not curves, and where a resumed run logged a step again its later record wins.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dino_scale import run_dir as layout
from dino_scale.config import MonitorConfig
from dino_scale.errors import InputError, NotFound
from dino_scale.io import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Panel:
    """One subplot: ``field`` on the left axis, ``second`` (if any) on a right axis of its own scale."""

    title: str
    field: str
    label: str
    second: str | None = None
    second_label: str | None = None
    log_scale: bool = False


PANELS = (
    Panel("loss", "loss", "loss"),
    Panel("teacher entropy H(P_t)", "teacher_entropy", "nats"),
    Panel("KL(P_t || P_s)", "kl", "nats", log_scale=True),
    Panel("learning rate, weight decay", "lr", "lr", second="wd", second_label="weight decay"),
    Panel("teacher momentum, temperature", "momentum", "momentum", second="teacher_temp", second_label="teacher temp"),
    Panel("throughput", "images_per_s", "images/s"),
)


def read_step_records(path: Path) -> list[dict[str, Any]]:
    """The step records of a metrics.jsonl, sorted by step, one per step (a resumed run's later record wins).

    Lines that are not JSON objects (the last line cut short by a crash) are skipped with a warning; event records
    (those with an ``event`` field) are left out.
    """
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist: no metrics to plot (is it a run directory?)") from None
    by_step: dict[int, dict[str, Any]] = {}
    bad = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            bad += 1
            continue
        if "event" not in record:
            by_step[record["step"]] = record  # later lines overwrite: the resumed part logged that step again
    if bad:
        log.warning("%s: skipped %d line(s) that are not whole records (cut short by a crash?)", path, bad)
    return [by_step[step] for step in sorted(by_step)]


def _read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.json as a dict; {} (with a warning) when it is missing or unreadable, as the curves do not
    need it: only the reference lines do."""
    path = run_dir / layout.CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.warning("%s cannot be read (%s): no log K or monitor thresholds on the curves", path, error)
        return {}
    return config if isinstance(config, dict) else {}


def _monitor(config: dict[str, Any]) -> MonitorConfig:
    """The run's collapse-monitor thresholds (the defaults where the config does not set valid ones)."""
    try:
        return MonitorConfig(**(config.get("monitor") or {}))
    except (TypeError, ValueError):
        return MonitorConfig()


def _values(records: list[dict[str, Any]], field: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold a number for ``field`` (NaN stays: the curve shows a gap)."""
    points = [
        (r["step"], float(r[field]))
        for r in records
        if isinstance(r.get(field), (int, float)) and not isinstance(r.get(field), bool)
    ]
    return [p[0] for p in points], [p[1] for p in points]


def _not_recorded(axes: Axes, field: str) -> None:
    axes.text(0.5, 0.5, f"{field}: not recorded", ha="center", va="center", transform=axes.transAxes, color="grey")


def build_figure(
    records: list[dict[str, Any]], out_dim: int | None = None, monitor: MonitorConfig | None = None, title: str = ""
) -> Figure:
    """The curves figure: one subplot per :data:`PANELS` entry (plus a right-hand axis where a second field is
    recorded), x = optimizer step. ``out_dim`` (K) adds log K to the entropy panel; ``monitor`` its thresholds.

    Built on a bare :class:`Figure` (no pyplot), so nothing opens a window or stays in pyplot's figure registry.
    """
    figure = Figure(figsize=(15, 8), layout="constrained")
    grid = figure.subplots(2, 3, squeeze=False).ravel()
    # A lone point is invisible as a line: mark points while there are few of them.
    marker = "o" if len(records) < 30 else None
    log_k = math.log(out_dim) if out_dim and out_dim > 1 else None
    for axes, panel in zip(grid, PANELS, strict=True):
        axes.set_title(panel.title)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(panel.label)
        axes.grid(alpha=0.3)
        steps, values = _values(records, panel.field)
        if not steps:
            _not_recorded(axes, panel.field)
            continue
        axes.plot(steps, values, marker=marker, markersize=3, color="C0", label=panel.field)
        if panel.log_scale and all(v > 0 for v in values if not math.isnan(v)):
            axes.set_yscale("log")
        if panel.field == "teacher_entropy" and log_k is not None:
            axes.axhline(log_k, linestyle="--", color="black", label=f"log K = {log_k:.2f} (uniform)")
            if monitor is not None:
                axes.axhline(monitor.high_entropy * log_k, linestyle=":", color="C3", label="monitor: uniform")
                axes.axhline(monitor.low_entropy * log_k, linestyle=":", color="C1", label="monitor: one dimension")
            axes.legend(fontsize="small")
        if panel.field == "kl" and monitor is not None and monitor.low_kl > 0:
            axes.axhline(monitor.low_kl, linestyle=":", color="C3", label=f"monitor: no signal ({monitor.low_kl:g})")
            axes.legend(fontsize="small")
        if panel.second is not None:
            second_steps, second_values = _values(records, panel.second)
            if second_steps:
                right = axes.twinx()
                right.plot(second_steps, second_values, marker=marker, markersize=3, color="C2")
                right.set_ylabel(panel.second_label or panel.second, color="C2")
            else:
                axes.set_title(f"{panel.title} ({panel.second} not recorded)")
    if title:
        figure.suptitle(title)
    return figure


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw RUN/metrics.jsonl's curves (see the module docstring) into one PNG, by default RUN/curves.png; returns
    its path. Raises NotFound (one line naming the file) when the run has no metrics.jsonl."""
    run_dir = Path(run_dir)
    records = read_step_records(run_dir / layout.METRICS_FILE)
    if not records:
        raise InputError(f"{run_dir / layout.METRICS_FILE} holds no step records yet: nothing to plot")
    config = _read_config(run_dir)
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    out_dim = model.get("out_dim") if isinstance(model.get("out_dim"), int) else None
    name = config.get("name") if isinstance(config.get("name"), str) else run_dir.name
    first, last = records[0]["step"], records[-1]["step"]
    monitor = _monitor(config) if config else None  # no config: the run's thresholds are unknown
    figure = build_figure(records, out_dim, monitor, f"{name}: steps {first}-{last} ({len(records)} records)")
    out = Path(out) if out is not None else run_dir / layout.CURVES_FILE
    atomic_write(out, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return out
