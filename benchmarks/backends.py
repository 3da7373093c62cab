"""Step time, images/s per device and peak memory per rank for each training backend, by launching the real trainer.

Every configuration is one short run of ``python -m dino_scale.train`` (through ``torch.distributed.run`` for more
than one process) with ``max_steps``, ``log_every=1`` and the per-device micro batch set on the command line. The
numbers come from the run's ``metrics.jsonl``: the first ``--warmup`` logged steps are dropped, the step time and
images/s are medians over the rest, and peak memory is the trainer's own per-rank figure (CUDA max allocated on a
GPU, max RSS on a CPU). A configuration that fails is reported with the last lines of its output; the others run on.

Configurations (``--backends``, comma-separated): ``local`` (always one process), ``ddp``, ``fsdp``, ``deepspeed``
(ZeRO stage as in the recipe) and ``zero0`` .. ``zero3`` (DeepSpeed with that stage). ``--grad-checkpointing
on|off|both`` adds ``model.grad_checkpointing`` (``both`` runs every backend twice, the second labelled ``+ckpt``).

The script sets ``deepspeed.train_micro_batch_size_per_gpu`` to ``--micro-batch``, ``train_batch_size`` to
micro x processes and ``gradient_accumulation_steps`` to 1 (one optimizer step per forward), and, unless you
``--set data.samples_per_epoch=...`` yourself, makes one epoch exactly as long as the run (the sample data then
repeats within the epoch as needed, and no epoch boundary restarts the data loader mid-measurement). ``--set``
overrides are passed on last, so they win. With no GPU visible (or ``--set device="cpu"``) DeepSpeed runs get
``DS_ACCELERATOR=cpu``. The JSON output holds the exact command and environment of every run.

Usage, CPU (this sandbox; seconds per configuration)::

    python benchmarks/backends.py --recipe tiny-test.json --micro-batch 8 --nproc 2 --steps 6 --warmup 2 \\
        --backends local,ddp,zero0,zero1,zero2,zero3,fsdp --set data.num_workers=0 --json bench-cpu.json

Usage, GPUs (one node; ``--nproc`` = GPUs to use)::

    # ViT-S/16 throughput, every backend, 8 GPUs, 64 images per GPU
    python benchmarks/backends.py --recipe vits16.json --micro-batch 64 --nproc 8 --steps 40 --warmup 10 \\
        --backends ddp,zero0,zero1,zero2,zero3,fsdp --json vits16-8gpu.json

    # ViT-B/8 throughput with activation checkpointing, 32 images per GPU
    python benchmarks/backends.py --recipe vitb8.json --micro-batch 32 --nproc 8 --steps 30 --warmup 10 \\
        --backends ddp,zero1,zero2,zero3,fsdp --grad-checkpointing on --json vitb8-8gpu.json

    # Largest ViT-B/8 micro batch per GPU: plain DDP vs DeepSpeed ZeRO-3, with and without activation
    # checkpointing (doubling from 8 until CUDA runs out of memory, then bisecting to a multiple of 4)
    python benchmarks/backends.py --recipe vitb8.json --find-max-batch --nproc 8 --backends ddp,zero3 \\
        --grad-checkpointing both --start-batch 8 --resolution 4 --json vitb8-max-batch.json

ZeRO-3 shards the student's weights, gradients and optimizer state over the processes, so its memory advantage
over DDP grows with ``--nproc`` (on one GPU there is nothing to shard; the EMA teacher is a full copy on every rank
with any backend). The data pipeline (``data.num_workers`` per process)
can bound images/s for the small models: compare with ``--set data.num_workers=N`` before blaming a backend.
``--find-max-batch`` treats a run that exits non-zero with "out of memory" in its output as "does not fit"; any
other failure stops the search for that configuration and is reported. It runs ``--steps`` (default 3) steps, so
the optimizer state exists before the last step; memory growth later in a long run is not seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dino_scale.io import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parent.parent
OOM_MARKERS = ("out of memory", "outofmemoryerror", "cublas_status_alloc_failed", "can't allocate memory")
TAIL_LINES = 25


# ----------------------------------------------------------------------------------------------------------------
# Configurations and commands
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One configuration to measure: a trainer backend, its ZeRO stage and the activation checkpointing setting."""

    name: str  # as given in --backends: local, ddp, fsdp, deepspeed, zero0..zero3
    backend: str  # the trainer's backend= value
    zero_stage: int | None = None  # None: as the recipe says (or not applicable)
    grad_checkpointing: bool | None = None  # None: as the recipe says

    @property
    def label(self) -> str:
        return self.name + ("+ckpt" if self.grad_checkpointing else "")

    def processes(self, nproc: int) -> int:
        return 1 if self.backend == "local" else nproc


def parse_backends(spec: str, grad_checkpointing: str = "recipe") -> list[Variant]:
    """`local,ddp,zero3` -> Variants; `grad_checkpointing` is recipe|on|off|both (both: each without, then with)."""
    settings: dict[str, list[bool | None]] = {
        "recipe": [None],
        "on": [True],
        "off": [False],
        "both": [False, True],
    }
    if grad_checkpointing not in settings:
        raise ValueError(f"--grad-checkpointing must be one of {', '.join(settings)}, got {grad_checkpointing!r}")
    variants: list[Variant] = []
    for raw in spec.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name in ("local", "ddp", "fsdp", "deepspeed"):
            backend, stage = name, None
        elif name.startswith("zero") and name[4:] in ("0", "1", "2", "3"):
            backend, stage = "deepspeed", int(name[4:])
        else:
            raise ValueError(f"unknown backend {raw!r}: use local, ddp, fsdp, deepspeed or zero0..zero3")
        for ckpt in settings[grad_checkpointing]:
            variant = Variant(name, backend, stage, ckpt)
            if variant not in variants:
                variants.append(variant)
    if not variants:
        raise ValueError("--backends lists no configuration")
    return variants


def has_override(extra: Sequence[str], key: str) -> bool:
    """Whether one of the user's `--set key=value` items sets `key`."""
    return any(item.split("=", 1)[0].strip() == key for item in extra)


def override_value(extra: Sequence[str], key: str) -> Any:
    """The (JSON-decoded) value the last `--set key=...` gives `key`, or None."""
    value = None
    for item in extra:
        name, _, raw = item.partition("=")
        if name.strip() == key:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
    return value


def train_overrides(variant: Variant, micro_batch: int, nproc: int, steps: int, extra: Sequence[str] = ()) -> list[str]:
    """The `--set` items of one run: backend, steps, logging, batch, then the variant's own, then the user's."""
    processes = variant.processes(nproc)
    items = [
        f"backend={variant.backend}",
        f"max_steps={steps}",
        "log_every=1",
        "checkpoint_every=100000",
        f"deepspeed.train_micro_batch_size_per_gpu={micro_batch}",
        "deepspeed.gradient_accumulation_steps=1",
        f"deepspeed.train_batch_size={micro_batch * processes}",
    ]
    if not has_override(extra, "data.samples_per_epoch"):
        items.append(f"data.samples_per_epoch={micro_batch * processes * steps}")
    if variant.zero_stage is not None:
        items.append(f"deepspeed.zero_optimization.stage={variant.zero_stage}")
    if variant.grad_checkpointing is not None:
        items.append(f"model.grad_checkpointing={json.dumps(variant.grad_checkpointing)}")
    return items + list(extra)


def build_command(
    variant: Variant,
    recipe: str,
    run_dir: Path,
    micro_batch: int,
    nproc: int,
    steps: int,
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The trainer's command line: plain `python -m dino_scale.train` for `local`, torch.distributed.run otherwise."""
    if variant.backend == "local":
        launcher = [python, "-m", "dino_scale.train"]
    else:
        launcher = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        launcher += ["-m", "dino_scale.train"]
    command = launcher + ["--config", recipe, "--output-dir", str(run_dir)]
    for item in train_overrides(variant, micro_batch, nproc, steps, extra):
        command += ["--set", item]
    return command


def extra_env(variant: Variant, extra: Sequence[str], cuda_available: bool) -> dict[str, str]:
    """Environment additions of one run: DeepSpeed on a CPU needs DS_ACCELERATOR=cpu (unless the caller set one)."""
    on_cpu = not cuda_available or override_value(extra, "device") == "cpu"
    if variant.backend == "deepspeed" and on_cpu and "DS_ACCELERATOR" not in os.environ:
        return {"DS_ACCELERATOR": "cpu"}
    return {}


def shell_command(command: Sequence[str], env: dict[str, str]) -> str:
    """A copy-pasteable form of the command, with its environment additions in front."""
    prefix = [f"{key}={shlex.quote(value)}" for key, value in sorted(env.items())]
    return " ".join(prefix + [shlex.quote(part) for part in command])


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


class MetricsError(ValueError):
    """metrics.jsonl is missing or holds too few step records to summarise."""


def read_step_records(path: Path) -> list[dict[str, Any]]:
    """The per-step records of a metrics.jsonl in file order (records with an `event` key are skipped)."""
    if not path.is_file():
        raise MetricsError(f"{path} does not exist (the run logged no step)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MetricsError(f"{path}:{number} is not JSON: {error}") from None
        if isinstance(record, dict) and "event" not in record and "step" in record:
            records.append(record)
    return records


def elementwise_max(rows: Iterable[Sequence[float]]) -> list[float]:
    """[[1, 5], [3, 2]] -> [3, 5]; rows of unequal length are padded with nothing (the longest decides)."""
    result: list[float] = []
    for row in rows:
        for index, value in enumerate(row):
            if index < len(result):
                result[index] = max(result[index], float(value))
            else:
                result.append(float(value))
    return result


def summarize_records(records: Sequence[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Drop the first `warmup` step records; medians of step time and images/s, per-rank peak memory (max)."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    kept = list(records[warmup:])
    if not kept:
        raise MetricsError(f"{len(records)} step record(s) logged, none left after dropping {warmup} warm-up step(s)")
    step_times = [float(r["step_time_s"]) for r in kept]
    per_device = [float(r["images_per_s_per_device"]) for r in kept]
    total = [float(r["images_per_s"]) for r in kept]
    per_rank = elementwise_max(r.get("peak_memory_gb_per_rank") or [r["peak_memory_gb"]] for r in kept)
    return {
        "steps_measured": len(kept),
        "first_step_measured": kept[0]["step"],
        "last_step_measured": kept[-1]["step"],
        "step_time_s_median": statistics.median(step_times),
        "step_time_s_min": min(step_times),
        "step_time_s_max": max(step_times),
        "images_per_s_per_device_median": statistics.median(per_device),
        "images_per_s_median": statistics.median(total),
        "peak_memory_gb_per_rank": per_rank,
        "peak_memory_gb_max": max(per_rank),
        "loss_last": float(kept[-1]["loss"]),
    }


def summarize_metrics(path: Path, warmup: int) -> dict[str, Any]:
    """`summarize_records` of a metrics.jsonl file."""
    return summarize_records(read_step_records(path), warmup)


def is_oom(output: str) -> bool:
    """Whether a failed run's output says it ran out of memory (CUDA OOM, cuBLAS allocation, CPU allocator)."""
    text = output.lower()
    return any(marker in text for marker in OOM_MARKERS)


# ----------------------------------------------------------------------------------------------------------------
# Running one configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one trainer run gave: status ok | oom | failed | timeout, the summary (ok) or the output's tail."""

    label: str
    backend: str
    zero_stage: int | None
    grad_checkpointing: bool | None
    processes: int
    micro_batch: int
    status: str
    command: list[str]
    command_line: str
    env: dict[str, str]
    run_dir: str
    wall_s: float
    returncode: int | None = None
    summary: dict[str, Any] | None = None
    error: str | None = None
    output_tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BenchSettings:
    """What every run shares: recipe, processes, steps, warm-up, extra overrides, where runs go, limits."""

    recipe: str
    nproc: int
    steps: int
    warmup: int
    extra: tuple[str, ...]
    work_dir: Path
    timeout_s: float
    keep_runs: bool
    cuda_available: bool
    quiet: bool = False


def output_tail(text: str, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` lines of a run's output, without torchrun's own closing traceback (which only says that a
    worker failed, and would push the worker's actual error out of view); a one-line note replaces it."""
    all_lines = text.rstrip().splitlines()
    launcher = next((i for i, line in enumerate(all_lines) if "ChildFailedError" in line), None)
    note: list[str] = []
    if launcher is not None:
        starts = [i for i, line in enumerate(all_lines[:launcher]) if line.startswith("Traceback (most recent call")]
        if starts:
            all_lines = all_lines[: starts[-1]]
            note = ["[torch.distributed.run: a worker failed; the launcher's traceback is left out]"]
    return all_lines[-lines:] + note


def _log(settings: BenchSettings, message: str) -> None:
    if not settings.quiet:
        print(message, file=sys.stderr, flush=True)


def run_configuration(variant: Variant, micro_batch: int, settings: BenchSettings) -> RunResult:
    """Launch one trainer run, wait (up to the timeout), and summarise its metrics; never raises for a bad run."""
    processes = variant.processes(settings.nproc)
    run_dir = settings.work_dir / f"{variant.label}-np{processes}-mb{micro_batch}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl is appended to: a stale one would mix runs
    run_dir.mkdir(parents=True)
    command = build_command(
        variant, settings.recipe, run_dir, micro_batch, settings.nproc, settings.steps, settings.extra
    )
    env_add = extra_env(variant, settings.extra, settings.cuda_available)
    result = RunResult(
        label=variant.label,
        backend=variant.backend,
        zero_stage=variant.zero_stage,
        grad_checkpointing=variant.grad_checkpointing,
        processes=processes,
        micro_batch=micro_batch,
        status="failed",
        command=command,
        command_line=shell_command(command, env_add),
        env=env_add,
        run_dir=str(run_dir),
        wall_s=0.0,
    )
    _log(settings, f"[bench] {variant.label}: {processes} process(es), micro batch {micro_batch} ...")
    log_path = run_dir / "train.log"
    start = time.monotonic()
    timed_out = False
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, **env_add},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout stops the launcher's workers too
        )
        try:
            result.returncode = process.wait(timeout=settings.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(process)
        except BaseException:
            _stop_group(process)  # Ctrl-C: leave no orphaned trainer behind
            raise
    result.wall_s = round(time.monotonic() - start, 2)
    output = log_path.read_text(encoding="utf-8", errors="replace")
    if timed_out:
        result.status, result.error = "timeout", f"no exit after {settings.timeout_s:g} s; stopped"
    elif result.returncode != 0:
        result.status = "oom" if is_oom(output) else "failed"
        result.error = f"exit code {result.returncode}" + (" (out of memory)" if result.status == "oom" else "")
    else:
        try:
            result.summary = summarize_metrics(run_dir / "metrics.jsonl", settings.warmup)
            result.status = "ok"
        except (MetricsError, KeyError, TypeError, ValueError) as error:
            result.error = f"could not summarise metrics: {error!r}"
    if not result.ok:
        result.output_tail = output_tail(output)
    _log(settings, f"[bench] {variant.label} mb{micro_batch}: {result.status} ({result.wall_s:.1f} s)")
    if not settings.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of big models fill disks quickly
    return result


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the run's process group, then SIGKILL it if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ----------------------------------------------------------------------------------------------------------------
# Largest micro batch that fits
# ----------------------------------------------------------------------------------------------------------------


class SearchAborted(RuntimeError):
    """A trial failed for a reason other than memory; the search cannot conclude."""


@dataclass
class SearchResult:
    """Largest batch that fits (None: not even the smallest tried), the smallest that did not, and every trial."""

    largest_fitting: int | None
    smallest_failing: int | None
    capped: bool  # every batch up to the limit fitted
    trials: list[tuple[int, bool]]


def find_max_fitting(fits: Callable[[int], bool], start: int, limit: int, resolution: int = 1) -> SearchResult:
    """Largest b in [1, limit] with fits(b), assuming fits is monotone (true up to some b, false after).

    Doubles from `start` until a batch fails (or halves from it until one fits), then bisects between the
    largest fitting and the smallest failing batch until they are `resolution` apart (midpoints are kept on
    multiples of `resolution` when possible). `fits` may raise (e.g. SearchAborted) to stop the search.
    """
    if start < 1 or limit < 1 or resolution < 1:
        raise ValueError(f"need start, limit, resolution >= 1, got {start}, {limit}, {resolution}")
    start = min(start, limit)
    trials: list[tuple[int, bool]] = []
    known: dict[int, bool] = {}

    def test(batch: int) -> bool:
        if batch not in known:
            known[batch] = bool(fits(batch))
            trials.append((batch, known[batch]))
        return known[batch]

    good: int | None = None
    bad: int | None = None
    if test(start):
        good = start
        while bad is None and good < limit:
            candidate = min(good * 2, limit)
            if test(candidate):
                good = candidate
            else:
                bad = candidate
        if bad is None:
            return SearchResult(good, None, True, trials)
    else:
        bad = start
        candidate = start // 2
        while candidate >= 1:
            if test(candidate):
                good = candidate
                break
            bad = candidate
            candidate //= 2
        if good is None:
            return SearchResult(None, bad, False, trials)
    while bad - good > resolution:
        middle = (good + bad) // 2
        aligned = middle - middle % resolution
        if good < aligned < bad:
            middle = aligned
        if test(middle):
            good = middle
        else:
            bad = middle
    return SearchResult(good, bad, False, trials)


def search_max_batch(
    variant: Variant,
    settings: BenchSettings,
    start: int,
    limit: int,
    resolution: int,
    runner: Callable[[Variant, int, BenchSettings], RunResult] = run_configuration,
) -> dict[str, Any]:
    """`find_max_fitting` over real runs of one configuration; OOM = does not fit, other failures abort."""
    runs: list[RunResult] = []

    def fits(batch: int) -> bool:
        result = runner(variant, batch, settings)
        runs.append(result)
        if result.ok:
            return True
        if result.status == "oom":
            return False
        raise SearchAborted(f"micro batch {batch}: {result.status} ({result.error})")

    outcome: dict[str, Any] = {
        "label": variant.label,
        "backend": variant.backend,
        "zero_stage": variant.zero_stage,
        "grad_checkpointing": variant.grad_checkpointing,
        "processes": variant.processes(settings.nproc),
    }
    try:
        search = find_max_fitting(fits, start, limit, resolution)
    except SearchAborted as error:
        outcome.update(status="failed", error=str(error), max_micro_batch=None, smallest_failing=None, capped=False)
    else:
        outcome.update(
            status="ok" if search.largest_fitting is not None else "none_fits",
            error=None,
            max_micro_batch=search.largest_fitting,
            smallest_failing=search.smallest_failing,
            capped=search.capped,
        )
    best = [r for r in runs if r.ok and r.micro_batch == outcome["max_micro_batch"]]
    outcome["at_max"] = best[0].summary if best else None
    outcome["trials"] = [r.to_dict() for r in runs]
    return outcome


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain fixed-width text table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(cell).ljust(widths[i]) if i == 0 else str(cell).rjust(widths[i]) for i, cell in enumerate(cells)
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def throughput_table(results: Sequence[RunResult]) -> str:
    """backend | processes | micro batch | step time median | images/s per device | peak memory per rank (max)."""
    header = ["config", "procs", "micro", "step s (median)", "img/s/device", "img/s total", "peak GB/rank", "status"]
    rows = []
    for r in results:
        s = r.summary or {}
        rows.append(
            [
                r.label,
                str(r.processes),
                str(r.micro_batch),
                _fmt(s.get("step_time_s_median"), 4),
                _fmt(s.get("images_per_s_per_device_median"), 1),
                _fmt(s.get("images_per_s_median"), 1),
                _fmt(s.get("peak_memory_gb_max"), 3),
                r.status if r.ok else r.status.upper(),
            ]
        )
    return format_table(rows, header)


def max_batch_table(outcomes: Sequence[dict[str, Any]]) -> str:
    """config | processes | largest micro batch | first failing | img/s/device and peak memory at the largest."""
    header = ["config", "procs", "max micro", "first OOM", "img/s/device @max", "peak GB/rank @max", "status"]
    rows = []
    for o in outcomes:
        at_max = o.get("at_max") or {}
        largest = o["max_micro_batch"]
        rows.append(
            [
                o["label"],
                str(o["processes"]),
                "-" if largest is None else f"{largest}{'+' if o['capped'] else ''}",
                "-" if o["smallest_failing"] is None else str(o["smallest_failing"]),
                _fmt(at_max.get("images_per_s_per_device_median"), 1),
                _fmt(at_max.get("peak_memory_gb_max"), 3),
                o["status"] if o["status"] == "ok" else o["status"].upper(),
            ]
        )
    return format_table(rows, header)


def failure_report(results: Sequence[RunResult]) -> str:
    """The error and last output lines of every run that did not succeed."""
    blocks = []
    for r in results:
        if r.ok:
            continue
        body = "\n".join("    " + line for line in r.output_tail)
        blocks.append(f"--- {r.label} (micro batch {r.micro_batch}): {r.error}\n    $ {r.command_line}\n{body}")
    return "\n".join(blocks)


def environment_info() -> dict[str, Any]:
    """Host, Python, torch and accelerator, for the JSON report."""
    info: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
    except ImportError:
        info["torch"] = None
        info["cuda_available"] = False
    return info


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/backends.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", required=True, help="Recipe JSON path or shipped name (tiny-test.json).")
    parser.add_argument("--backends", default="local,ddp", help="Comma-separated: local,ddp,fsdp,deepspeed,zero0..3.")
    parser.add_argument("--nproc", type=int, default=1, help="Processes (GPUs) for every backend but local.")
    parser.add_argument("--micro-batch", type=int, help="Per-device micro batch (default: the recipe's).")
    parser.add_argument("--steps", type=int, help="Optimizer steps per run (default 20; 3 with --find-max-batch).")
    parser.add_argument("--warmup", type=int, help="Logged steps dropped before measuring (default 5; 1 with search).")
    parser.add_argument(
        "--grad-checkpointing",
        choices=["recipe", "on", "off", "both"],
        default="recipe",
        help="model.grad_checkpointing per run; 'both' measures every backend without and with it.",
    )
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], metavar="KEY=JSON", help="Extra trainer override (wins)."
    )
    parser.add_argument("--json", type=Path, help="Write the results (with the exact commands) to this file.")
    parser.add_argument("--work-dir", type=Path, help="Where run directories go (default: a temporary directory).")
    parser.add_argument("--keep-runs", action="store_true", help="Keep run directories (logs, metrics, checkpoints).")
    parser.add_argument("--timeout", type=float, default=1800.0, help="Seconds before one run is stopped (1800).")
    parser.add_argument("--find-max-batch", action="store_true", help="Search the largest micro batch that fits.")
    parser.add_argument("--start-batch", type=int, default=8, help="Search: first micro batch tried (8).")
    parser.add_argument("--max-batch", type=int, default=4096, help="Search: never try more than this (4096).")
    parser.add_argument("--resolution", type=int, default=1, help="Search: stop bisecting at this gap (1).")
    parser.add_argument("--quiet", action="store_true", help="No progress lines on stderr.")
    return parser


def recipe_micro_batch(recipe: str, extra: Sequence[str] = ()) -> int:
    """The recipe's deepspeed.train_micro_batch_size_per_gpu (read with the trainer's own config loader)."""
    from dino_scale.config import load_config

    return load_config(recipe, list(extra)).micro_batch_size


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or the search), print the table, write the JSON report; returns the report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        variants = parse_backends(args.backends, args.grad_checkpointing)
    except ValueError as error:
        parser.error(str(error))
    steps = args.steps if args.steps is not None else (3 if args.find_max_batch else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.find_max_batch else 5)
    if args.nproc < 1 or steps < 1 or warmup < 0:
        parser.error("need --nproc >= 1, --steps >= 1, --warmup >= 0")
    if warmup >= steps:
        parser.error(f"--warmup {warmup} leaves no measured step of --steps {steps}")
    if args.find_max_batch and (args.start_batch < 1 or args.max_batch < 1 or args.resolution < 1):
        parser.error("need --start-batch, --max-batch, --resolution >= 1")
    for key in ("deepspeed.train_micro_batch_size_per_gpu", "deepspeed.train_batch_size", "backend"):
        if has_override(args.extra, key):
            parser.error(f"--set {key}=... is set per run by this script; use --micro-batch / --backends")
    recipe = str(Path(args.recipe).resolve()) if Path(args.recipe).is_file() else args.recipe

    temporary = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="dino-bench-")) if temporary else args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = BenchSettings(
        recipe=recipe,
        nproc=args.nproc,
        steps=steps,
        warmup=warmup,
        extra=tuple(args.extra),
        work_dir=work_dir,
        timeout_s=args.timeout,
        keep_runs=args.keep_runs,
        cuda_available=_cuda_available(),
        quiet=args.quiet,
    )
    report: dict[str, Any] = {
        "mode": "find_max_batch" if args.find_max_batch else "throughput",
        "recipe": args.recipe,
        "nproc": args.nproc,
        "steps": steps,
        "warmup": warmup,
        "extra_overrides": list(args.extra),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment_info(),
    }
    try:
        if args.find_max_batch:
            report.update(start_batch=args.start_batch, max_batch=args.max_batch, resolution=args.resolution)
            outcomes = []
            for variant in variants:
                outcomes.append(search_max_batch(variant, settings, args.start_batch, args.max_batch, args.resolution))
            report["results"] = outcomes
            print(max_batch_table(outcomes))
            for outcome in outcomes:
                if outcome["status"] == "failed":
                    print(f"\n{outcome['label']}: search stopped: {outcome['error']}")
                    bad = [RunResult(**t) for t in outcome["trials"] if t["status"] not in ("ok", "oom")]
                    print(failure_report(bad))
        else:
            micro = args.micro_batch if args.micro_batch is not None else recipe_micro_batch(recipe, args.extra)
            results = [run_configuration(variant, micro, settings) for variant in variants]
            report["micro_batch"] = micro
            report["results"] = [r.to_dict() for r in results]
            print(throughput_table(results))
            failures = failure_report(results)
            if failures:
                print("\nFailed configurations (last lines of output):\n" + failures)
    finally:
        if temporary and not args.keep_runs:
            shutil.rmtree(work_dir, ignore_errors=True)
        elif args.keep_runs:
            print(f"\nrun directories kept in {work_dir}")
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.json:
        atomic_write_json(args.json, report)  # its folder made, indented, a final newline
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
