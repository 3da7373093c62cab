"""End-to-end `dino-scale index` throughput next to the model alone, on the same machine and batch size.

Target: index images/s >= 90% of model-only images/s, i.e. decoding in DataLoader workers keeps the model fed.
Writes synthetic photo-like JPEGs (smooth colour fields plus noise, ``--width`` x ``--height``, default 500 x 375,
the typical ImageNet photo), exports a randomly initialised timm backbone to ONNX (no download), then

* model only: the ONNX model in ONNX Runtime on one preprocessed batch, repeated (``dino-scale bench``'s timing);
* end to end: `dino-scale index --images DIR` with ``--workers`` decode workers (file read, sha256, JPEG decode,
  resize, crop, model, fp16 shards, faiss index), images/s over the embedding loop.

    .venv/bin/python benchmarks/index_throughput.py --images 256 --batch 32 --workers 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dino_scale.export.bench import BenchOptions, run_bench
from dino_scale.export.exporter import ExportOptions, run_export
from dino_scale.io import atomic_write_json, save_safetensors
from dino_scale.models.backbones import create_backbone
from dino_scale.retrieval.index import IndexOptions, run_index


def write_photos(folder: Path, count: int, width: int, height: int, seed: int = 0) -> None:
    """JPEGs (quality 90) with the statistics that matter for decode cost: smooth content plus sensor noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
        noisy = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"photo_{n:05d}.jpg", quality=90)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=256, help="Synthetic JPEGs to index.")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--descriptor", default="cls", choices=["cls", "cls+gem"])
    parser.add_argument("--json", help="Also write the results to this JSON file.")
    parser.add_argument("--workdir", help="Keep images, model and index here (default: a temporary folder).")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="index-bench-") as scratch:
        work = Path(args.workdir or scratch)
        write_photos(work / "images", args.images, args.width, args.height)
        torch.manual_seed(0)
        weights = work / "backbone.safetensors"
        save_safetensors(create_backbone(args.arch).state_dict(), weights, metadata={"arch": args.arch})
        artifact = work / "model.onnx"
        outputs = "cls,patch_gem" if args.descriptor == "cls+gem" else "cls"
        run_export(
            ExportOptions(
                format="onnx",
                checkpoint=str(weights),
                out=str(artifact),
                image_size=args.image_size,
                outputs=outputs,
                uint8_input=True,
            )
        )
        iterations = max(3, args.images // args.batch)
        model_only = run_bench(
            BenchOptions(
                model=str(artifact), batch=args.batch, runtimes="onnxruntime:CPU", warmup=2, iterations=iterations
            )
        )
        model_rate = model_only["results"][0]["images_per_s"]
        summary = run_index(
            IndexOptions(
                images=str(work / "images"),
                model=str(artifact),
                out=str(work / "index"),
                descriptor=args.descriptor,
                batch_size=args.batch,
                workers=args.workers,
                progress=False,
            )
        )
    index_rate = summary["images_per_s"]
    result = {
        "arch": args.arch,
        "image_size": args.image_size,
        "images": args.images,
        "photo_size": [args.width, args.height],
        "batch": args.batch,
        "workers": args.workers,
        "model_only_images_per_s": model_rate,
        "index_images_per_s": index_rate,
        "index_over_model": round(index_rate / model_rate, 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
