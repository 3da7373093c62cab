"""Damaged shards and a damaged shards.json: the survey before training, the training loader and the shard lister
(`index --shards`, evaluation) leave a bad shard out with a warning naming it and use the rest; a shards.json count
that cannot be right is blamed on shards.json instead of flowing on into an allocation or a schedule."""

from __future__ import annotations

import json
import logging
import random
import shlex
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import photo

from dino_scale.data.items import list_image_source, list_labelled, list_shard_items
from dino_scale.data.loaders import make_train_loader
from dino_scale.data.shards import SHARDS_INDEX, expand_shards, iter_raw_samples, survey_shards, write_shards
from dino_scale.errors import InputError

PER_SHARD = 4
N_SHARDS = 6  # shard-000000 .. shard-000005, of which 0 and 5 stay whole


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _image_keys_before(path: Path, cut: int) -> set[str]:
    """Keys whose image member lies wholly in the first ``cut`` bytes of the (whole) shard ``path``."""
    return {
        m.name.split(".", 1)[0] for m in _members(path) if not m.name.endswith(".cls") and m.offset_data + m.size <= cut
    }


def _keys(path: Path) -> set[str]:
    return {m.name.split(".", 1)[0] for m in _members(path)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Six labelled shards of four written by write_shards (so shards.json lists them all, with the right counts),
    then damaged in place the ways copies and disks damage them; plus a directory named like a shard."""
    root = tmp_path_factory.mktemp("corpus")
    images = root / "images"
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for i in range(N_SHARDS * PER_SHARD // 2):
            photo(40, 30, seed=100 * len(label) + i).save(images / label / f"{i}.png")
    out = root / "shards"
    write_shards(images, out, maxcount=PER_SHARD)
    shard = [out / f"shard-{i:06d}.tar" for i in range(N_SHARDS)]
    whole = {i: shard[i].read_bytes() for i in range(N_SHARDS)}
    keys = {i: _keys(shard[i]) for i in range(N_SHARDS)}
    pristine = root / "pristine"
    pristine.mkdir()
    for path in shard:
        shutil.copy(path, pristine)

    # 1: cut in the middle of the third sample's image data (an interrupted copy).
    image = [m for m in _members(shard[1]) if m.name.endswith(".png")][2]
    cut_mid = image.offset_data + image.size // 2
    shard[1].write_bytes(whole[1][:cut_mid])
    # 2: zero bytes. 3: garbage of a real shard's length.
    shard[2].write_bytes(b"")
    shard[3].write_bytes(random.Random(3).randbytes(len(whole[3])))
    # 4: cut exactly at a member boundary: tarfile alone would take it for a complete, shorter archive.
    cut_boundary = _members(shard[4])[4].offset
    shard[4].write_bytes(whole[4][:cut_boundary])
    directory = out / "shard-000006.tar"
    directory.mkdir()
    return {
        "out": out,
        "pristine": pristine,
        "shard": shard,
        "keys": keys,
        "dir": directory,
        "readable_1": _image_keys_before(pristine / shard[1].name, cut_mid),
        "readable_4": _image_keys_before(pristine / shard[4].name, cut_boundary),
        "urls": [str(p) for p in shard] + [str(directory)],
    }


def _copy(corpus: dict, tmp_path: Path, index: bool) -> tuple[list[str], list[str]]:
    """The corpus in a fresh folder, with or without its shards.json: (all urls, the bad ones)."""
    out = tmp_path / "shards"
    shutil.copytree(corpus["out"], out)
    if not index:
        (out / SHARDS_INDEX).unlink()
    urls = [str(out / Path(u).name) for u in corpus["urls"]]
    return urls, [urls[i] for i in (1, 2, 3, 4, 6)]


# ----------------------------------------------------------------------------------------------------------
# the survey before training
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [True, False], ids=["shards.json", "scan"])
def test_survey_skips_exactly_the_bad_shards(
    corpus: dict, tmp_path: Path, index: bool, caplog: pytest.LogCaptureFixture
) -> None:
    urls, bad = _copy(corpus, tmp_path, index)
    with caplog.at_level(logging.WARNING, logger="dino_scale"):
        survey = survey_shards(urls)
    assert survey.urls == [urls[0], urls[5]]
    assert survey.samples == 2 * PER_SHARD
    assert [url for url, _ in survey.skipped] == bad
    reasons = dict(survey.skipped)
    assert "empty" in reasons[bad[1]] and "directory" in reasons[bad[4]]
    assert "end-of-archive" in reasons[bad[3]]  # the boundary cut: no end marker
    assert all("\n" not in reason for reason in reasons.values())
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for url in bad:
        assert any(url in message for message in warned), url


def test_survey_of_nothing_readable_names_the_shards(corpus: dict, tmp_path: Path) -> None:
    _, bad = _copy(corpus, tmp_path, index=True)
    with pytest.raises(InputError, match="none of the 5 shard") as info:
        survey_shards(bad)
    message = str(info.value)
    assert "\n" not in message
    for url in bad:
        assert url in message


def test_survey_skips_a_shard_whose_end_was_zero_filled(corpus: dict, tmp_path: Path) -> None:
    # A preallocated copy cut short: the size is right but everything after the cut is zeros, which tarfile reads as
    # the end of the archive. Only visible to the header walk (no shards.json here).
    good = corpus["pristine"] / "shard-000000.tar"
    raw = good.read_bytes()
    zeroed = tmp_path / "zeroed.tar"
    zeroed.write_bytes(raw[: len(raw) // 2 // 512 * 512] + bytes(2 << 20))
    survey = survey_shards([str(good), str(zeroed)])
    assert survey.urls == [str(good)] and survey.samples == PER_SHARD
    assert "follow the end-of-archive marker" in survey.skipped[0][1]


def test_remote_shards_are_counted_by_streaming_and_a_failing_stream_is_skipped(corpus: dict) -> None:
    shard = corpus["shard"]
    good, cut, boundary = (f"pipe:cat {shlex.quote(str(shard[i]))}" for i in (0, 1, 4))
    urls = [good, cut, boundary, "pipe:exit 3"]
    survey = survey_shards(urls)
    assert survey.urls == [good] and survey.samples == PER_SHARD
    assert [url for url, _ in survey.skipped] == [cut, boundary, "pipe:exit 3"]
    reports: list[str] = []
    samples = list(iter_raw_samples(urls, lambda url, reason: reports.append(url)))
    assert reports == [cut, boundary, "pipe:exit 3"]
    readable = corpus["keys"][0] | corpus["readable_1"] | corpus["readable_4"]
    assert {s["__key__"] for s in samples if "png" in s} == readable  # up to the damage, as from local files


# ----------------------------------------------------------------------------------------------------------
# a damaged shards.json
# ----------------------------------------------------------------------------------------------------------


def _indexed_shard(corpus: dict, tmp_path: Path, index_text: str) -> tuple[str, Path]:
    shutil.copy(corpus["pristine"] / "shard-000000.tar", tmp_path / "s.tar")
    (tmp_path / SHARDS_INDEX).write_text(index_text)
    return str(tmp_path / "s.tar"), tmp_path / SHARDS_INDEX


@pytest.mark.parametrize(
    ("count", "shown"),
    [(10**12, "1000000000000"), (-5, "-5"), ("12", '"12"'), (True, "true"), (1.5, "1.5"), ({"n": 4}, '{"n": 4}')],
)
def test_bad_count_in_shards_json_is_blamed_on_it(corpus: dict, tmp_path: Path, count: object, shown: str) -> None:
    url, index = _indexed_shard(corpus, tmp_path, json.dumps({"shards": {"s.tar": count}, "total": 4}))
    with pytest.raises(InputError) as info:
        survey_shards([url])
    message = str(info.value)
    assert str(index) in message and "'s.tar'" in message and shown in message
    assert "dino-scale shard" in message and "delete" in message


def test_count_higher_than_the_headers_is_a_stale_index(corpus: dict, tmp_path: Path) -> None:
    size = (corpus["pristine"] / "shard-000000.tar").stat().st_size
    listed = size // 1024 + 1  # more than the file can hold, so the headers are walked and disagree
    url, index = _indexed_shard(corpus, tmp_path, json.dumps({"shards": {"s.tar": listed}}))
    says = rf"'s\.tar' is listed with {listed} samples, but .* holds {PER_SHARD}"
    with pytest.raises(InputError, match=says) as info:
        survey_shards([url])
    assert str(index) in str(info.value) and "stale" in str(info.value)


@pytest.mark.parametrize(
    ("text", "says"),
    [("{", "not valid JSON"), ("[4]", "JSON list"), ('{"total": 4}', "no key 'shards'"), ('{"shards": 4}', "'shards'")],
    ids=["invalid-json", "top-level-list", "no-shards-key", "shards-not-an-object"],
)
def test_malformed_shards_json_is_named(corpus: dict, tmp_path: Path, text: str, says: str) -> None:
    url, index = _indexed_shard(corpus, tmp_path, text)
    with pytest.raises(InputError, match=says) as info:
        survey_shards([url])
    assert str(index) in str(info.value)


def test_shard_writer_repairs_a_damaged_shards_json(tmp_path: Path) -> None:
    # The hint says: write the shards again. That must work over a shards.json the survey refuses.
    images = tmp_path / "images"
    images.mkdir()
    photo(40, 30).save(images / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / SHARDS_INDEX).write_text('{"shards": {"shard-000000.tar": true, "x.tar": -5}}')
    write_shards(images, out)
    assert survey_shards(expand_shards(str(out))).samples == 1
    assert json.loads((out / SHARDS_INDEX).read_text())["shards"] == {"shard-000000.tar": 1}


# ----------------------------------------------------------------------------------------------------------
# the training loader
# ----------------------------------------------------------------------------------------------------------


class TwoViews:
    """A stand-in augmentation: two 4x4 crops."""

    def __call__(self, image: Image.Image, generator: torch.Generator) -> list[torch.Tensor]:
        x = torch.from_numpy(np.array(image.resize((8, 8)))).permute(2, 0, 1)
        i, j = torch.randint(0, 5, (2,), generator=generator).tolist()
        return [x[:, i : i + 4, j : j + 4].clone(), x[:, j : j + 4, i : i + 4].clone()]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_reports_a_shard_cut_mid_way_once(
    corpus: dict, num_workers: int, caplog: pytest.LogCaptureFixture, one_thread: None
) -> None:
    shard = corpus["shard"]
    urls = [str(shard[0]), str(shard[1]), str(shard[5])]
    # 2 + 4 + 4 readable samples; 12 batches of 2 make every worker pass over its share more than once.
    loader = make_train_loader(urls, TwoViews(), 2, 12, epoch=0, seed=0, num_workers=num_workers)
    with caplog.at_level(logging.WARNING, logger="dino_scale"):
        batches = list(loader)
    assert len(batches) == 12
    assert [s for b in batches for s in b.skipped_shards] == [str(shard[1])]
    seen = {k for b in batches for k in b.keys}
    assert seen == corpus["keys"][0] | corpus["keys"][5] | corpus["readable_1"]
    assert len(corpus["readable_1"]) == 2  # the samples before the damage are used
    if num_workers == 0:  # worker processes log to their own stderr
        assert any(str(shard[1]) in r.getMessage() for r in caplog.records)


def test_loader_resumes_exactly_across_a_damaged_shard(corpus: dict, one_thread: None) -> None:
    shard = corpus["shard"]
    urls = [str(shard[0]), str(shard[1]), str(shard[4]), str(shard[5])]
    full = list(make_train_loader(urls, TwoViews(), 2, 10, epoch=0, seed=0, shuffle_buffer=3))
    assert sorted(s for b in full for s in b.skipped_shards) == [str(shard[1]), str(shard[4])]
    for start in (1, 4, 9):
        resumed = list(make_train_loader(urls, TwoViews(), 2, 10, epoch=0, seed=0, shuffle_buffer=3, start_batch=start))
        assert [b.keys for b in resumed] == [b.keys for b in full[start:]]
        assert [b.skipped_shards for b in resumed] == [b.skipped_shards for b in full[start:]]


def test_loader_with_only_bad_shards_says_which(corpus: dict) -> None:
    shard = corpus["shard"]
    with pytest.raises(RuntimeError, match="damaged: .*shard-000002.tar: .*empty"):
        list(make_train_loader([str(shard[2]), str(shard[3])], TwoViews(), 2, 1, epoch=0, seed=0))


# ----------------------------------------------------------------------------------------------------------
# listing shard samples (index --shards, evaluation)
# ----------------------------------------------------------------------------------------------------------


def test_shard_lister_uses_the_good_shards(corpus: dict, caplog: pytest.LogCaptureFixture) -> None:
    shard = corpus["shard"]
    skipped: list[tuple[str, str]] = []
    with caplog.at_level(logging.WARNING, logger="dino_scale"):
        items = list_image_source(str(corpus["out"]), skipped)  # what `index --shards DIR` lists
    expected = corpus["keys"][0] | corpus["keys"][5] | corpus["readable_1"] | corpus["readable_4"]
    assert sorted(i.key.split("#")[1] for i in items) == sorted(expected)
    assert [path for path, _ in skipped] == [str(shard[i]) for i in (1, 2, 3, 4)]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(str(shard[i]) in warned for i in (1, 2, 3, 4))
    assert "4 of the 6 shard(s)" in warned
    assert all(item.read() for item in items)  # the offsets point at whole images
    labelled, _ = list_labelled([str(shard[2]), str(shard[0])])
    assert len(labelled) == PER_SHARD and all(i.label is not None for i in labelled)


def test_shard_lister_with_nothing_readable_names_the_pattern(corpus: dict) -> None:
    shard = corpus["shard"]
    pattern = [str(shard[2]), str(shard[3])]
    with pytest.raises(InputError, match="none of the 2 shard") as info:
        list_shard_items(pattern)
    assert repr(pattern) in str(info.value) and str(shard[2]) in str(info.value)
