"""Multi-process training on CPU (gloo, 2 processes, tiny ViT) through the real launchers and the real loop.

Every distributed run here is compared with ONE process training on the same global batch: 16 samples per step
as 2 micro-batches of 8 (2 data workers) on one process, or 1 micro-batch of 8 (1 worker) on each of 2. The data
loader seeds each reader by its global index, so both layouts read exactly the same samples in the same order,
and the loss center is updated once per optimizer step from the whole global batch. Differences left are the
order of floating-point sums (gradient all-reduce vs. accumulation).

Tolerances, and why:
* Losses: relative 1e-5. fp32 sums taken in another order differ by ~1e-7 relative; the weights they lead to
  differ by far less than the lr (~1e-5) per step, so later losses stay within 1e-5 (observed: equal).
* Teacher weights: an absolute bound computed from the run's own schedules. Adam moves each weight by at most
  about lr per step (|m_hat| / sqrt(v_hat) <= 1 since beta1^2 < beta2), so even an update whose sign flipped
  because of rounding moves a student weight by <= 2 lr; the teacher takes (1 - momentum) of each student
  change. Summed over the run that is the bound (observed differences: ~1e-10, bound: ~1e-5).
* Across ranks the teacher must be bit-identical: the run records each rank's sha256 of it.
"""

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
import torch
from support import REPO, free_port, run_ranks

pytest.importorskip("deepspeed")

STEPS = 8
COMMON = (
    f"max_steps={STEPS}",
    "checkpoint_every=2",
    "keep_checkpoints=10",
    "deepspeed.train_batch_size=16",  # micro batch 8: accumulation 2 on one process, 1 on two
    "model.drop_path_rate=0.0",  # drop-path masks come from per-process RNG streams, which differ by layout
    "optim.freeze_last_layer=0.1",  # 4.8 steps: the run crosses the end of the last-layer freeze
)
BACKENDS = {
    "ddp": ("backend=ddp",),
    "zero2": ("backend=deepspeed", "deepspeed.zero_optimization.stage=2"),
    # ZeRO-3 with activation checkpointing of the ViT blocks (recomputation must not change the numbers either).
    "zero3": ("backend=deepspeed", "deepspeed.zero_optimization.stage=3", "model.grad_checkpointing=true"),
    "fsdp": ("backend=fsdp",),
}


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def train_command(nproc: int | None, run_dir: Path, *overrides: str, resume: bool = False) -> list[str]:
    launcher = (
        [sys.executable, "-m", "dino_scale.train"]
        if nproc is None
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "dino_scale.train",
        ]
    )
    workers = 2 if nproc in (None, 1) else 1  # two readers in total, whatever the layout
    sets = [*COMMON, f"data.num_workers={workers}", *overrides]
    command = [*launcher, "--config", "tiny-test.json", "--output-dir", str(run_dir)]
    for item in sets:
        command += ["--set", item]
    return command + (["--resume"] if resume else [])


def run_training(nproc: int | None, run_dir: Path, *overrides: str, resume: bool = False) -> Path:
    result = subprocess.run(
        train_command(nproc, run_dir, *overrides, resume=resume),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"training failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs some steps twice)."""
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def final_digests(run_dir: Path) -> list[str]:
    return [m for m in metrics(run_dir) if m.get("event") == "final"][-1]["teacher_sha256_per_rank"]


def checkpoint_state(run_dir: Path) -> dict:
    directory = run_dir / "checkpoints"
    path = directory / json.loads((directory / "latest.json").read_text())["file"]
    return torch.load(path / "trainer_state.pt" if path.is_dir() else path, map_location="cpu", weights_only=True)


def teacher_bound(reference: Path) -> float:
    """Sum over steps of (1 - momentum_t) * 2 * sum_{u <= t} lr_u: see the module docstring."""
    records = sorted((m for m in metrics(reference) if "loss" in m), key=lambda m: m["step"])
    bound, lr_sum = 0.0, 0.0
    for m in records:
        lr_sum += m["lr"]
        bound += (1 - m["momentum"]) * 2 * lr_sum
    return bound


def assert_same_training(reference: Path, other: Path, world_size: int, steps: int = STEPS) -> None:
    expected, got = losses(reference), losses(other)
    assert sorted(got) == list(range(1, steps + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}"
    reference_teacher, other_teacher = checkpoint_state(reference)["teacher"], checkpoint_state(other)["teacher"]
    worst = max((reference_teacher[k] - other_teacher[k]).abs().max().item() for k in reference_teacher)
    assert worst <= teacher_bound(reference), f"teacher differs by {worst}"
    digests = final_digests(other)
    assert len(digests) == world_size and len(set(digests)) == 1, digests


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def reference(runs: Path) -> Path:
    """One process, the same global batch as 2 accumulation steps."""
    return run_training(None, runs / "reference")


@pytest.fixture(scope="module")
def zero2(runs: Path) -> Path:
    return run_training(2, runs / "zero2", *BACKENDS["zero2"])


@pytest.fixture(scope="module")
def zero3(runs: Path) -> Path:
    return run_training(2, runs / "zero3", *BACKENDS["zero3"])


def test_bound_is_meaningful(reference: Path) -> None:
    # Guards the tolerance itself: a bound of 0 or of the weights' own size would prove nothing.
    assert 1e-9 < teacher_bound(reference) < 1e-3


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_two_processes_match_one(reference: Path, runs: Path, backend: str) -> None:
    assert_same_training(reference, run_training(2, runs / backend, *BACKENDS[backend]), world_size=2)


def test_zero2_matches_one_process(reference: Path, zero2: Path) -> None:
    assert_same_training(reference, zero2, world_size=2)
    # ZeRO 0-2 checkpoints carry a name-keyed copy beside DeepSpeed's shards, for resuming on other counts.
    latest = sorted((zero2 / "checkpoints").glob("step_*"))[-1]
    assert {"deepspeed", "trainer_state.pt", "student_full.pt"} <= {p.name for p in latest.iterdir()}
    # The last layer was frozen in steps 1-5: official DINO's AdamW never saw it then, so it has stepped it 3 times
    # by step 8, the rest 8 times. ZeRO steps it in its flat partition with lr 0 and resets its state after each
    # frozen step: its moments and step count must be those of the one process, which drops its gradients.
    ours = torch.load(latest / "student_full.pt", map_location="cpu", weights_only=True)["optimizer"]["state"]
    official = checkpoint_state(reference)["optimizer"]["state"]
    assert {name: int(s["step"]) for name, s in ours.items()} == {name: int(s["step"]) for name, s in official.items()}
    assert int(ours["head.last_layer.parametrizations.weight.original1"]["step"]) == 3
    for name, state in official.items():  # fp32 sums in another order: ~6e-7 of each tensor's largest value
        for key in ("exp_avg", "exp_avg_sq"):
            worst = (ours[name][key] - state[key]).abs().max().item()
            assert worst <= 1e-5 * state[key].abs().max().item(), f"{name} {key}: {worst}"


def test_zero3_matches_one_process(reference: Path, zero3: Path) -> None:
    assert_same_training(reference, zero3, world_size=2)


def rewind(source: Path, target: Path, step: int) -> Path:
    """A copy of a finished run as it was right after the checkpoint of `step` (later checkpoints removed)."""
    import shutil

    shutil.copytree(source, target)
    for later in (target / "checkpoints").glob("step_*"):
        if int(later.name[5:13]) > step:
            shutil.rmtree(later)
    name = f"step_{step:08d}"
    (target / "checkpoints" / "latest.json").write_text(json.dumps({"step": step, "file": name}))
    return target


@pytest.mark.parametrize("how", ["deepspeed", "local"])
def test_zero2_checkpoint_of_two_processes_resumes_on_one(runs: Path, zero2: Path, how: str) -> None:
    resumed = rewind(zero2, runs / f"zero2-resumed-{how}", step=4)
    if how == "deepspeed":  # DeepSpeed itself on one process, ZeRO-2
        run_training(1, resumed, *BACKENDS["zero2"], resume=True)
    else:  # plain `python -m dino_scale.train`: the single-process debugging path
        run_training(None, resumed, resume=True)
    # Same weights, optimizer state, center and data position: the rest of the run is that of the 2-process run
    # (a lost optimizer state alone would change the next Adam steps by far more than the bound).
    expected = losses(zero2)
    for step in range(5, STEPS + 1):
        assert losses(resumed)[step] == pytest.approx(expected[step], rel=1e-5), step
    ta, tb = checkpoint_state(zero2)["teacher"], checkpoint_state(resumed)["teacher"]
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) <= teacher_bound(zero2)


def test_killed_zero3_run_resumes_to_the_same_result(runs: Path, zero3: Path) -> None:
    run_dir = runs / "zero3-killed"
    process = subprocess.Popen(
        train_command(2, run_dir, *BACKENDS["zero3"]),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = run_dir / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # SIGKILL every process of the job (torchrun starts its workers in their own sessions), as a lost node would.
    for child in psutil.Process(process.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    killed_at = max(losses(run_dir))
    assert killed_at < STEPS, "the run finished before it could be killed; the test proves nothing"

    run_training(2, run_dir, *BACKENDS["zero3"], resume=True)
    expected, got = losses(zero3), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    # Same process count, backend and data position: the resumed run is bit-identical to the uninterrupted one.
    assert final_digests(run_dir) == final_digests(zero3)


def test_deepspeed_launcher_picks_the_deepspeed_backend(runs: Path) -> None:
    run_dir = runs / "launcher"
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus=2",  # on CPU this is the number of processes
        "--master_port",
        str(free_port()),
        "--module",
        *train_command(None, run_dir, "max_steps=2", "deepspeed.zero_optimization.stage=1")[2:],
    ]
    result = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = checkpoint_state(run_dir)
    assert state["backend"] == "deepspeed" and state["data_position"]["world_size"] == 2


def test_deepspeed_bf16_weights_feed_the_ema_through_fp32_master_copies(reference: Path, runs: Path) -> None:
    """DeepSpeed's own bf16 mode keeps bf16 module weights; the EMA must read the fp32 master copies instead.

    With teacher momentum 0 (and no lr warm-up, so that step moves the weights) the first EMA copies the student:
    after one step the teacher must equal the fp32 masters saved in the checkpoint, bit for bit, and hold values
    that bf16 cannot represent.
    """
    bf16 = ("backend=deepspeed", "deepspeed.zero_optimization.stage=2", 'deepspeed.bf16={"enabled": true}')
    one_copying_step = ("max_steps=1", "dino.momentum_teacher=0.0", "optim.warmup_epochs=0")
    run_dir = run_training(2, runs / "zero2-bf16", *bf16, *one_copying_step)
    assert losses(run_dir)[1] == pytest.approx(losses(reference)[1], rel=2e-2)  # bf16 compute, same samples
    latest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    masters = torch.load(latest / "student_full.pt", map_location="cpu", weights_only=True)["student"]
    teacher = checkpoint_state(run_dir)["teacher"]
    assert all(teacher[name].dtype == torch.float32 and torch.equal(teacher[name], masters[name]) for name in teacher)
    cls_token = teacher["backbone.cls_token"]
    assert not torch.equal(cls_token, cls_token.bfloat16().float())  # not the bf16 module weights
    assert len(set(final_digests(run_dir))) == 1


# --- several runs in one launch: resuming on the same and on another process count -------------------------------
#
# A launch costs ~10-20 s of imports (DeepSpeed above all) per process on two shared cores, a tiny run ~2 s. So the
# resume matrix below runs as two launches, one on 2 processes and one on 1, each running a plan of actions: `train`
# (one run of the training loop, in a fresh process group on its own port) and `call` (a function of a test module,
# e.g. copying a run as it was at a checkpoint; every rank calls it, then they wait for each other).

MATRIX_STEPS = 4  # checkpoints at 2 and 4 (COMMON: checkpoint_every=2); the resumed runs continue from 2
MATRIX = {  # the backends not already resumed by the tests above (ZeRO-2 and ZeRO-3 are, from their fixtures)
    "ddp": ("backend=ddp",),
    "zero0": ("backend=deepspeed", "deepspeed.zero_optimization.stage=0"),
    "zero1": ("backend=deepspeed", "deepspeed.zero_optimization.stage=1"),
    "fsdp": ("backend=fsdp",),
}


def launch_plan(world: int, out: Path, plan: list[dict], timeout: float = 600.0) -> list[list[dict]]:
    """Run `plan` on `world` processes started once (see above); returns each rank's results, one per action: for
    `train`, {"record": the final metrics record} or {"error": message, "type": exception class}."""
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / "plan.json"
    plan_file.write_text(json.dumps([{**action, "port": free_port()} for action in plan]))
    tests = Path(__file__).resolve().parents[1]
    logs = [out / f"plan_rank{rank}.log" for rank in range(world)]
    paths = [str(REPO), str(tests), str(tests / "integration"), str(tests / "faults")]
    rank_env = {**env(), "PYTHONPATH": os.pathsep.join(paths)}
    run_ranks([sys.executable, __file__, str(plan_file), str(out)], world, logs, rank_env, timeout, cwd=REPO)
    return [json.loads((out / f"plan_rank{rank}.json").read_text()) for rank in range(world)]


def train_action(run_dir: Path, *overrides: str, resume: bool = False, workers: int = 0) -> dict:
    """A run of the training loop. No data-loader workers by default: forking a process that has already been
    through several DeepSpeed runs can crash the forked worker (seen at random, 1 in ~10 runs)."""
    shards, output = json.dumps(str(REPO / "shards/sample/train")), json.dumps(str(run_dir))
    sets = [*COMMON, f"data.num_workers={workers}", f"data.train_shards={shards}", f"output_dir={output}", *overrides]
    return {"train": {"sets": sets, "resume": resume}}


def call_action(function: str, *args: str) -> dict:
    return {"call": function, "args": list(args)}


def rewound_copy(source: str, target: str, step: str) -> None:
    """(A `call` action, rank 0.) `target`: a copy of the run `source` as it was right after its checkpoint of
    `step` (later checkpoints and their manifests removed, latest.json naming it)."""
    import shutil

    if int(os.environ["RANK"]) != 0:
        return
    shutil.copytree(source, target)
    directory = Path(target) / "checkpoints"
    kept = None
    for entry in directory.glob("step_*"):
        if int(entry.name[5:13]) > int(step):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        elif int(entry.name[5:13]) == int(step) and not entry.name.endswith(".json"):
            kept = entry.name
    assert kept is not None, f"{source} has no checkpoint of step {step}"
    (directory / "latest.json").write_text(json.dumps({"step": int(step), "file": kept}))


def _reset_process_groups() -> None:
    """Between runs in one process: destroy the process group and DeepSpeed's cached groups built on it."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    for name, value in list(vars(groups).items()) if groups else []:
        if name.startswith("_") and name.isupper():
            if isinstance(value, dict):
                value.clear()
            elif name.endswith("GROUP") or name.startswith("_MPU"):
                setattr(groups, name, None)


def _run_plan(plan_file: Path, out: Path) -> None:
    import importlib

    from dino_scale.config import load_config
    from dino_scale.errors import DinoScaleError
    from dino_scale.train.loop import train

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results: list[dict] = []
    for index, action in enumerate(json.loads(plan_file.read_text())):
        os.environ["MASTER_PORT"] = str(action["port"])
        if "call" in action:
            module, name = action["call"].split(":")
            value = getattr(importlib.import_module(module), name)(*action["args"])
            results.append({"value": value})
            (out / f".barrier{index}_{rank}").touch()
            while not all((out / f".barrier{index}_{r}").exists() for r in range(world)):
                time.sleep(0.05)
            continue
        run = action["train"]
        try:
            record = train(load_config("tiny-test.json", run["sets"]), resume=run["resume"])
            results.append({"record": {k: v for k, v in record.items() if isinstance(v, (int, float, str, list))}})
        except DinoScaleError as error:
            results.append({"error": str(error), "type": type(error).__name__})
        finally:
            _reset_process_groups()
        (out / f"plan_rank{rank}.json").write_text(json.dumps(results))  # what is done so far, if a later one hangs
    (out / f"plan_rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def resume_matrix(runs: Path, reference: Path, zero2: Path, zero3: Path) -> Path:
    """On 2 processes: each backend of MATRIX trains MATRIX_STEPS steps straight, then a copy rewound to step 2
    resumes to the end; ZeRO-2's run resumes from its step 4; the 1-process reference's single-file checkpoint resumes
    on 2 processes with ddp. Then on 1 process: each backend of MATRIX resumes its 2-process checkpoint of step 2,
    and ZeRO-3's is refused."""
    out = runs / "matrix"
    two = out / "two"
    plan = []
    for name, sets in MATRIX.items():
        plan.append(train_action(two / name, *sets, f"max_steps={MATRIX_STEPS}"))
        plan.append(call_action("test_distributed:rewound_copy", str(two / name), str(two / f"{name}-resumed"), "2"))
        plan.append(train_action(two / f"{name}-resumed", *sets, f"max_steps={MATRIX_STEPS}", resume=True))
    plan.append(call_action("test_distributed:rewound_copy", str(zero2), str(two / "zero2-resumed"), "4"))
    plan.append(train_action(two / "zero2-resumed", *BACKENDS["zero2"], resume=True))
    plan.append(call_action("test_distributed:rewound_copy", str(reference), str(two / "local-on-ddp"), "6"))
    plan.append(train_action(two / "local-on-ddp", *BACKENDS["ddp"], resume=True))
    plan.append(call_action("test_distributed:rewound_copy", str(reference), str(two / "frozen-local-on-zero2"), "4"))
    plan.append(train_action(two / "frozen-local-on-zero2", *BACKENDS["zero2"], resume=True))
    launch_plan(2, two, plan)

    one = out / "one"
    plan = []
    for name, sets in MATRIX.items():
        plan.append(call_action("test_distributed:rewound_copy", str(two / name), str(one / name), "2"))
        plan.append(train_action(one / name, *sets, f"max_steps={MATRIX_STEPS}", resume=True))
    plan.append(call_action("test_distributed:rewound_copy", str(zero3), str(one / "zero3"), "4"))
    plan.append(train_action(one / "zero3", *BACKENDS["zero3"], resume=True))
    launch_plan(1, one, plan)
    return out


@pytest.mark.parametrize("backend", [*MATRIX, "zero2"])
def test_resumed_on_the_same_process_count_is_bit_identical(resume_matrix: Path, zero2: Path, backend: str) -> None:
    """A run rewound to a checkpoint and resumed on as many processes ends exactly where the uninterrupted one did:
    the same losses after the resume and the same final teacher, bit for bit."""
    straight = zero2 if backend == "zero2" else resume_matrix / "two" / backend
    resumed = resume_matrix / "two" / f"{backend}-resumed"
    first = 4 if backend == "zero2" else 2
    last = max(losses(straight))
    # The copy holds the straight run's metrics up to the end; the resumed run appended its own steps after `first`.
    assert [m["step"] for m in metrics(resumed) if "loss" in m] == [*range(1, last + 1), *range(first + 1, last + 1)]
    for step in range(first + 1, last + 1):
        assert losses(resumed)[step] == losses(straight)[step], step
    assert final_digests(resumed) == final_digests(straight)
    assert len(set(final_digests(resumed))) == 1


@pytest.mark.parametrize("backend", MATRIX)
def test_two_process_checkpoints_resume_on_one(resume_matrix: Path, backend: str) -> None:
    """Each backend's 2-process checkpoint loads on 1 process and training goes on from it. (With one data reader
    instead of two the samples differ, so the losses are not the 2-process run's; ZeRO-2's and FSDP's exact
    reloads on one process are checked by test_zero2_checkpoint_of_two_processes_resumes_on_one and
    test_backend_fsdp.)"""
    straight, resumed = resume_matrix / "two" / backend, resume_matrix / "one" / backend
    assert checkpoint_state(straight)["data_position"]["world_size"] == 2
    state = checkpoint_state(resumed)
    assert state["step"] == MATRIX_STEPS and state["data_position"]["world_size"] == 1
    logged = [m["step"] for m in metrics(resumed) if "loss" in m]
    assert logged == [1, 2, 3, 4, 3, 4]  # the 2-process run's (copied), then steps 3-4 resumed on one process
    assert all(0 < losses(resumed)[step] < 20 for step in (3, 4))
    assert len(final_digests(resumed)) == 1


def test_single_process_checkpoint_resumes_on_two_with_ddp(resume_matrix: Path, reference: Path) -> None:
    resumed = resume_matrix / "two" / "local-on-ddp"
    assert checkpoint_state(resumed)["data_position"]["world_size"] == 2
    for step in (7, 8):
        assert losses(resumed)[step] == pytest.approx(losses(reference)[step], rel=1e-5), step


def test_checkpoint_saved_while_the_last_layer_is_frozen_resumes_on_zero2(resume_matrix: Path, reference: Path) -> None:
    """The one process's step-4 checkpoint has no optimizer state for the frozen last layer (official DINO: its
    gradients were dropped). ZeRO-2 resumes it on 2 processes with a fresh state for it (it used to refuse such a
    checkpoint) and ends where the one process did: the same losses, and the same step counts (the last layer's 3,
    from step 6 on) in its checkpoint."""
    resumed = resume_matrix / "two" / "frozen-local-on-zero2"
    assert (
        "head.last_layer.parametrizations.weight.original1"
        not in torch.load(reference / "checkpoints" / "step_00000004.pt", map_location="cpu", weights_only=True)[
            "optimizer"
        ]["state"]
    )
    for step in range(5, STEPS + 1):
        assert losses(resumed)[step] == pytest.approx(losses(reference)[step], rel=1e-5), step
    latest = sorted((resumed / "checkpoints").glob("step_*"))[-1]
    ours = torch.load(latest / "student_full.pt", map_location="cpu", weights_only=True)["optimizer"]["state"]
    official = checkpoint_state(reference)["optimizer"]["state"]
    assert {name: int(s["step"]) for name, s in ours.items()} == {name: int(s["step"]) for name, s in official.items()}


def test_zero3_checkpoint_on_another_process_count_is_refused_in_one_line(resume_matrix: Path) -> None:
    results = json.loads((resume_matrix / "one" / "plan_rank0.json").read_text())
    refused = results[-1]
    assert refused["type"] == "IncompatibleCheckpoint" and "\n" not in refused["error"]
    assert "written by 2 process(es) with ZeRO stage 3; this run has 1" in refused["error"]
    assert "step_00000004" in refused["error"]  # the newest, and no fallback to the older ones


# --- per-parameter clipping that bites, on every backend, in one launch --------------------------------------------
#
# Official DINO clips each parameter's gradient on its own. A clip of 0.01 is far below the gradients' norms here (the
# global norm falls from ~500 to ~5 over the steps), so most gradients are rescaled in every step, and the update
# depends on it: Adam's per-weight normalisation does not undo a per-parameter factor that changes from step to step
# (with the full lr from the first step, global clipping ends 3.5% away in loss, per-parameter clipping on 2
# processes within 5e-7 of one process: observed). Each backend
# computes the per-parameter norms from its own pieces of the gradients (DDP: whole averaged ones; FSDP2: dim-0
# shards; ZeRO-1/2: fragments of flat partitions; ZeRO-3: partitions), so a piece left out of a norm, or a clip that
# DeepSpeed applied again globally, would show in the losses. The runs cross the end of the last layer's freeze
# (4.8 steps): its optimizer state must come out of the freeze untouched, as a fresh one.

CLIP_STEPS = 8  # losses 7 and 8 come after updates of the unfrozen last layer (the loss of a step is before its update)
CLIPPED = (
    "deepspeed.gradient_clipping=0.01",
    f"max_steps={CLIP_STEPS}",
    "checkpoint_every=1000",
    "optim.lr=0.05",
    "optim.warmup_epochs=0",
)
CLIP_BACKENDS = {**BACKENDS, "zero0": MATRIX["zero0"], "zero1": MATRIX["zero1"]}
OFFLOAD = 'deepspeed.zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}'
# bf16 weights with fp32 gradient accumulation on ZeRO-1: DeepSpeed's BF16_Optimizer, whose gradients we cannot reach
BF16_FP32_ACCUMULATION = ('deepspeed.bf16={"enabled": true}', 'deepspeed.data_types={"grad_accum_dtype": "fp32"}')


@pytest.fixture(scope="module")
def clipped(runs: Path) -> Path:
    """One process (2 readers, as the reference); then on 2 processes each backend with per-parameter clipping,
    DDP with global clipping (the deviation this replaces, to show that the comparison can tell them apart), and two
    DeepSpeed set-ups that must refuse per-parameter clipping before any step: ZeRO-2 with its optimizer offloaded
    (refused from the recipe), ZeRO-1 with bf16 weights and fp32 gradient accumulation (from the engine built)."""
    out = runs / "clipped"
    run_training(None, out / "reference", *CLIPPED)
    plan = [train_action(out / name, *sets, *CLIPPED) for name, sets in CLIP_BACKENDS.items()]
    plan.append(train_action(out / "ddp-global", *BACKENDS["ddp"], *CLIPPED, "optim.clip_mode=global"))
    plan.append(train_action(out / "offload", "backend=deepspeed", OFFLOAD, *CLIPPED))
    plan.append(train_action(out / "bf16-accumulation", *MATRIX["zero1"], *BF16_FP32_ACCUMULATION, *CLIPPED))
    launch_plan(2, out, plan)
    return out


def test_clipping_bites_and_global_clipping_trains_differently(clipped: Path) -> None:
    reference = metrics(clipped / "reference")
    assert min(m["grad_norm"] for m in reference if "grad_norm" in m) > 100 * 0.01  # the logged pre-clip norm
    expected, global_clip = losses(clipped / "reference"), losses(clipped / "ddp-global")
    worst = max(abs(global_clip[s] - expected[s]) / expected[s] for s in expected)
    assert worst > 100 * 1e-5, f"global clipping is within {worst:.2g} of per-parameter clipping: the test is blind"


@pytest.mark.parametrize("backend", CLIP_BACKENDS)
def test_per_parameter_clipping_matches_one_process(clipped: Path, backend: str) -> None:
    assert_same_training(clipped / "reference", clipped / backend, world_size=2, steps=CLIP_STEPS)
    expected = {m["step"]: m["grad_norm"] for m in metrics(clipped / "reference") if "grad_norm" in m}
    got = {m["step"]: m["grad_norm"] for m in metrics(clipped / backend) if "grad_norm" in m}
    assert got == pytest.approx(expected, rel=1e-4)  # the global norm before clipping, whatever holds the pieces


def test_deepspeed_set_ups_without_per_parameter_clipping_refuse_it_in_one_line(clipped: Path) -> None:
    offload, bf16_accumulation = json.loads((clipped / "plan_rank0.json").read_text())[-2:]
    for refused, names in ((offload, "offload_optimizer"), (bf16_accumulation, "BF16_Optimizer (ZeRO stage 1")):
        assert refused["type"] == "ConfigError" and "\n" not in refused["error"]
        assert names in refused["error"] and refused["error"].endswith("set optim.clip_mode=global")
    for name in ("offload", "bf16-accumulation"):  # refused before any step
        assert not (clipped / name / "metrics.jsonl").exists() or not losses(clipped / name)


if __name__ == "__main__":
    _run_plan(Path(sys.argv[1]), Path(sys.argv[2]))
