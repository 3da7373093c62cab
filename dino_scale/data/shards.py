"""WebDataset shards: finding, counting, reading and writing them.

Shard format (see ``shards/README.md``): each sample is a ``__key__`` plus one image member (``jpg``,
``png``, ``webp``, ... anything PIL reads) and an optional ``cls`` member: the integer class index as ASCII.
Beside the shards live ``classes.json`` (list of class names, index = cls) and ``shards.json``
(``{"shards": {"name.tar": n_samples, ...}, "total": N}``) so the epoch length is known without a scan.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from dino_scale.data.decode import IMAGE_EXTENSIONS, PIL_FORMAT_TO_EXT, _open_image, image_extension
from dino_scale.data.folders import list_files
from dino_scale.errors import InputError, NotFound
from dino_scale.io import atomic_write_json

SHARDS_INDEX = "shards.json"
CLASSES_FILE = "classes.json"
# Fixed tar member mtime so that re-running the writer on the same images gives byte-identical shards.
_TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z


def is_remote(url: str) -> bool:
    # webdataset opens these through gopen (curl, pipes, ...); they cannot be stat'ed or globbed locally.
    return ("://" in url and not url.startswith("file://")) or url.startswith("pipe:")


def parse_label(payload: bytes) -> int:
    """A ``cls`` member: the class index as ASCII digits."""
    return int(bytes(payload).decode("ascii").strip())


def sample_image_bytes(sample: dict[str, Any]) -> bytes:
    ext = image_extension(sample)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise InputError(f"sample has no image member (members: {members})")
    return sample[ext]


def _tar_error_handler(exn: Exception) -> bool:
    """webdataset exception handler: damaged tar data is skipped with a warning (the rest is still read)."""
    warnings.warn(f"skipping damaged tar data: {exn!r}", RuntimeWarning, stacklevel=2)
    return True


def iter_raw_samples(urls: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Yield the raw (undecoded) samples of the shards in order: dicts of extension -> bytes, plus __key__."""
    for url in urls:
        # Opened here rather than by wds.tarfile_to_samples so that a consumer that stops early (a worker that
        # has filled its quota) closes the file at once instead of leaving it to the garbage collector.
        # A missing shard raises FileNotFoundError: a configuration error must not mean training on less data.
        with wds.gopen(url, "rb") as stream:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=_tar_error_handler)
            yield from group_by_keys(files, handler=_tar_error_handler)


# ----------------------------------------------------------------------------------------------------------
# Finding and counting shards
# ----------------------------------------------------------------------------------------------------------


def expand_shards(pattern: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Expand shard specifications into a list of shard paths/URLs.

    Each pattern may use brace expansion (``train-{000000..000127}.tar``), glob wildcards (``train-*.tar``),
    name a directory (all ``*.tar`` files directly in it) or be a plain path. Remote URLs (``s3://``,
    ``https://``, ``pipe:``) are passed through unchecked. Directory and glob matches are sorted; the result
    is de-duplicated keeping the first occurrence, so overlapping patterns do not double-count shards.

    Raises:
        FileNotFoundError: naming the pattern, if any expanded item matches nothing.
    """
    single = isinstance(pattern, (str, os.PathLike))
    patterns = [os.fspath(pattern)] if single else [os.fspath(p) for p in pattern]
    if not patterns:
        raise NotFound("no shard pattern given")
    result: list[str] = []
    seen: set[str] = set()
    for pat in patterns:
        for item in braceexpand(pat):
            if is_remote(item):
                found = [item]
            else:
                local = os.path.expanduser(item)
                if os.path.isdir(local):
                    found = sorted(p for p in glob.glob(os.path.join(glob.escape(local), "*.tar")) if os.path.isfile(p))
                    if not found:
                        raise NotFound(f"no *.tar shards in directory {local!r} (shard pattern {pat!r})")
                elif any(ch in local for ch in "*?["):
                    found = sorted(p for p in glob.glob(local) if os.path.isfile(p))
                    if not found:
                        raise NotFound(f"no shard files match {local!r} (shard pattern {pat!r})")
                elif os.path.isfile(local):
                    found = [local]
                else:
                    raise NotFound(f"shard {local!r} does not exist (shard pattern {pat!r})")
            for url in found:
                if url not in seen:
                    seen.add(url)
                    result.append(url)
    return result


def _read_index(directory: Path) -> dict[str, int]:
    """Read ``shards.json`` in ``directory``: {shard file name: n_samples}; empty if absent or malformed."""
    try:
        index = json.loads((directory / SHARDS_INDEX).read_text())
        return {str(name): int(n) for name, n in index["shards"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _scan_count(url: str) -> int:
    """Count samples (distinct keys) in one shard from its member names, without decoding anything."""
    keys: set[str] = set()

    def add_members(tar: tarfile.TarFile) -> None:
        for member in tar:
            name = member.name
            if not member.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")):
                continue
            prefix, _ = base_plus_ext(name)
            if prefix is not None:
                keys.add(prefix)

    if is_remote(url):
        with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            add_members(tar)
    else:
        # Random-access mode seeks over member data instead of reading it.
        with tarfile.open(url, mode="r:*") as tar:
            add_members(tar)
    return len(keys)


def count_samples(urls: Sequence[str]) -> int:
    """Number of samples in the given shards.

    Uses the ``shards.json`` beside each local shard when it lists that shard; any shard it does not list (or
    a remote one) is counted by scanning its tar member names, which needs no image decoding.
    """
    total = 0
    indexes: dict[Path, dict[str, int]] = {}
    for url in urls:
        if not is_remote(url):
            path = Path(url)
            if path.parent not in indexes:
                indexes[path.parent] = _read_index(path.parent)
            n = indexes[path.parent].get(path.name)
            if n is not None:
                total += n
                continue
        total += _scan_count(url)
    return total


def read_classes(urls: Sequence[str]) -> list[str]:
    """Class names from the ``classes.json`` beside the first local shard (empty list if there is none)."""
    for url in urls:
        if not is_remote(url):
            classes_file = Path(url.removeprefix("file://")).parent / CLASSES_FILE
            try:
                return [str(c) for c in json.loads(classes_file.read_text())]
            except (OSError, ValueError, TypeError):
                return []
    return []


# ----------------------------------------------------------------------------------------------------------
# Writing shards
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ShardWriteReport:
    """What :func:`write_shards` did."""

    shards: list[Path]
    written: int
    skipped: list[tuple[str, str]]  # (path, reason) of every file that was not written
    classes: list[str] = field(default_factory=list)


def _slug(text: str, limit: int = 64) -> str:
    # webdataset splits a member name at the first dot of its basename, so keys must not contain dots.
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:limit] or "x"


def _list_class_items(root: Path) -> tuple[list[tuple[Path, int | None]], list[str], list[tuple[str, str]]]:
    """(file, label or None) of every file, the class names, and the files left out with why: each first-level
    subfolder is a class when there are any, and files beside them are left out."""
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    if not class_dirs:
        return [(f, None) for f in list_files(root)], [], []
    skipped = [(str(p), "file outside the class subfolders") for p in entries if not p.is_dir()]
    items = [(f, label) for label, class_dir in enumerate(class_dirs) for f in list_files(class_dir)]
    return items, [d.name for d in class_dirs], skipped


def _sample_image(path: Path, max_image_side: int | None) -> tuple[str, bytes]:
    """(member extension, bytes) to store for an image file, fully decoded first so that unreadable files raise.

    The original bytes are kept, except for formats the loader would not recognise by extension (stored as PNG) and
    images larger than ``max_image_side`` (downscaled, stored as JPEG quality 90).
    """
    data = path.read_bytes()
    image, fmt = _open_image(data)
    ext = PIL_FORMAT_TO_EXT.get(fmt or "", (fmt or path.suffix.lstrip(".") or "img").lower())
    if ext not in IMAGE_EXTENSIONS:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data, ext = buf.getvalue(), "png"
    if max_image_side is not None and max(image.size) > max_image_side:
        scale = max_image_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        buf = io.BytesIO()
        image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0).save(buf, format="JPEG", quality=90)
        data, ext = buf.getvalue(), "jpg"
    return ext, data


class _TarSequence:
    """``{prefix}-000000.tar, ...`` of at most ``maxcount`` samples each, each written under a temporary name and
    renamed when complete; leaving the ``with`` block early removes the shard in progress."""

    def __init__(self, out: Path, prefix: str, maxcount: int) -> None:
        self.out, self.prefix, self.maxcount = out, prefix, maxcount
        self.shards: list[Path] = []
        self.counts: dict[str, int] = {}  # shard file name -> samples
        self.written = 0
        self._writer: wds.TarWriter | None = None
        self._tmp: Path | None = None  # the shard in progress, under its temporary name
        self._in_shard = 0

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is None:
            self._tmp = self.out / f".{self.prefix}-{len(self.shards):06d}.tar.tmp"
            self._writer = wds.TarWriter(str(self._tmp), encoder=False, mtime=_TAR_MTIME)
        self._writer.write(sample)
        self._in_shard += 1
        self.written += 1
        if self._in_shard >= self.maxcount:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._writer is not None and self._tmp is not None
        self._writer.close()
        self._writer = None
        final = self.out / f"{self.prefix}-{len(self.shards):06d}.tar"
        os.replace(self._tmp, final)  # atomic: readers never see a half-written shard under a real name
        self.shards.append(final)
        self.counts[final.name] = self._in_shard
        self._in_shard = 0

    def __enter__(self) -> _TarSequence:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self._writer is None:
            return
        if kind is None:
            self._finish_shard()
        else:  # interrupted mid-shard: leave no temporary file behind
            self._writer.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)


def write_shards(
    images_dir: str | Path,
    out_dir: str | Path,
    maxcount: int = 1000,
    prefix: str = "shard",
    max_image_side: int | None = None,
    progress: bool = False,
    shuffle_seed: int | None = 0,
) -> ShardWriteReport:
    """Pack a folder of images into ``{prefix}-000000.tar, ...`` shards in ``out_dir``.

    If ``images_dir`` has subfolders, each first-level subfolder is a class (sorted names, index = ``cls``,
    written to ``classes.json``) and files directly in ``images_dir`` are skipped; otherwise samples are
    unlabelled and ``classes.json`` is ``[]``. Files are listed recursively in sorted order; then, unless
    ``shuffle_seed`` is None, deterministically permuted with that seed, because class-sorted shards would
    give every data worker only a class or two at a time (no shuffle buffer can fix that). Every file is fully
    decoded before it is written; unreadable ones are reported in ``skipped`` and never abort the run. The
    original bytes are stored, except that images larger than ``max_image_side`` are downscaled and re-encoded
    as JPEG (quality 90). Each shard is written under a temporary name and renamed when complete. Stale
    ``{prefix}-NNNNNN.tar`` files from an earlier, larger run are removed; ``shards.json`` keeps the entries
    of other prefixes in the same directory.
    """
    if maxcount < 1:
        raise InputError(f"maxcount must be >= 1, got {maxcount}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise InputError(f"prefix must be letters, digits, '_' or '-' (no dots), got {prefix!r}")
    root = Path(images_dir)
    if not root.is_dir():
        raise NotFound(f"{str(root)!r} is not a directory", argument="images_dir")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    items, classes, skipped = _list_class_items(root)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)

    with _TarSequence(out, prefix, maxcount) as tars:
        for path, label in tqdm(items, desc=f"sharding {root}", unit="img", disable=not progress):
            try:
                ext, data = _sample_image(path, max_image_side)
            except Exception as exn:  # any unreadable file is reported, never fatal
                skipped.append((str(path), f"{type(exn).__name__}: {exn}"))
                continue
            rel = path.relative_to(root).with_suffix("").as_posix()
            sample: dict[str, Any] = {"__key__": f"{tars.written:07d}_{_slug(rel)}", ext: data}
            if label is not None:
                sample["cls"] = str(label).encode("ascii")
            tars.write(sample)
    shards, counts, written = tars.shards, tars.counts, tars.written

    ours = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    new_names = {p.name for p in shards}
    for stale in out.iterdir():
        if ours.fullmatch(stale.name) and stale.name not in new_names:
            stale.unlink()
    index = {n: c for n, c in _read_index(out).items() if not ours.fullmatch(n) and (out / n).is_file()}
    index.update(counts)
    atomic_write_json(out / SHARDS_INDEX, {"shards": index, "total": sum(index.values())}, sort_keys=True)
    atomic_write_json(out / CLASSES_FILE, classes)
    if written == 0:
        warnings.warn(f"write_shards: no readable images under {str(root)!r}; no shards written", stacklevel=2)
    return ShardWriteReport(shards=shards, written=written, skipped=skipped, classes=classes)
