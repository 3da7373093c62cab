"""Inference throughput of an exported backbone in every runtime here (PyTorch eager vs ONNX Runtime, ...).

Builds a randomly initialised timm backbone (no download; weights do not change speed), saves it as our
safetensors, exports it with `dino-scale export` (parity-gated) and runs `dino-scale bench` at each batch size.

    .venv/bin/python benchmarks/export_throughput.py --arch vit_small_patch16_224 --batch 1 --batch 8 --batch 32
    .venv/bin/python benchmarks/export_throughput.py --arch vit_base_patch16_224 --batch 256 --fp16   # on a GPU

Prints one table per batch; --json also writes all results to a file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from dino_scale.export.bench import BenchOptions, run_bench
from dino_scale.export.exporter import FORMATS, ExportOptions, run_export
from dino_scale.io import atomic_write_json, save_safetensors
from dino_scale.models.backbones import create_backbone


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--timm-kwargs", default="{}", help="JSON of extra timm.create_model arguments.")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, action="append", help="Repeatable; default 1, 8, 32 (CPU).")
    parser.add_argument("--outputs", default="cls")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--format", default="onnx", choices=["onnx", "aoti", "tensorrt"])
    parser.add_argument("--runtimes", help="Subset passed to dino-scale bench --runtimes.")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="Also write every batch's results to this JSON file.")
    parser.add_argument("--workdir", help="Keep the checkpoint and artifacts here (default: a temporary folder).")
    args = parser.parse_args(argv)
    batches = args.batch or [1, 8, 32]

    with tempfile.TemporaryDirectory(prefix="export-bench-") as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        extra = json.loads(args.timm_kwargs)
        backbone = create_backbone(args.arch, **extra)
        weights = work / "backbone.safetensors"
        metadata = {"arch": args.arch, "timm_kwargs": json.dumps(extra)}
        save_safetensors(backbone.state_dict(), weights, metadata=metadata)
        artifact = work / f"model{FORMATS[args.format]}"
        run_export(
            ExportOptions(
                format=args.format,
                checkpoint=str(weights),
                out=str(artifact),
                image_size=args.image_size,
                outputs=args.outputs,
                precision="fp16" if args.fp16 else "fp32",
                max_batch=max(max(batches), 2),
                device=args.device,
            )
        )
        results = []
        for batch in batches:
            options = BenchOptions(
                model=str(artifact),
                batch=batch,
                runtimes=args.runtimes,
                warmup=args.warmup,
                iterations=args.iterations,
                device=args.device,
            )
            results.append(run_bench(options))
    if args.json:
        atomic_write_json(args.json, results)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
