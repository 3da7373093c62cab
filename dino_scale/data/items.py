"""What to embed or evaluate: images listed up front as items (a file, or one sample of a local tar shard found by
its byte offset), in a fixed order.

A fixed order is what lets a map-style DataLoader decode items in parallel workers while batches still come out in
listing order, and what makes an interrupted `index` run resumable to exactly the result of an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from dino_scale.data.decode import image_extension
from dino_scale.data.folders import is_image_file, list_files
from dino_scale.data.shards import CheckedTar, expand_shards, is_remote, parse_label, read_classes, read_error_reason
from dino_scale.errors import InputError, NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageItem:
    """One image to embed: a file, or ``size`` bytes at ``offset`` inside the tar shard ``path``.

    ``key`` identifies it across runs (the file path, or ``shard#sample key``); ``label`` is its class index
    where the source is labelled; ``copy_seed`` asks for a strong synthetic copy of the image instead of the image
    itself (copy-detection queries).
    """

    key: str
    path: str
    offset: int | None = None
    size: int | None = None
    label: int | None = None
    copy_seed: int | None = None

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset is None:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


def list_image_files(root: str | Path) -> tuple[list[ImageItem], int]:
    """Every image file under ``root`` (recursive, hidden entries left out, sorted by relative path), as items
    keyed by absolute path; and the number of other files ignored."""
    root = Path(root)
    if not root.is_dir():
        raise NotFound(f"{root} is not a directory")
    files = list_files(root)
    found = [p for p in files if is_image_file(p)]
    resolved = [str(p.resolve()) for p in found]
    return [ImageItem(key=path, path=path) for path in resolved], len(files) - len(found)


def list_class_folder(root: str | Path) -> tuple[list[ImageItem], list[str]]:
    """An ImageFolder-style tree: each first-level subfolder is a class (sorted names, index = label)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{root} has no class subfolders (expected ROOT/CLASS/IMAGE files)")
    items: list[ImageItem] = []
    for label, name in enumerate(classes):
        files, _ = list_image_files(root / name)
        items.extend(ImageItem(key=i.key, path=i.path, label=label) for i in files)
    return items, classes


def _shard_items(path: str) -> tuple[list[ImageItem], str | None]:
    """The samples of one local shard, and why the shard is not whole (None if it is); raises the read error when
    the shard cannot be opened at all."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    labels: dict[str, int] = {}
    file_size = os.path.getsize(path)
    with CheckedTar.open(path, mode="r:") as tar:
        try:
            for member in tar:
                prefix, ext = base_plus_ext(member.name)
                if member.isreg() and prefix is not None:
                    members.setdefault(prefix, {})[ext.lower()] = member
            damage = tar.damage(file_size)
        except (tarfile.TarError, OSError) as error:
            damage = f"{read_error_reason(error)} at byte {tar.offset}"
        for key, by_ext in members.items():
            if "cls" in by_ext:
                try:
                    labels[key] = parse_label(tar.extractfile(by_ext["cls"]).read())
                except (tarfile.TarError, OSError, ValueError):
                    continue  # a label cut off by the damage: the sample goes with it
    items: list[ImageItem] = []
    for key, by_ext in members.items():
        image_ext = image_extension(by_ext)
        if image_ext is None:
            log.warning("%s: sample %s has no image member (%s); skipped", path, key, sorted(by_ext))
            continue
        image = by_ext[image_ext]
        if image.offset_data + image.size > file_size or ("cls" in by_ext and key not in labels):
            continue  # cut off by the damage
        items.append(
            ImageItem(key=f"{path}#{key}", path=path, offset=image.offset_data, size=image.size, label=labels.get(key))
        )
    return items, damage


def list_shard_items(pattern: str | Sequence[str], skipped: list[tuple[str, str]] | None = None) -> list[ImageItem]:
    """The samples of local WebDataset shards, in shard order, each located by its image member's byte offset.

    Reading tar headers seeks over the data, so listing is cheap; the byte offsets then let DataLoader workers
    read any sample directly. Remote shards (``s3://``, ``pipe:``) cannot be read at an offset and are refused.
    One bad shard must not stop a run over many: a shard that cannot be opened (empty, not a tar, a directory) is
    left out, and one damaged part-way (an interrupted copy, say) gives the samples before the damage. Each gets a
    warning naming it, a closing warning counts them, and each is appended to ``skipped`` as (shard, reason) when
    that list is given.

    Raises:
        InputError: naming the pattern, when every one of its shards is bad and not one sample can be read.
    """
    urls = expand_shards(pattern)
    items: list[ImageItem] = []
    bad: list[tuple[str, str]] = []
    for url in urls:
        if is_remote(url):
            raise InputError(f"{url} is remote; reading at byte offsets needs local shards (copy them first)")
        path = os.path.abspath(url.removeprefix("file://"))  # keys must not depend on the working directory
        try:
            found, damage = _shard_items(path)
        except (tarfile.TarError, OSError) as error:
            reason = read_error_reason(error)
            log.warning("skipping shard %s: %s", path, reason)
            bad.append((path, reason))
            continue
        items.extend(found)
        if damage is not None:
            log.warning("damaged shard %s: %s; its %d sample(s) before the damage are used", path, damage, len(found))
            bad.append((path, f"{damage} ({len(found)} sample(s) before it used)"))
    if len(bad) == len(urls) and not items:
        reasons = "; ".join(f"{path}: {reason}" for path, reason in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InputError(f"none of the {len(urls)} shard(s) of {pattern!r} can be read: {reasons}{more}")
    if bad:
        log.warning("%d of the %d shard(s) of %r were skipped or read only in part", len(bad), len(urls), pattern)
    if skipped is not None:
        skipped.extend(bad)
    return items


def _is_image_folder(source: str | Sequence[str]) -> bool:
    """A folder of images (or of class folders), as opposed to shards: a folder of .tar files, a pattern, a list."""
    if not isinstance(source, str):
        return False
    path = Path(source)
    return path.is_dir() and not any(path.glob("*.tar"))


def list_labelled(
    source: str | Sequence[str], skipped: list[tuple[str, str]] | None = None
) -> tuple[list[ImageItem], list[str]]:
    """Labelled images for evaluation: a class-folder tree, or shards (a folder of .tar files, patterns, a list).
    Bad shards are left out or read up to the damage and appended to ``skipped`` (see :func:`list_shard_items`)."""
    if _is_image_folder(source):
        return list_class_folder(source)
    items = list_shard_items(source, skipped)
    unlabelled = [i.key for i in items if i.label is None]
    if unlabelled:
        raise InputError(f"{source}: {len(unlabelled)} sample(s) have no 'cls' label, e.g. {unlabelled[0]}")
    return items, read_classes(expand_shards(source))


def list_image_source(source: str, skipped: list[tuple[str, str]] | None = None) -> list[ImageItem]:
    """Images named by one string: a folder of image files, or shards (a folder of .tar files or a pattern). Bad
    shards are left out or read up to the damage and appended to ``skipped`` (see :func:`list_shard_items`)."""
    if _is_image_folder(source):
        return list_image_files(source)[0]
    return list_shard_items(source, skipped)
