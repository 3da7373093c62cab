"""`python -m dino_scale.train` ends a rank of a gloo (CPU) job without the interpreter's teardown, whose race with
gloo's threads could abort a rank after a complete run; every other process exits as usual."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch.distributed as dist

from dino_scale.train import command


class _Exited(Exception):
    pass


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """os._exit recorded instead of taken."""
    statuses: list[int] = []

    def fake_exit(status: int) -> None:
        statuses.append(status)
        raise _Exited

    monkeypatch.setattr(command.os, "_exit", fake_exit)
    return statuses


def test_without_a_process_group_the_process_exits_as_usual(exits: list[int]) -> None:
    assert not dist.is_initialized()
    command.leave_gloo_job(0)
    assert exits == []


def test_a_gloo_rank_leaves_with_the_exit_status_its_logs_flushed(
    exits: list[int], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutdowns: list[bool] = []
    monkeypatch.setattr(logging, "shutdown", lambda: shutdowns.append(True))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for code in (0, 75, None, "Error: a message"):
            with pytest.raises(_Exited):
                command.leave_gloo_job(code)
    finally:
        dist.destroy_process_group()
    assert exits == [0, 75, 0, 1]  # what sys.exit would give: None -> 0, a message -> 1
    assert len(shutdowns) == 4
    assert "Error: a message" in capsys.readouterr().err


def test_the_module_entry_point_passes_click_s_exit_status_through() -> None:
    """A bad recipe in a plain process (no group): the one-line error and click's status, unchanged."""
    result = subprocess.run(
        [sys.executable, "-m", "dino_scale.train", "--config", "no-such-recipe.json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode not in (0, None)
    assert "no-such-recipe.json" in result.stderr
