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
ends with exactly the rows an uninterrupted run writes. Adding images later embeds only the new ones; a file
that changed is embedded again and its newer row replaces the older one in the faiss index.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dino_scale.data.items import ImageItem, list_image_files, list_shard_items
from dino_scale.errors import InputError, NotFound, blame
from dino_scale.io import atomic_write, atomic_write_json, atomic_write_text, file_sha256
from dino_scale.retrieval import vector_index
from dino_scale.retrieval.embed import (
    EmbeddedBatch,
    EmbeddingModel,
    Whitening,
    check_descriptor,
    embed,
    learn_whitening,
    load_embedding_model,
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def read_manifest(index_dir: str | Path) -> dict[str, Any] | None:
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise InputError(f"{path} is not valid JSON: {error}") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise InputError(f"{path}: unsupported manifest_version {manifest.get('manifest_version')!r}")
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


def _default_out(model: EmbeddingModel) -> Path:
    name = model.path.stem if model.path.is_file() else model.path.name
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


def _committed_rows(index_dir: Path, manifest: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The metadata lines of every committed shard, in shard order."""
    rows = []
    for shard in manifest["shards"]:
        path = index_dir / EMBEDDINGS_DIR / shard["meta"]
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) != shard["rows"]:
            raise InputError(f"{path} has {len(lines)} rows, the manifest says {shard['rows']}; the index is damaged")
        rows.append([json.loads(line) for line in lines])
    return rows


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
    shards = [np.load(index_dir / EMBEDDINGS_DIR / s["vectors"], mmap_mode="r") for s in manifest["shards"]]
    if len(rows) == 0:
        return np.zeros((0, manifest["dim"]), np.float32)
    return np.stack([shards[s][r] for s, r in rows]).astype(np.float32)


def _learn_whitening(
    options: IndexOptions, model: EmbeddingModel, descriptor: str, path: Path, echo: Callable[[str], None]
) -> dict[str, Any]:
    echo(f"learning PCA whitening on the images of {options.whiten_on}")
    with blame("whiten_on"):
        whitening, images, skipped = learn_whitening(
            model,
            options.whiten_on,
            descriptor,
            options.whiten_dim,
            batch_size=options.batch_size,
            workers=options.workers,
            progress=options.progress,
        )
    whitening.save(path)
    return {
        "file": path.name,
        "sha256": file_sha256(path),
        "learned_on": str(options.whiten_on),
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
    """An index folder being built: its manifest (the commit point), its committed rows, and its log."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path, self.manifest = path, manifest
        path.mkdir(parents=True, exist_ok=True)
        (path / EMBEDDINGS_DIR).mkdir(exist_ok=True)
        self.shard_rows = _committed_rows(path, manifest)

    @classmethod
    def open(cls, options: IndexOptions, echo: Callable[[str], None]) -> tuple[IndexFolder, EmbeddingModel]:
        """The folder the options name (or index/<model name>), created or checked against the model, descriptor
        and whitening asked for; and the embedding model."""
        out_given = options.out is not None
        manifest = read_manifest(options.out) if out_given else None
        descriptor = options.descriptor or (manifest["descriptor"] if manifest else "cls")
        with blame("descriptor"):
            outputs = check_descriptor(descriptor)
        model = load_embedding_model(
            options.model,
            options.image_size or (manifest["model"]["image_size"] if manifest else None),
            outputs,
            device=options.device,
        )
        if options.model is None:
            echo(f"model: {model.path} (newest in export/)")
        path = Path(options.out) if out_given else _default_out(model)
        if not out_given:
            echo(f"index: {path}")
            manifest = read_manifest(path)
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
        return cls(path, manifest), model

    def whitening(self, options: IndexOptions, model: EmbeddingModel, echo: Callable[[str], None]) -> Whitening | None:
        """The folder's whitening: learned on ``--whiten-on`` the first time it is asked for, then the stored one."""
        if options.whiten_on is not None and self.manifest["whitening"] is None:
            descriptor = self.manifest["descriptor"]
            self.manifest["whitening"] = _learn_whitening(options, model, descriptor, self.path / WHITENING_FILE, echo)
            self.write_manifest()
        if self.manifest["whitening"] is None:
            return None
        return Whitening.load(self.path / self.manifest["whitening"]["file"])

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
        """Write one shard of rows (vectors, then metadata), then the manifest that lists it: the commit point."""
        number = len(self.manifest["shards"])
        names = {"vectors": f"emb-{number:06d}.npy", "meta": f"emb-{number:06d}.jsonl"}
        _save_npy(self.path / EMBEDDINGS_DIR / names["vectors"], vectors.astype(np.float16))
        _write_jsonl(self.path / EMBEDDINGS_DIR / names["meta"], meta)
        self.manifest["shards"].append({**names, "rows": len(meta)})
        self.manifest["dim"] = int(vectors.shape[1])
        self.manifest["updated"] = _now()
        self.write_manifest()
        self.shard_rows.append(meta)
        self.log({"shard": number, "rows": len(meta), **progress})

    def report_skipped(self, skipped: list[dict[str, str]], echo: Callable[[str], None]) -> None:
        _write_jsonl(self.path / SKIPPED_FILE, skipped)
        if skipped:
            echo(f"skipped {len(skipped)} unreadable image(s) (listed with reasons in {self.path / SKIPPED_FILE}):")
            for entry in skipped[:10]:
                echo(f"  {entry['key']}: {entry['reason']}")

    def update_faiss(self, index_type: str | None, echo: Callable[[str], None]) -> dict[str, Any]:
        """Bring index.faiss up to the committed rows (the index type asked for, else the folder's) and record it."""
        self.manifest["index_type"] = index_type or self.manifest.get("index_type", "auto")
        self.manifest["index"] = _update_faiss(
            self.path, self.manifest, self.shard_rows, self.manifest["index_type"], echo
        )
        self.manifest["updated"] = _now()
        self.write_manifest()
        return self.manifest["index"]

    def write_manifest(self) -> None:
        atomic_write_json(self.path / MANIFEST_FILE, self.manifest)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


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
    type stays, otherwise rebuild from the stored vectors (so the index always equals a fresh build's content)."""
    rows = live_rows(shard_rows)
    wanted = vector_index.choose_index_type(len(rows), requested_type)
    previous = manifest.get("index")
    faiss_path, rows_path = index_dir / FAISS_FILE, index_dir / ROWS_FILE
    if previous is not None and faiss_path.is_file() and rows_path.is_file():
        old_rows = np.load(rows_path)
        same_prefix = len(old_rows) <= len(rows) and np.array_equal(old_rows, rows[: len(old_rows)])
        if previous["type"] == wanted and same_prefix and previous.get("num_vectors") == len(old_rows):
            if len(old_rows) == len(rows):
                return previous
            index = vector_index.load_index(faiss_path)
            # A run interrupted between saving index.faiss and index_rows.npy leaves them disagreeing: rebuild.
            if index.ntotal == len(old_rows):
                index.add(load_vectors(index_dir, manifest, rows[len(old_rows) :]))
                echo(f"added {len(rows) - len(old_rows)} vector(s) to the {wanted} index")
                return _save_faiss(index, rows, index_dir, wanted)
    echo(f"building a {wanted} index over {len(rows)} vector(s)")
    index = vector_index.build_index(load_vectors(index_dir, manifest, rows), wanted)
    return _save_faiss(index, rows, index_dir, wanted)


def _save_faiss(index: Any, rows: np.ndarray, index_dir: Path, index_type: str) -> dict[str, Any]:
    vector_index.save_index(index, index_dir / FAISS_FILE)
    _save_npy(index_dir / ROWS_FILE, rows)
    return {"file": FAISS_FILE, "rows_file": ROWS_FILE, **vector_index.describe_index(index), "type": index_type}


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
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    if manifest is None:
        raise NotFound(f"{index_dir} has no {MANIFEST_FILE}; build it with dino-scale index", argument="index_dir")
    info = manifest.get("index")
    if not info:
        raise InputError(
            f"{index_dir}: the index run did not finish; run the same dino-scale index command again",
            argument="index_dir",
        )
    index = vector_index.load_index(index_dir / info["file"])
    rows = np.load(index_dir / info["rows_file"])
    if index.ntotal != info["num_vectors"] or len(rows) != info["num_vectors"]:
        raise InputError(
            f"{index_dir}: the faiss index holds {index.ntotal} vectors, the manifest {info['num_vectors']}; an index "
            "run was interrupted while saving: run the same dino-scale index command again"
        )
    whitening = Whitening.load(index_dir / manifest["whitening"]["file"]) if manifest.get("whitening") else None
    return OpenIndex(index_dir, manifest, index, rows, _committed_rows(index_dir, manifest), whitening)


def query_model(opened: OpenIndex, model: str | None, device: str = "auto") -> EmbeddingModel:
    """The model the index was built with (or ``model``, which must have the same weights)."""
    recorded = opened.manifest["model"]
    path = model or recorded["path"]
    if model is None and not Path(path).exists():
        raise NotFound(
            f"the model {path} that {opened.path} was built with is gone; name one with the same weights (sha256 "
            f"{recorded['sha256'][:16]}…)",
            argument="model",
        )
    embedding_model = load_embedding_model(
        path,
        recorded["image_size"],
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
) -> dict[str, Any]:
    """Embed ``query`` (an image file or a folder of them) and return each one's k nearest indexed images."""
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}", argument="k")
    opened = open_index(index_dir)
    embedding_model = query_model(opened, model, device)
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
