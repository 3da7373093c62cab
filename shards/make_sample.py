"""Generate the small labelled sample dataset in ``shards/sample/`` (deterministic, no downloads).

Usage::

    python shards/make_sample.py [--out shards/sample]

Six synthetic "places" are drawn once each (a few dozen overlapping coloured shapes on a background, blurred
slightly). Every image is a different *view* of one place: a random square crop covering 15-50 % of it, resized
to 96 px, randomly flipped, with its own brightness, contrast and saturation and sensor-like noise. The class is
the place. Two views of the same place rarely overlap pixel for pixel, so telling them apart takes features that
are invariant to crop, zoom, flip and lighting: exactly the invariances DINO's multi-crop objective teaches. That
is what makes the dataset useful for a demo that runs for minutes on a CPU: a short DINO run measurably beats a
randomly initialised network of the same architecture on k-NN, the paper's headline measure, and the same data
exercises retrieval and copy detection later. Images are written into a temporary class-folder tree and packed
with :func:`dino_scale.data.shards.write_shards`.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from dino_scale.data.shards import write_shards

CLASSES = ("place_a", "place_b", "place_c", "place_d", "place_e", "place_f")
PLACE_SEED = 7  # fixes the six places; the views are seeded by (split, class, index)
PLACE_SIZE = 320


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    red, green, blue = (int(v) for v in rng.integers(0, 256, size=3))
    return red, green, blue


def draw_place(class_index: int, seed: int) -> Image.Image:
    """One place: a background and 60 random ellipses, boxes and triangles, all fixed by (seed, class)."""
    rng = np.random.default_rng([seed, class_index])
    place = Image.new("RGB", (PLACE_SIZE, PLACE_SIZE), _colour(rng))
    draw = ImageDraw.Draw(place)
    for _ in range(60):
        x, y = rng.uniform(0, PLACE_SIZE, size=2)
        radius = rng.uniform(8, 50)
        colour = _colour(rng)
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
        elif kind == 1:
            draw.rectangle([x - radius, y - radius * rng.uniform(0.3, 1.0), x + radius, y + radius], fill=colour)
        else:
            draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=colour)
    return place.filter(ImageFilter.GaussianBlur(1.0))


def view(place: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """A random view of a place: crop (15-50 % of its area), resize, flip, lighting, saturation, noise."""
    side = int(math.sqrt(PLACE_SIZE * PLACE_SIZE * rng.uniform(0.15, 0.5)))
    left = int(rng.integers(0, PLACE_SIZE - side + 1))
    top = int(rng.integers(0, PLACE_SIZE - side + 1))
    image = place.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.5, 1.5))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_split(root: Path, split: str, per_class: int, size: int, quality: int) -> None:
    """Write ``per_class`` JPEG views per place into ``root/<class>/``."""
    for class_index, class_name in enumerate(CLASSES):
        place = draw_place(class_index, PLACE_SEED)
        folder = root / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            # One independent stream per image: output does not depend on generation order.
            rng = np.random.default_rng([0 if split == "train" else 1, class_index, i])
            view(place, rng, size).save(folder / f"{class_name}_{i:04d}.jpg", quality=quality)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sample")
    parser.add_argument("--train-per-class", type=int, default=128)
    parser.add_argument("--val-per-class", type=int, default=40)
    parser.add_argument("--train-shards", type=int, default=4)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality")
    args = parser.parse_args()

    splits = {"train": args.train_per_class, "val": args.val_per_class}
    with tempfile.TemporaryDirectory(prefix="dino-sample-") as tmp:
        for split, per_class in splits.items():
            images = Path(tmp) / split
            make_split(images, split, per_class, args.size, args.quality)
            n_shards = args.train_shards if split == "train" else 1
            maxcount = math.ceil(per_class * len(CLASSES) / n_shards)
            report = write_shards(images, args.out / split, maxcount=maxcount, prefix=split)
            if report.skipped:
                raise RuntimeError(f"generated images failed to verify: {report.skipped[:3]}")
            size = sum(p.stat().st_size for p in report.shards)
            print(f"{split}: {report.written} images in {len(report.shards)} shard(s), {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
