"""WebDataset shards: writing them, counting them, and streaming them into DINO training and evaluation.

Shard format (see ``shards/README.md``): each sample is a ``__key__`` plus one image member (``jpg``,
``png``, ``webp``, ... anything PIL reads) and an optional ``cls`` member: the integer class index as ASCII.
Beside the shards live ``classes.json`` (list of class names, index = cls) and ``shards.json``
(``{"shards": {"name.tar": n_samples, ...}, "total": N}``) so the epoch length is known without a scan.

The training loader is built for exact resume and multi-rank training:

* Shard order is shuffled per epoch from ``(seed, epoch)`` and split first by rank, then by DataLoader worker.
* Each worker shuffles its raw (still encoded) samples in a buffer seeded from ``(seed, epoch, reader index)``
  and assembles whole batches itself, so the DataLoader (``batch_size=None``) yields batch ``i`` from worker
  ``i % num_workers``.
* Every batch occupies exactly ``batch_size`` consecutive raw samples of its worker's stream. A sample that
  fails to decode is dropped (its key is reported in ``TrainBatch.skipped``) and its slot is refilled with a
  freshly augmented copy of another good sample of the *same* batch. Because the number of raw samples a batch
  consumes therefore never depends on the image bytes, resuming at batch ``n`` can skip the earlier batches'
  samples without decoding them and still reproduce the uninterrupted run bit for bit.
* Each sample's augmentation draws from its own ``torch.Generator`` seeded from a stable hash of
  ``(seed, epoch, key)``, so the views do not depend on which worker decoded the sample.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import io
import itertools
import json
import logging
import os
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import ExifTags, Image, ImageFile, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from dino_scale.checkpoint import atomic_write_text

__all__ = [
    "DECODE_FAILURE_KINDS",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageTooLargeError",
    "ShardWriteReport",
    "TrainBatch",
    "count_samples",
    "decode_image",
    "expand_shards",
    "is_remote",
    "load_classes",
    "make_eval_loader",
    "make_train_loader",
    "stable_seed",
    "write_shards",
]

logger = logging.getLogger(__name__)

# Member extensions recognised as the sample's image, in order of preference when a sample has several.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    "jpg",
    "jpeg",
    "png",
    "webp",
    "bmp",
    "gif",
    "tif",
    "tiff",
    "ppm",
    "pgm",
    "pbm",
)
# MPO is what many cameras write: JPEG with extra frames; PIL reads the first, so store it as a jpg.
_PIL_FORMAT_TO_EXT = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tiff",
}
SHARDS_INDEX = "shards.json"
CLASSES_FILE = "classes.json"
# Fixed tar member mtime so that re-running the writer on the same images gives byte-identical shards.
_TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
# If this many samples in a row fail to decode while no good one is available for a batch, the data (or the
# decoder) is broken, and looping forever over it would hang the job instead of failing it.
_MAX_CONSECUTIVE_FAILURES = 10_000


class Augmentation(Protocol):
    """What the training loader needs from ``dino_scale.augment.MultiCropAugmentation``."""

    def __call__(self, image: Image.Image, generator: torch.Generator) -> list[torch.Tensor]: ...


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


def stable_seed(*parts: object) -> int:
    """Return a 63-bit seed that depends only on ``parts`` (never on the interpreter's hash randomisation).

    Used for every seed in this module so that two processes (ranks, workers, restarts) derive identical
    random streams from identical inputs.
    """
    text = "\x1f".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts: object) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(stable_seed(*parts))
    return gen


def is_remote(url: str) -> bool:
    # webdataset opens these through gopen (curl, pipes, ...); they cannot be stat'ed or globbed locally.
    return ("://" in url and not url.startswith("file://")) or url.startswith("pipe:")


# Values of ``ImageDecodeError.kind``: why ``decode_image`` refused some bytes, for callers that count skips.
DECODE_FAILURE_KINDS: tuple[str, ...] = ("empty", "truncated", "not_an_image", "too_large", "corrupt", "unsupported")
# Source modes whose ICC profile (if any) still describes the RGB result; any other profile (CMYK, grey) would
# mislabel it, and PNG re-encoding in ``write_shards`` copies ``info["icc_profile"]`` into the new file.
_RGB_PROFILE_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA"})
# Background that transparent pixels are composited onto (see ``_to_rgb``).
_ALPHA_BACKGROUND = (255, 255, 255)
_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class ImageDecodeError(ValueError):
    """Encoded bytes that ``decode_image`` cannot turn into an image; ``kind`` is in ``DECODE_FAILURE_KINDS``.

    A ``ValueError`` so that existing ``except ValueError`` / ``except Exception`` skip logic keeps working.
    """

    # ``kind`` has a default so that ``cls(message)`` works: unpickling (``kind`` comes back from ``__dict__``)
    # and the DataLoader re-raising a worker's exception both rebuild it from the message alone.
    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind


class ImageTooLargeError(ImageDecodeError, Image.DecompressionBombError):
    """More pixels than PIL agrees to decode (``2 * Image.MAX_IMAGE_PIXELS``); still a ``DecompressionBombError``."""

    def __init__(self, message: str, kind: str = "too_large") -> None:
        super().__init__(message, kind)


def _scaled_to_uint8(image: Image.Image) -> Image.Image:
    """Map a high-bit-depth greyscale image (``I;16*``, ``I``, ``F``) to 8-bit ``L``, scaling instead of clipping.

    PIL's own ``convert`` clips these to 0..255, which turns most 16-bit images white. ``I;16*`` is known to be
    16-bit; ``I`` and ``F`` carry no bit depth, so their range is guessed from the values: 0..1 (float only),
    0..255, 0..65535, else a min-max stretch (signed or 32-bit data has no natural white point).
    """
    arr = np.asarray(image).astype(np.float32)
    if image.mode.startswith("I;16"):
        arr = arr / 257.0
    else:
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)  # NaN would cast to an arbitrary byte
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if lo < 0.0 or hi > 65535.0:
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        elif image.mode == "F" and hi <= 1.0:
            arr = arr * 255.0
        elif hi > 255.0:
            arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    High-bit-depth greyscale is scaled (not clipped), and transparency is composited onto white. Dropping the
    alpha channel instead would expose whatever colour the encoder left under fully transparent pixels:
    usually black, sometimes leftovers of an edit, never what a viewer shows (on a white page). White is also
    what document-style images (logos, icons, screenshots) are designed against.
    """
    mode = image.mode
    icc_profile = image.info.get("icc_profile") if mode in _RGB_PROFILE_MODES else None
    if mode.startswith("I;16") or mode in ("I", "F"):
        rgb = _scaled_to_uint8(image).convert("RGB")
    elif image.has_transparency_data:  # RGBA, LA, PA, RGBa, La, or a "transparency" key (P, L, RGB)
        if mode == "La":
            image = image.convert("LA")  # PIL converts premultiplied grey+alpha (TIFF) to LA only
        rgba = image.convert("RGBA")  # also avoids PIL's "palette images with transparency" warning
        rgb = Image.new("RGB", rgba.size, _ALPHA_BACKGROUND)
        rgb.paste(rgba, mask=rgba.getchannel("A"))
    else:
        try:
            rgb = image.convert("RGB")
        except ValueError as exn:  # a mode PIL reads but cannot convert (rare TIFF variants)
            raise ImageDecodeError(f"unsupported image mode {mode!r}: {exn}", kind="unsupported") from exn
    # convert() copies ``info``; keep the ICC profile only where it still describes the RGB pixels.
    rgb.info.pop("icc_profile", None)
    if icc_profile is not None:
        rgb.info["icc_profile"] = icc_profile
    return rgb


def _exif_orientation(image: Image.Image) -> int:
    """EXIF (or XMP) orientation 1..8 of ``image``; 1 (as stored) when absent or unreadable."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed metadata must not make otherwise decodable pixels unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, so phone photos are indexed the way viewers show them."""
    if _exif_orientation(image) == 1:
        return image  # exif_transpose would return a full copy even when there is nothing to do
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exn:  # it also rewrites the EXIF block, which can fail on odd tags: keep the pixels
        logger.debug("cannot apply EXIF orientation (%r); decoding the image as stored", exn)
        return image


def _decode_failure(exn: Exception, fmt: str | None, size: int) -> ImageDecodeError:
    """Turn whatever PIL raised into an ``ImageDecodeError`` whose message and ``kind`` say what went wrong."""
    what = f"{fmt} image" if fmt else "image"
    if isinstance(exn, Image.DecompressionBombError):
        found = _PIL_BOMB_PIXELS.search(str(exn))
        pixels = f"{int(found.group(1)):,} pixels" if found else "its pixel count"
        limit = Image.MAX_IMAGE_PIXELS
        limit_text = f"{2 * limit:,} pixels (2 x PIL.Image.MAX_IMAGE_PIXELS)" if limit else "PIL's limit"
        return ImageTooLargeError(f"{what} too large: {pixels} exceeds the decode limit of {limit_text}")
    if isinstance(exn, Image.UnidentifiedImageError):
        return ImageDecodeError(
            f"not an image: no format PIL reads recognises these {size} bytes (or their header is damaged)",
            kind="not_an_image",
        )
    # PIL reports a short file as OSError("image file is truncated ...") or "Truncated File Read", or EOFError.
    if isinstance(exn, EOFError) or "truncat" in str(exn).lower():
        return ImageDecodeError(f"truncated {what} ({size} bytes): {exn}", kind="truncated")
    return ImageDecodeError(f"corrupt {what} ({size} bytes): {type(exn).__name__}: {exn}", kind="corrupt")


def _open_image(data: bytes, *, draft_size: int | None = None) -> tuple[Image.Image, str | None]:
    """Fully decode ``data``; return the upright RGB image and PIL's format name. See ``decode_image``."""
    if draft_size is not None and draft_size < 1:
        raise ValueError(f"draft_size must be a positive number of pixels, got {draft_size}")
    if not data:
        raise ImageDecodeError("empty image data (zero bytes)", kind="empty")
    fmt: str | None = None
    # Truncated images must be errors (so they are skipped), whatever some other module set globally.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # Huge images only warn (we decode them); above 2x MAX_IMAGE_PIXELS PIL raises and the sample is
            # skipped. Neither may crash a job that runs with warnings turned into errors.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with Image.open(io.BytesIO(data)) as image:  # a multi-frame file (GIF, TIFF, APNG) opens on frame 0
                fmt = image.format
                if draft_size is not None and fmt in ("JPEG", "MPO"):
                    # libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 size for a fraction of the time and
                    # memory; PIL picks the largest reduction that keeps both sides >= draft_size.
                    image.draft("RGB", (draft_size, draft_size))
                image.load()
                # Both return new images, which stay valid after the context manager closes the file.
                return _to_rgb(_upright(image)), fmt
    except ImageDecodeError:
        raise
    except MemoryError:
        raise  # the machine, not the data: do not disguise it as a bad image
    except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for bad data
        raise _decode_failure(exn, fmt, len(data)) from exn
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def decode_image(data: bytes, *, draft_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes into an upright 8-bit RGB PIL image.

    Any PIL mode is accepted: L, P, CMYK (Adobe inverted too), 16-bit and float greyscale (scaled to 8 bits,
    not clipped), and anything with transparency, which is composited onto white. The EXIF orientation is
    applied, and multi-frame files (GIF, TIFF, APNG) give their first frame.

    ``draft_size``: for JPEG only, decode at a reduced scale (1/2, 1/4 or 1/8) whose sides stay
    ``>= draft_size``, which makes indexing big photos cheap; other formats decode at full size.

    Raises ``ImageDecodeError`` (a ``ValueError``) whose ``kind`` is ``"empty"``, ``"truncated"``,
    ``"not_an_image"``, ``"corrupt"`` or ``"unsupported"``, or ``ImageTooLargeError`` (``kind == "too_large"``,
    also a ``PIL.Image.DecompressionBombError``) for more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels;
    images between one and two times that limit decode, PIL's warning silenced. The caller skips and counts.
    """
    return _open_image(data, draft_size=draft_size)[0]


def _image_bytes(sample: dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    members = sorted(k for k in sample if not k.startswith("__"))
    raise ValueError(f"sample has no image member (members: {members})")


def _label(sample: dict[str, Any]) -> int:
    if "cls" not in sample:
        raise ValueError(
            f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} has no 'cls' member; "
            "evaluation needs labelled shards (write them from a folder with one subfolder per class)"
        )
    return int(bytes(sample["cls"]).decode("ascii").strip())


def _tar_error_handler(exn: Exception) -> bool:
    """webdataset exception handler: damaged tar data is skipped with a warning (the rest is still read)."""
    warnings.warn(f"skipping damaged tar data: {exn!r}", RuntimeWarning, stacklevel=2)
    return True


def _iter_raw_samples(urls: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Yield the raw (undecoded) samples of the shards in order: dicts of extension -> bytes, plus __key__."""
    for url in urls:
        # Opened here rather than by wds.tarfile_to_samples so that a consumer that stops early (a worker that
        # has filled its quota) closes the file at once instead of leaving it to the garbage collector.
        # A missing shard raises FileNotFoundError: a configuration error must not mean training on less data.
        with wds.gopen(url, "rb") as stream:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=_tar_error_handler)
            yield from group_by_keys(files, handler=_tar_error_handler)


def _identity(x: Any) -> Any:
    # Module-level (picklable) collate_fn: batches are assembled inside the datasets.
    return x


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
        raise FileNotFoundError("no shard pattern given")
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
                        raise FileNotFoundError(f"no *.tar shards in directory {local!r} (shard pattern {pat!r})")
                elif any(ch in local for ch in "*?["):
                    found = sorted(p for p in glob.glob(local) if os.path.isfile(p))
                    if not found:
                        raise FileNotFoundError(f"no shard files match {local!r} (shard pattern {pat!r})")
                elif os.path.isfile(local):
                    found = [local]
                else:
                    raise FileNotFoundError(f"shard {local!r} does not exist (shard pattern {pat!r})")
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


def load_classes(urls: Sequence[str]) -> list[str]:
    """Class names from the ``classes.json`` beside the first local shard (empty list if there is none)."""
    for url in urls:
        if not is_remote(url):
            try:
                return [str(c) for c in json.loads((Path(url).parent / CLASSES_FILE).read_text())]
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


def _list_files(directory: Path) -> list[Path]:
    """All non-hidden files under ``directory``, sorted by relative path (same order on every filesystem)."""
    found: list[Path] = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / f for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def _slug(text: str, limit: int = 64) -> str:
    # webdataset splits a member name at the first dot of its basename, so keys must not contain dots.
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:limit] or "x"


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=isinstance(obj, dict)) + "\n")


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
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix must be letters, digits, '_' or '-' (no dots), got {prefix!r}")
    root = Path(images_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"images_dir {str(root)!r} is not a directory")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    skipped: list[tuple[str, str]] = []
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    items: list[tuple[Path, int | None]] = []
    if class_dirs:
        classes = [d.name for d in class_dirs]
        skipped.extend((str(p), "file outside the class subfolders") for p in entries if not p.is_dir())
        for label, class_dir in enumerate(class_dirs):
            items.extend((f, label) for f in _list_files(class_dir))
    else:
        classes = []
        items = [(f, None) for f in _list_files(root)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)

    shards: list[Path] = []
    counts: dict[str, int] = {}
    writer: wds.TarWriter | None = None
    tmp_path: Path | None = None
    in_shard = 0
    written = 0

    def finish_shard() -> None:
        nonlocal writer, tmp_path, in_shard
        if writer is None or tmp_path is None:
            return
        writer.close()
        final = out / f"{prefix}-{len(shards):06d}.tar"
        os.replace(tmp_path, final)  # atomic: readers never see a half-written shard under a real name
        shards.append(final)
        counts[final.name] = in_shard
        writer, tmp_path, in_shard = None, None, 0

    try:
        for path, label in tqdm(items, desc=f"sharding {root}", unit="img", disable=not progress):
            try:
                data = path.read_bytes()
                image, fmt = _open_image(data)
            except Exception as exn:  # any unreadable file is reported, never fatal
                skipped.append((str(path), f"{type(exn).__name__}: {exn}"))
                continue
            ext = _PIL_FORMAT_TO_EXT.get(fmt or "", (fmt or path.suffix.lstrip(".") or "img").lower())
            if ext not in IMAGE_EXTENSIONS:
                # Formats PIL reads but the loader would not recognise by extension are stored as PNG.
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
            if max_image_side is not None and max(image.size) > max_image_side:
                scale = max_image_side / max(image.size)
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                buf = io.BytesIO()
                image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0).save(buf, format="JPEG", quality=90)
                data, ext = buf.getvalue(), "jpg"
            rel = path.relative_to(root).with_suffix("").as_posix()
            sample: dict[str, Any] = {"__key__": f"{written:07d}_{_slug(rel)}", ext: data}
            if label is not None:
                sample["cls"] = str(label).encode("ascii")
            if writer is None:
                tmp_path = out / f".{prefix}-{len(shards):06d}.tar.tmp"
                writer = wds.TarWriter(str(tmp_path), encoder=False, mtime=_TAR_MTIME)
            writer.write(sample)
            in_shard += 1
            written += 1
            if in_shard >= maxcount:
                finish_shard()
        finish_shard()
    finally:
        if writer is not None:  # interrupted mid-shard: leave no temporary file behind
            writer.close()
            if tmp_path is not None:
                tmp_path.unlink(missing_ok=True)

    ours = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    new_names = {p.name for p in shards}
    for stale in out.iterdir():
        if ours.fullmatch(stale.name) and stale.name not in new_names:
            stale.unlink()
    index = {n: c for n, c in _read_index(out).items() if not ours.fullmatch(n) and (out / n).is_file()}
    index.update(counts)
    _write_json_atomic(out / SHARDS_INDEX, {"shards": index, "total": sum(index.values())})
    _write_json_atomic(out / CLASSES_FILE, classes)
    if written == 0:
        warnings.warn(f"write_shards: no readable images under {str(root)!r}; no shards written", stacklevel=2)
    return ShardWriteReport(shards=shards, written=written, skipped=skipped, classes=classes)


# ----------------------------------------------------------------------------------------------------------
# Training loader
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainBatch:
    """One training batch of multi-crop views.

    ``views[k]`` is view ``k`` of every sample stacked to ``[B, 3, H, W]`` (in the augmentation's dtype).
    ``skipped`` lists the keys of corrupt samples dropped while assembling this batch; their slots hold extra,
    independently augmented copies of other samples of the batch, so a key may appear twice in ``keys``.
    """

    views: list[torch.Tensor]
    keys: list[str]
    skipped: list[str] = field(default_factory=list)

    def pin_memory(self) -> TrainBatch:
        """Page-locked copy (called by ``DataLoader(pin_memory=True)``) for faster host-to-GPU transfer."""
        return TrainBatch([v.pin_memory() for v in self.views], self.keys, self.skipped)


def _pop_random(buffer: list[Any], rng: random.Random) -> Any:
    j = rng.randrange(len(buffer))
    buffer[j], buffer[-1] = buffer[-1], buffer[j]
    return buffer.pop()


class _TrainStream(IterableDataset):
    """Per-worker stream of :class:`TrainBatch`; see :func:`make_train_loader` for the contract."""

    def __init__(
        self,
        urls: list[str],
        augmentation: Augmentation,
        batch_size: int,
        steps_per_epoch: int,
        epoch: int,
        seed: int,
        start_batch: int,
        num_workers: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.augmentation = augmentation
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.epoch = epoch
        self.seed = seed
        self.start_batch = start_batch
        self.n_local = max(num_workers, 1)
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = max(shuffle_buffer, 1)

    def _raw_stream(self, worker: int) -> Iterator[tuple[dict[str, Any], int]]:
        """Endless shuffled stream of (raw sample, pass number) for one logical worker."""
        n_global = self.world_size * self.n_local
        gid = self.rank * self.n_local + worker
        order = sorted(self.urls)  # sorted first, so every rank derives the same order from the same set
        random.Random(stable_seed("shard-order", self.seed, self.epoch)).shuffle(order)
        fallback = len(order) < n_global
        # With too few shards every worker reads them all and keeps every n_global-th sample instead.
        share0 = order if fallback else order[gid::n_global]
        # Seeded by the reader's global index, not (rank, worker): 1 process x 2 workers then reads exactly what
        # 2 processes x 1 worker read, which is what makes runs comparable (and resumable) across process counts.
        rng = random.Random(stable_seed("shuffle-buffer", self.seed, self.epoch, gid, n_global))
        for pass_idx in itertools.count():
            share = list(share0)
            if pass_idx > 0:
                # In fallback mode all workers must agree on the order for the modulo split to stay disjoint.
                owner = "all" if fallback else gid
                random.Random(stable_seed("pass-order", self.seed, self.epoch, pass_idx, owner)).shuffle(share)
            buffer: list[tuple[dict[str, Any], int]] = []
            kept = 0
            for idx, sample in enumerate(_iter_raw_samples(share)):
                if fallback and idx % n_global != gid:
                    continue
                kept += 1
                buffer.append((sample, pass_idx))
                if len(buffer) >= self.shuffle_buffer:
                    yield _pop_random(buffer, rng)
            # Drain before the next pass: no sample of pass p+1 may come out while pass p has unseen ones.
            while buffer:
                yield _pop_random(buffer, rng)
            if kept == 0:
                raise RuntimeError(
                    f"data worker {gid} of {n_global} (rank {self.rank}) got no samples from shards {share0}"
                )

    def _augment(self, image: Image.Image, key: str, pass_idx: int, fill: int | None = None) -> list[torch.Tensor]:
        if fill is not None:
            gen = _generator("augment-fill", self.seed, self.epoch, key, pass_idx, fill)
        elif pass_idx == 0:
            gen = _generator("augment", self.seed, self.epoch, key)
        else:  # a repeated pass within the epoch must not replay the first pass's views
            gen = _generator("augment", self.seed, self.epoch, key, pass_idx)
        return self.augmentation(image, gen)

    def _batch(self, stream: Iterator[tuple[dict[str, Any], int]]) -> TrainBatch:
        good: list[tuple[dict[str, Any], int]] = []
        per_sample: list[list[torch.Tensor]] = []
        skipped: list[str] = []

        def try_add(sample: dict[str, Any], pass_idx: int) -> None:
            key = sample["__key__"]
            try:
                image = decode_image(_image_bytes(sample))
            except Exception as exn:  # a corrupt sample must never stop training
                skipped.append(key)
                logger.debug("dropping unreadable sample %s (%s): %r", key, sample.get("__url__"), exn)
                return
            # Augmentation errors are bugs, not bad data: they propagate.
            per_sample.append(self._augment(image, key, pass_idx))
            good.append((sample, pass_idx))

        for sample, pass_idx in itertools.islice(stream, self.batch_size):
            try_add(sample, pass_idx)
        # Only if a whole batch is corrupt do we read beyond its slots (then resume is no longer bit-exact).
        while not good:
            if len(skipped) >= _MAX_CONSECUTIVE_FAILURES:
                raise RuntimeError(f"{len(skipped)} consecutive samples failed to decode, e.g. {skipped[:5]}")
            try_add(*next(stream))
        n_good = len(good)
        for fill in range(self.batch_size - n_good):
            # Refill the slots of dropped samples with new views of this batch's good ones (re-decoded: rare).
            sample, pass_idx = good[fill % n_good]
            image = decode_image(_image_bytes(sample))
            per_sample.append(self._augment(image, sample["__key__"], pass_idx, fill=fill))
            good.append((sample, pass_idx))
        views = [torch.stack([s[k] for s in per_sample]) for k in range(len(per_sample[0]))]
        return TrainBatch(views=views, keys=[s["__key__"] for s, _ in good], skipped=skipped)

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        # The DataLoader always starts its round robin at worker 0, but after resuming at batch n the next
        # batch belongs to logical worker n % W; rotating the roles keeps batch n + j at loader position j.
        worker = (loader_worker + self.start_batch) % self.n_local
        quota = len(range(worker, self.steps_per_epoch, self.n_local))
        done = len(range(worker, self.start_batch, self.n_local))
        if quota - done <= 0:
            return
        stream = self._raw_stream(worker)
        # Resume: every batch occupies exactly batch_size raw samples, so skip them without decoding.
        collections.deque(itertools.islice(stream, done * self.batch_size), maxlen=0)
        for _ in range(quota - done):
            yield self._batch(stream)


class _Loader:
    """Re-iterable wrapper: each ``iter()`` starts fresh DataLoader workers that replay the same batches."""

    def __init__(
        self, dataset: IterableDataset, num_workers: int, pin_memory: bool, length: int | None, seed: int
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.length = length
        self.seed = seed

    def __iter__(self) -> Iterator[Any]:
        # A private generator: otherwise creating the iterator draws a worker base seed from the global torch
        # RNG, and a resumed run would see a different training random stream (drop path, ...) than before.
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            generator=generator,
        )
        return iter(loader)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this loader has no known length")
        return self.length


def make_train_loader(
    urls: Sequence[str],
    augmentation: Augmentation,
    batch_size: int,
    steps_per_epoch: int,
    epoch: int,
    seed: int,
    start_batch: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
    pin_memory: bool = False,
) -> Iterable[TrainBatch]:
    """Training batches for one epoch on one rank: exactly ``steps_per_epoch - start_batch`` of them.

    Every batch holds exactly ``batch_size`` samples. Shards (sorted, then shuffled from ``(seed, epoch)``)
    are split by rank, then by worker (global worker id = ``rank * num_workers + worker``). With fewer
    shards than ``world_size * max(num_workers, 1)`` a warning is issued and every worker reads every shard,
    keeping sample ``i`` when ``i % n_workers_total == id``. A worker whose share runs out before its quota
    starts another, re-shuffled pass over it, so within an epoch no sample repeats as long as each worker's
    share holds its quota. Worker ``w`` produces batches ``w, w + W, ...`` (W = max(num_workers, 1));
    ``start_batch = n`` skips batches ``< n`` without decoding their samples, and the rest are bit-identical
    to those of an uninterrupted run. The same (urls, seed, epoch, rank, world_size, num_workers, batch_size,
    shuffle_buffer) always gives the same batches. Corrupt samples are dropped and reported in
    ``TrainBatch.skipped``; their slots are refilled with extra views of the batch's other samples.

    The returned object supports ``len()`` and can be iterated again (each time from ``start_batch``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= start_batch <= steps_per_epoch:
        raise ValueError(f"need 0 <= start_batch <= steps_per_epoch, got {start_batch} and {steps_per_epoch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    urls = list(urls)
    if not urls:
        raise ValueError("make_train_loader needs at least one shard")
    n_global = world_size * max(num_workers, 1)
    if len(urls) < n_global:
        warnings.warn(
            f"only {len(urls)} shard(s) for {world_size} rank(s) x {max(num_workers, 1)} data worker(s) = "
            f"{n_global} readers: every reader will read all shards and keep every {n_global}-th sample "
            f"(correct, no duplicates, but {n_global}x the I/O). Write at least {n_global} shards, ideally a "
            "multiple of that, for efficient loading.",
            UserWarning,
            stacklevel=2,
        )
    dataset = _TrainStream(
        urls,
        augmentation,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        epoch=epoch,
        seed=seed,
        start_batch=start_batch,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
    )
    loader_seed = stable_seed("dataloader", seed, epoch, rank)
    return _Loader(dataset, num_workers, pin_memory, steps_per_epoch - start_batch, loader_seed)


# ----------------------------------------------------------------------------------------------------------
# Evaluation loader
# ----------------------------------------------------------------------------------------------------------


class _EvalStream(IterableDataset):
    """Every readable labelled sample once, batched per worker in shard order."""

    def __init__(
        self,
        urls: list[str],
        transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.transform = transform
        self.batch_size = batch_size
        self.n_local = max(num_workers, 1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        fallback = len(self.urls) < self.n_local
        share = self.urls if fallback else self.urls[worker :: self.n_local]
        images: list[torch.Tensor] = []
        labels: list[int] = []
        for idx, sample in enumerate(_iter_raw_samples(share)):
            if fallback and idx % self.n_local != worker:
                continue
            label = _label(sample)  # unlabelled shards are a usage error, not a data error: raise
            try:
                image = decode_image(_image_bytes(sample))
            except Exception as exn:
                logger.warning("skipping unreadable sample %s (%s): %r", sample["__key__"], sample.get("__url__"), exn)
                continue
            images.append(self.transform(image))
            labels.append(label)
            if len(images) == self.batch_size:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.long)
                images, labels = [], []
        if images:
            yield torch.stack(images), torch.tensor(labels, dtype=torch.long)


def make_eval_loader(
    urls: Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    num_workers: int = 0,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``(images [B, 3, H, W], labels long [B])`` covering every readable sample exactly once.

    The order is deterministic for given ``(urls, num_workers)``; the last batch of each worker may be short.
    Samples must carry ``cls`` (ValueError otherwise); corrupt images are skipped with a logged warning.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    urls = list(urls)
    if not urls:
        raise ValueError("make_eval_loader needs at least one shard")
    return _Loader(_EvalStream(urls, transform, batch_size, num_workers), num_workers, False, None, seed=0)
