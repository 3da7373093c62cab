"""Training straight from an image folder (data.train_images): the survey's virtual shards, their raw samples, and
the training loader's guarantees on them (unreadable files skipped and counted, exact resume, disjoint readers)."""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import as_pil

from dino_scale.data import folders
from dino_scale.data.folders import (
    FOLDER_URL_PREFIX,
    is_folder_url,
    iter_folder_samples,
    parse_folder_url,
    survey_image_folder,
)
from dino_scale.data.loaders import TrainBatch, make_train_loader
from dino_scale.data.shards import expand_shards, is_remote, iter_raw_samples, read_classes, sample_image_bytes
from dino_scale.errors import InputError, NotFound

GROUP = 5  # files per group in these tests: the 31 images of `tree` make 7 groups


class TinyCrops:
    """Stand-in for MultiCropAugmentation: two random 6x6 uint8 crops of the image resized to 10x10."""

    def __call__(self, image: Image.Image | torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        x = torch.from_numpy(np.array(as_pil(image).resize((10, 10)))).permute(2, 0, 1)
        views = []
        for _ in range(2):
            i, j = torch.randint(0, 5, (2,), generator=generator).tolist()
            views.append(x[:, i : i + 6, j : j + 6].clone())
        return views


def _picture(ident: int) -> Image.Image:
    rng = np.random.default_rng(ident)
    return Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8))


@pytest.fixture(autouse=True)
def small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(folders, "FILES_PER_GROUP", GROUP)
    monkeypatch.setattr(folders, "_LISTINGS", {})


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, list[str]]:
    """An ImageFolder tree (3 classes of 8) plus 6 images at the top, PNG and JPEG, one with an upper-case
    extension; hidden files and folders and two non-image files that must be left out. Returns (root, the
    relative paths of its image files)."""
    root = tmp_path / "images"
    images: list[str] = []
    for c, name in enumerate(("cat", "dog", "eel")):
        (root / name).mkdir(parents=True)
        for i in range(8):
            images.append(f"{name}/{i}.{'png' if i % 2 else 'jpg'}")
            _picture(10 * c + i).save(root / images[-1])
    for i in range(6):
        images.append(f"top-{i}.png")
        _picture(100 + i).save(root / images[-1])
    images.append("dog/LOUD.JPG")
    _picture(200).save(root / images[-1], format="JPEG")
    (root / ".hidden.jpg").write_bytes(b"not an image")
    (root / ".cache").mkdir()
    _picture(300).save(root / ".cache" / "thumb.png")
    (root / "notes.txt").write_text("not an image")
    (root / "cat" / "labels.csv").write_text("a,b")
    return root, sorted(images)


def _batches(urls: list[str], **kw: object) -> list[TrainBatch]:
    options: dict = {"batch_size": 4, "steps_per_epoch": 7, "epoch": 0, "seed": 3, "shuffle_buffer": 6, **kw}
    return list(make_train_loader(urls, TinyCrops(), **options))


def _assert_same(a: list[TrainBatch], b: list[TrainBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys and x.skipped == y.skipped
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views, strict=True))


# --- the survey -------------------------------------------------------------------------------------------------


def test_survey_groups_cover_every_image_once_in_a_mixed_fixed_order(
    tree: tuple[Path, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    root, images = tree
    with caplog.at_level(logging.INFO, logger="dino_scale.data.folders"):
        survey = survey_image_folder(str(root))
    assert survey.samples == len(images) == 31 and survey.skipped == []
    assert "2 other files ignored" in caplog.text

    bounds = [parse_folder_url(url) for url in survey.urls]
    assert {b[0] for b in bounds} == {str(root.resolve())} and {b[3] for b in bounds} == {31}
    # ceil(31 / 5) = 7 consecutive groups covering positions 0..30, of sizes that differ by at most one.
    assert len(bounds) == 7 and bounds[0][1] == 0 and bounds[-1][2] == 30
    assert all(b[1] == a[2] + 1 for a, b in itertools.pairwise(bounds))
    assert {last - first + 1 for _, first, last, _ in bounds} == {4, 5}

    samples = list(iter_raw_samples(survey.urls))
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == images  # every image file once; hidden and non-image files left out
    for sample in samples:
        key = sample["__key__"]
        assert is_folder_url(sample["__url__"]) and sample["__url__"] in survey.urls
        ext = key.rpartition(".")[2].lower()
        assert set(sample) == {"__key__", "__url__", ext}
        assert sample_image_bytes(sample) == (root / key).read_bytes()
    # Class-sorted groups would feed each data worker one class at a time: the order is mixed...
    assert any(len({k.split("/")[0] for k in keys[i : i + GROUP]}) > 1 for i in range(0, 15, GROUP))
    assert keys != images
    # ...but fixed: another survey (another rank, a restart) gives the same groups with the same files.
    folders._LISTINGS.clear()
    again = survey_image_folder(str(root) + "/")
    assert again.urls == survey.urls
    assert [s["__key__"] for s in iter_raw_samples(again.urls)] == keys


def test_group_urls_are_neither_tar_paths_nor_remote(tree: tuple[Path, list[str]]) -> None:
    root, _ = tree
    url = survey_image_folder(str(root)).urls[0]
    assert url.startswith(FOLDER_URL_PREFIX) and not is_remote(url)
    assert read_classes([url]) == []
    with pytest.raises(NotFound):  # not a file: expand_shards must not take it for a shard
        expand_shards(url)
    odd = f"{FOLDER_URL_PREFIX}/a://b#0-1of2"  # even a path that looks like a remote URL
    assert not is_remote(odd) and parse_folder_url(odd) == ("/a://b", 0, 1, 2)
    for bad in (f"{FOLDER_URL_PREFIX}/a", f"{FOLDER_URL_PREFIX}/a#0-9", f"{FOLDER_URL_PREFIX}/a#3-1of5", "/a#0-1of2"):
        with pytest.raises(InputError, match="not an image folder group|first <= last"):
            parse_folder_url(bad)


def test_survey_does_not_read_the_images(tree: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    root, images = tree
    opened: list[str] = []
    real_open = open

    def spy(file: object, *args: object, **kwargs: object) -> object:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", spy)
    survey = survey_image_folder(str(root))
    samples = list(iter_raw_samples(survey.urls))
    assert len(samples) == len(images) and opened == []  # listing and yielding samples open no file
    sample_image_bytes(samples[0])
    assert opened == [str(root.resolve() / samples[0]["__key__"])]
    sample_image_bytes(samples[0])  # a refill decodes the sample again: the bytes are kept, not read twice
    assert len(opened) == 1


@pytest.mark.parametrize(
    ("setup", "kind", "words"),
    [
        ("missing", NotFound, "does not exist"),
        ("file", InputError, "is a file, not a folder"),
        ("tar_file", InputError, "a shard\\? Train on shards with data.train_shards"),
        ("empty", NotFound, "holds no files"),
        ("hidden_only", NotFound, "holds no files"),
        ("no_images", NotFound, r"no image files .* only 2 \.txt, 1 \.json$"),
        ("shards", NotFound, r"its 2 \*\.tar files are shards: train on them with data.train_shards="),
    ],
)
def test_survey_errors_name_the_path(tmp_path: Path, setup: str, kind: type[Exception], words: str) -> None:
    path = tmp_path / "data"
    if setup == "file":
        path.write_text("x")
    elif setup == "tar_file":
        path = tmp_path / "train-000000.tar"
        path.write_bytes(b"")
    elif setup != "missing":
        path.mkdir()
    if setup == "hidden_only":
        (path / ".DS_Store").write_bytes(b"x")
        (path / ".git").mkdir()
        _picture(0).save(path / ".git" / "a.png")
    if setup == "no_images":
        for name in ("a.txt", "b.txt", "c.json"):
            (path / name).write_text("x")
    if setup == "shards":
        for name in ("train-000000.tar", "train-000001.tar", "shards.json"):
            (path / name).write_text("x")
    with pytest.raises(kind, match=words) as caught:
        survey_image_folder(str(path))
    message = str(caught.value)
    assert str(path) in message and "\n" not in message


def test_survey_of_an_unreadable_folder_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    _picture(0).save(locked / "a.png")

    real_scandir = os.scandir

    def denied(path: object = ".") -> object:  # chmod 0 does not stop root, who runs these tests in containers
        if Path(str(path)) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(InputError, match=f"^cannot list image folder '{locked}': Permission denied$"):
        survey_image_folder(str(locked))


def test_expand_shards_points_a_folder_of_images_at_train_images(tree: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, images = tree
    with pytest.raises(NotFound) as caught:
        expand_shards(str(root))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"no *.tar shards in directory '{root}'")
    assert f"it holds {len(images)} image files: train on them with data.train_images={root}" in message
    assert f"`dino-scale shard --images {root} --out <dir>`" in message
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "notes.txt").write_text("x")
    with pytest.raises(NotFound) as caught:
        expand_shards(str(bare))
    assert "image files" not in str(caught.value)  # no hint where it would be wrong


# --- reading the groups -----------------------------------------------------------------------------------------


def test_a_vanished_file_is_an_unreadable_sample(tree: tuple[Path, list[str]]) -> None:
    root, _ = tree
    survey = survey_image_folder(str(root))
    (root / "eel" / "3.png").unlink()
    samples = {s["__key__"]: s for s in iter_raw_samples(survey.urls)}
    assert len(samples) == survey.samples  # listed at the survey, so still yielded
    with pytest.raises(InputError, match=r"cannot read image file .*eel/3\.png: No such file"):
        sample_image_bytes(samples["eel/3.png"])


def test_a_folder_that_changed_since_the_survey_is_reported_not_misread(tree: tuple[Path, list[str]]) -> None:
    root, _ = tree
    survey = survey_image_folder(str(root))
    folders._LISTINGS.clear()  # as in a process that did not survey (a spawned data worker)...
    assert [s["__key__"] for s in iter_folder_samples(survey.urls[1], lambda *_: None)] == [
        s["__key__"] for s in iter_raw_samples(survey.urls[1:2])
    ]
    folders._LISTINGS.clear()
    _picture(400).save(root / "cat" / "new.png")  # ...where the listing has changed since
    reports: list[tuple[str, str]] = []
    assert list(iter_raw_samples(survey.urls[:2], lambda url, reason: reports.append((url, reason)))) == []
    assert [url for url, _ in reports] == survey.urls[:2]
    assert "now holds 32 image files, not the 31 surveyed" in reports[0][1]


# --- the training loader on a folder ----------------------------------------------------------------------------


def test_loader_skips_and_counts_corrupt_and_vanished_files(tree: tuple[Path, list[str]]) -> None:
    root, images = tree
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    survey = survey_image_folder(str(root))
    assert survey.samples == 32
    (root / "top-2.png").unlink()  # gone after the survey, before the loader reads it
    # 8 batches of 4 = 32 samples: the one reader reads each listed file exactly once.
    batches = _batches(survey.urls, steps_per_epoch=8)
    assert len(batches) == 8 and all(len(b.keys) == 4 and b.views[0].shape == (4, 3, 6, 6) for b in batches)
    skipped = [key for b in batches for key in b.skipped]
    assert sorted(skipped) == ["dog/broken.jpg", "top-2.png"]
    trained = {key for b in batches for key in b.keys}
    assert trained == set(images) - {"top-2.png"}  # refilled slots repeat good samples of their batch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_any_batch_matches_the_uninterrupted_loader(tree: tuple[Path, list[str]], num_workers: int) -> None:
    root, _ = tree
    (root / "eel" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    urls = survey_image_folder(str(root)).urls
    full = _batches(urls, num_workers=num_workers)
    assert len(full) == 7 and any(b.skipped == ["eel/broken.png"] for b in full)
    for start in (1, 4, 6):
        _assert_same(_batches(urls, num_workers=num_workers, start_batch=start), full[start:])
    if num_workers == 0:
        folders._LISTINGS.clear()  # a process that lists the folder itself reads the same batches
        _assert_same(_batches(urls, start_batch=2), full[2:])


def test_ranks_and_workers_read_disjoint_files(tree: tuple[Path, list[str]]) -> None:
    root, images = tree
    urls = survey_image_folder(str(root)).urls  # 7 groups of 4 or 5 files for 2 ranks x 2 workers
    seen: list[str] = []
    for rank in range(2):
        # Each worker makes 2 batches of 2: 4 samples, fewer than its share (one or two groups) holds.
        for batch in _batches(urls, batch_size=2, steps_per_epoch=4, num_workers=2, rank=rank, world_size=2):
            seen.extend(batch.keys)
    assert len(seen) == 16 and len(set(seen)) == 16 and set(seen) <= set(images)
