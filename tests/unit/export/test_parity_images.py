"""The parity gate's real images come from the readable shards of a pattern; a damaged shard is passed over."""

from __future__ import annotations

import shutil
from pathlib import Path

from support import SAMPLE_VAL

from dino_scale.data.shards import expand_shards
from dino_scale.export.parity import real_images


def test_a_garbage_shard_is_passed_over_for_the_next_one(tmp_path: Path) -> None:
    (tmp_path / "a-000000.tar").write_bytes(b"not a tar " * 100)
    shutil.copy(expand_shards(SAMPLE_VAL)[0], tmp_path / "b-000001.tar")
    images = real_images(tmp_path, image_size=32, count=8, as_uint8=True)
    assert images is not None and images.shape == (8, 32, 32, 3)


def test_nothing_readable_gives_no_images(tmp_path: Path) -> None:
    (tmp_path / "a-000000.tar").write_bytes(b"not a tar " * 100)
    assert real_images(tmp_path, image_size=32, count=8, as_uint8=True) is None
