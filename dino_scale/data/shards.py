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
import logging
import os
import random
import re
import stat
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext, group_by_keys

from dino_scale.data.decode import IMAGE_EXTENSIONS, PIL_FORMAT_TO_EXT, _open_image, image_extension
from dino_scale.data.folders import LazyFile, is_folder_url, is_image_file, iter_folder_samples, list_files
from dino_scale.errors import InputError, NotFound
from dino_scale.io import atomic_write_json

log = logging.getLogger(__name__)

SHARDS_INDEX = "shards.json"
CLASSES_FILE = "classes.json"
# Fixed tar member mtime so that re-running the writer on the same images gives byte-identical shards.
_TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z


def is_remote(url: str) -> bool:
    # webdataset opens these through gopen (curl, pipes, ...); they cannot be stat'ed or globbed locally.
    if is_folder_url(url):  # a group of a local image folder (dino_scale.data.folders), whatever its path holds
        return False
    return ("://" in url and not url.startswith("file://")) or url.startswith("pipe:")


def parse_label(payload: bytes) -> int:
    """A ``cls`` member: the class index as ASCII digits."""
    return int(bytes(payload).decode("ascii").strip())


def sample_image_bytes(sample: dict[str, Any]) -> bytes:
    """The encoded image of a raw sample. A sample of an image folder holds a LazyFile, read here (once: the loader
    decodes a sample again to refill a batch's slot); InputError naming the file when it cannot be read."""
    ext = image_extension(sample)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise InputError(f"sample has no image member (members: {members})")
    data = sample[ext]
    if isinstance(data, LazyFile):
        data = sample[ext] = data.read()
    return data


def _tar_error_handler(exn: Exception) -> bool:
    """webdataset exception handler for grouping members into samples (a duplicate member name, say): the member
    is skipped with a warning and the rest is still read."""
    warnings.warn(f"skipping damaged tar data: {exn!r}", RuntimeWarning, stacklevel=2)
    return True


# ----------------------------------------------------------------------------------------------------------
# Reading tar files: member headers, and whether the archive is whole
# ----------------------------------------------------------------------------------------------------------

# What reading a damaged tar file raises: tarfile's own errors, I/O errors (a short read, a failed pipe, a bad gzip
# stream), and what decompressors raise on a stream cut short.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
# More bytes than this after the end-of-archive marker is not record padding (10 KiB for tarfile and GNU tar's
# default blocking factor; 1 MiB allows `tar -b 2048`) but data the marker hides, typically a region a crash left
# zero-filled: tarfile would stop at the first zero block and drop the samples behind it without a word.
_MAX_TAIL = 1 << 20
# Each sample is at least one member: a 512-byte header and at least one 512-byte data block.
_MIN_SAMPLE_BYTES = 2 * tarfile.BLOCKSIZE
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: tarfile reads these too
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset metadata (__key__ and the like), not sample members


class _EndAwareTarInfo(tarfile.TarInfo):
    """Records on a :class:`CheckedTar` the header error that ends its member iteration."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as error:
            if isinstance(tar, CheckedTar):
                tar.stop = error
            raise


class CheckedTar(tarfile.TarFile):
    """A TarFile that remembers why its member iteration stopped.

    tarfile ends the iteration quietly where the end-of-archive marker is missing (a file cut short at a member
    boundary), where a header is cut, or where garbage stands in a header's place: the archive would pass for
    complete and the samples behind the damage would be lost without a word. After iterating all members,
    :meth:`damage` tells a whole archive from one of those.
    """

    tarinfo = _EndAwareTarInfo
    stop: tarfile.HeaderError | None = None  # the header error that ended the member iteration

    def damage(self, size: int | None = None) -> str | None:
        """Why the archive is not whole, once its members have been iterated; None if it ended at its end-of-archive
        marker. ``size`` (the file size, for an uncompressed file) also catches data hidden behind the marker."""
        at = self.offset
        if isinstance(self.stop, tarfile.EOFHeaderError):
            if size is not None and size - at > _MAX_TAIL:
                return f"{size - at} bytes follow the end-of-archive marker at byte {at} (overwritten or zero-filled?)"
            return None
        if isinstance(self.stop, tarfile.EmptyHeaderError):
            return f"ends early at byte {at}: no end-of-archive marker (cut short?)"
        if isinstance(self.stop, tarfile.TruncatedHeaderError):
            return f"ends early at byte {at}, inside a member header (cut short?)"
        return f"no valid tar header at byte {at}" + (f" ({self.stop})" if self.stop is not None else "")


def read_error_reason(error: BaseException) -> str:
    """One line saying why a tar file could not be read. (tarfile's "could not be opened successfully" lists every
    compression it tried, one per line; the plain-tar line is the one that says why.)"""
    lines = [line.strip().removeprefix("- ") for line in str(error).splitlines() if line.strip()]
    tar_line = next((line for line in lines if line.startswith("method tar: ")), None)
    if tar_line is not None:
        return f"not a tar file ({tar_line.removeprefix('method tar: ')})"
    return f"{type(error).__name__}: {' '.join(lines)}" if lines else type(error).__name__


def _is_sample_member(info: tarfile.TarInfo) -> bool:
    return info.isreg() and not _META_MEMBER.match(info.name)


def _stream_members(url: str, stream: Any, report: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """The sample members of one tar stream, as webdataset's ``group_by_keys`` takes them, up to any damage; the
    damage (if any) goes to ``report``."""
    try:
        with CheckedTar.open(fileobj=stream, mode="r|*") as tar:
            try:
                for info in tar:
                    if not _is_sample_member(info):
                        continue
                    member = tar.extractfile(info)
                    assert member is not None  # a regular file
                    data = member.read()
                    yield {"fname": info.name, "data": data, "__url__": url}
                    tar.members = []  # stream mode cannot go back to them; do not let them pile up
            except _READ_ERRORS as error:
                report(f"{read_error_reason(error)} at byte {tar.offset}")
                return
            damage = tar.damage()
    except _READ_ERRORS as error:
        report(read_error_reason(error))
        return
    if damage is not None:
        report(damage)


def _warn_damaged(url: str, reason: str) -> None:
    log.warning("damaged shard %s is read no further: %s", url, reason)


def iter_raw_samples(
    urls: Sequence[str], on_damage: Callable[[str, str], None] = _warn_damaged
) -> Iterator[dict[str, Any]]:
    """Yield the raw (undecoded) samples of the shards in order: dicts of extension -> bytes, plus __key__ and __url__.

    A URL may also name a group of an image folder (``imagefolder:...``, see dino_scale.data.folders): its samples
    are the group's files, each image member a LazyFile that :func:`sample_image_bytes` reads.

    A shard that turns out damaged (it cannot be opened, a member is cut off, garbage or the end of the file stands
    where a header should be) is read no further: the samples before the damage are yielded, and
    ``on_damage(url, reason)`` is called once for it (by default: a warning naming the shard). A missing shard
    raises FileNotFoundError instead: a configuration error must not mean training on less data.
    """
    for url in urls:
        if is_folder_url(url):
            yield from iter_folder_samples(url, on_damage)
        else:
            yield from _shard_samples(url, on_damage)


def _shard_samples(url: str, on_damage: Callable[[str, str], None]) -> Iterator[dict[str, Any]]:
    reported: list[str] = []

    def report(reason: str) -> None:
        if not reported:  # the first damage says it; a failing pipe also fails again on close
            reported.append(reason)
            on_damage(url, reason)

    try:
        stream = wds.gopen(url, "rb")
    except FileNotFoundError:
        raise
    except OSError as error:  # a directory, no permission, a pipe that cannot start
        report(read_error_reason(error))
        return
    finished = False
    try:
        yield from group_by_keys(_stream_members(url, stream, report), handler=_tar_error_handler)
        finished = True
    finally:
        # Closed here rather than by wds.tarfile_to_samples so that a consumer that stops early (a worker that has
        # filled its quota) closes the file at once instead of leaving it to the garbage collector.
        try:
            stream.close()
        except OSError as error:  # a pipe's command failed (curl, ...); when stopped early, that is our doing
            if finished:
                report(read_error_reason(error))


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
                        raise NotFound(
                            f"no *.tar shards in directory {local!r} (shard pattern {pat!r}){_images_hint(local)}"
                        )
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


def _images_hint(directory: str) -> str:
    """For a folder without shards: how to use the image files it holds, if any (a walk, on the error path only)."""
    n_images = sum(is_image_file(p) for p in list_files(Path(directory)))
    if not n_images:
        return ""
    return (
        f"; it holds {n_images} image files: train on them with data.train_images={directory}, or write shards with "
        f"`dino-scale shard --images {directory} --out <dir>`"
    )


@dataclass(frozen=True)
class ShardSurvey:
    """What :func:`survey_shards` found: the usable shards in the given order, their total sample count, and each
    shard left out with a one-line reason."""

    urls: list[str]
    samples: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


class _Damaged(Exception):
    """A shard that cannot be opened or ends early; the message is the one-line reason."""


_NAMED = 5  # shards named, with their reasons, when none can be read
_INDEX_HINT = "; write the shards again (`dino-scale shard`) or delete it to have the shards counted by a scan"


def _index_entries(path: Path) -> dict[str, Any]:
    """The ``shards`` object of the ``shards.json`` at ``path`` ({} when there is none), its entries unchecked.

    Raises:
        InputError: naming the file, when it is there but not of the form ``{"shards": {name: count}, ...}``:
            a count that cannot be trusted must not turn silently into an epoch length.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {path}: {error}{_INDEX_HINT}") from None
    try:
        index = json.loads(text)
    except ValueError as error:
        raise InputError(f"{path} is not valid JSON ({error}){_INDEX_HINT}") from None
    if not isinstance(index, dict):
        raise InputError(f'{path} holds a JSON {type(index).__name__}, not {{"shards": {{...}}, ...}}{_INDEX_HINT}')
    shards = index.get("shards")
    if not isinstance(shards, dict):
        found = "no key 'shards'" if shards is None else f"'shards' = {json.dumps(shards)[:60]}"
        raise InputError(f'{path} has {found}, not {{"shards": {{"name.tar": samples, ...}}}}{_INDEX_HINT}')
    return shards


def _index_count(path: Path, name: str, value: object) -> int:
    """A shard's count from shards.json, which must be a whole number >= 0 (JSON true is not 1, "12" is not 12)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(
            f"{path}: shard {name!r} has the sample count {json.dumps(value)}, not a whole number >= 0{_INDEX_HINT}"
        )
    return value


def _read_index(directory: Path) -> dict[str, int]:
    """The usable entries of ``shards.json`` in ``directory`` ({} if it is absent or unusable): for the writer, which
    rewrites the file and so must be able to repair a damaged one."""
    try:
        entries = _index_entries(directory / SHARDS_INDEX)
    except InputError:
        return {}
    return {str(name): n for name, n in entries.items() if isinstance(n, int) and not isinstance(n, bool) and n >= 0}


def _count_keys(tar: tarfile.TarFile) -> int:
    """Samples (distinct keys) among the members of a tar, from their names alone."""
    keys: set[str] = set()
    for info in tar:
        if _is_sample_member(info):
            prefix, _ = base_plus_ext(info.name)
            if prefix is not None:
                keys.add(prefix)
    return len(keys)


def _walk_local(path: str, size: int, compressed: bool) -> int:
    """Count the samples of a local shard by walking its member headers (tarfile seeks over the data of an
    uncompressed file); raises _Damaged if it cannot be opened or does not end at its end-of-archive marker."""
    try:
        with CheckedTar.open(path, mode="r:*" if compressed else "r:") as tar:
            try:
                count = _count_keys(tar)
            except _READ_ERRORS as error:
                raise _Damaged(f"{read_error_reason(error)} at byte {tar.offset}") from None
            damage = tar.damage(None if compressed else size)
    except _READ_ERRORS as error:
        raise _Damaged(read_error_reason(error)) from None
    if damage is not None:
        raise _Damaged(damage)
    return count


def _count_stream(url: str) -> int:
    """Count the samples of a remote shard by streaming it (the only way to read it); raises _Damaged if the stream
    fails or ends early."""
    try:
        with wds.gopen(url, "rb") as stream, CheckedTar.open(fileobj=stream, mode="r|*") as tar:
            try:
                count = _count_keys(tar)
            except _READ_ERRORS as error:
                raise _Damaged(f"{read_error_reason(error)} at byte {tar.offset}") from None
            damage = tar.damage()
    except _READ_ERRORS as error:
        raise _Damaged(read_error_reason(error)) from None
    if damage is not None:
        raise _Damaged(damage)
    return count


def _looks_whole(head: bytes, tail: bytes, size: int, listed: int) -> bool:
    """Whether an uncompressed shard passes the checks that need no header walk: 512-byte aligned, large enough for
    ``listed`` samples, a valid first header (or, for an empty archive, an end marker) and the end-of-archive marker
    (two zero blocks) at the end of the file. A file cut short anywhere loses that marker with its tail."""
    if size % tarfile.BLOCKSIZE or size < 2 * tarfile.BLOCKSIZE or listed * _MIN_SAMPLE_BYTES > size:
        return False
    if tail != bytes(2 * tarfile.BLOCKSIZE):
        return False
    if head == bytes(tarfile.BLOCKSIZE):
        return listed == 0
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _count_local(path: str, listed: int | None, index_path: Path) -> int:
    """Samples in a local shard: ``listed`` (its shards.json count, if any) when the shard passes the cheap checks,
    otherwise a header walk, which also decides between a damaged shard (_Damaged) and a wrong count (InputError)."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise _Damaged("a directory, not a tar file")
        if not stat.S_ISREG(info.st_mode):
            raise _Damaged("not a regular file")
        size = info.st_size
        if size == 0:
            raise _Damaged("empty file (0 bytes)")
        with open(path, "rb") as f:
            head = f.read(tarfile.BLOCKSIZE)
            f.seek(max(size - 2 * tarfile.BLOCKSIZE, 0))
            tail = f.read()
    except OSError as error:
        raise _Damaged(read_error_reason(error)) from None
    compressed = head.startswith(_COMPRESSED_MAGIC)
    # The header walk runs only where shards.json does not list the shard, or the shard fails a cheap check. Measured
    # on a 1,000-sample shard (2,000 members, 104 MB): the walk takes ~70 ms with the file in the page cache and
    # ~130 ms cold on a local disk (tarfile parses a header in ~35 us, and each header is a random 512-byte read),
    # the cheap checks 0.3 ms. At 10,000 shards a walk would cost minutes on every start of every rank, more on a
    # network file system. The cheap checks catch a shard cut short anywhere, a zero-byte or garbage file and a
    # count the file is too small to hold; they miss damage inside a shard whose tail is intact, which the training
    # loader meets, skips and reports when it streams the shard (TrainBatch.skipped_shards), and a stale count the
    # file could hold, which only makes the epoch longer or shorter than the data.
    if listed is not None and not compressed and _looks_whole(head, tail, size, listed):
        return listed
    walked = _walk_local(path, size, compressed)
    if listed is not None and walked != listed:
        room = ""
        if listed * _MIN_SAMPLE_BYTES > size:
            room = f"; its {size} bytes hold at most {size // _MIN_SAMPLE_BYTES}"
        raise InputError(
            f"{index_path}: shard {Path(path).name!r} is listed with {listed} samples, but {path} holds {walked}"
            f"{room} (a stale or damaged index){_INDEX_HINT}"
        )
    return walked


def survey_shards(urls: Sequence[str]) -> ShardSurvey:
    """Check the shards before training on them: which can be used, and how many samples they hold.

    A shard is left out, with a warning naming it, when it cannot be opened or ends early (cut short, garbage where
    a header should be); the rest are used, since one bad copy must not stop a run over thousands of shards. A local
    shard's count comes from the ``shards.json`` beside it when that lists the shard and the shard passes cheap checks
    (see ``_count_local``), else from walking its tar headers (no image is decoded). A remote shard can only be
    checked by reading it: it is counted by streaming it, and a stream that fails is skipped.

    Raises:
        InputError: naming ``shards.json`` and the shard, for a count that is not a whole number >= 0 or disagrees
            with the shard's headers, or for a ``shards.json`` that cannot be parsed; naming the shards and the
            first reasons, when none of them can be read.
    """
    usable: list[str] = []
    skipped: list[tuple[str, str]] = []
    total = 0
    indexes: dict[Path, dict[str, Any]] = {}
    for url in urls:
        try:
            if is_remote(url):
                count = _count_stream(url)
            else:
                path = Path(url.removeprefix("file://"))
                index_path = path.parent / SHARDS_INDEX
                if index_path not in indexes:
                    indexes[index_path] = _index_entries(index_path)
                entries = indexes[index_path]
                listed = _index_count(index_path, path.name, entries[path.name]) if path.name in entries else None
                count = _count_local(str(path), listed, index_path)
        except _Damaged as damage:
            log.warning("skipping shard %s: %s", url, damage)
            skipped.append((url, str(damage)))
            continue
        usable.append(url)
        total += count
    if not usable:
        if not skipped:
            raise InputError("no shards given")
        reasons = "; ".join(f"{url}: {reason}" for url, reason in skipped[:_NAMED])
        more = f"; and {len(skipped) - _NAMED} more" if len(skipped) > _NAMED else ""
        raise InputError(f"none of the {len(skipped)} shard(s) can be read: {reasons}{more}")
    return ShardSurvey(urls=usable, samples=total, skipped=skipped)


def count_samples(urls: Sequence[str]) -> int:
    """Number of samples in the usable shards among ``urls``: :func:`survey_shards`'s count (damaged shards are left
    out with a warning)."""
    return survey_shards(urls).samples


def read_classes(urls: Sequence[str]) -> list[str]:
    """Class names from the ``classes.json`` beside the first local shard (empty list if there is none)."""
    for url in urls:
        if not is_remote(url) and not is_folder_url(url):
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
