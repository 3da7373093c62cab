"""Tests for dino_scale.data: shard writing/reading, counting, and the exact-resume training loader."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from support import REPO, as_pil

from dino_scale.data import loaders, shards
from dino_scale.data.decode import decode_image
from dino_scale.data.items import list_labelled
from dino_scale.data.loaders import TrainBatch, iterate_crops, make_train_loader
from dino_scale.data.shards import count_samples, expand_shards, survey_shards, write_shards
from dino_scale.errors import InputError

CLASSES = ["alpha", "beta", "delta", "gamma"]  # sorted, as write_shards orders them
PER_CLASS = 8
N_GOOD = len(CLASSES) * PER_CLASS  # 32 readable images -> 4 shards of 8 with maxcount=8


class TinyMultiCrop:
    """Stand-in for augment.MultiCropAugmentation: 2 global (8x8) + 2 local (4x4) uint8 random crops."""

    n_local = 2

    def __call__(self, image: Image.Image | torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        x = torch.from_numpy(np.array(as_pil(image).resize((12, 12)))).permute(2, 0, 1)
        views = []
        for size in (8, 8, 4, 4):
            i, j = torch.randint(0, 12 - size + 1, (2,), generator=generator).tolist()
            views.append(x[:, i : i + size, j : j + size].clone())
        return views


def make_eval_loader(urls: list[str], batch_size: int, num_workers: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation loader on labelled shards: (4x4 crops as float 0..255 [B, 3, 4, 4], labels) per batch."""
    items, _ = list_labelled(urls)
    return [
        (batch.crops.float(), torch.tensor([items[i].label for i in batch.indices], dtype=torch.long))
        for batch in iterate_crops(items, 4, batch_size, num_workers, progress=False)
        if batch.crops is not None
    ]


def image_id(tensor: torch.Tensor) -> int:
    """Recover the identity painted into the red channel by `_solid` (robust to JPEG rounding)."""
    return round(tensor[0].mean().item() / 3)


def _solid(ident: int, label: int) -> Image.Image:
    # Red encodes a unique id (step 3 survives JPEG error), green the class: the eval test reads both back.
    # The blue ramp gives different crops different pixels.
    pixels = np.zeros((12, 12, 3), dtype=np.uint8)
    pixels[..., 0] = 3 * ident
    pixels[..., 1] = 40 + 50 * label
    pixels[..., 2] = 100 + 4 * np.add.outer(np.arange(12), np.arange(12))
    return Image.fromarray(pixels)


def _jpeg_bytes(image: Image.Image, quality: int = 98) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """32 good images in 4 class folders (PNG and JPEG) plus a corrupt, an empty and a truncated file."""
    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    truth: dict[str, tuple[int, int]] = {}  # relative path stem -> (id, label)
    ident = 0
    for label, name in enumerate(CLASSES):
        (images / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            ext = "png" if i % 2 else "jpg"
            # Dotted stems: keys must not keep the dots. JPEGs near-lossless so the painted id survives.
            _solid(ident, label).save(images / name / f"img.{i}.{ext}", quality=98, subsampling=0)
            truth[f"{name}/img.{i}"] = (ident, label)
            ident += 1
    (images / "beta" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    (images / "gamma" / "empty.jpg").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = _jpeg_bytes(Image.fromarray(noise))
    (images / "delta" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    bad = {str(images / "beta" / "corrupt.jpg"), str(images / "gamma" / "empty.jpg")}
    bad.add(str(images / "delta" / "truncated.jpg"))

    out = root / "shards"
    report = write_shards(images, out, maxcount=8, prefix="shard")

    # A shard written directly (not via write_shards) with corrupt samples among good ones.
    extra = root / "extra"
    extra.mkdir()
    extra_ids = {}
    with wds.TarWriter(str(extra / "extra-000000.tar")) as sink:
        for i in range(6):
            key = f"extra_{i}"
            extra_ids[key] = (N_GOOD + i, i % len(CLASSES))
            sink.write({"__key__": key, "jpg": _jpeg_bytes(_solid(N_GOOD + i, i % len(CLASSES))), "cls": i % 4})
            if i == 1:
                sink.write({"__key__": "zz_corrupt", "jpg": b"garbage bytes", "cls": 0})
            if i == 3:
                sink.write({"__key__": "zz_truncated", "jpg": full[:700], "cls": 1})
    return {
        "root": root,
        "images": images,
        "out": out,
        "report": report,
        "truth": truth,
        "bad": bad,
        "extra": extra,
        "extra_ids": extra_ids,
        "urls": sorted(str(p) for p in out.glob("*.tar")),
    }


def _read_tar_samples(paths: list[str]) -> list[dict]:
    """Independent reader (plain tarfile): samples as {ext: bytes, "__key__": ..., "__url__": ...}."""
    samples: dict[tuple[str, str], dict] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                directory, _, name = member.name.rpartition("/")
                key, _, ext = name.partition(".")
                key = f"{directory}/{key}" if directory else key
                sample = samples.setdefault((path, key), {"__key__": key, "__url__": path})
                sample[ext] = tar.extractfile(member).read()
    return list(samples.values())


def _batches(urls: list[str], **kw) -> list[TrainBatch]:
    args = {"augmentation": TinyMultiCrop(), "batch_size": 3, "steps_per_epoch": 7, "epoch": 0, "seed": 1}
    args.update(kw)
    return list(make_train_loader(urls, **args))


def _assert_same(a: list[TrainBatch], b: list[TrainBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys
        assert x.skipped == y.skipped
        assert x.skipped_shards == y.skipped_shards
        assert len(x.views) == len(y.views)
        for vx, vy in zip(x.views, y.views, strict=True):
            assert vx.dtype == vy.dtype and torch.equal(vx, vy)


# ----------------------------------------------------------------------------------------------------------
# writing and reading shards
# ----------------------------------------------------------------------------------------------------------


def test_write_shards_round_trip(dataset: dict) -> None:
    report, out, images = dataset["report"], dataset["out"], dataset["images"]
    assert report.written == N_GOOD
    assert report.classes == CLASSES
    assert {p for p, _ in report.skipped} == dataset["bad"]
    assert all(reason for _, reason in report.skipped)
    assert [p.name for p in report.shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))

    assert json.loads((out / "classes.json").read_text()) == CLASSES
    index = json.loads((out / "shards.json").read_text())
    assert index["total"] == N_GOOD
    assert index["shards"] == {f"shard-{i:06d}.tar": 8 for i in range(4)}

    samples = _read_tar_samples(dataset["urls"])
    assert len(samples) == N_GOOD
    assert len({s["__key__"] for s in samples}) == N_GOOD
    assert all("." not in s["__key__"] for s in samples)
    source_bytes = {}
    for path in images.rglob("*"):
        if path.is_file():
            source_bytes[path.read_bytes()] = path
    seen_stems = set()
    for s in samples:
        ext = "png" if "png" in s else "jpg"
        src = source_bytes[s[ext]]  # original bytes are stored unchanged
        stem = f"{src.parent.name}/{src.name.rsplit('.', 1)[0]}"
        seen_stems.add(stem)
        assert int(s["cls"]) == CLASSES.index(src.parent.name)
        assert int(s["cls"]) == dataset["truth"][stem][1]
    assert seen_stems == set(dataset["truth"])
    # Shuffled before sharding: shards are not class-sorted.
    first_shard_labels = {int(s["cls"]) for s in _read_tar_samples(dataset["urls"][:1])}
    assert len(first_shard_labels) > 1


def test_write_shards_is_deterministic_and_replaces_stale_shards(dataset: dict, tmp_path: Path) -> None:
    a = write_shards(dataset["images"], tmp_path / "a", maxcount=8)
    b = write_shards(dataset["images"], tmp_path / "b", maxcount=8)
    assert [p.read_bytes() for p in a.shards] == [p.read_bytes() for p in b.shards]
    # Re-writing with bigger shards must not leave the old shard-000002/3.tar behind.
    again = write_shards(dataset["images"], tmp_path / "a", maxcount=16)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.tar")) == [p.name for p in again.shards]
    assert len(again.shards) == 2
    assert json.loads((tmp_path / "a" / "shards.json").read_text())["total"] == N_GOOD
    # Another prefix in the same directory: shards.json lists both.
    write_shards(dataset["images"], tmp_path / "a", maxcount=100, prefix="other")
    index = json.loads((tmp_path / "a" / "shards.json").read_text())
    assert sorted(index["shards"]) == ["other-000000.tar", "shard-000000.tar", "shard-000001.tar"]
    assert index["total"] == 2 * N_GOOD


def test_write_shards_unlabelled_and_max_image_side(tmp_path: Path) -> None:
    images = tmp_path / "flat"
    images.mkdir()
    Image.new("RGB", (40, 20), (10, 200, 30)).save(images / "wide.png")
    Image.new("RGB", (10, 10), (10, 200, 30)).save(images / "small.png")
    report = write_shards(images, tmp_path / "out", max_image_side=16)
    assert report.written == 2 and report.classes == []
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == []
    samples = {s["__key__"]: s for s in _read_tar_samples([str(p) for p in report.shards])}
    assert all("cls" not in s for s in samples.values())
    wide = next(s for k, s in samples.items() if k.endswith("wide"))
    assert "jpg" in wide and Image.open(io.BytesIO(wide["jpg"])).size == (16, 8)  # downscaled, re-encoded
    small = next(s for k, s in samples.items() if k.endswith("small"))
    assert small["png"] == (images / "small.png").read_bytes()  # small enough: original bytes


def test_decode_image_modes_and_bombs(monkeypatch: pytest.MonkeyPatch) -> None:
    def encode(image: Image.Image, fmt: str) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        return buf.getvalue()

    palette = Image.new("P", (8, 8), 3)
    palette.info["transparency"] = 0
    cases = {
        "L": encode(Image.new("L", (8, 8), 77), "PNG"),
        "LA": encode(Image.new("LA", (8, 8), (77, 10)), "PNG"),
        "RGBA": encode(Image.new("RGBA", (8, 8), (1, 2, 3, 4)), "PNG"),
        "P": encode(palette, "PNG"),
        "CMYK": encode(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "JPEG"),
        "I;16": encode(Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)), "PNG"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may escape decoding
        for mode, raw in cases.items():
            image = decode_image(raw)
            assert image.mode == "RGB" and image.size == (8, 8), mode
        assert decode_image(cases["L"]).getpixel((0, 0)) == (77, 77, 77)
        assert decode_image(cases["I;16"]).getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped
        assert decode_image(encode(Image.fromarray(np.full((8, 8), 256, np.uint16)), "PNG")).getpixel((0, 0))[0] == 1

        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        big = decode_image(encode(Image.new("RGB", (40, 40)), "PNG"))  # > limit: PIL warns, we decode
        assert big.size == (40, 40)
        with pytest.raises(Image.DecompressionBombError):
            decode_image(encode(Image.new("RGB", (50, 50)), "PNG"))  # > 2x limit: error -> sample skipped
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"")


# ----------------------------------------------------------------------------------------------------------
# expanding and counting
# ----------------------------------------------------------------------------------------------------------


def test_expand_shards(dataset: dict, tmp_path: Path) -> None:
    out, urls = dataset["out"], dataset["urls"]
    assert expand_shards(str(out)) == urls  # a directory means its *.tar files
    assert expand_shards(str(out / "shard-{000000..000003}.tar")) == urls
    assert expand_shards(str(out / "shard-00000[12].tar")) == urls[1:3]
    assert expand_shards(out / "shard-000003.tar") == urls[3:]
    assert expand_shards([str(out / "shard-000000.tar"), str(out)]) == urls  # overlap de-duplicated

    for pattern in (
        str(out / "shard-{000000..000009}.tar"),  # partly missing: must not silently train on less
        str(out / "nope-*.tar"),
        str(tmp_path / "missing.tar"),
        str(tmp_path),  # a directory without shards
    ):
        with pytest.raises(FileNotFoundError, match="pattern") as info:
            expand_shards(pattern)
        assert repr(pattern) in str(info.value)


def test_count_samples(dataset: dict, tmp_path: Path) -> None:
    urls = dataset["urls"]
    assert count_samples(urls) == N_GOOD
    assert count_samples(urls[:2]) == 16

    # Without shards.json: counted by scanning the tars.
    bare = tmp_path / "bare"
    bare.mkdir()
    for u in urls:
        shutil.copy(u, bare)
    bare_urls = expand_shards(str(bare))
    assert count_samples(bare_urls) == N_GOOD
    assert count_samples([str(dataset["extra"] / "extra-000000.tar")]) == 8  # corrupt ones are samples too

    # shards.json is trusted for what it lists when the shard passes the cheap checks (a fake but plausible number
    # proves it is read without a header walk) and the rest is scanned.
    plausible = (bare / "shard-000000.tar").stat().st_size // 1024
    assert plausible > 8
    (bare / "shards.json").write_text(json.dumps({"shards": {"shard-000000.tar": plausible}, "total": plausible}))
    assert count_samples(bare_urls) == plausible + 24
    # A count the file cannot hold is checked against the headers, and blamed on shards.json.
    (bare / "shards.json").write_text(json.dumps({"shards": {"shard-000000.tar": 1000}, "total": 1000}))
    with pytest.raises(InputError, match=r"shards\.json: shard 'shard-000000\.tar' is listed with 1000 .* holds 8"):
        count_samples(bare_urls)


# ----------------------------------------------------------------------------------------------------------
# training loader
# ----------------------------------------------------------------------------------------------------------


def test_train_loader_shapes_count_and_corrupt_in_tar(dataset: dict) -> None:
    tar = str(dataset["extra"] / "extra-000000.tar")
    # shuffle_buffer=1 keeps tar order: slots [e0, zz_corrupt, e1] [e2, e3, zz_truncated] [e4, e5, e0'] ...
    batches = _batches([tar], batch_size=3, steps_per_epoch=5, shuffle_buffer=1)
    assert len(batches) == 5  # more steps than data: the worker starts another pass
    for b in batches:
        assert len(b.views) == 4 and len(b.keys) == 3
        assert [tuple(v.shape) for v in b.views] == [(3, 3, 8, 8), (3, 3, 8, 8), (3, 3, 4, 4), (3, 3, 4, 4)]
        assert all(v.dtype == torch.uint8 for v in b.views)
    assert batches[0].skipped == ["zz_corrupt"] and batches[1].skipped == ["zz_truncated"]
    assert batches[0].keys[:2] == ["extra_0", "extra_1"] and batches[0].keys[2] in ("extra_0", "extra_1")
    assert not batches[2].skipped
    all_keys = [k for b in batches for k in b.keys]
    assert "zz_corrupt" not in all_keys and "zz_truncated" not in all_keys
    # The refill is a new augmentation of a good sample, not a copy of its views.
    dup = batches[0].keys.index(batches[0].keys[2])
    assert not all(torch.equal(v[2], v[dup]) for v in batches[0].views)
    # Second pass (slots 8.. = batch 2, row 2 is extra_0 again): fresh views, not a replay of the first pass.
    assert batches[2].keys == ["extra_4", "extra_5", "extra_0"]
    assert not all(torch.equal(v[0], w[2]) for v, w in zip(batches[0].views, batches[2].views, strict=True))


def test_train_loader_deterministic(dataset: dict) -> None:
    urls = dataset["urls"]
    a = _batches(urls, num_workers=0)
    _assert_same(a, _batches(urls, num_workers=0))
    assert [b.keys for b in a] != [b.keys for b in _batches(urls, epoch=1)]  # new order every epoch
    assert [b.keys for b in a] != [b.keys for b in _batches(urls, seed=2)]
    w2 = _batches(urls, num_workers=2)
    _assert_same(w2, _batches(urls, num_workers=2))
    # Views depend on (seed, epoch, key) only, not on which worker decoded the sample.
    views_by_key = {k: [v[i] for v in b.views] for b in a for i, k in enumerate(b.keys)}
    compared = 0
    for b in w2:
        for i, k in enumerate(b.keys):
            if k in views_by_key:
                assert all(torch.equal(x, v[i]) for x, v in zip(views_by_key[k], b.views, strict=True))
                compared += 1
    assert compared > 0


def test_shard_order_changes_per_epoch(dataset: dict) -> None:
    urls = dataset["urls"]
    shard_of = {s["__key__"]: s["__url__"] for s in _read_tar_samples(urls)}
    first_shards = set()
    for epoch in range(8):
        # No sample shuffle and batch = shard size: batch 0 is exactly the epoch's first shard.
        first = _batches(urls, batch_size=8, steps_per_epoch=1, epoch=epoch, shuffle_buffer=1)[0]
        assert len({shard_of[k] for k in first.keys}) == 1
        first_shards.add(shard_of[first.keys[0]])
    assert len(first_shards) > 1


def test_one_epoch_sees_each_sample_once_when_quota_fits(dataset: dict) -> None:
    # Quota == data exactly: a sample buffer larger than the data must still not let pass 2 leak in.
    batches = _batches(dataset["urls"], batch_size=4, steps_per_epoch=8, shuffle_buffer=1000)
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == len(set(keys)) == N_GOOD


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_batch_count(dataset: dict, num_workers: int) -> None:
    loader = make_train_loader(
        dataset["urls"],
        TinyMultiCrop(),
        batch_size=5,
        steps_per_epoch=11,
        epoch=0,
        seed=0,
        num_workers=num_workers,
    )
    assert len(loader) == 11
    batches = list(loader)
    assert len(batches) == 11  # 55 samples from 32: passes repeat
    assert all(len(b.keys) == 5 and b.views[0].shape[0] == 5 for b in batches)
    resumed = make_train_loader(
        dataset["urls"], TinyMultiCrop(), 5, 11, epoch=0, seed=0, start_batch=4, num_workers=num_workers
    )
    assert len(resumed) == 7 and len(list(resumed)) == 7


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_matches_uninterrupted(dataset: dict, num_workers: int) -> None:
    # Clean shards plus the one with corrupt samples: resume must be exact even across skipped samples.
    urls = dataset["urls"] + [str(dataset["extra"] / "extra-000000.tar")]
    # 16 x 3 slots cover every worker's share (at most 24 samples) at least once, corrupt samples included.
    kw = {"batch_size": 3, "steps_per_epoch": 16, "num_workers": num_workers, "shuffle_buffer": 4}
    full = _batches(urls, **kw)
    assert len(full) == 16
    assert {k for b in full for k in b.skipped} == {"zz_corrupt", "zz_truncated"}
    for start in (1, 2, 5, 10, 15, 16):
        _assert_same(_batches(urls, start_batch=start, **kw), full[start:])


def test_no_duplicates_across_ranks_and_workers(dataset: dict) -> None:
    urls = dataset["urls"]  # 4 shards of 8 for 2 ranks x 2 workers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough shards: no fallback warning
        per_rank = [
            _batches(urls, batch_size=2, steps_per_epoch=8, rank=r, world_size=2, num_workers=2) for r in range(2)
        ]
    keys = [k for batches in per_rank for b in batches for k in b.keys]
    assert len(keys) == N_GOOD
    assert Counter(keys).most_common(1)[0][1] == 1
    assert set(keys) == {s["__key__"] for s in _read_tar_samples(urls)}


@pytest.mark.parametrize(("num_workers", "world_size"), [(2, 2), (0, 4)])
def test_fewer_shards_than_workers_warns_and_splits_samples(dataset: dict, num_workers: int, world_size: int) -> None:
    urls = dataset["urls"][:2]  # 16 samples, 2 shards for 4 readers
    keys = []
    for rank in range(world_size):
        steps = 16 // (2 * world_size)
        with pytest.warns(UserWarning, match=r"only 2 shard\(s\).* = 4 readers"):
            loader = make_train_loader(
                urls,
                TinyMultiCrop(),
                2,
                steps,
                3,
                0,
                rank=rank,
                world_size=world_size,
                num_workers=num_workers,
            )
        keys += [k for b in loader for k in b.keys]
    assert len(keys) == 16
    assert set(keys) == {s["__key__"] for s in _read_tar_samples(urls)}


def test_loaders_leave_global_rng_alone(dataset: dict) -> None:
    # The trainer's random stream (drop path, ...) must not depend on how many loaders were created.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for num_workers in (0, 2):
        _batches(dataset["urls"], steps_per_epoch=2, num_workers=num_workers)
        list(make_eval_loader(dataset["urls"][:1], batch_size=4, num_workers=num_workers))
    assert torch.equal(torch.rand(3), expected)


def test_train_loader_errors(dataset: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _batches([str(tmp_path / "gone.tar")])
    with pytest.raises(ValueError):
        make_train_loader(dataset["urls"], TinyMultiCrop(), 2, steps_per_epoch=3, epoch=0, seed=0, start_batch=4)
    with pytest.raises(ValueError):
        make_train_loader(dataset["urls"], TinyMultiCrop(), 2, 3, epoch=0, seed=0, rank=2, world_size=2)


def test_stable_seed_is_stable() -> None:
    # Fixed value: catches any switch to Python's salted hash() or to a different digest.
    assert loaders.stable_seed("augment", 1, 0, "key") == 6464503829617863445
    assert loaders.stable_seed("augment", 1, 0, "key") != loaders.stable_seed("augment", 1, 1, "key")
    assert 0 <= loaders.stable_seed("x") < 2**63


# ----------------------------------------------------------------------------------------------------------
# evaluation loader
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_loader_covers_every_sample_once(dataset: dict, num_workers: int) -> None:
    urls = dataset["urls"] + [str(dataset["extra"] / "extra-000000.tar")]
    expected = {ident: label for ident, label in dataset["truth"].values()}
    expected.update(dict(dataset["extra_ids"].values()))
    batches = make_eval_loader(urls, batch_size=5, num_workers=num_workers)
    seen = []
    for images, labels in batches:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 4, 4)
        assert labels.dtype == torch.long and len(labels) == len(images) <= 5
        for image, label in zip(images, labels, strict=True):
            seen.append(image_id(image))
            assert expected[seen[-1]] == int(label)
    assert sorted(seen) == sorted(expected)  # every readable sample once; the corrupt ones skipped
    again = make_eval_loader(urls, batch_size=5, num_workers=num_workers)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


def test_damaged_tar_is_read_up_to_the_damage(dataset: dict, tmp_path: Path) -> None:
    raw = Path(dataset["urls"][0]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: len(raw) // 2])  # a shard truncated mid-way (e.g. an interrupted copy)
    batches = make_eval_loader([str(cut), dataset["urls"][1]], batch_size=64)
    n = sum(len(labels) for _, labels in batches)
    assert 8 < n < 16  # the intact samples of the cut shard, then all of the next shard
    train = _batches([str(cut)], batch_size=4, steps_per_epoch=3)  # repeats what is readable, no crash
    assert len(train) == 3
    assert [b.skipped_shards for b in train] == [[str(cut)], [], []]  # once, though every batch passes over it


def test_raw_samples_report_damage_once_per_shard(dataset: dict, tmp_path: Path) -> None:
    raw = Path(dataset["urls"][0]).read_bytes()
    with tarfile.open(dataset["urls"][0]) as tar:
        members = tar.getmembers()
    cuts = {
        "mid-member": members[5].offset_data + 10,
        "boundary": members[6].offset,  # tarfile alone reads this as a complete archive of 6 members
        "mid-header": members[6].offset + 100,
    }
    reports: list[tuple[str, str]] = []
    for name, cut in cuts.items():
        (tmp_path / f"{name}.tar").write_bytes(raw[:cut])
    (tmp_path / "empty.tar").write_bytes(b"")
    urls = [str(tmp_path / f"{name}.tar") for name in (*cuts, "empty")] + [dataset["urls"][1]]
    samples = list(shards.iter_raw_samples(urls, lambda url, reason: reports.append((url, reason))))
    assert [url for url, _ in reports] == urls[:4]
    assert "end-of-archive" in reports[1][1] and "inside a member header" in reports[2][1] and "empty" in reports[3][1]
    whole = [s for s in samples if s["__url__"] == dataset["urls"][1]]
    assert len(whole) == 8
    assert all(len(s) > 2 for s in samples)  # members before the damage, grouped into samples as usual
    with pytest.raises(FileNotFoundError):  # a missing shard is a configuration error, not damage
        list(shards.iter_raw_samples([str(tmp_path / "gone.tar")], lambda url, reason: None))


def test_train_batch_pin_memory_keeps_the_reports() -> None:
    class Pinnable:
        def pin_memory(self) -> str:
            return "pinned"

    batch = TrainBatch([Pinnable()], ["a", "a"], ["b"], ["bad.tar"]).pin_memory()  # type: ignore[list-item]
    assert (batch.views, batch.keys, batch.skipped, batch.skipped_shards) == (
        ["pinned"],
        ["a", "a"],
        ["b"],
        ["bad.tar"],
    )


def test_eval_loader_needs_labels(tmp_path: Path) -> None:
    with wds.TarWriter(str(tmp_path / "u.tar")) as sink:
        sink.write({"__key__": "a", "jpg": _jpeg_bytes(_solid(1, 0))})
    with pytest.raises(ValueError, match="cls"):
        make_eval_loader([str(tmp_path / "u.tar")], batch_size=2)


def test_sample_dataset_in_repo(tmp_path: Path) -> None:
    """The committed sample shards are complete and consistent with their index files."""
    root = REPO / "shards" / "sample"
    if not root.is_dir():
        pytest.skip("shards/sample not generated")
    for split in ("train", "val"):
        urls = expand_shards(str(root / split))
        index = json.loads((root / split / "shards.json").read_text())
        assert sorted(Path(u).name for u in urls) == sorted(index["shards"])
        survey = survey_shards(urls)
        assert survey.samples == index["total"] and survey.urls == urls and not survey.skipped
        # Counted from the tar headers alone (no shards.json beside the copies), the total is the same.
        shutil.copytree(root / split, tmp_path / split, ignore=shutil.ignore_patterns("shards.json"))
        assert survey_shards(expand_shards(str(tmp_path / split))).samples == index["total"]
        classes = json.loads((root / split / "classes.json").read_text())
        assert len(classes) >= 5
        with tarfile.open(urls[0]) as tar:
            assert any(m.name.endswith(".cls") for m in tar.getmembers())
    assert len(expand_shards(str(root / "train"))) == 4
