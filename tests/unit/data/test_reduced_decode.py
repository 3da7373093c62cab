"""data.decode_reduced: JPEGs decoded at a libjpeg DCT reduction (1/2, 1/4, 1/8) chosen per sample so that no view is
upsampled, with the views drawn from the full upright size (the same draws as a full decode) and their boxes moved
into the reduced image; small JPEGs and other formats decode and render exactly as without the option."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from support import striped_photo

from dino_scale.data.augment import MultiCropAugmentation, ViewParams, choose_dct_reduction, reduced_view_params
from dino_scale.data.decode import dct_reduced_size, decode_image, read_jpeg_header
from dino_scale.data.loaders import TrainBatch, make_train_loader
from dino_scale.errors import InputError

# DINO's sizes: the reductions they allow. Torch view kernel: the device path's bit-for-bit twin on CPU.
AUG = MultiCropAugmentation(global_size=224, local_size=96, n_local=2, view_kernel="torch")
BATCH, STEPS = 4, 2
# Upright (width, height) of each picture; "rot6" is stored 1200x900 with EXIF orientation 6 (rotate 90 clockwise).
UPRIGHT = {"big": (1600, 1200), "small": (400, 300), "rot6": (900, 1200), "png": (500, 400)}


def encode(image: Image.Image, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    if fmt != "JPEG":
        image.save(buf, fmt)
        return buf.getvalue()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One shard, two samples (different keys, so different views) of each picture: 2 batches of 4."""
    files = {
        "big": ("jpg", encode(striped_photo(1600, 1200, 0))),
        "small": ("jpg", encode(striped_photo(400, 300, 1))),
        "rot6": ("jpg", encode(striped_photo(1200, 900, 2), orientation=6)),
        "png": ("png", encode(striped_photo(500, 400, 3), "PNG")),
    }
    path = tmp_path_factory.mktemp("reduced") / "shard-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for copy in range(2):
            for name, (ext, data) in files.items():
                sink.write({"__key__": f"{name}_{copy}", ext: data})
    return str(path)


def batches(shard: str, start_batch: int = 0, num_workers: int = 0, **options: bool) -> list[TrainBatch]:
    loader = make_train_loader(
        [shard], AUG, BATCH, STEPS, epoch=0, seed=5, start_batch=start_batch, num_workers=num_workers,
        shuffle_buffer=8, **options,
    )  # fmt: skip
    return list(loader)


def by_key(batch_list: list[TrainBatch]) -> dict[str, tuple[TrainBatch, int]]:
    return {key: (b, i) for b in batch_list for i, key in enumerate(b.keys)}


def kind(key: str) -> str:
    return key.rsplit("_", 1)[0]


def views_of(batch: TrainBatch, i: int) -> list[torch.Tensor]:
    return [v[i] for v in batch.views]


def test_boxes_move_by_the_stated_rounding_and_the_reduction_is_the_largest_that_upsamples_nothing() -> None:
    def view(box: tuple[int, int, int, int], size: int) -> ViewParams:
        return ViewParams(size, box, flip=False, jitter=None, grayscale=False, blur_sigma=None, solarize=False)

    # Edges scaled by reduced / full and rounded half up: 1199 -> 150 rows (ceil(1199 / 8)).
    moved = reduced_view_params([view((3, 5, 1001, 797), 96)], (1199, 1600), (150, 200))
    assert moved[0].box == (0, 1, 126, 99)  # rows: 3 * 150 / 1199 = 0.38 -> 0, 1004 * 150 / 1199 = 125.6 -> 126
    assert reduced_view_params(moved, (150, 200), (150, 200)) == moved  # same size: unchanged
    assert dct_reduced_size(1199, 3) == 150 and dct_reduced_size(1200, 3) == 150 and dct_reduced_size(7, 1) == 4

    whole = [view((0, 0, 1200, 1600), 224)]
    assert choose_dct_reduction(whole, 1200, 1600) == 2  # 300 rows >= 224; at 1/8 150 rows would be upsampled
    assert choose_dct_reduction(whole + [view((10, 10, 100, 100), 96)], 1200, 1600) == 0  # a 100 px box for 96 px
    assert choose_dct_reduction([view((0, 0, 300, 400), 96)], 300, 400) == 1  # 150 >= 96, 75 is not
    assert choose_dct_reduction([view((0, 0, 7, 7), 1)], 7, 7) == 2  # both sides need >= 2^k pixels: 7 < 8

    data = encode(striped_photo(1600, 1200, 0))
    for k in range(4):
        assert decode_image(data, dct_reduction=k).size == (dct_reduced_size(1600, k), dct_reduced_size(1200, k))
    png = encode(striped_photo(50, 40, 0), "PNG")
    assert decode_image(png, dct_reduction=2).size == (50, 40)  # other formats: full size
    with pytest.raises(InputError, match="not both"):
        decode_image(data, draft_size=100, dct_reduction=1)
    with pytest.raises(InputError, match="dct_reduction"):
        decode_image(data, dct_reduction=4)


def test_header_gives_the_upright_size() -> None:
    rot6 = encode(striped_photo(1200, 900, 2), orientation=6)
    header = read_jpeg_header(rot6)
    assert header is not None
    assert (header.width, header.height, header.orientation) == (900, 1200, 6)
    assert decode_image(rot6).size == (900, 1200)
    assert read_jpeg_header(encode(striped_photo(50, 40, 0), "PNG")) is None


def test_same_draws_boxes_moved_and_small_images_untouched_on_the_device_path(shard: str) -> None:
    full = by_key(batches(shard, render_on_device=True))
    reduced = by_key(batches(shard, render_on_device=True, decode_reduced=True))
    assert full.keys() == reduced.keys() and len(full) == 8
    reductions = {}
    for key, (fb, i) in full.items():
        rb, j = reduced[key]
        image, params, full_image, full_params = rb.images[j], rb.params[j], fb.images[i], fb.params[i]
        width, height = UPRIGHT[kind(key)]
        assert full_image.shape == (3, height, width)
        # The draws of the full decode, whatever the reduction: only the boxes move, by reduced_view_params.
        assert params == reduced_view_params(full_params, (height, width), tuple(image.shape[1:]))
        k = round(np.log2(height / image.shape[1]))
        assert tuple(image.shape[1:]) == (dct_reduced_size(height, k), dct_reduced_size(width, k))
        if kind(key) != "png":
            assert k == choose_dct_reduction(full_params, height, width)
        if k > 0:  # nothing upsampled because of the reduction (a small image's full-size boxes may be)
            assert all(p.box[2] >= p.size and p.box[3] >= p.size for p in params)
        else:
            assert torch.equal(image, full_image) and params == full_params
        reductions[key] = k
    # Measured with these draws: both big pictures at 1/2 (k = 1; DINO's 224 px globals from 0.4 of the picture), the
    # small one and the PNG at full size.
    assert all(reductions[f"{name}_{c}"] >= 1 for name in ("big", "rot6") for c in (0, 1)), reductions
    assert all(reductions[f"{name}_{c}"] == 0 for name in ("small", "png") for c in (0, 1)), reductions


def test_worker_views_are_exact_in_size_close_to_the_full_decode_and_identical_for_small_images(shard: str) -> None:
    full = by_key(batches(shard))
    reduced = by_key(batches(shard, decode_reduced=True))
    sizes = [224, 224, 96, 96]

    def mean_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return torch.cat([(x.int() - y.int()).abs().flatten() for x, y in zip(a, b, strict=True)]).float().mean().item()

    diffs, others = {}, {}
    for key, (fb, i) in full.items():
        rb, j = reduced[key]
        a, b = views_of(fb, i), views_of(rb, j)
        assert [tuple(v.shape) for v in b] == [(3, s, s) for s in sizes] and all(v.dtype == torch.uint8 for v in b)
        if kind(key) in ("small", "png"):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), key  # k = 0 / not JPEG: bit-identical
        else:
            diffs[key] = mean_difference(a, b)
            twin = key[:-1] + str(1 - int(key[-1]))  # the other sample of the same picture: other views
            others[key] = mean_difference(views_of(*full[twin]), b)
    # Measured, mean |difference| over a sample's 4 views: 0.7 (rot6) to 5.6 (big) grey levels; ~3 of them without
    # the colour ops, which stretch differences. Causes: a box edge moves by up to half a reduced pixel when rounded
    # to the reduced grid (a shift of up to 0.25 output pixel at k = 1, visible on these pictures' high-contrast
    # stripes), and libjpeg's DCT scaling is another low-pass than the bicubic resize (~1 level with aligned boxes).
    # The other sample of the same picture (other crops) differs by 60-70: these are the same views, not just alike.
    assert all(0 < d < 8.0 for d in diffs.values()), diffs
    assert all(diffs[key] < others[key] / 4 for key in diffs), (diffs, others)


@pytest.mark.usefixtures("one_thread")  # with more threads, a batch's reductions (contrast's mean) sum in another order
def test_rendering_on_the_device_gives_the_workers_views(shard: str) -> None:
    workers = batches(shard, decode_reduced=True)
    device = batches(shard, render_on_device=True, decode_reduced=True)
    for w, d in zip(workers, device, strict=True):
        assert w.keys == d.keys
        for x, y in zip(AUG.to_model_input(w), AUG.to_model_input(d), strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize(("render_on_device", "num_workers"), [(False, 0), (True, 0), (True, 1)])
def test_resume_gives_the_uninterrupted_batches(shard: str, render_on_device: bool, num_workers: int) -> None:
    whole = batches(shard, render_on_device=render_on_device, decode_reduced=True)
    resumed = batches(shard, 1, num_workers, render_on_device=render_on_device, decode_reduced=True)
    assert len(resumed) == 1 and resumed[0].keys == whole[1].keys
    if render_on_device:
        assert resumed[0].params == whole[1].params
        assert all(torch.equal(x, y) for x, y in zip(resumed[0].images, whole[1].images, strict=True))
    else:
        assert all(torch.equal(x, y) for x, y in zip(resumed[0].views, whole[1].views, strict=True))


def test_unreadable_jpegs_are_still_skipped_and_counted(tmp_path: Path) -> None:
    good = encode(striped_photo(400, 300, 1))
    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "good", "jpg": good})
        sink.write({"__key__": "cut", "jpg": good[: len(good) // 2]})  # header reads, pixels do not
        sink.write({"__key__": "garbage", "jpg": b"\xff\xd8\xff not a jpeg at all"})
    (batch,) = make_train_loader([str(path)], AUG, 3, 1, epoch=0, seed=0, decode_reduced=True)
    assert sorted(batch.skipped) == ["cut", "garbage"] and batch.keys == ["good"] * 3
