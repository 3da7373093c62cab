"""Training img/s of the demo recipe with the thread settings a user gets by default, on this machine.

Runs `python -m dino_scale.train --config demo` for a few steps from one or more source trees (e.g. the current
checkout and a `git worktree` of an older commit, to compare before / after), with OMP_NUM_THREADS and
MKL_NUM_THREADS removed from the environment (a new user's shell sets neither), idle and with `--load N` busy
processes competing for the cores. Prints the median images/s of the logged steps (the first one, which holds the
start-up, left out) per source and condition, side by side in one run.

    python benchmarks/train_threads.py --source after=. --source before=/tmp/before --steps 40 --load 0 --load 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY = "while True: pass"


def run(source: Path, steps: int, load: int, workdir: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(source)
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    recipe = source / "configs" / "demo.json"
    shards = source / "shards" / "sample" / "train"
    sets = [f"max_steps={steps}", "log_every=5", "eval.knn_train_shards=null", "eval.knn_val_shards=null",
            f"data.train_shards={shards}"]  # fmt: skip
    args = [sys.executable, "-m", "dino_scale.train", "--config", str(recipe), "--output-dir", str(run_dir)]
    for item in sets:
        args += ["--set", item]
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
    try:
        subprocess.run(args, cwd=workdir, env=env, check=True, capture_output=True, timeout=1800)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][1:]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", required=True, help="NAME=PATH of a source tree")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--load", type=int, action="append", help="busy processes beside training (repeatable)")
    args = parser.parse_args()
    sources = [(name, Path(path).resolve()) for name, path in (s.split("=", 1) for s in args.source)]
    print(f"cores: {len(os.sched_getaffinity(0))}, steps: {args.steps}, demo recipe (global batch 32, 2 + 6 crops)")
    with tempfile.TemporaryDirectory() as tmp:
        for load in args.load or [0]:
            for name, path in sources:
                rate = run(path, args.steps, load, Path(tmp))
                print(f"load {load}  {name:>8}: {rate:7.1f} img/s (median of the logged steps)", flush=True)


if __name__ == "__main__":
    main()
