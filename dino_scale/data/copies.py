"""Copydays-style copies of images: the queries of ``dino-scale eval copy-detection``.

The copy-detection evaluation turns database images into queries by editing them the way images get edited
when they are re-posted (the "strong" variants of INRIA Copydays, Douze et al. 2009: crops, rotations, blur,
heavy JPEG, colour changes, captions, stickers, mirroring) and checks that the original is retrieved.

* ``strong_copy`` applies a random chain of 2-4 distinct edits and returns what it did as ``CopyEdit`` records
  (name + JSON-serialisable parameters) for the evaluation report.
* ``mild_copy`` makes a near-duplicate (slight crop, rescale, good-quality JPEG, small brightness change) that
  any working descriptor retrieves at rank 1; tests use it as a sanity floor.

Both draw every random choice from the ``random.Random`` they are given, so a seed reproduces the copy exactly
(given the same Pillow/libjpeg build), and both accept images of any size, down to a few pixels. Geometric and
colour edits use ``torchvision.transforms.v2.functional`` (which works on PIL images directly); blur, JPEG,
text and patches are done with PIL.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torchvision.transforms import InterpolationMode

__all__ = ["EDIT_NAMES", "CopyEdit", "mild_copy", "strong_copy"]

# Crops never go below this many pixels a side (or the image's own side, if that is smaller).
_MIN_SIDE = 8
# Caption vocabulary: what overlaid text on re-posted images tends to look like.
_WORDS = (
    "breaking", "news", "sale", "today", "only", "copy", "repost", "viral", "share", "follow", "original",
    "photo", "credit", "lol", "wow", "best", "summer", "2024", "free", "new", "look", "this", "amazing", "meme",
)  # fmt: skip


@dataclass
class CopyEdit:
    """One edit applied by ``strong_copy``: its name (one of ``EDIT_NAMES``) and JSON-serialisable parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


def _clamp_side(value: float, side: int) -> int:
    return max(min(_MIN_SIDE, side), min(side, round(value)))


def _jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB")  # a loaded copy, independent of the buffer


def _random_box(width: int, height: int, area: float, aspect: float, rng: random.Random) -> tuple[int, int, int, int]:
    """A box covering about ``area`` of the image with side ratio ``aspect`` (relative), at a random position."""
    fw, fh = math.sqrt(area * aspect), math.sqrt(area / aspect)
    if fw > 1.0:  # too wide for the image: use the full width and give the area to the height
        fw, fh = 1.0, area
    if fh > 1.0:
        fw, fh = area, 1.0
    w, h = _clamp_side(fw * width, width), _clamp_side(fh * height, height)
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    return left, top, left + w, top + h


# ----------------------------------------------------------------------------------------------------------
# The edits of strong_copy: each takes an RGB image and the rng, returns the edited image and its record.
# ----------------------------------------------------------------------------------------------------------


def _crop(image: Image.Image, rng: random.Random) -> tuple[Image.Image, CopyEdit]:
    area = rng.uniform(0.3, 0.8)
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # log-uniform: as likely wider as taller
    left, top, right, bottom = _random_box(image.width, image.height, area, aspect, rng)
    out = F.crop(image, top, left, bottom - top, right - left)
    kept = out.width * out.height / (image.width * image.height)
    return out, CopyEdit("crop", {"box": [left, top, right, bottom], "area_kept": round(kept, 4)})


def _rotate(image: Image.Image, rng: random.Random) -> tuple[Image.Image, CopyEdit]:
    if rng.random() < 0.5:
        angle = rng.choice((-1.0, 1.0)) * rng.uniform(10.0, 30.0)
        # expand=True keeps the whole picture (as a re-post would); the new corners are black.
        out = F.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, expand=True, fill=[0.0, 0.0, 0.0])
        return out, CopyEdit("rotate", {"angle": round(angle, 3), "expand": True})
    angle_q = rng.choice((90, 180, 270))
    out = F.rotate(image, float(angle_q), expand=True)  # PIL turns multiples of 90 degrees into exact transposes
    return out, CopyEdit("rotate", {"angle": angle_q, "expand": True})


def _blur(image: Image.Image, rng: random.Random) -> tuple[Image.Image, CopyEdit]:
    sigma = rng.uniform(1.0, 4.0)
    # PIL, not v2.functional.gaussian_blur: on PIL input torchvision converts to a tensor and convolves a full
    # kernel, 5-15x slower (~90 ms for 400x300 on CPU), and its reflect padding fails on images smaller than
    # the kernel. PIL's box-blur approximation (radius = standard deviation) is within ~1 grey level of it.
    return image.filter(ImageFilter.GaussianBlur(sigma)), CopyEdit("blur", {"sigma": round(sigma, 3)})


def _jpeg(image: Image.Image, rng: random.Random) -> tuple[Image.Image, CopyEdit]:
    quality = rng.randint(10, 50)
    return _jpeg_round_trip(image, quality), CopyEdit("jpeg", {"quality": quality})


def _color(image: Image.Image, rng: random.Random) -> tuple[Image.Image, CopyEdit]:
    if rng.random() < 0.25:
        return F.rgb_to_grayscale(image, num_output_channels=3), CopyEdit("color", {"grayscale": True})
    params = {
        "brightness": round(rng.uniform(0.6, 1.4), 3),
        "contrast": round(rng.uniform(0.6, 1.4), 3),
        "saturation": round(rng.uniform(0.3, 1.7), 3),
        "hue": round(rng.uniform(-0.15, 0.15), 3),
    }
    out = F.adjust_brightness(image, params["brightness"])
    out = F.adjust_contrast(out, params["contrast"])
    out = F.adjust_saturation(out, params["saturation"])
    out = F.adjust_hue(out, params["hue"])
    return out, CopyEdit("color", {"grayscale": False, **params})


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's embedded font at ``size`` px: no font file on disk is needed, so this works anywhere."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow built without FreeType: the fixed-size embedded bitmap font
        return ImageFont.load_default_imagefont()


def _text(image: Image.Image, rng: random.Random) -> tuple[Image.Image, CopyEdit]:
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))
    if rng.random() < 0.5:
        words = words.upper()
    # Scaled to the image so captions stay captions on thumbnails and on 4K photos alike.
    size = max(6, round(min(image.size) * rng.uniform(0.08, 0.25)))
    color = tuple(rng.randint(0, 255) for _ in range(3))
    stroke = rng.choice((0, max(1, size // 15)))  # outlined captions, as meme generators make them
    out = image.copy()
    draw = ImageDraw.Draw(out)
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), words, font=font, stroke_width=stroke)
    # Anywhere the text fits; text wider than the image starts at the left edge and is cut at the right.
    x = rng.randint(0, max(0, out.width - (right - left))) - left
    y = rng.randint(0, max(0, out.height - (bottom - top))) - top
    draw.text((x, y), words, fill=color, font=font, stroke_width=stroke, stroke_fill=(255 - color[0],) * 3)
    params = {"text": words, "size": size, "color": list(color), "xy": [x, y], "stroke": stroke}
    return out, CopyEdit("text", params)


def _patch(image: Image.Image, rng: random.Random) -> tuple[Image.Image, CopyEdit]:
    area = rng.uniform(0.05, 0.2)
    count = rng.randint(1, 3)
    out = image.copy()
    draw = ImageDraw.Draw(out)
    patches = []
    for _ in range(count):
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        box = _random_box(out.width, out.height, area / count, aspect, rng)
        style = rng.choice(("solid", "noise"))
        if style == "solid":
            color = tuple(rng.randint(0, 255) for _ in range(3))
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=color)  # PIL's rectangle is inclusive
        else:
            # numpy draws the pixels (fast), seeded from the rng so the copy stays reproducible.
            noise = np.random.default_rng(rng.getrandbits(64))
            w, h = box[2] - box[0], box[3] - box[1]
            out.paste(Image.fromarray(noise.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB"), box[:2])
        patches.append({"box": list(box), "style": style})
    return out, CopyEdit("patch", {"area": round(area, 4), "patches": patches})


def _hflip(image: Image.Image, rng: random.Random) -> tuple[Image.Image, CopyEdit]:
    return F.horizontal_flip(image), CopyEdit("hflip", {})


_EDITS: dict[str, Callable[[Image.Image, random.Random], tuple[Image.Image, CopyEdit]]] = {
    "crop": _crop,
    "rotate": _rotate,
    "blur": _blur,
    "jpeg": _jpeg,
    "color": _color,
    "text": _text,
    "patch": _patch,
    "hflip": _hflip,
}
# Names ``strong_copy`` can put in ``CopyEdit.name``.
EDIT_NAMES: tuple[str, ...] = tuple(_EDITS)


def strong_copy(image: Image.Image, rng: random.Random) -> tuple[Image.Image, list[CopyEdit]]:
    """Make a strongly edited copy of ``image``: a random chain of 2-4 distinct edits, in random order.

    The edits are drawn from ``EDIT_NAMES``: crop (30-80% of the area kept, random aspect), rotation (+-10-30
    degrees with the canvas expanded, or a quarter/half turn), gaussian blur (sigma 1-4), JPEG re-encoding
    (quality 10-50), a colour change (brightness/contrast/saturation/hue jitter, or grayscale), a text caption,
    opaque patches (solid colour or noise, 5-20% of the area) and a horizontal flip.

    Returns the RGB copy and the edits in the order applied. Deterministic for a given ``rng`` state.
    """
    out = image if image.mode == "RGB" else image.convert("RGB")
    edits = []
    # Distinct edits: two JPEG passes or two crops in one chain would be a weaker test of variety, not a harder one.
    for name in rng.sample(EDIT_NAMES, rng.randint(2, 4)):
        out, edit = _EDITS[name](out, rng)
        edits.append(edit)
    return (out if out.mode == "RGB" else out.convert("RGB")), edits


def mild_copy(image: Image.Image, rng: random.Random) -> Image.Image:
    """Make a near-duplicate of ``image``: slight crop (85-95% of the area), rescale by 0.7-1.3, brightness
    0.9-1.1, JPEG quality 70-90. Any usable descriptor retrieves the original at rank 1. Returns RGB.
    """
    out = image if image.mode == "RGB" else image.convert("RGB")
    side = math.sqrt(rng.uniform(0.85, 0.95))  # same aspect: a uniform trim of the borders
    left, top, right, bottom = _random_box(out.width, out.height, side * side, 1.0, rng)
    out = F.crop(out, top, left, bottom - top, right - left)
    scale = rng.uniform(0.7, 1.3)
    size = [max(1, round(out.height * scale)), max(1, round(out.width * scale))]
    out = F.resize(out, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    out = F.adjust_brightness(out, rng.uniform(0.9, 1.1))
    return _jpeg_round_trip(out, rng.randint(70, 90))  # last, as when the copy is saved and re-published
