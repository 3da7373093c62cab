"""The parity gate's real images come from the readable shards of a pattern (a damaged shard is passed over) or from
a folder of images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from support import SAMPLE_VAL, photo

from dino_scale.data.shards import expand_shards
from dino_scale.errors import NotFound
from dino_scale.export.parity import real_images


def test_a_garbage_shard_is_passed_over_for_the_next_one(tmp_path: Path) -> None:
    (tmp_path / "a-000000.tar").write_bytes(b"not a tar " * 100)
    shutil.copy(expand_shards(SAMPLE_VAL)[0], tmp_path / "b-000001.tar")
    images = real_images(tmp_path, image_size=32, count=8, as_uint8=True)
    assert images is not None and images.shape == (8, 32, 32, 3)


def test_nothing_readable_gives_no_images(tmp_path: Path) -> None:
    (tmp_path / "a-000000.tar").write_bytes(b"not a tar " * 100)
    assert real_images(tmp_path, image_size=32, count=8, as_uint8=True) is None


def test_a_folder_of_images_serves_too(tmp_path: Path) -> None:
    for n in range(3):
        photo(40, 30, seed=n).save(tmp_path / f"{n}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    images = real_images(tmp_path, image_size=32, count=8, as_uint8=True)
    assert images is not None and images.shape == (3, 32, 32, 3)
    normalised = real_images(tmp_path, image_size=32, count=2, as_uint8=False)
    assert normalised is not None and normalised.shape == (2, 3, 32, 32) and normalised.dtype == torch.float32


def test_a_missing_source_is_an_error_unless_it_may_be_missing(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="nowhere"):
        real_images(tmp_path / "nowhere", image_size=32, count=8, as_uint8=True)
    assert real_images(tmp_path / "nowhere", image_size=32, count=8, as_uint8=True, missing_ok=True) is None
