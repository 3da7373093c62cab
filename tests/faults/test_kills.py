"""Processes killed with SIGKILL: at three different steps of one run (one process, and two processes with
DeepSpeed ZeRO-2), in the middle of a checkpoint write, and one rank of a two-process job. Every interrupted run,
resumed with --resume, ends exactly where the uninterrupted run ends (same losses, same final teacher digest); a
job that loses a rank stops within a bounded time instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from support import REPO, SAMPLE_TRAIN, free_port

pytestmark = pytest.mark.slow

STEPS = 12
COMMON = (
    f"data.train_shards={json.dumps(SAMPLE_TRAIN)}",
    f"max_steps={STEPS}",
    "checkpoint_every=1",
    "keep_checkpoints=2",
    "data.samples_per_epoch=32",
    "epochs=8",  # 2 steps per epoch with two processes of 8
    "data.num_workers=0",
)
ZERO2 = ("backend=deepspeed", "deepspeed.zero_optimization.stage=2", "model.drop_path_rate=0.0")
DDP = ("backend=ddp", "model.drop_path_rate=0.0")
# SIGKILL one process and the launcher notices and stops the rest: torchrun checks its workers every 0.1 s and
# then gives the survivors 30 s to exit after SIGTERM before it SIGKILLs them. The bound leaves room for a loaded
# machine; measured here: about 1 s.
DEAD_RANK_EXIT_BOUND_S = 60

# Runs training in this process with torch.save cut short: at its KILL_AT-th call it writes half the bytes of the
# file and SIGKILLs the process, as a node lost in the middle of a checkpoint write would.
KILL_MID_WRITE = """
import os, signal, sys, torch
kill_at, calls, real_save = int(os.environ["KILL_AT"]), [0], torch.save
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    real_save(obj, f, *args, **kwargs)
    if calls[0] == kill_at:
        f.flush()
        f.truncate(f.tell() // 2)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
from dino_scale.train.command import main
sys.argv = ["dino_scale.train", *sys.argv[1:]]
main()
"""


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **extra}


def command(nproc: int | None, run_dir: Path, *overrides: str, resume: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "dino_scale.train"]
    if nproc is not None:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                    "dino_scale.train"]  # fmt: skip
    args = [*launcher, "--config", "tiny-test.json", "--output-dir", str(run_dir)]
    for item in (*COMMON, *overrides):
        args += ["--set", item]
    return args + (["--resume"] if resume else [])


def run(args: list[str], **env: str) -> None:
    result = subprocess.run(args, cwd=REPO, env=environment(**env), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"training failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def final_digest(run_dir: Path) -> list[str]:
    return [r for r in records(run_dir) if r.get("event") == "final"][-1]["teacher_sha256_per_rank"]


def kill_when(process: subprocess.Popen, run_dir: Path, step: int, victims=None) -> int:
    """SIGKILL the job (or only `victims(process)`) once the log shows `step`; returns the last step logged."""
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline and max(losses(run_dir), default=0) < step:
        time.sleep(0.01)
    if process.poll() is not None:  # finished or failed before the kill: the caller's step check fails
        return STEPS
    targets = victims(process) if victims else [*psutil.Process(process.pid).children(recursive=True), process]
    for target in targets:
        target.send_signal(signal.SIGKILL)
    return max(losses(run_dir), default=0)


def assert_same_run(reference: Path, resumed: Path) -> None:
    assert sorted(losses(resumed)) == list(range(1, STEPS + 1))
    assert losses(resumed) == losses(reference)
    assert final_digest(resumed) == final_digest(reference)


@pytest.mark.parametrize("nproc, backend", [(None, ()), (2, ZERO2)], ids=["one-process", "zero2-two-processes"])
def test_killed_at_three_steps_resumes_to_the_uninterrupted_run(tmp_path: Path, nproc, backend) -> None:
    reference = tmp_path / "reference"
    run(command(nproc, reference, *backend))
    interrupted = tmp_path / "interrupted"
    killed_at = []
    for kill_step in (3, 6, 9):
        process = subprocess.Popen(
            command(nproc, interrupted, *backend, resume=bool(killed_at)),
            cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        killed_at.append(kill_when(process, interrupted, kill_step))
        process.wait(timeout=60)
    assert killed_at == sorted(set(killed_at)) and killed_at[-1] < STEPS, killed_at  # three different steps
    run(command(nproc, interrupted, *backend, resume=True))
    assert_same_run(reference, interrupted)


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    run(command(None, reference))
    interrupted = tmp_path / "interrupted"
    script = [sys.executable, "-c", KILL_MID_WRITE, *command(None, interrupted)[3:]]
    result = subprocess.run(script, cwd=REPO, env=environment(KILL_AT="5"), capture_output=True, timeout=600)
    assert result.returncode == -signal.SIGKILL
    checkpoints = interrupted / "checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 4  # step 5's save never completed
    run(command(None, interrupted, resume=True))
    assert_same_run(reference, interrupted)
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]  # no debris left


def worker_with_rank(rank: int):
    def victims(launcher: subprocess.Popen) -> list[psutil.Process]:
        workers = psutil.Process(launcher.pid).children(recursive=True)
        return [w for w in workers if w.environ().get("RANK") == str(rank)]

    return victims


def test_a_dead_rank_stops_the_job_in_bounded_time_and_it_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        command(2, run_dir, *DDP), cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    killed_at = kill_when(process, run_dir, 4, victims=worker_with_rank(1))
    started = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=DEAD_RANK_EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
        process.kill()
        pytest.fail(f"the job still ran {DEAD_RANK_EXIT_BOUND_S} s after rank 1 died")
    waited = time.monotonic() - started
    assert process.returncode != 0 and killed_at < STEPS
    assert "Signals.SIGKILL" in stderr or "SIGKILL" in stderr, stderr[-2000:]
    print(f"the job stopped {waited:.1f} s after rank 1 was killed at step {killed_at}")
    run(command(2, run_dir, *DDP, resume=True))
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert len(set(final_digest(run_dir))) == 1


def test_without_a_launcher_the_survivor_says_a_peer_died_in_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    args = command(None, run_dir, *DDP, "max_steps=400", "epochs=400", "log_every=1")
    ranks = [
        subprocess.Popen(args, cwd=REPO, env=environment(**rendezvous, RANK=str(rank)), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]  # fmt: skip
    killed_at = kill_when(ranks[0], run_dir, 3, victims=lambda _: [psutil.Process(ranks[1].pid)])
    try:
        _, stderr = ranks[0].communicate(timeout=DEAD_RANK_EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        ranks[0].kill()
        pytest.fail(f"rank 0 still ran {DEAD_RANK_EXIT_BOUND_S} s after rank 1 died")
    ranks[1].wait(timeout=10)
    assert ranks[0].returncode == 1 and killed_at < 400
    error_lines = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and "another process of this job stopped" in error_lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
