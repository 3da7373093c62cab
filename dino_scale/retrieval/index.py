"""`dino-scale index`, `search` and `dedup`: a resumable on-disk image index over exported (or PyTorch) backbones.

An index folder holds::

    manifest.json            what the index is: model (path, sha256), descriptor, whitening, shards, faiss index
    embeddings/emb-000000.npy     float16 [n, D] L2-normalised descriptors, one row per image
    embeddings/emb-000000.jsonl   one JSON line per row: key, path, bytes, sha256, width, height, (mtime_ns | label)
    whitening.faiss          the PCA whitening, where one was learned (--whiten-on)
    index.faiss              faiss inner-product index over the live rows; index_rows.npy maps its ids to rows
    skipped.jsonl            images that could not be read on the last run, with the reason
    index_log.jsonl          one JSON line per committed shard: images, images/s, skipped

The manifest is the commit point. Embeddings are committed a shard (``--shard-size`` rows) at a time: the
arrays and metadata are written atomically first, then the manifest that lists them. An interrupted run
therefore loses at most the shard in flight, and the next run (the same command) lists the images again, skips
every key already committed with the same size and modification time, and continues in the same order, so it
ends with exactly the rows an uninterrupted run writes (batches restart at shard boundaries when ``--shard-size``
is a multiple of ``--batch-size``, as the defaults are). Adding images later embeds only the new ones; a file
that changed is embedded again and its newer row replaces the older one in the faiss index.

Every file goes through dino_scale.io's atomic writers (faiss objects through a Python file, see
vector_index.write_faiss), so a full disk is one WriteFailed naming the path, with no temporary file left, and the
folder stays as the last commit left it: a failed faiss update puts the previous index.faiss / index_rows.npy back
(hard links kept during the update), so the folder stays searchable. The manifest records the sha256 of every file
it lists.

Nothing is used unchecked. The manifest's every key is checked for type and range (file names must be the
folder's own: emb-NNNNNN.* in embeddings/, index.faiss, whitening.faiss), and every file against the manifest
(sha256, dtype, shape, row count, dimensions; .npy files are never unpickled). ``search`` and ``dedup`` stop at
the first damage with one DamagedIndex line naming the file and the key. ``index`` rebuilds what it cannot read,
with a warning naming it: a damaged shard is dropped and its images embedded again, a damaged faiss index or
whitening is rebuilt (the whitening learned again on the images it was learned on), and a manifest that says
nothing trustworthy about the vectors starts the folder afresh; committed shards that verify are reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dino_scale.data.items import ImageItem, list_image_files, list_shard_items
from dino_scale.errors import InputError, NotFound, blame
from dino_scale.io import (
    TMP_SUFFIX,
    atomic_write_bytes,
    file_sha256,
    write_failure,
)
from dino_scale.models.weights import ImageSize
from dino_scale.retrieval import vector_index
from dino_scale.retrieval.embed import (
    DESCRIPTORS,
    EmbeddedBatch,
    EmbeddingModel,
    Whitening,
    check_descriptor,
    embed,
    learn_whitening,
    load_embedding_model,
    newest_artifact,
)

MANIFEST_FILE = "manifest.json"
EMBEDDINGS_DIR = "embeddings"
FAISS_FILE = "index.faiss"
ROWS_FILE = "index_rows.npy"
WHITENING_FILE = "whitening.faiss"
SKIPPED_FILE = "skipped.jsonl"
LOG_FILE = "index_log.jsonl"
MANIFEST_VERSION = 1
DEFAULT_INDEX_ROOT = Path("index")

# Bounds that refuse nonsense in a manifest before anything acts on it (far beyond any index this builds).
MAX_COUNT = 1 << 40  # rows, vectors
MAX_DIM = 1 << 16  # descriptor dimensions
MAX_IMAGE_SIZE = 1 << 14
MAX_MANIFEST_BYTES = 64 << 20
_SHARD_NAME = re.compile(r"emb-(\d{6,12})\.(npy|jsonl)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NPY_MAGIC = b"\x93NUMPY"
_BUILT_TYPES = tuple(t for t in vector_index.INDEX_TYPES if t != "auto")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Reading and checking an index folder: every file is checked before it is used, and a damaged one is named
# ----------------------------------------------------------------------------------------------------------


class DamagedIndex(InputError):
    """A file of an index folder that cannot be used as it is (damaged, tampered with, missing); the message names
    the file and, for the manifest, the key at fault. ``dino-scale index`` rebuilds what raised it; ``search`` and
    ``dedup`` stop with it."""


class _Problem(Exception):
    """A manifest key that fails its check (internal: becomes a DamagedIndex naming the file, or a warning)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key} {message}" if key else message)
        self.key = key


def _shown(value: Any) -> str:
    """A value as it appears in the JSON file, shortened."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _get(obj: dict[str, Any], key: str, dotted: str) -> Any:
    if key not in obj:
        raise _Problem(dotted, "is missing")
    return obj[key]


def _object(value: Any, dotted: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Problem(dotted, f"must be an object, got {_shown(value)}")
    return value


def _integer(value: Any, dotted: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Problem(dotted, f"must be an integer in {low}..{high}, got {_shown(value)}")
    return value


def _string(value: Any, dotted: str, choices: Sequence[str] = (), empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise _Problem(dotted, f"must be a {'' if empty else 'non-empty '}string, got {_shown(value)}")
    if choices and value not in choices:
        raise _Problem(dotted, f"must be one of {', '.join(map(repr, choices))}, got {_shown(value)}")
    return value


def _digest(value: Any, dotted: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise _Problem(dotted, f"must be a sha256 (64 hex digits), got {_shown(value)}")
    return value


def _load_json(path: Path) -> Any:
    """The manifest's JSON value (None: there is no manifest), or a DamagedIndex naming the file."""
    if not path.exists():
        return None
    if not path.is_file():
        raise DamagedIndex(f"{path} is not a file")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise DamagedIndex(f"{path} is {path.stat().st_size} bytes: too large for a manifest")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise DamagedIndex(f"{path} is not valid JSON: {reason}") from None
    except OSError as error:
        raise DamagedIndex(f"{path} cannot be read: {error.strerror or error}") from None


def _check_version(manifest: Any, path: Path) -> None:
    """A manifest of a newer dino-scale is refused (never repaired); a missing or malformed version is damage."""
    if not isinstance(manifest, dict):
        raise _Problem("", f"must hold a JSON object, got {_shown(manifest)}")
    version = _get(manifest, "manifest_version", "manifest_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > MANIFEST_VERSION:
        raise InputError(
            f"{path}: manifest_version {version} was written by a newer dino-scale (this one reads "
            f"{MANIFEST_VERSION}); use that version, or another folder"
        )
    _integer(version, "manifest_version", MANIFEST_VERSION, MANIFEST_VERSION)


def _check_identity(manifest: dict[str, Any]) -> None:
    """What the vectors are (model, descriptor, whitening, dimension): without it no committed row can be trusted."""
    model = _object(_get(manifest, "model", "model"), "model")
    _string(_get(model, "path", "model.path"), "model.path")
    _string(_get(model, "sha256", "model.sha256"), "model.sha256")
    _integer(_get(model, "image_size", "model.image_size"), "model.image_size", 1, MAX_IMAGE_SIZE)
    if "which" in model:
        _string(model["which"], "model.which", ("teacher", "student"))
    _string(_get(manifest, "descriptor", "descriptor"), "descriptor", tuple(DESCRIPTORS))
    whitening = _get(manifest, "whitening", "whitening")
    dim = _get(manifest, "dim", "dim")
    if dim is not None:
        _integer(dim, "dim", 1, MAX_DIM)
    if whitening is not None:
        _object(whitening, "whitening")
        _string(_get(whitening, "file", "whitening.file"), "whitening.file", (WHITENING_FILE,))
        _digest(_get(whitening, "sha256", "whitening.sha256"), "whitening.sha256")
        _string(_get(whitening, "learned_on", "whitening.learned_on"), "whitening.learned_on")
        in_dim = _integer(_get(whitening, "in_dim", "whitening.in_dim"), "whitening.in_dim", 1, MAX_DIM)
        out_dim = _integer(_get(whitening, "out_dim", "whitening.out_dim"), "whitening.out_dim", 1, in_dim)
        if dim is not None and dim != out_dim:
            raise _Problem("dim", f"is {dim}, but whitening.out_dim is {out_dim}")
    shards = manifest.get("shards")
    if dim is None and isinstance(shards, list) and shards:
        raise _Problem("dim", "is null, but shards are listed")


def _check_shards(manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], list[_Problem]]:
    """The well-formed shard entries (in order, each naming its own files emb-NNNNNN.* in embeddings/), and the
    problems of the others."""
    if "shards" not in manifest:
        return [], [_Problem("shards", "is missing")]
    shards = manifest["shards"]
    if not isinstance(shards, list):
        return [], [_Problem("shards", f"must be a list, got {_shown(shards)}")]
    kept: list[dict[str, Any]] = []
    problems = []
    last = -1
    for n, entry in enumerate(shards):
        key = f"shards[{n}]"
        try:
            _object(entry, key)
            numbers = []
            for part, suffix in (("vectors", "npy"), ("meta", "jsonl")):
                name = _get(entry, part, f"{key}.{part}")
                match = _SHARD_NAME.fullmatch(name) if isinstance(name, str) else None
                if match is None or match.group(2) != suffix:
                    raise _Problem(
                        f"{key}.{part}",
                        f"must name a file emb-NNNNNN.{suffix} in {EMBEDDINGS_DIR}/, got {_shown(name)}",
                    )
                numbers.append(int(match.group(1)))
            if numbers[0] != numbers[1]:
                raise _Problem(f"{key}.meta", f"{entry['meta']!r} is not the metadata of {entry['vectors']!r}")
            if numbers[0] <= last:
                raise _Problem(f"{key}.vectors", f"{entry['vectors']!r} is listed twice or out of order")
            _integer(_get(entry, "rows", f"{key}.rows"), f"{key}.rows", 1, MAX_COUNT)
            for part in ("vectors_sha256", "meta_sha256"):
                if part in entry:
                    _digest(entry[part], f"{key}.{part}")
        except _Problem as problem:
            problems.append(problem)
            continue
        kept.append(entry)
        last = numbers[0]
    return kept, problems


def _check_index_info(manifest: dict[str, Any], shards: list[dict[str, Any]]) -> None:
    """The faiss index's record (what index.faiss / index_rows.npy hold) and the index type asked for."""
    if "index_type" in manifest:
        _string(manifest["index_type"], "index_type", vector_index.INDEX_TYPES)
    info = _get(manifest, "index", "index")
    if info is None:
        return
    _object(info, "index")
    _string(_get(info, "file", "index.file"), "index.file", (FAISS_FILE,))
    _string(_get(info, "rows_file", "index.rows_file"), "index.rows_file", (ROWS_FILE,))
    _string(_get(info, "type", "index.type"), "index.type", _BUILT_TYPES)
    rows = sum(s["rows"] for s in shards)
    num_vectors = _integer(_get(info, "num_vectors", "index.num_vectors"), "index.num_vectors", 1, MAX_COUNT)
    if num_vectors > rows:
        raise _Problem("index.num_vectors", f"is {num_vectors}, but the shards hold {rows} rows")
    if "dim" in info and info["dim"] != manifest["dim"]:
        raise _Problem("index.dim", f"is {_shown(info['dim'])}, but dim is {_shown(manifest['dim'])}")
    for part in ("sha256", "rows_sha256"):
        if part in info:
            _digest(info[part], f"index.{part}")


def _check_notes(manifest: dict[str, Any]) -> list[_Problem]:
    """The informational keys (when and how it was built): wrong types are damage, never used for anything."""
    problems = []
    for key in ("created", "updated", "command"):
        if key in manifest:
            try:
                _string(manifest[key], key, empty=True)
            except _Problem as problem:
                problems.append(problem)
    return problems


def read_manifest(index_dir: str | Path) -> dict[str, Any] | None:
    """The folder's manifest, fully checked (None: there is none). A damaged or tampered one is a DamagedIndex
    naming the file and the key at fault."""
    path = Path(index_dir) / MANIFEST_FILE
    manifest = _load_json(path)
    if manifest is None:
        return None
    try:
        _check_version(manifest, path)
        _check_identity(manifest)
        shards, problems = _check_shards(manifest)
        problems += _check_notes(manifest)
        if problems:
            raise problems[0]
        _check_index_info(manifest, shards)
    except _Problem as problem:
        raise DamagedIndex(f"{path}: {problem}") from None
    return manifest


def repair_manifest(index_dir: Path, echo: Callable[[str], None]) -> dict[str, Any] | None:
    """The manifest for an index run to continue from: checked like :func:`read_manifest`, but what can be rebuilt
    is dropped with a warning rather than refused. Damaged shard entries are dropped (their images are embedded
    again), a damaged faiss record is dropped (the index is rebuilt), a damaged note is rewritten. Damage to what
    the vectors are (model, descriptor, whitening, dimension), or a manifest that is no JSON object, leaves nothing
    to trust: the index starts afresh (None) -- but only in a folder that holds an embeddings/ folder, so that a
    folder of something else is never overwritten."""
    path = index_dir / MANIFEST_FILE
    try:
        manifest = _load_json(path)
        if manifest is None:
            if any((index_dir / EMBEDDINGS_DIR).glob("emb-*")):
                echo(
                    f"warning: {path} is missing; without it no embedding in {EMBEDDINGS_DIR}/ can be trusted: "
                    "indexing every image again"
                )
            return None
        _check_version(manifest, path)
        _check_identity(manifest)
    except (DamagedIndex, _Problem) as error:
        message = f"{path}: {error}" if isinstance(error, _Problem) else str(error)
        if not (index_dir / EMBEDDINGS_DIR).is_dir():
            raise DamagedIndex(
                f"{message}; {index_dir} has no {EMBEDDINGS_DIR}/ folder, so it is not an index folder to rebuild: "
                "use another --out"
            ) from None
        echo(f"warning: {message}; without it no committed embedding can be trusted: indexing every image again")
        return None
    shards, problems = _check_shards(manifest)
    for problem in problems:
        echo(f"warning: {path}: {problem}; dropping that entry: its images are embedded again")
    manifest["shards"] = shards
    for problem in _check_notes(manifest):
        echo(f"warning: {path}: {problem}; rewriting it")
        del manifest[problem.key]
    try:
        _check_index_info(manifest, shards)
    except _Problem as problem:
        echo(f"warning: {path}: {problem}; rebuilding the faiss index")
        manifest["index"] = None
        if problem.key == "index_type":
            del manifest["index_type"]
    return manifest


def check_model(manifest: dict[str, Any], model: EmbeddingModel, index_dir: Path) -> None:
    """Refuse a model whose weights differ from the ones the index was built with."""
    recorded = manifest["model"]
    if recorded["sha256"] != model.sha256:
        raise InputError(
            f"{index_dir} was built with the model {recorded['path']} (sha256 {recorded['sha256'][:16]}…); "
            f"{model.path} is a different model (sha256 {model.sha256[:16]}…). Its vectors are not comparable: "
            "use the same model, or build a new index with another --out"
        )
    if recorded["image_size"] != model.image_size:
        raise InputError(f"{index_dir} was built at image size {recorded['image_size']}, not {model.image_size}")


def _read_file(path: Path, recorded_sha256: str | None) -> bytes:
    """A file's bytes, checked against the sha256 the manifest recorded for it (if any)."""
    if not path.is_file():
        raise DamagedIndex(f"{path} is missing" if not path.exists() else f"{path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DamagedIndex(f"{path} cannot be read: {error.strerror or error}") from None
    if recorded_sha256 is not None and _sha256(data) != recorded_sha256:
        raise DamagedIndex(f"{path} does not match the sha256 recorded in {MANIFEST_FILE}: it was changed or damaged")
    return data


def _check_file_sha256(path: Path, recorded_sha256: str | None) -> None:
    if not path.is_file():
        raise DamagedIndex(f"{path} is missing" if not path.exists() else f"{path} is not a file")
    if recorded_sha256 is not None and file_sha256(path) != recorded_sha256:
        raise DamagedIndex(f"{path} does not match the sha256 recorded in {MANIFEST_FILE}: it was changed or damaged")


def _open_npy(path: Path, mmap: bool) -> np.ndarray:
    """A .npy array (memory-mapped if asked), never unpickled: object arrays and pickles are refused."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
        if magic != _NPY_MAGIC:
            raise DamagedIndex(f"{path} is not a .npy array file")
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise DamagedIndex(f"{path} is not a readable .npy array: {error}") from None


def _shard_rows(index_dir: Path, shard: dict[str, Any], dim: int, verify_sha256: bool) -> list[dict[str, Any]]:
    """The metadata rows of one committed shard, after checking both of its files against the manifest: the rows
    file's sha256 where recorded, the vectors file's too if ``verify_sha256`` (it is read whole for that; otherwise
    its header: dtype and shape)."""
    meta_path = index_dir / EMBEDDINGS_DIR / shard["meta"]
    data = _read_file(meta_path, shard.get("meta_sha256"))  # read whole anyway: always checked
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise DamagedIndex(f"{meta_path} is not UTF-8 text: {error}") from None
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != shard["rows"]:
        raise DamagedIndex(f"{meta_path} has {len(lines)} rows, {MANIFEST_FILE} says {shard['rows']}")
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("key"), str) and isinstance(row.get("path"), str)):
            raise DamagedIndex(f"{meta_path}: line {number} is not a row (a JSON object with a key and a path)")
        rows.append(row)
    vectors_path = index_dir / EMBEDDINGS_DIR / shard["vectors"]
    _check_file_sha256(vectors_path, shard.get("vectors_sha256") if verify_sha256 else None)
    vectors = _open_npy(vectors_path, mmap=True)
    if vectors.dtype != np.float16 or vectors.shape != (shard["rows"], dim):
        raise DamagedIndex(
            f"{vectors_path} holds {vectors.dtype} {list(vectors.shape)}, expected float16 [{shard['rows']}, {dim}]"
        )
    return rows


def _committed_rows(index_dir: Path, manifest: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The metadata lines of every committed shard, in shard order; a damaged shard is a DamagedIndex."""
    return [_shard_rows(index_dir, shard, manifest["dim"], verify_sha256=False) for shard in manifest["shards"]]


def live_rows(shard_rows: list[list[dict[str, Any]]]) -> np.ndarray:
    """(shard, row) of the newest row of every key, in commit order of those rows: the faiss index's id order."""
    newest: dict[str, tuple[int, int]] = {}
    for s, rows in enumerate(shard_rows):
        for r, meta in enumerate(rows):
            newest.pop(meta["key"], None)  # re-inserting moves the key to the end: commit order of newest rows
            newest[meta["key"]] = (s, r)
    return np.array(list(newest.values()), dtype=np.int64).reshape(-1, 2)


def load_vectors(index_dir: Path, manifest: dict[str, Any], rows: np.ndarray) -> np.ndarray:
    """float32 [len(rows), D] vectors of the given (shard, row) pairs."""
    if len(rows) == 0:
        return np.zeros((0, manifest["dim"]), np.float32)
    shards = [_open_npy(index_dir / EMBEDDINGS_DIR / s["vectors"], mmap=True) for s in manifest["shards"]]
    vectors = np.stack([shards[s][r] for s, r in rows]).astype(np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        shard = manifest["shards"][int(rows[np.flatnonzero(~finite)[0]][0])]
        raise DamagedIndex(f"{index_dir / EMBEDDINGS_DIR / shard['vectors']} holds NaN or infinite values")
    return vectors


def _load_rows_file(index_dir: Path, info: dict[str, Any], shard_rows: list[list[dict[str, Any]]]) -> np.ndarray:
    """index_rows.npy (faiss id -> (shard, row)), checked against the manifest and the committed shards."""
    path = index_dir / info["rows_file"]
    _check_file_sha256(path, info.get("rows_sha256"))
    rows = _open_npy(path, mmap=False)
    if rows.dtype != np.int64 or rows.shape != (info["num_vectors"], 2):
        raise DamagedIndex(f"{path} holds {rows.dtype} {list(rows.shape)}, expected int64 [{info['num_vectors']}, 2]")
    sizes = np.array([len(r) for r in shard_rows] + [0], dtype=np.int64)
    shard = rows[:, 0]
    in_range = (shard >= 0) & (shard < len(shard_rows))
    in_range &= (rows[:, 1] >= 0) & (rows[:, 1] < sizes[np.where(in_range, shard, len(shard_rows))])
    if not in_range.all():
        raise DamagedIndex(f"{path} names rows that no committed shard holds")
    return rows


def _load_faiss_file(index_dir: Path, info: dict[str, Any], dim: int) -> Any:
    """index.faiss, checked against the sha256, size and dimension the manifest recorded."""
    path = index_dir / info["file"]
    _check_file_sha256(path, info.get("sha256"))
    try:
        index = vector_index.load_index(path)
    except InputError as error:
        raise DamagedIndex(str(error)) from None
    if index.ntotal != info["num_vectors"] or index.d != dim:
        raise DamagedIndex(
            f"{path} holds {index.ntotal} vectors of dimension {index.d}; {MANIFEST_FILE} says "
            f"{info['num_vectors']} of dimension {dim}"
        )
    return index


def load_whitening(index_dir: Path, info: dict[str, Any]) -> Whitening:
    """The folder's whitening, checked against the sha256 and dimensions the manifest recorded."""
    path = index_dir / info["file"]
    _check_file_sha256(path, info["sha256"])
    try:
        return Whitening.load(path, info["in_dim"], info["out_dim"])
    except InputError as error:
        raise DamagedIndex(str(error)) from None


def _remove_debris(index_dir: Path) -> None:
    """Temporary files that a killed run left (atomic writes, backups): never part of the index."""
    for folder in (index_dir, index_dir / EMBEDDINGS_DIR):
        if folder.is_dir():
            for path in folder.glob(f".*{TMP_SUFFIX}"):
                if path.is_file():
                    path.unlink(missing_ok=True)


class _Backups:
    """Hard links to the current index.faiss / index_rows.npy, so that a failed update (a full disk while saving
    them or the manifest) puts the previous, consistent pair back: the folder stays searchable. Links cost no space;
    where they are impossible the update goes ahead without (a search then asks for the index run to be
    repeated)."""

    def __init__(self, index_dir: Path, names: Sequence[str]) -> None:
        self.saved: list[tuple[Path, Path | None]] = []
        for name in names:
            path = index_dir / name
            backup: Path | None = index_dir / f".{name}.previous{TMP_SUFFIX}"
            try:
                backup.unlink(missing_ok=True)
                if path.is_file():
                    os.link(path, backup)
                else:
                    backup = None
            except OSError:
                continue  # no backup of this one
            self.saved.append((path, backup))

    def restore(self) -> None:
        for path, backup in self.saved:
            try:
                if backup is None:
                    path.unlink(missing_ok=True)  # it did not exist before
                elif path.exists() and os.path.samefile(backup, path):
                    backup.unlink()  # never replaced (rename() of two links to one file would do nothing)
                else:
                    os.replace(backup, path)
            except OSError:
                pass

    def discard(self) -> None:
        for _, backup in self.saved:
            if backup is not None:
                backup.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------


@dataclass
class IndexOptions:
    images: str | None = None
    shards: str | None = None
    model: str | None = None
    out: str | None = None
    descriptor: str | None = None  # default: the index's, else "cls"
    index_type: str | None = None  # default: the index's, else "auto"
    batch_size: int = 64
    workers: int | None = None
    shard_size: int = 4096
    whiten_on: str | None = None
    whiten_dim: int | None = None
    image_size: int | None = None
    device: str = "auto"
    progress: bool = True
    command: str = ""


def _default_out(model: Path) -> Path:
    """index/<model name>: an artifact's or checkpoint's stem, a run directory's name."""
    name = model.stem if model.is_file() else model.name
    return DEFAULT_INDEX_ROOT / name


def _file_state(item: ImageItem) -> dict[str, int]:
    """Size and mtime of an image file (what decides whether it changed since it was indexed); {} in a shard."""
    if item.offset is not None:
        return {}
    try:
        stat = os.stat(item.path)
    except OSError:
        return {}
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _learn_whitening(
    options: IndexOptions,
    model: EmbeddingModel,
    descriptor: str,
    source: str,
    out_dim: int | None,
    path: Path,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    echo(f"learning PCA whitening on the images of {source}")
    with blame("whiten_on"):
        whitening, images, skipped = learn_whitening(
            model,
            source,
            descriptor,
            out_dim,
            batch_size=options.batch_size,
            workers=options.workers,
            progress=options.progress,
        )
    sha256 = whitening.save(path)
    return {
        "file": path.name,
        "sha256": sha256,
        "learned_on": str(source),
        "images": images,
        "skipped": skipped,
        "in_dim": whitening.in_dim,
        "out_dim": whitening.out_dim,
    }


def run_index(options: IndexOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Embed what is new under ``--images`` / ``--shards`` into the index folder, then bring the faiss index up to
    date. Returns a summary (also the last line of ``index_log.jsonl``)."""
    items, ignored = _list_items(options)
    folder, model = IndexFolder.open(options, echo)
    whitening = folder.whitening(options, model, echo)
    pending = folder.pending(items)
    echo(
        f"{len(items)} image(s) listed, {len(items) - len(pending)} already indexed, {len(pending)} to embed"
        + (f" ({ignored} non-image file(s) ignored)" if ignored else "")
    )

    rows = _Rows()
    skipped: list[dict[str, str]] = []
    start = time.monotonic()
    embedding = embed(
        model,
        [item for item, _ in pending],
        folder.manifest["descriptor"],
        whitening,
        options.batch_size,
        options.workers,
        hash_files=True,
        progress=options.progress,
    )
    for batch in embedding:
        skipped.extend({"key": pending[index][0].key, "reason": reason} for index, reason in batch.skipped)
        rows.add(batch, pending)
        while len(rows) >= options.shard_size:
            folder.commit(*rows.take(options.shard_size), _rate(rows.embedded, len(skipped), start))
    if len(rows):
        folder.commit(*rows.take(len(rows)), _rate(rows.embedded, len(skipped), start))
    seconds = time.monotonic() - start
    folder.report_skipped(skipped, echo)
    if not folder.manifest["shards"]:
        raise InputError(f"no readable image in {options.images or options.shards}; nothing to index")

    index_info = folder.update_faiss(options.index_type, echo)
    summary = {
        "index_dir": str(folder.path),
        "listed": len(items),
        "embedded": rows.embedded,
        "skipped": len(skipped),
        "vectors": index_info["num_vectors"],
        "seconds": round(seconds, 3),
        "images_per_s": round(len(pending) / seconds, 2) if seconds > 0 and pending else None,
        "index_type": index_info["type"],
    }
    folder.log({"summary": summary, "time": _now()})
    rate = f" at {summary['images_per_s']} img/s" if summary["images_per_s"] else ""
    echo(
        f"embedded {rows.embedded} image(s){rate}; {index_info['num_vectors']} vector(s) in a "
        f"{index_info['type']} index at {folder.path / FAISS_FILE}"
    )
    return summary


def _list_items(options: IndexOptions) -> tuple[list[ImageItem], int]:
    """The options' images or shards, checked before any work; and how many non-image files were ignored."""
    if options.shard_size < 1 or options.batch_size < 1:
        raise InputError("--shard-size and --batch-size must be >= 1")
    with blame("index_type"):
        vector_index.choose_index_type(1, options.index_type or "auto")  # a bad --index-type fails before any work
    if (options.images is None) == (options.shards is None):
        raise InputError("give exactly one of --images DIR and --shards PATTERN")
    if options.images is not None:
        with blame("images"):
            return list_image_files(options.images)
    with blame("shards"):
        return list_shard_items(options.shards), 0


def _rate(embedded: int, skipped: int, start: float) -> dict[str, Any]:
    """The progress numbers of an index run so far, for the log line of a committed shard."""
    elapsed = time.monotonic() - start
    return {
        "embedded": embedded,
        "skipped": skipped,
        "seconds": round(elapsed, 3),
        "images_per_s": round(embedded / elapsed, 2) if elapsed else None,
    }


@dataclass
class _Rows:
    """Rows embedded but not yet committed, and how many were embedded in all."""

    vectors: list[np.ndarray] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)
    embedded: int = 0

    def __len__(self) -> int:
        return len(self.meta)

    def add(self, batch: EmbeddedBatch, pending: list[tuple[ImageItem, dict[str, int]]]) -> None:
        """The readable items of one embedded batch, with their file facts as metadata rows."""
        if not batch.indices:
            return
        self.vectors.append(batch.vectors)
        for index, info in zip(batch.indices, batch.info, strict=True):
            item, state = pending[index]
            meta = {"key": item.key, "path": item.path, **info, **state}
            if item.label is not None:
                meta["label"] = item.label
            self.meta.append(meta)
        self.embedded += len(batch.indices)

    def take(self, count: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        stacked = np.concatenate(self.vectors) if self.vectors else np.zeros((0, 0), np.float32)
        head, tail = stacked[:count], stacked[count:]
        meta, self.meta = self.meta[:count], self.meta[count:]
        self.vectors = [tail] if len(tail) else []
        return head, meta


class IndexFolder:
    """An index folder being built: its manifest (the commit point), its committed rows, and its log.

    Opening it checks every committed shard against the manifest (and the sha256 recorded for its files); a shard
    that fails is dropped with a warning naming the file, and its images are embedded again."""

    def __init__(self, path: Path, manifest: dict[str, Any], echo: Callable[[str], None] = print) -> None:
        self.path, self.manifest = path, manifest
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / EMBEDDINGS_DIR).mkdir(exist_ok=True)
        except OSError as error:
            raise write_failure(path / EMBEDDINGS_DIR, error) from None
        _remove_debris(path)
        self.shard_rows: list[list[dict[str, Any]]] = []
        kept = []
        for shard in manifest["shards"]:
            try:
                self.shard_rows.append(_shard_rows(path, shard, manifest["dim"], verify_sha256=True))
            except DamagedIndex as error:
                echo(f"warning: {error}; dropping shard {shard['vectors']}: its images are embedded again")
                continue
            kept.append(shard)
        if len(kept) != len(manifest["shards"]):
            manifest["shards"] = kept
            manifest["index"] = None  # it indexes rows that are gone: rebuild it

    @classmethod
    def open(cls, options: IndexOptions, echo: Callable[[str], None]) -> tuple[IndexFolder, EmbeddingModel]:
        """The folder the options name (or index/<model name>), created or checked against the model, descriptor
        and whitening asked for; and the embedding model. What cannot be read is rebuilt (see repair_manifest)."""
        model_path, which, whose = options.model, "teacher", ""
        path = Path(options.out) if options.out is not None else None
        manifest = repair_manifest(path, echo) if path is not None else None
        if path is not None and model_path is None and manifest is not None:
            # Re-running on an existing index: its own model, not whatever was exported last.
            model_path, which = recorded_model(manifest, path), manifest["model"].get("which", "teacher")
            whose = f"the model of the index {path}"
        if model_path is None:
            model_path, whose = str(newest_artifact()), "newest in export/"
        if path is None:
            path = _default_out(Path(model_path))
            echo(f"index: {path}")
            manifest = repair_manifest(path, echo)
        descriptor = options.descriptor or (manifest["descriptor"] if manifest else "cls")
        with blame("descriptor"):
            outputs = check_descriptor(descriptor)
        size: int | ImageSize | None = options.image_size
        if size is None and manifest is not None:
            size = ImageSize(manifest["model"]["image_size"], f"the size the index was built at: {path}")
        model = load_embedding_model(model_path, size, outputs, which=which, device=options.device)
        if whose:
            echo(f"model: {model.path} ({whose})")
        echo(model.size_line())
        if manifest is None:
            manifest = {
                "manifest_version": MANIFEST_VERSION,
                "model": model.describe(),
                "descriptor": descriptor,
                "whitening": None,
                "dim": None,
                "shards": [],
                "index": None,
                "created": _now(),
            }
        else:
            _check_compatible(manifest, path, model, descriptor, options.whiten_on)
        manifest["command"] = options.command
        return cls(path, manifest, echo), model

    def whitening(self, options: IndexOptions, model: EmbeddingModel, echo: Callable[[str], None]) -> Whitening | None:
        """The folder's whitening: learned on ``--whiten-on`` the first time it is asked for, then the stored one.
        A stored one that cannot be read is learned again on the images it was learned on; if that gives another
        whitening, the committed rows (whitened with the old one) are embedded again."""
        info = self.manifest["whitening"]
        descriptor = self.manifest["descriptor"]
        if options.whiten_on is not None and info is None:
            learned = _learn_whitening(
                options, model, descriptor, options.whiten_on, options.whiten_dim, self.path / WHITENING_FILE, echo
            )
            self._write({**self.manifest, "whitening": learned})
        elif info is not None:
            try:
                return load_whitening(self.path, info)
            except DamagedIndex as error:
                echo(f"warning: {error}; learning the whitening again on {info['learned_on']}")
            learned = _learn_whitening(
                options, model, descriptor, info["learned_on"], info["out_dim"], self.path / WHITENING_FILE, echo
            )
            changes: dict[str, Any] = {"whitening": learned}
            if learned["sha256"] != info["sha256"] and self.manifest["shards"]:
                echo(
                    f"warning: the whitening learned again differs from the one the {len(self.shard_rows)} committed "
                    "shard(s) were whitened with: embedding their images again"
                )
                changes.update(shards=[], index=None)
                self.shard_rows = []
            self._write({**self.manifest, **changes})
        if self.manifest["whitening"] is None:
            return None
        return load_whitening(self.path, self.manifest["whitening"])

    def pending(self, items: list[ImageItem]) -> list[tuple[ImageItem, dict[str, int]]]:
        """The items not committed yet, or changed since (size or mtime), with those file facts."""
        done = {meta["key"]: meta for rows in self.shard_rows for meta in rows}
        pending = []
        for item in items:
            state = _file_state(item)
            previous = done.get(item.key)
            if previous is None or (state and any(previous.get(k) != v for k, v in state.items())):
                pending.append((item, state))
        return pending

    def commit(self, vectors: np.ndarray, meta: list[dict[str, Any]], progress: dict[str, Any]) -> None:
        """Write one shard of rows (vectors, then metadata), then the manifest that lists it: the commit point.
        A failed write (a full disk) leaves the manifest, and so every shard committed before, as it was."""
        shards = self.manifest["shards"]
        number = 1 + max((int(_SHARD_NAME.fullmatch(s["vectors"]).group(1)) for s in shards), default=-1)
        names = {"vectors": f"emb-{number:06d}.npy", "meta": f"emb-{number:06d}.jsonl"}
        vectors_data, meta_text = _npy_bytes(vectors.astype(np.float16)), _jsonl(meta)
        atomic_write_bytes(self.path / EMBEDDINGS_DIR / names["vectors"], vectors_data)
        atomic_write_bytes(self.path / EMBEDDINGS_DIR / names["meta"], meta_text.encode("utf-8"))
        entry = {
            **names,
            "rows": len(meta),
            "vectors_sha256": _sha256(vectors_data),
            "meta_sha256": _sha256(meta_text.encode("utf-8")),
        }
        self._write({**self.manifest, "shards": [*shards, entry], "dim": int(vectors.shape[1]), "updated": _now()})
        self.shard_rows.append(meta)
        self.log({"shard": number, "rows": len(meta), **progress})

    def report_skipped(self, skipped: list[dict[str, str]], echo: Callable[[str], None]) -> None:
        atomic_write_bytes(self.path / SKIPPED_FILE, _jsonl(skipped).encode("utf-8"))
        if skipped:
            echo(f"skipped {len(skipped)} unreadable image(s) (listed with reasons in {self.path / SKIPPED_FILE}):")
            for entry in skipped[:10]:
                echo(f"  {entry['key']}: {entry['reason']}")

    def update_faiss(self, index_type: str | None, echo: Callable[[str], None]) -> dict[str, Any]:
        """Bring index.faiss up to the committed rows (the index type asked for, else the folder's) and record it.
        If saving fails part way, the previous index.faiss / index_rows.npy are put back, matching the manifest."""
        index_type = index_type or self.manifest.get("index_type", "auto")
        backups = _Backups(self.path, [FAISS_FILE, ROWS_FILE])
        try:
            info = _update_faiss(self.path, self.manifest, self.shard_rows, index_type, echo)
            self._write({**self.manifest, "index_type": index_type, "index": info, "updated": _now()})
        except BaseException:
            backups.restore()
            raise
        backups.discard()
        return info

    def write_manifest(self) -> None:
        self._write(self.manifest)

    def _write(self, manifest: dict[str, Any]) -> None:
        """Commit ``manifest``: it becomes the folder's only once it is on disk."""
        atomic_write_bytes(self.path / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        self.manifest = manifest

    def log(self, record: dict[str, Any]) -> None:
        """Append one line to index_log.jsonl (rewritten atomically, like every file of the folder)."""
        path = self.path / LOG_FILE
        try:
            previous = path.read_bytes() if path.is_file() else b""
        except OSError:
            previous = b""
        if previous and not previous.endswith(b"\n"):
            previous += b"\n"
        atomic_write_bytes(path, previous + (json.dumps(record) + "\n").encode("utf-8"))


def _check_compatible(
    manifest: dict[str, Any], path: Path, model: EmbeddingModel, descriptor: str, whiten_on: str | None
) -> None:
    """Refuse to add vectors that the folder's could not be compared with."""
    check_model(manifest, model, path)
    if descriptor != manifest["descriptor"]:
        raise InputError(f"{path} holds {manifest['descriptor']!r} descriptors, not {descriptor!r}; use another --out")
    recorded = (manifest.get("whitening") or {}).get("learned_on")
    if whiten_on is not None and str(whiten_on) != recorded:
        raise InputError(
            f"{path} was built with whitening learned on {recorded or 'nothing (no whitening)'}; "
            f"--whiten-on {whiten_on} would make its vectors incomparable; use another --out"
        )


def _update_faiss(
    index_dir: Path,
    manifest: dict[str, Any],
    shard_rows: list[list[dict[str, Any]]],
    requested_type: str,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Bring index.faiss up to the committed rows: append the new rows where only rows were added and the index
    type stays, otherwise rebuild from the stored vectors (so the index always equals a fresh build's content).
    An index.faiss or index_rows.npy that does not match the manifest is rebuilt, with a warning naming it."""
    rows = live_rows(shard_rows)
    wanted = vector_index.choose_index_type(len(rows), requested_type)
    previous = manifest.get("index")
    if previous is not None:
        try:
            # Its recorded sha256 vouches for the file's content; an older record without one: parse it to check.
            index = None if previous.get("sha256") else _load_faiss_file(index_dir, previous, manifest["dim"])
            _check_file_sha256(index_dir / previous["file"], previous.get("sha256"))
            old_rows = _load_rows_file(index_dir, previous, shard_rows)
            same_prefix = len(old_rows) <= len(rows) and np.array_equal(old_rows, rows[: len(old_rows)])
            if previous["type"] == wanted and same_prefix:
                if len(old_rows) == len(rows):
                    return previous
                index = index or _load_faiss_file(index_dir, previous, manifest["dim"])
                index.add(load_vectors(index_dir, manifest, rows[len(old_rows) :]))
                echo(f"added {len(rows) - len(old_rows)} vector(s) to the {wanted} index")
                return _save_faiss(index, rows, index_dir, wanted)
        except DamagedIndex as error:
            echo(f"warning: {error}; rebuilding the faiss index")
    echo(f"building a {wanted} index over {len(rows)} vector(s)")
    index = vector_index.build_index(load_vectors(index_dir, manifest, rows), wanted)
    return _save_faiss(index, rows, index_dir, wanted)


def _save_faiss(index: Any, rows: np.ndarray, index_dir: Path, index_type: str) -> dict[str, Any]:
    sha256 = vector_index.save_index(index, index_dir / FAISS_FILE)
    rows_data = _npy_bytes(np.ascontiguousarray(rows, dtype=np.int64))
    atomic_write_bytes(index_dir / ROWS_FILE, rows_data)
    return {
        "file": FAISS_FILE,
        "rows_file": ROWS_FILE,
        **vector_index.describe_index(index),
        "type": index_type,
        "sha256": sha256,
        "rows_sha256": _sha256(rows_data),
    }


# ----------------------------------------------------------------------------------------------------------
# Reading: search and dedup
# ----------------------------------------------------------------------------------------------------------


@dataclass
class OpenIndex:
    """An index folder opened for queries."""

    path: Path
    manifest: dict[str, Any]
    index: Any
    rows: np.ndarray  # faiss id -> (shard, row)
    shard_rows: list[list[dict[str, Any]]]
    whitening: Whitening | None

    def meta(self, faiss_id: int) -> dict[str, Any]:
        shard, row = self.rows[faiss_id]
        return self.shard_rows[shard][row]

    def vectors(self) -> np.ndarray:
        return load_vectors(self.path, self.manifest, self.rows)


def open_index(index_dir: str | Path) -> OpenIndex:
    """An index folder opened for queries, every file checked against the manifest first: a damaged or tampered one
    is a DamagedIndex naming the file (and the manifest key), which asks for the index run to be repeated."""
    index_dir = Path(index_dir)
    with blame("index_dir"):
        try:
            manifest = read_manifest(index_dir)
            if manifest is None:
                raise NotFound(f"{index_dir} has no {MANIFEST_FILE}; build it with dino-scale index")
            info = manifest["index"]
            if not info:
                raise InputError(
                    f"{index_dir}: the index run did not finish; run the same dino-scale index command again"
                )
            shard_rows = _committed_rows(index_dir, manifest)
            index = _load_faiss_file(index_dir, info, manifest["dim"])
            rows = _load_rows_file(index_dir, info, shard_rows)
            whitening = load_whitening(index_dir, manifest["whitening"]) if manifest["whitening"] else None
        except DamagedIndex as error:
            raise DamagedIndex(
                f"{error}; run the dino-scale index command that built {index_dir} again to repair it"
            ) from None
    return OpenIndex(index_dir, manifest, index, rows, shard_rows, whitening)


def recorded_model(manifest: dict[str, Any], index_dir: Path) -> str:
    """The model an index was built with (its manifest's ``model.path``); NotFound blaming ``model`` when it is
    gone."""
    recorded = manifest["model"]
    if not Path(recorded["path"]).exists():
        raise NotFound(
            f"the model {recorded['path']} that {index_dir} was built with is gone; name one with the same weights "
            f"(sha256 {recorded['sha256'][:16]}…)",
            argument="model",
        )
    return recorded["path"]


def query_model(opened: OpenIndex, model: str | None, device: str = "auto") -> EmbeddingModel:
    """The model the index was built with (or ``model``, which must have the same weights), at the index's size."""
    recorded = opened.manifest["model"]
    path = model or recorded_model(opened.manifest, opened.path)
    embedding_model = load_embedding_model(
        path,
        ImageSize(recorded["image_size"], f"the size the index was built at: {opened.path}"),
        check_descriptor(opened.manifest["descriptor"]),
        which=recorded.get("which", "teacher"),
        device=device,
    )
    check_model(opened.manifest, embedding_model, opened.path)
    return embedding_model


def search_images(
    index_dir: str | Path,
    query: str | Path,
    k: int = 10,
    model: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    progress: bool = False,
    echo: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Embed ``query`` (an image file or a folder of them) and return each one's k nearest indexed images;
    ``echo`` gets the line saying the image size."""
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}", argument="k")
    opened = open_index(index_dir)
    embedding_model = query_model(opened, model, device)
    echo(embedding_model.size_line())
    query = Path(query)
    if query.is_dir():
        items, _ = list_image_files(query)
    elif query.is_file():
        items = [ImageItem(key=str(query.resolve()), path=str(query.resolve()))]
    else:
        raise NotFound(f"{query} does not exist", argument="query")
    if not items:
        raise InputError(f"no image files in {query}", argument="query")
    results: list[dict[str, Any]] = []
    descriptor = opened.manifest["descriptor"]
    for batch in embed(embedding_model, items, descriptor, opened.whitening, batch_size, workers, progress=progress):
        for index, reason in batch.skipped:
            results.append({"query": items[index].path, "error": reason, "neighbours": []})
        if not batch.indices:
            continue
        scores, ids = vector_index.search(opened.index, batch.vectors, k)
        for row, index in enumerate(batch.indices):
            neighbours = [
                {"rank": rank + 1, "score": float(score), **_public_meta(opened.meta(int(i)))}
                for rank, (score, i) in enumerate(zip(scores[row], ids[row], strict=True))
                if i >= 0
            ]
            results.append({"query": items[index].path, "neighbours": neighbours})
    order = {item.path: n for n, item in enumerate(items)}
    results.sort(key=lambda r: order[r["query"]])
    return {"index": str(opened.path), "model": embedding_model.describe(), "k": k, "results": results}


def _public_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {key: meta[key] for key in ("path", "key", "sha256", "bytes", "width", "height", "label") if key in meta}


def find_duplicates(index_dir: str | Path, threshold: float, k: int = 20) -> dict[str, Any]:
    """Groups of near-duplicate images: connected components of the graph whose edges join two indexed images
    with cosine similarity >= ``threshold`` (each image's ``k`` nearest neighbours are examined)."""
    if not -1.0 <= threshold <= 1.0:
        raise InputError(f"threshold is a cosine similarity in [-1, 1], got {threshold}", argument="threshold")
    if k < 2:
        raise InputError(f"k must be >= 2, got {k}", argument="k")
    opened = open_index(index_dir)
    vectors = opened.vectors()
    n = len(vectors)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs: list[tuple[int, int, float]] = []
    for start in range(0, n, 4096):
        scores, ids = vector_index.search(opened.index, vectors[start : start + 4096], min(k, n))
        for offset in range(len(ids)):
            i = start + offset
            for score, j in zip(scores[offset], ids[offset], strict=True):
                if j > i and score >= threshold:  # each pair once; j < i was (or will be) seen from j's side
                    pairs.append((i, int(j), float(score)))
                    parent[root(int(j))] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    by_group: dict[int, list[tuple[int, int, float]]] = {}
    for i, j, score in pairs:
        by_group.setdefault(root(i), []).append((i, j, score))
    found = []
    for group_root, members in groups.items():
        if len(members) < 2:
            continue
        edges = by_group.get(group_root, [])
        found.append(
            {
                "size": len(members),
                "members": [opened.meta(i)["key"] for i in members],
                "min_score": min(s for _, _, s in edges),
                "pairs": [[opened.meta(i)["key"], opened.meta(j)["key"], round(s, 6)] for i, j, s in edges],
            }
        )
    found.sort(key=lambda g: (-g["size"], g["members"][0]))
    return {
        "index": str(opened.path),
        "threshold": threshold,
        "images": n,
        "groups": found,
        "duplicates": sum(g["size"] - 1 for g in found),
    }
