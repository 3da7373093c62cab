"""The collapse monitor's verdicts on hand-made log records (no training)."""

from __future__ import annotations

import logging
import math

import pytest

from dino_scale.config import MonitorConfig
from dino_scale.errors import CollapseError
from dino_scale.train.monitor import CollapseMonitor

K = 256


def record(step: int, entropy_share: float, kl: float = 1.0) -> dict:
    return {"step": step, "teacher_entropy": entropy_share * math.log(K), "kl": kl}


def test_each_sign_is_named() -> None:
    monitor = CollapseMonitor(MonitorConfig(), K)
    assert list(monitor.signs(0.01 * math.log(K), 1.0)) == ["one dimension"]
    assert list(monitor.signs(0.99 * math.log(K), 1.0)) == ["uniform"]
    assert list(monitor.signs(0.5 * math.log(K), 1e-4)) == ["no signal"]
    assert monitor.signs(0.5 * math.log(K), 0.5) == {}


def test_stop_waits_for_patience_then_raises_with_figures() -> None:
    monitor = CollapseMonitor(MonitorConfig(collapse="stop", patience_steps=20), K)
    for step in (10, 20, 30):  # holds from step 10: 20 steps later is step 30
        if step < 30:
            monitor.observe(record(step, 0.995))
    with pytest.raises(CollapseError, match=r"step 30: .*\(uniform\) since step 10: H\(P_t\) = 5\.5\d+ nats, 99\.5%"):
        monitor.observe(record(30, 0.995))


def test_a_break_restarts_the_count(caplog) -> None:
    monitor = CollapseMonitor(MonitorConfig(collapse="stop", patience_steps=20), K)
    monitor.observe(record(10, 0.001))
    monitor.observe(record(20, 0.5))  # recovered
    monitor.observe(record(30, 0.001))
    monitor.observe(record(40, 0.001))  # only 10 steps since it came back
    with pytest.raises(CollapseError, match="one dimension"):
        monitor.observe(record(50, 0.001))


def test_warn_mode_warns_once_per_episode(caplog) -> None:
    monitor = CollapseMonitor(MonitorConfig(collapse="warn", patience_steps=10), K)
    with caplog.at_level(logging.WARNING, logger="dino_scale"):
        for step in range(0, 100, 10):
            monitor.observe(record(step, 0.5, kl=1e-5))
        monitor.observe(record(100, 0.5, kl=1.0))  # recovered
        for step in range(110, 140, 10):
            monitor.observe(record(step, 0.5, kl=1e-5))
    warnings = [r.getMessage() for r in caplog.records if "looks collapsed (no signal)" in r.getMessage()]
    assert len(warnings) == 2 and "KL(P_t || P_s) = 1.00e-05" in warnings[0]


def test_off_and_non_log_steps_do_nothing() -> None:
    monitor = CollapseMonitor(MonitorConfig(collapse="off", patience_steps=1), K)
    for step in range(10):
        monitor.observe(record(step, 0.0, kl=0.0))  # would raise or warn if judged
    assert not monitor._since
    stopping = CollapseMonitor(MonitorConfig(collapse="stop", patience_steps=1), K)
    stopping.observe(None)
    assert not stopping._since
