"""Would ``torch.compile`` take the per-core data path to issue 15's 4x goal? A probe for that decision, not a path
of the product: nothing here changes what training runs.

Two measurements, on one core (``torch.set_num_threads(1)``), eager against ``torch.compile`` (``--backend``,
default inductor, ``dynamic=False``, one graph per crop size):

* ``ops``: each per-crop kernel of augment.py on one float ``[3, S, S]`` crop (``[1, 3, S, S]`` for the blur), at the
  given crop sizes: torchvision's brightness / contrast / saturation kernels and augment's ``_adjust_hue`` (factors
  fixed, so a compiled op is compiled once), augment's Gaussian blur (sigma 1.0) followed by its rounding to uint8.
  Also the largest difference in grey levels between the two outputs.
* ``data``: decode + views + stacking + ``to_model_input`` per image (as train_throughput's data path (a)), eager
  and with augment's hue op compiled (the one op whose compiled kernel is several times faster, see ``ops``),
  against the official-style PIL pipeline (train_throughput's (c)), at the given setups; rounds alternate, medians.

Usage (this machine, one core)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/augment_compile_probe.py --json augment-compile-probe.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torchvision.transforms.v2 import functional as tvf

from dino_scale.data import augment
from dino_scale.data.augment import MultiCropAugmentation
from dino_scale.data.decode import decode_image
from dino_scale.io import atomic_write_json

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling benchmarks (also when loaded by a test)
    sys.path.insert(0, str(HERE))

from augment_throughput import _stack_views, decode, make_test_jpegs  # noqa: E402
from train_throughput import baseline_augmentation, time_batches  # noqa: E402

VARIANTS = ("ours, eager", "ours, hue compiled", "official-style")


def _blur_then_round(x: torch.Tensor) -> torch.Tensor:
    return augment.round_to_uint8(augment._gaussian_blur(x.clone(), [1.0]))


def _hue_with_tensor_factor(compiled: Callable) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """augment._adjust_hue's signature over a compiled copy that takes its factor as a tensor (a Python float would be
    specialised: one graph per factor)."""
    return lambda img, factor: compiled(img, torch.tensor(factor, dtype=torch.float64))


def per_call_ms(fn: Callable[[], Any], seconds: float) -> float:
    fn()  # compiles, when compiled
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls == 0:
        fn()
        calls += 1
    return elapsed / calls * 1e3


def measure_ops(sizes: Sequence[int], backend: str, seconds: float) -> list[dict[str, Any]]:
    kernels: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
        "brightness": (lambda x: tvf.adjust_brightness_image(x, 1.2), False),
        "contrast": (lambda x: tvf.adjust_contrast_image(x, 1.3), False),
        "saturation": (lambda x: tvf.adjust_saturation_image(x, 0.9), False),
        "hue": (lambda x: augment._adjust_hue(x, 0.07), False),
        "blur + rounding": (_blur_then_round, True),
    }
    rows = []
    for name, (eager, batched) in kernels.items():
        compiled = torch.compile(eager, backend=backend, dynamic=False)
        for size in sizes:
            x = torch.rand(1, 3, size, size) if batched else torch.rand(3, size, size)
            start = time.perf_counter()
            out_compiled = compiled(x)
            compile_s = time.perf_counter() - start
            out_eager = eager(x)
            if out_eager.dtype != torch.uint8:
                out_eager, out_compiled = (augment.round_to_uint8(t.clone()) for t in (out_eager, out_compiled))
            rows.append(
                {
                    "op": name,
                    "size": size,
                    "eager_ms": per_call_ms(lambda: eager(x), seconds),  # noqa: B023 (called in this iteration)
                    "compiled_ms": per_call_ms(lambda: compiled(x), seconds),  # noqa: B023
                    "compile_s": compile_s,
                    "max_level_difference": int((out_eager.int() - out_compiled.int()).abs().max()),
                }
            )
    return rows


def measure_data(
    setups: Sequence[tuple[int, int, int]],
    backend: str,
    jpegs: Sequence[bytes],
    batch: int,
    seconds: float,
    rounds: int,
) -> list[dict[str, Any]]:
    compiled_hue = _hue_with_tensor_factor(torch.compile(augment._adjust_hue, backend=backend, dynamic=False))
    rows = []
    for global_size, local_size, n_local in setups:
        # The torch ops, whose hue this probe compiles (the fused C kernel, data.view_kernel's default, has its own).
        ours = MultiCropAugmentation(global_size, local_size, n_local, view_kernel="torch")
        official = baseline_augmentation(global_size, local_size, n_local)
        seeds = iter(range(10**9))

        def ours_path(batch_jpegs: Sequence[bytes]) -> None:
            samples = [ours(decode_image(d), torch.Generator().manual_seed(next(seeds))) for d in batch_jpegs]  # noqa: B023
            ours.to_model_input(_stack_views(samples), "cpu")  # noqa: B023

        def ours_compiled_path(batch_jpegs: Sequence[bytes]) -> None:
            with mock.patch.object(augment, "_adjust_hue", compiled_hue):
                ours_path(batch_jpegs)

        def official_path(batch_jpegs: Sequence[bytes]) -> None:
            _stack_views([official(decode(d)) for d in batch_jpegs])  # noqa: B023

        paths = dict(zip(VARIANTS, (ours_path, ours_compiled_path, official_path), strict=True))
        for path in paths.values():  # warm-up (and the compiles) outside the timed rounds
            time_batches(path, jpegs, batch, 0.0)
        figures: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(rounds):
            for name, path in paths.items():
                figures[name].append(time_batches(path, jpegs, batch, seconds))
        medians = {name: statistics.median(values) for name, values in figures.items()}
        rows.append(
            {
                "setup": f"{global_size}/{local_size} px, 2 + {n_local} crops",
                "img_per_s": medians,
                "rounds": figures,
                "ratio_eager": medians["ours, eager"] / medians["official-style"],
                "ratio_hue_compiled": medians["ours, hue compiled"] / medians["official-style"],
            }
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| op | crop px | eager ms | compiled ms | eager / compiled | max grey-level difference |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["ops"]:
        speedup = r["eager_ms"] / r["compiled_ms"]
        lines.append(
            f"| {r['op']} | {r['size']} | {r['eager_ms']:.3f} | {r['compiled_ms']:.3f} | {speedup:.2f}x "
            f"| {r['max_level_difference']} |"
        )
    lines += ["", "| setup | " + " | ".join(f"{v}, img/s" for v in VARIANTS) + " | eager / official | hue compiled / "
              "official |", "|---" * (len(VARIANTS) + 3) + "|"]  # fmt: skip
    for r in report["data"]:
        figures = " | ".join(f"{r['img_per_s'][v]:.1f}" for v in VARIANTS)
        lines.append(f"| {r['setup']} | {figures} | {r['ratio_eager']:.2f}x | {r['ratio_hue_compiled']:.2f}x |")
    return "\n".join(lines)


def _setup(text: str) -> tuple[int, int, int]:
    try:
        global_size, local_size, n_local = (int(part) for part in text.split("/"))
    except ValueError as exn:
        raise argparse.ArgumentTypeError(f"a setup is GLOBAL/LOCAL/N_LOCAL, e.g. 224/96/8; got {text!r}") from exn
    return global_size, local_size, n_local


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--op-sizes", default="48,96,224", help="crop sizes of the op timings (default 48,96,224)")
    parser.add_argument(
        "--setups",
        type=_setup,
        nargs="+",
        default=[(224, 96, 8), (96, 48, 8), (64, 32, 6)],
        help="GLOBAL/LOCAL/N_LOCAL crop setups of the data path (default 224/96/8 96/48/8 64/32/6)",
    )
    parser.add_argument("--images", type=int, default=64, help="distinct 500x375 test JPEGs, cycled (default 64)")
    parser.add_argument("--batch", type=int, default=32, help="images per timed batch (default 32)")
    parser.add_argument("--op-seconds", type=float, default=0.5, help="seconds per op timing (default 0.5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per data round (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating data rounds (default 3)")
    parser.add_argument("--json", help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = {
            "torch": torch.__version__,
            "backend": args.backend,
            "ops": measure_ops([int(s) for s in args.op_sizes.split(",")], args.backend, args.op_seconds),
            "data": measure_data(
                args.setups, args.backend, make_test_jpegs(args.images), args.batch, args.seconds, args.rounds
            ),
        }
    finally:
        torch.set_num_threads(threads)
    print(markdown(report))
    if args.json:
        atomic_write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
