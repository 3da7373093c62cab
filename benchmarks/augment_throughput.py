"""Single-core throughput of DINO multi-crop augmentation: PIL baseline vs ``dino_scale.data.augment``.

Measures images/s on ONE core (``torch.set_num_threads(1)``, one process) for JPEG decode + 2 global
(224 px) + 8 local (96 px) crops + everything needed to hand the model normalised float32 batches:

(a) baseline: the official DINO ``DataAugmentationDINO`` recipe, i.e. PIL decode, torchvision transforms
    on PIL images per crop, ``ToTensor`` + ``Normalize`` per crop, then stacking the batch;
(b) ours: PIL decode, ``MultiCropAugmentation.__call__`` (uint8 crops), stacking the batch, then
    ``to_model_input`` on CPU (its cost is thus amortised over the batch).

The test images are generated in memory (smooth gradients + shapes + noise, ~500x375, JPEG quality 90),
so no download is needed. Rounds of (a) and (b) alternate so that machine-load drift hits both equally;
the reported rate of each pipeline is the median over rounds.

Usage: python benchmarks/augment_throughput.py [--images N] [--seconds S] [--rounds R] [--json OUT]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import time

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from torchvision import transforms

from dino_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation


def make_test_jpegs(n: int, width: int = 500, height: int = 375, seed: int = 0) -> list[bytes]:
    """``n`` photo-like synthetic JPEGs (quality 90): sinusoidal colour gradients, random ellipses and
    rectangles, Gaussian noise, slight blur (so that JPEG sees natural-looking edges)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(n):
        img = np.empty((height, width, 3), np.float32)
        for c in range(3):
            fx, fy, phase = rng.uniform(-1.0, 1.0, 3)
            img[..., c] = 128 + 90 * np.sin(fx * xx / 70 + fy * yy / 50 + 6 * phase)
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            x1, y1 = x0 + int(rng.integers(10, 160)), y0 + int(rng.integers(10, 160))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x0, y0, x1, y1], fill=colour)
        noisy = np.asarray(pil, dtype=np.float32) + rng.normal(0.0, 8.0, (height, width, 3))
        pil = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode(data: bytes) -> Image.Image:
    """JPEG bytes -> RGB PIL image (the same decode for both pipelines)."""
    return Image.open(io.BytesIO(data)).convert("RGB")


class _PILGaussianBlur:
    """Official DINO ``GaussianBlur``: PIL blur with radius (= sigma) ~ U(0.1, 2.0), applied with prob p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _PILSolarize:
    """Official DINO ``Solarization``: ``ImageOps.solarize`` (threshold 128) with prob p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class BaselineDINOAugmentation:
    """Official ``DataAugmentationDINO``: torchvision transforms on PIL, ToTensor + Normalize per crop."""

    def __init__(self, n_local: int = 8) -> None:
        bicubic = transforms.InterpolationMode.BICUBIC
        flip_and_color_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.global1 = transforms.Compose(
            [
                transforms.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
                flip_and_color_jitter,
                _PILGaussianBlur(1.0),
                normalize,
            ]
        )
        self.global2 = transforms.Compose(
            [
                transforms.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
                flip_and_color_jitter,
                _PILGaussianBlur(0.1),
                _PILSolarize(0.2),
                normalize,
            ]
        )
        self.local = transforms.Compose(
            [
                transforms.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bicubic),
                flip_and_color_jitter,
                _PILGaussianBlur(0.5),
                normalize,
            ]
        )
        self.n_local = n_local

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.n_local)]


def _stack_views(samples: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Collate: per-sample lists of views -> one [B, 3, H, W] batch per view."""
    return [torch.stack(view) for view in zip(*samples, strict=True)]


def run_baseline(jpegs: list[bytes], batch: int, seconds: float) -> tuple[float, int]:
    """Process batches until ``seconds`` have passed; returns (images/s, images processed)."""
    aug = BaselineDINOAugmentation()
    done, i, start = 0, 0, time.perf_counter()
    while True:
        samples = []
        for _ in range(batch):
            samples.append(aug(decode(jpegs[i % len(jpegs)])))
            i += 1
        _stack_views(samples)
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed, done


def run_ours(
    jpegs: list[bytes], batch: int, seconds: float, stages: dict[str, float] | None = None
) -> tuple[float, int]:
    """Same loop for ``MultiCropAugmentation``, including ``to_model_input`` on CPU per batch.

    If ``stages`` is given, per-stage seconds are added to it (decode / call / collate+to_model_input).
    """
    aug = MultiCropAugmentation()
    gen = torch.Generator().manual_seed(0)
    done, i, start = 0, 0, time.perf_counter()
    t_dec = t_call = t_batch = 0.0
    while True:
        samples = []
        for _ in range(batch):
            t0 = time.perf_counter()
            img = decode(jpegs[i % len(jpegs)])
            t1 = time.perf_counter()
            samples.append(aug(img, gen))
            t2 = time.perf_counter()
            t_dec += t1 - t0
            t_call += t2 - t1
            i += 1
        t0 = time.perf_counter()
        aug.to_model_input(_stack_views(samples), device="cpu")
        t_batch += time.perf_counter() - t0
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            if stages is not None:
                for key, value in (("decode", t_dec), ("call", t_call), ("collate+to_model_input", t_batch)):
                    stages[key] = stages.get(key, 0.0) + value
                stages["images"] = stages.get("images", 0) + done
            return done / elapsed, done


def _cpu_description() -> str:
    """CPU model name and logical core count, for the JSON record."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a summary, optionally write JSON; returns the results dict."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="distinct test JPEGs, cycled (default 64)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per round per pipeline (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--batch", type=int, default=32, help="batch size for collate/to_model_input (32)")
    parser.add_argument("--json", type=str, default=None, help="write results as JSON to this path")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    random.seed(0)
    torch.manual_seed(0)
    jpegs = make_test_jpegs(args.images)
    mean_kb = sum(len(j) for j in jpegs) / len(jpegs) / 1024
    print(f"{len(jpegs)} synthetic 500x375 JPEGs (q=90, mean {mean_kb:.0f} KiB); 1 thread; batch {args.batch}")

    # Warm-up (allocator, lazy imports, kernel dispatch caches) outside the timed rounds.
    run_baseline(jpegs, args.batch, 0.0)
    run_ours(jpegs, args.batch, 0.0)

    base_rates, ours_rates, stages = [], [], {}
    for r in range(args.rounds):
        rate_b, _ = run_baseline(jpegs, args.batch, args.seconds)
        rate_o, _ = run_ours(jpegs, args.batch, args.seconds, stages)
        base_rates.append(rate_b)
        ours_rates.append(rate_o)
        print(f"round {r + 1}: baseline {rate_b:6.1f} img/s   ours {rate_o:6.1f} img/s   x{rate_o / rate_b:.2f}")

    base, ours = statistics.median(base_rates), statistics.median(ours_rates)
    per_img = {k: 1e3 * v / stages["images"] for k, v in stages.items() if k != "images"}
    print(f"baseline (PIL + torchvision per crop): {base:6.1f} img/s")
    print(f"ours (MultiCropAugmentation):          {ours:6.1f} img/s")
    print(f"speed-up: x{ours / base:.2f}")
    print("ours, ms per image: " + ", ".join(f"{k} {v:.2f}" for k, v in per_img.items()))
    load_after = os.getloadavg()[0]
    print(f"1-min load average before/after: {load_before:.2f}/{load_after:.2f} on {os.cpu_count()} CPUs")

    result = {
        "baseline_img_per_s": base,
        "ours_img_per_s": ours,
        "speedup": ours / base,
        "baseline_rounds": base_rates,
        "ours_rounds": ours_rates,
        "ours_ms_per_image": per_img,
        "config": vars(args),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
        },
        "machine": _cpu_description(),
        "load_average_1min_before_after": [load_before, load_after],
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
