"""Generate the small labelled sample dataset in ``shards/sample/`` (deterministic, no downloads).

Usage::

    python shards/make_sample.py [--out shards/sample]

Each image is a two-colour pattern. The class is the pattern's *structure* (checkerboard, diagonal
crosshatch, dots, horizontal stripes, concentric rings, vertical stripes); its ink and paper tints, period, phase,
edge softness, small tilt and warp, the lighting gradient, blur and pixel noise are drawn independently of
the class. So the label cannot be read from colour or brightness, which is what a randomly initialised network
mostly sees, while DINO's crop and colour-jitter invariances push a trained network towards structure, and every
local crop of an image shows the same structure as its global crops (a short CPU run can learn it). Classes
are symmetric under the horizontal flip used in training. Images are rendered into a temporary class-folder
tree and packed with :func:`dino_scale.data.write_shards`.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from dino_scale.data import write_shards

CLASSES = ("checkerboard", "crosshatch", "dots", "horizontal_stripes", "rings", "vertical_stripes")
SEED = 20210429  # DINO's arXiv date; any fixed value works


def _wave(phase: np.ndarray, softness: float) -> np.ndarray:
    """A periodic profile in [0, 1] from phase (in periods): a square wave with soft edges."""
    return np.clip(0.5 + np.sin(2 * np.pi * phase) / (2 * softness), 0.0, 1.0)


def _pattern(class_name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """The class's pattern as an HxW float32 mask in [0, 1]; period, phase, duty and edge softness vary."""
    period = rng.uniform(7.0, 18.0)
    softness = rng.uniform(0.3, 1.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # A small random tilt and a little warp keep stripes from being pixel-perfect, without changing the class.
    tilt = math.radians(rng.uniform(-8, 8))
    u = xx * math.cos(tilt) + yy * math.sin(tilt)
    v = -xx * math.sin(tilt) + yy * math.cos(tilt)
    warp = rng.uniform(0, 1.5) * np.sin(2 * np.pi * (u + v) / rng.uniform(40, 90))
    u, v = u + warp, v + warp
    offset_u, offset_v = rng.uniform(0, period, size=2)
    pu, pv = (u + offset_u) / period, (v + offset_v) / period
    if class_name == "horizontal_stripes":
        return _wave(pv, softness)
    if class_name == "vertical_stripes":
        return _wave(pu, softness)
    if class_name == "checkerboard":
        return np.clip(0.5 + (np.sin(2 * np.pi * pu) * np.sin(2 * np.pi * pv)) / (0.5 * softness), 0, 1)
    if class_name == "crosshatch":
        diagonal_a, diagonal_b = (pu + pv) / math.sqrt(2), (pu - pv) / math.sqrt(2)
        lines = np.maximum(_wave(diagonal_a * 1.4, softness), _wave(diagonal_b * 1.4, softness))
        return lines
    if class_name == "dots":
        cell_u, cell_v = pu - np.floor(pu) - 0.5, pv - np.floor(pv) - 0.5
        radius = rng.uniform(0.2, 0.35)
        return np.clip((radius - np.hypot(cell_u, cell_v)) * period / (2 * softness) + 0.5, 0, 1)
    # rings: concentric circles around a random centre, possibly outside the image
    cx, cy = rng.uniform(-0.3, 1.3, size=2) * size
    return _wave(np.hypot(xx - cx, yy - cy) / period + offset_u, softness)


def _ink_and_paper(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Dark ink on light paper, each a random low-saturation tint.

    Colour is kept uninformative on purpose: if every image had its own vivid colours, the colour would be the
    easiest crop-invariant code for DINO to learn (hue jitter is small), and a short run would learn colour
    instead of structure. With similar palettes, images can only be told apart by their structure.
    """
    paper = rng.uniform(170, 255) + rng.uniform(-25, 25, size=3)
    ink = rng.uniform(0, 90) + rng.uniform(-25, 25, size=3)
    return np.clip(ink, 0, 255).astype(np.float32), np.clip(paper, 0, 255).astype(np.float32)


def render(class_name: str, rng: np.random.Generator, size: int) -> Image.Image:
    """Render one image of ``class_name`` with every nuisance factor drawn from ``rng``."""
    mask = _pattern(class_name, rng, size)[..., None]
    ink, paper = _ink_and_paper(rng)
    pixels = paper * (1 - mask) + ink * mask
    # Uneven lighting: a linear gradient of random direction and strength.
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    light = 1 + rng.uniform(0, 0.35) * (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None])
    pixels = pixels * light[..., None] + rng.normal(0, rng.uniform(2, 12), size=pixels.shape)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return image


def make_split(root: Path, split: str, per_class: int, size: int, seed: int, quality: int) -> None:
    """Write ``per_class`` JPEGs per class into ``root/<class>/``."""
    for class_index, class_name in enumerate(CLASSES):
        folder = root / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            # One independent stream per image: output does not depend on generation order.
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, class_index, i])
            render(class_name, rng, size).save(folder / f"{class_name}_{i:04d}.jpg", quality=quality)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sample")
    parser.add_argument("--train-per-class", type=int, default=128)
    parser.add_argument("--val-per-class", type=int, default=40)
    parser.add_argument("--train-shards", type=int, default=4)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()

    splits = {"train": args.train_per_class, "val": args.val_per_class}
    with tempfile.TemporaryDirectory(prefix="dino-sample-") as tmp:
        for split, per_class in splits.items():
            images = Path(tmp) / split
            make_split(images, split, per_class, args.size, args.seed, args.quality)
            n_shards = args.train_shards if split == "train" else 1
            maxcount = math.ceil(per_class * len(CLASSES) / n_shards)
            report = write_shards(images, args.out / split, maxcount=maxcount, prefix=split)
            if report.skipped:
                raise RuntimeError(f"generated images failed to verify: {report.skipped[:3]}")
            size = sum(p.stat().st_size for p in report.shards)
            print(f"{split}: {report.written} images in {len(report.shards)} shard(s), {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
