"""Files, safely: atomic writes, loads that never unpickle code, and content hashes.

* Every write is atomic: the bytes go to a temporary file in the destination directory, which is flushed,
  fsynced and then moved over the final name with :func:`os.replace`. A crash leaves either the old file or the
  new one under the final name, never a torn one.
* Nothing is ever unpickled with ``weights_only=False``. Torch files are read with
  ``torch.load(path, map_location="cpu", weights_only=True)``; the only class added to the allowlist is
  :class:`argparse.Namespace` (see :func:`load_torch`), because official DINO checkpoints store their ``args`` as
  one.
* Errors name the file at fault.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from dino_scale.errors import CheckpointError, InputError, NotFound, WriteFailed

# Temp files start with "." and end with ".tmp" so that no glob/regex for final names can ever match them.
TMP_SUFFIX = ".tmp"

# Classes that may appear in an official DINO checkpoint besides tensors and containers. argparse.Namespace
# is a plain attribute bag: torch's weights_only unpickler creates it with ``cls.__new__`` and fills it with
# ``__dict__.update`` (no ``__setstate__``, no ``__init__`` side effects), so allowlisting it cannot run code.
_EXTRA_SAFE_GLOBALS: list[Any] = [argparse.Namespace]


# ----------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------


def fsync_dir(directory: Path) -> None:
    """Persist a rename: on POSIX the directory entry is only durable after fsyncing the directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename itself is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read the umask is to set it; restore it at once
    os.umask(mask)
    return mask


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def write_failure(path: str | Path, error: OSError, needed: int | None = None) -> WriteFailed:
    """A one-line WriteFailed for an OSError raised while writing ``path``: the path, the reason and, when the disk
    (or quota) is full, the free space there and the space needed (``needed`` bytes, when the writer knows it)."""
    path = Path(path)
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = human_bytes(shutil.disk_usage(_existing_parent(path.parent)).free)
        except OSError:
            free = "unknown"
        need = f"; it needs about {human_bytes(needed)}" if needed else ""
        return WriteFailed(
            f"cannot write {path}: {reason} ({free} free in {path.parent}{need}); free some space and run again"
        )
    return WriteFailed(f"cannot write {path}: {reason}")


def atomic_write(path: str | Path, write: Callable[[Path], None], needed: int | None = None) -> None:
    """Run ``write(tmp_path)`` on a temp file next to ``path``, fsync it, then atomically rename it.

    The temp file lives in the same directory so that ``os.replace`` is a same-filesystem rename (atomic).
    On any failure (including KeyboardInterrupt) the temp file is removed and ``path`` is left untouched; an
    OSError (a full disk, a read-only folder) becomes a one-line WriteFailed naming the path (``needed``: the size
    the writer expects, for the message).
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets the usual permissions
        write(tmp)
        # Flush the data to disk before the rename, otherwise a power loss could leave a renamed empty file.
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        cause = _os_error_behind(error)
        if cause is not None:
            raise write_failure(path, cause, needed) from error
        raise
    fsync_dir(path.parent)


def _os_error_behind(error: BaseException) -> OSError | None:
    """The OSError that made a write fail: the error itself, or one it was raised while handling. torch.save that
    runs out of space mid-file raises the OSError, then a RuntimeError ("unexpected pos") from closing its zip
    writer, which hides it."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, WriteFailed):
            return None
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def tensor_bytes(obj: Any) -> int:
    """Bytes of tensor data in a (nested) state: what a torch / safetensors file of it needs, give or take headers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically: readers see either the previous file or the complete new one."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write, needed=tensor_bytes(obj))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temporary file in the same folder, fsync, rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), needed=len(data))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, **dumps: Any) -> None:
    """``obj`` as JSON (indented unless ``indent=None``) plus a final newline at ``path``, atomically; ``dumps`` go
    to json.dumps."""
    atomic_write_text(path, json.dumps(obj, indent=indent, **dumps) + "\n")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------------------


def require_file(path: Path) -> None:
    if not path.exists():
        raise NotFound(f"Checkpoint file not found: {path}")
    if path.is_dir():
        raise InputError(f"Expected a checkpoint file but got a directory: {path}")


def _unsafe_globals(path: Path) -> list[str]:
    """Best-effort list of pickled globals that weights_only refuses (static scan, nothing executed)."""
    try:
        with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) format or unreadable: the caller's error is still informative
        return []


# Magic bytes of the image formats a user may hand over by mistake (what a file is, for the error message).
_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
# The fields of an ONNX ModelProto that may follow its first one (ir_version, field 1, a varint: byte 0x08), as
# protobuf tags: producer_name .. graph (2-7, length-delimited), model_version (5, varint), opset_import (8),
# metadata_props (14), training_info (20), functions (25), configuration (26).
_ONNX_NEXT_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA, 0xD2})
# What to do with an exported artifact that was given where a checkpoint is read.
_ARTIFACT_HINT = "pass it to index/search/eval/bench as --model"


def not_a_checkpoint(path: Path) -> str | None:
    """What a file that torch.load cannot read is instead, as ``"x.onnx is an ONNX model, not a checkpoint: ..."``;
    None when it may be a damaged or refused torch file (a zip written by torch.save, or a pickle), whose own error
    says more. Decided from the content (magic bytes, a zip's listing), the suffix only for TensorRT engines, whose
    format is opaque."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    kind, hint = None, ""
    if size == 0:
        kind = "empty"
    elif head[:4] == b"PK\x03\x04":  # a zip: torch.save writes NAME/data.pkl into it
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):  # truncated: torch's own error names that
            return None
        if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            return None
        if path.suffix == ".pt2" or any("aotinductor" in name for name in names):
            kind, hint = "an AOTInductor package", _ARTIFACT_HINT
        else:
            kind = "a zip archive that torch.save did not write"
    elif is_safetensors_file(path):  # before the pickle test: a header length may start with 0x80 too
        kind = "a safetensors file (backbone weights only)"
    elif head[:1] == b"\x80":  # a pickle (torch's legacy format): the unpickler's error says what is wrong
        return None
    elif len(head) > 2 and head[0] == 0x08 and 0 < head[1] < 0x80 and head[2] in _ONNX_NEXT_TAGS:
        kind, hint = "an ONNX model", _ARTIFACT_HINT
    elif path.suffix in (".engine", ".plan"):
        kind, hint = "a TensorRT engine", _ARTIFACT_HINT
    elif image := next((name for magic, name in _IMAGE_MAGIC if head.startswith(magic)), None):
        kind = f"an image ({image})"
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "an image (WebP)"
    elif head[257:262] == b"ustar":
        kind = "a tar archive (a shard?)"
    elif head.lstrip()[:1] in (b"{", b"["):
        kind = "a JSON file"
    else:
        return f"{path} is not a checkpoint: neither a zip archive written by torch.save nor a pickle"
    if kind == "empty":
        return f"{path} is empty, not a checkpoint"
    return f"{path} is {kind}, not a checkpoint" + (f": {hint}" if hint else "")


def load_torch(path: Path) -> Any:
    """``torch.load(..., weights_only=True)`` with argparse.Namespace allowlisted, and readable errors.

    Verified with torch 2.14.1: plain ``weights_only=True`` raises UnpicklingError "Unsupported global: GLOBAL
    argparse.Namespace" on official DINO checkpoints; inside ``torch.serialization.safe_globals([Namespace])``
    they load, while every other non-allowlisted global (custom classes, ``os.system``, ...) is still refused.
    The context manager only widens the allowlist for the duration of this call.

    A file that is something else (an ONNX model, an image, a safetensors file, ...) is a one-line CheckpointError
    saying what it is (:func:`not_a_checkpoint`): torch's own error would call it pickled Python objects.
    """
    require_file(path)
    try:
        with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        other = not_a_checkpoint(path)
        if other is not None:
            raise CheckpointError(other) from err
        unsafe = _unsafe_globals(path)
        if unsafe or "weights only load failed" in str(err).lower():
            detail = f" (found: {', '.join(unsafe)})" if unsafe else ""
            raise CheckpointError(
                f"Refusing to load {path}: it contains pickled Python objects that are not plain tensors or "
                f"containers{detail}. Loading it would allow arbitrary code execution, so only "
                "weights_only=True loads are performed. If you trust the file, re-save its state dicts with "
                "plain tensors."
            ) from err
        raise CheckpointError(f"Cannot read checkpoint {path}: {type(err).__name__}: {err}") from err


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a torch checkpoint file (a dict) onto the CPU, with ``weights_only=True``.

    Raises NotFound if ``path`` does not exist, CheckpointError if it is corrupt, truncated, refused
    by the safe unpickler, or not a dict.
    """
    path = Path(path)
    obj = load_torch(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"Checkpoint {path} holds a {type(obj).__qualname__}, expected a dict")
    return obj


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Atomically write ``state_dict`` as a safetensors file.

    Tensors are stored as contiguous CPU clones: safetensors rejects non-contiguous tensors and tensors that
    share storage (e.g. tied weights), and cloning also detaches them from any live training state.
    """
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"safetensors keys must be str, got {key!r} while writing {path}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"safetensors values must be tensors; key {key!r} is {type(value).__qualname__}")
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise TypeError(f"safetensors metadata keys and values must be str; offending keys: {bad[:5]}")

    atomic_write_bytes(path, canonical_safetensors(safetensors.torch.save(tensors, metadata=metadata)))


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted, so identical tensors and metadata give identical bytes.

    safetensors keeps the metadata in a hash map, whose order changes run to run (the same tensors then got a new
    sha256 each time); the data offsets in the header are relative to its end, so re-serialising it is safe.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file onto the CPU. Raises FileNotFoundError / CheckpointError naming the file."""
    path = Path(path)
    require_file(path)
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as err:
        raise CheckpointError(f"Cannot read safetensors file {path}: {type(err).__name__}: {err}") from err


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header ({} when it has none)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise CheckpointError(f"Cannot read safetensors file {path}: {type(err).__name__}: {err}") from err


def is_safetensors_file(path: Path) -> bool:
    """Sniff the format rather than trust the suffix: safetensors = u64 little-endian header length, then JSON.

    The first byte alone says nothing (a header length of 128 + 256k starts with 0x80, like a pickle); a JSON
    header that fits in the file does.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[:2] == b"PK":  # zip: torch.save
        return False
    header_length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + header_length <= path.stat().st_size
