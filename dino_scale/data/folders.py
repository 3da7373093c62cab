"""Walking image folders: one walker for sharding, indexing and evaluation, so they all see the same files."""

from __future__ import annotations

import os
from pathlib import Path

from dino_scale.data.decode import IMAGE_EXTENSIONS


def list_files(directory: Path) -> list[Path]:
    """All non-hidden files under ``directory`` (hidden folders skipped), sorted by relative path, so that the
    order is the same on every filesystem."""
    found: list[Path] = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / f for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def is_image_file(path: Path) -> bool:
    """Whether a file's suffix is one of the image extensions a shard sample may carry."""
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
