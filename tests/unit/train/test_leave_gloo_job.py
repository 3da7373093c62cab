"""`python -m dino_scale.train` and the `dino-scale` program end a rank of a gloo (CPU) job without the interpreter's
teardown, whose race with gloo's threads could abort a rank after a complete run; every other process exits as usual."""

from __future__ import annotations

import logging
import subprocess
import sys

import click
import pytest
import torch.distributed as dist

from dino_scale import cli
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


@pytest.mark.parametrize(
    "program",
    [["-m", "dino_scale.train"], ["-m", "dino_scale", "train"]],
    ids=["python -m dino_scale.train", "python -m dino_scale train"],
)
def test_the_entry_points_pass_click_s_exit_status_through(program: list[str]) -> None:
    """A bad recipe in a plain process (no group): the one-line error and click's status, unchanged."""
    result = subprocess.run(
        [sys.executable, *program, "--config", "no-such-recipe.json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr  # what dino_scale.command gives bad input
    assert "no-such-recipe.json" in result.stderr


@pytest.mark.parametrize("status", [0, 75, 2])
def test_the_dino_scale_program_leaves_a_gloo_job_through_leave_gloo_job(
    status: int, exits: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`torchrun --no-python dino-scale train`: the console script's entry point (cli.run) ends a gloo rank with the
    command's status through os._exit, as `python -m dino_scale.train` does."""

    @click.command()
    def finish() -> None:
        raise SystemExit(status)

    monkeypatch.setattr(cli, "main", finish)
    monkeypatch.setattr(sys, "argv", ["dino-scale"])  # not pytest's arguments
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(_Exited):
            cli.run()
    finally:
        dist.destroy_process_group()
    assert exits == [status]
