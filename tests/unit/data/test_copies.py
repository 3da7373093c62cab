"""Copy generation for the copy-detection evaluation: reproducible, varied, robust on any image size."""

from __future__ import annotations

import collections
import io
import json
import math
import random

import numpy as np
import pytest
from PIL import Image, ImageFont
from support import photo

from dino_scale.data import copies as copy_transforms
from dino_scale.data.copies import EDIT_NAMES, CopyEdit, mild_copy, strong_copy


def raw(image: Image.Image) -> tuple[tuple[int, int], bytes]:
    return image.size, image.tobytes()


def apply(name: str, image: Image.Image, seed: int) -> tuple[Image.Image, CopyEdit]:
    return copy_transforms._EDITS[name](image, random.Random(seed))


# ----------------------------------------------------------------------------------------------------------
# strong_copy
# ----------------------------------------------------------------------------------------------------------


def test_strong_copy_is_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    image = photo()
    for seed in range(5):
        a, edits_a = strong_copy(image, random.Random(seed))
        b, edits_b = strong_copy(image, random.Random(seed))
        assert raw(a) == raw(b) and edits_a == edits_b, seed
    outputs = {raw(strong_copy(image, random.Random(seed))[0]) for seed in range(12)}
    assert len(outputs) == 12


def test_strong_copy_chains_two_to_four_distinct_edits_and_reaches_every_kind() -> None:
    image = photo(64, 48)
    names: collections.Counter[str] = collections.Counter()
    lengths = set()
    variants = set()
    for seed in range(150):
        _, edits = strong_copy(image, random.Random(seed))
        chain = [e.name for e in edits]
        assert len(set(chain)) == len(chain), chain
        lengths.add(len(chain))
        names.update(chain)
        json.dumps([{"name": e.name, "params": e.params} for e in edits])  # the report must be able to hold it
        for e in edits:
            if e.name == "rotate":
                variants.add("quarter" if e.params["angle"] in (90, 180, 270) else "small")
            elif e.name == "color":
                variants.add("grayscale" if e.params["grayscale"] else "jitter")
            elif e.name == "patch":
                variants.update(p["style"] for p in e.params["patches"])
    assert lengths == {2, 3, 4}
    assert set(names) == set(EDIT_NAMES) == {"crop", "rotate", "blur", "jpeg", "color", "text", "patch", "hflip"}
    assert variants == {"quarter", "small", "grayscale", "jitter", "solid", "noise"}


def test_strong_copy_output_is_rgb_with_a_sane_size_and_leaves_the_input_alone() -> None:
    image = photo(200, 90)
    before = raw(image)
    diagonal = math.hypot(*image.size)
    for seed in range(40):
        out, _ = strong_copy(image, random.Random(seed))
        assert out.mode == "RGB"
        # The crop keeps >= 30% of the area; an expanded rotation never exceeds the diagonal.
        assert out.width * out.height >= 0.29 * image.width * image.height, seed
        assert max(out.size) <= diagonal + 2, seed
        assert raw(out) != before
    assert raw(image) == before
    for mode in ("RGBA", "L", "P"):
        assert strong_copy(image.convert(mode), random.Random(0))[0].mode == "RGB"


@pytest.mark.parametrize("size", [(32, 32), (8, 200), (5, 3), (1, 1)])
def test_tiny_images_never_raise(size: tuple[int, int]) -> None:
    image = photo(*size)
    for seed in range(60):
        out, _ = strong_copy(image, random.Random(seed))
        assert out.mode == "RGB" and min(out.size) >= 1
        assert mild_copy(image, random.Random(seed)).mode == "RGB"
    for name in EDIT_NAMES:  # each edit at least a few times, whatever the chain sampling did
        for seed in range(5):
            assert min(apply(name, image, seed)[0].size) >= 1


# ----------------------------------------------------------------------------------------------------------
# the edits one by one
# ----------------------------------------------------------------------------------------------------------


def test_every_edit_changes_the_image_deterministically() -> None:
    image = photo()
    for name in EDIT_NAMES:
        for seed in range(8):
            out, edit = apply(name, image, seed)
            assert edit.name == name and out.mode == "RGB"
            assert raw(out) != raw(image), (name, seed)
            again, edit_again = apply(name, image, seed)  # every random choice comes from the rng
            assert raw(again) == raw(out) and edit_again == edit, (name, seed)


def test_crop_keeps_30_to_80_percent_of_the_area_at_the_reported_box() -> None:
    image = photo(300, 200)
    aspects = []
    for seed in range(30):
        out, edit = apply("crop", image, seed)
        left, top, right, bottom = edit.params["box"]
        assert raw(out) == raw(image.crop((left, top, right, bottom)))
        kept = out.width * out.height / (300 * 200)
        assert 0.29 <= kept <= 0.81 and kept == pytest.approx(edit.params["area_kept"], abs=1e-4), seed
        aspects.append(out.width / out.height)
    assert min(aspects) < 1.2 < 1.8 < max(aspects)  # random aspect, not always the image's 1.5
    for size in ((12, 300), (300, 12)):
        for seed in range(10):
            assert min(apply("crop", photo(*size), seed)[0].size) >= 8  # clamped, not a sliver


def test_rotation_angles() -> None:
    image = photo(120, 60)
    for seed in range(30):
        out, edit = apply("rotate", image, seed)
        angle = edit.params["angle"]
        if angle in (90, 180, 270):
            expected = image.rotate(angle, expand=True)  # quarter turns are exact
            assert raw(out) == raw(expected)
        else:
            assert 10 <= abs(angle) <= 30
            assert out.width > image.width and out.height > image.height  # expanded canvas


def test_jpeg_reencode_degrades_and_reports_quality() -> None:
    image = photo()
    q10 = copy_transforms._jpeg_round_trip(image, 10)
    q95 = copy_transforms._jpeg_round_trip(image, 95)
    error = {q: np.abs(np.asarray(x, float) - np.asarray(image, float)).mean() for q, x in ((10, q10), (95, q95))}
    assert error[10] > 2 * error[95] > 0
    for seed in range(10):
        _, edit = apply("jpeg", image, seed)
        assert 10 <= edit.params["quality"] <= 50


def test_blur_and_colour_do_what_they_say() -> None:
    image = photo()
    out, edit = apply("blur", image, 0)
    assert 1.0 <= edit.params["sigma"] <= 4.0
    edges = lambda im: np.abs(np.diff(np.asarray(im.convert("L"), float), axis=1)).mean()  # noqa: E731
    assert edges(out) < edges(image)
    greys = [apply("color", image, s) for s in range(40)]
    grey = next(o for o, e in greys if e.params["grayscale"])
    arr = np.asarray(grey)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_patches_cover_5_to_20_percent() -> None:
    image = photo(200, 200)
    for seed in range(20):
        out, edit = apply("patch", image, seed)
        assert 0.05 <= edit.params["area"] <= 0.2
        changed = (np.asarray(out) != np.asarray(image)).any(axis=2).mean()
        assert 0.01 < changed <= 0.21, (seed, changed)  # overlaps and lucky colours can only lower it


def test_text_overlay_needs_no_font_file(monkeypatch: pytest.MonkeyPatch) -> None:
    real_truetype = ImageFont.truetype

    def no_files(font: object = None, *args: object, **kwargs: object) -> ImageFont.FreeTypeFont:
        assert isinstance(font, io.BytesIO), f"tried to read a font file: {font!r}"
        return real_truetype(font, *args, **kwargs)

    monkeypatch.setattr(ImageFont, "truetype", no_files)
    image = photo(400, 300)
    for seed in range(5):
        out, edit = apply("text", image, seed)
        assert edit.params["text"] and raw(out) != raw(image)
        assert max(6, round(0.08 * 300)) <= edit.params["size"] <= round(0.25 * 300)


def test_text_overlay_without_freetype_falls_back_to_the_bitmap_font(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_freetype(size: float | None = None) -> ImageFont.FreeTypeFont:
        raise ImportError("The _imagingft C module is not installed")

    monkeypatch.setattr(ImageFont, "load_default", no_freetype)
    out, _ = apply("text", photo(), 1)
    assert raw(out) != raw(photo())


# ----------------------------------------------------------------------------------------------------------
# mild_copy
# ----------------------------------------------------------------------------------------------------------


def test_mild_copy_is_deterministic_small_and_rescaled() -> None:
    image = photo(200, 100)
    assert raw(mild_copy(image, random.Random(3))) == raw(mild_copy(image, random.Random(3)))
    sizes = set()
    for seed in range(30):
        out = mild_copy(image, random.Random(seed))
        assert out.mode == "RGB"
        sizes.add(out.size)
        # Crop keeps 85-95% of the area (~92-97.5% of each side), then rescale by 0.7-1.3.
        assert 0.92 * 0.7 * 200 - 2 <= out.width <= 0.975 * 1.3 * 200 + 2
        assert abs(out.width / out.height - 2.0) < 0.1  # the aspect ratio survives
    assert len(sizes) > 20 and min(w for w, _ in sizes) < 170 < 220 < max(w for w, _ in sizes)


def descriptor(image: Image.Image) -> np.ndarray:
    """A crude global descriptor (16x16 colour thumbnail, centred and normalised): enough for near-duplicates."""
    x = np.asarray(image.resize((16, 16), Image.Resampling.BILINEAR), float).ravel()
    x -= x.mean()
    return x / np.linalg.norm(x)


def test_mild_copies_retrieve_their_original_at_rank_1() -> None:
    database = [photo(160, 120, seed) for seed in range(30)]
    keys = np.stack([descriptor(im) for im in database])
    for i, image in enumerate(database):
        for seed in range(3):
            query = descriptor(mild_copy(image, random.Random(seed)))
            assert int(np.argmax(keys @ query)) == i, (i, seed)
    # The same crude descriptor misses strong copies often: the strong set is not trivially easy.
    misses = sum(
        int(np.argmax(keys @ descriptor(strong_copy(image, random.Random(i))[0]))) != i
        for i, image in enumerate(database)
    )
    assert misses >= 5
