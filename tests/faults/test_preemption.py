"""Preemption: SIGTERM, SIGINT and SIGUSR1 end a training run after its current optimizer step with a checkpoint on
every rank and exit status 75; `--resume` then ends exactly where the uninterrupted run ends (same losses, same final
teacher digest), with one process and with two (where the signal reaches only one rank, as a node-local notice
would: both ranks still stop at the same step)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import REPO, free_port
from test_kills import DDP, STEPS, assert_same_run, command, environment, losses, records, run

from dino_scale.errors import PREEMPTED_EXIT_STATUS

pytestmark = pytest.mark.slow

LOG_EACH_STEP = ("log_every=1", "checkpoint_every=100")  # no scheduled checkpoint before the end: only the signal's


def signal_when(processes: list[subprocess.Popen], run_dir: Path, step: int, signum: int, targets: list[int]) -> None:
    """Send `signum` to processes[i] for i in `targets` once the log shows `step`."""
    deadline = time.monotonic() + 300
    while all(p.poll() is None for p in processes) and time.monotonic() < deadline:
        if max(losses(run_dir), default=0) >= step:
            break
        time.sleep(0.01)
    for index in targets:
        processes[index].send_signal(signum)


def wait_all(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in processes]


def checkpoint_step(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]


def test_sigterm_checkpoints_and_the_resumed_run_matches_the_uninterrupted_one(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    run(command(None, reference, *LOG_EACH_STEP))
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        command(None, interrupted, *LOG_EACH_STEP), cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    signal_when([process], interrupted, 3, signal.SIGTERM, [0])
    [(status, stderr)] = wait_all([process])
    assert status == PREEMPTED_EXIT_STATUS, stderr[-3000:]
    stopped_at = checkpoint_step(interrupted)
    assert 3 <= stopped_at < STEPS
    assert max(losses(interrupted)) == stopped_at  # the step under way was finished, no further one was started
    error_lines = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and f"stopped by SIGTERM after step {stopped_at}" in error_lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert [r for r in records(interrupted) if r.get("event") == "preempted"][0]["signal"] == "SIGTERM"
    run(command(None, interrupted, *LOG_EACH_STEP, resume=True))
    assert_same_run(reference, interrupted)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1], ids=["SIGINT", "SIGUSR1"])
def test_sigint_and_sigusr1_also_stop_with_a_checkpoint(tmp_path: Path, signum: int) -> None:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        command(None, run_dir, *LOG_EACH_STEP), cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    signal_when([process], run_dir, 2, signum, [0])
    [(status, stderr)] = wait_all([process])
    assert status == PREEMPTED_EXIT_STATUS, stderr[-3000:]
    assert checkpoint_step(run_dir) == max(losses(run_dir)) < STEPS
    assert f"stopped by {signal.Signals(signum).name}" in stderr


def test_a_signal_to_one_rank_stops_both_at_the_same_step_and_the_job_resumes_exactly(tmp_path: Path) -> None:
    def launch(run_dir: Path, resume: bool = False) -> list[subprocess.Popen]:
        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
        args = command(None, run_dir, *DDP, *LOG_EACH_STEP, resume=resume)
        return [
            subprocess.Popen(args, cwd=REPO, env=environment(**rendezvous, RANK=str(rank), LOCAL_RANK=str(rank)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for rank in (0, 1)
        ]  # fmt: skip

    reference = tmp_path / "reference"
    assert [status for status, _ in wait_all(launch(reference))] == [0, 0]
    interrupted = tmp_path / "interrupted"
    ranks = launch(interrupted)
    signal_when(ranks, interrupted, 3, signal.SIGTERM, [1])  # only rank 1 hears it
    outcome = wait_all(ranks)
    logs = "\n".join(f"--- rank {rank} ---\n{stderr[-3000:]}" for rank, (_, stderr) in enumerate(outcome))
    assert [status for status, _ in outcome] == [PREEMPTED_EXIT_STATUS] * 2, logs
    stopped_at = checkpoint_step(interrupted)
    assert 3 <= stopped_at < STEPS
    for _, stderr in outcome:  # both ranks name the same checkpoint
        assert f"after step {stopped_at}: checkpoint" in stderr, stderr[-2000:]
    assert [status for status, _ in wait_all(launch(interrupted, resume=True))] == [0, 0]
    assert_same_run(reference, interrupted)
