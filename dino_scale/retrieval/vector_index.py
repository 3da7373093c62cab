"""The faiss index layer behind ``dino-scale index`` / ``search`` / ``dedup``.

Vectors are L2-normalised float32 image descriptors, so every index here uses the inner-product metric and a score
is a cosine similarity. Three index types:

* ``flat``  -- ``IndexFlatIP``: exact, no training, memory = N * d * 4 bytes. Used below ``EXACT_LIMIT`` vectors,
  where a single query still costs at most ~13 ms (100k x 384 on 2 CPU cores, benchmarks/RESULTS.md).
* ``hnsw``  -- ``IndexHNSWFlat``: graph search over the full float vectors. No training, but slow to build: every
  vector is inserted with a graph search of width ``ef_construction`` (1M x 384: ~15 min on 2 cores).
* ``ivfpq`` -- ``IndexIVFPQ`` candidates re-ranked exactly by ``IndexRefineFlat``. Builds ~4x faster than hnsw
  (k-means on a sample, then one assignment pass); PQ distances alone are too coarse for good recall@10, hence the
  re-rank. The refine stage keeps the float vectors, so it saves no memory over hnsw.

Search-time parameters (``ef_search`` for hnsw, ``nprobe`` and ``k_factor`` for ivfpq) are stored by faiss inside
the index file and come back with :func:`load_index` (checked by the tests). :func:`describe_index` records them too,
so that the manifest says which parameters produced a result, and ``set_search_params(index, **search_params_of(
description))`` re-applies a recorded configuration to any index of the same type.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dino_scale.errors import InputError, NotFound
from dino_scale.io import atomic_write

INDEX_TYPES = ("auto", "flat", "hnsw", "ivfpq")
EXACT_LIMIT = 100_000  # below this many vectors "auto" picks exact search
SEARCH_PARAMS = ("ef_search", "nprobe", "k_factor")

# HNSW defaults, chosen from measurements on 1M x 384 vectors on a 2-core CPU (benchmarks/search_latency.py, table in
# benchmarks/RESULTS.md). M=32 with efConstruction=80 builds 1M vectors in ~15 min on 2 cores; M=48 (efConstruction
# 64) took 18 min for no better recall/latency trade-off at 1M, and efConstruction >= 100 would take the 1M build past
# ~20 min for a few points of recall (measured at 100k). M=16 is clearly worse at 100k. ef_search=128 keeps p50 under
# 5 ms even on uniformly random vectors (the worst case, ~2.7 ms) and gives recall@10 0.998 on clustered data; on
# uniformly random vectors no setting reaches recall@10 0.95 within 5 ms (0.62 at ef_search=4096, 57 ms), so callers
# who need more recall raise ef_search with set_search_params.
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 80
DEFAULT_EF_SEARCH = 128

# IVF-PQ defaults: the coarse quantizer is only a filter, so nprobe is generous; k_factor * k candidates go to the
# exact re-rank, which costs k_factor * k dot products per query -- cheap next to the list scan.
DEFAULT_NPROBE = 64
DEFAULT_K_FACTOR = 16
_MIN_TRAIN_PER_CENTROID = 39  # faiss warns below 39 training points per k-means centroid
_MIN_IVFPQ_VECTORS = 1_000  # below this there is nothing to gain and too little to train k-means and PQ on
_MAX_TRAIN_POINTS = 256 * 1024  # k-means quality saturates well before this; training time does not


def choose_index_type(num_vectors: int, requested: str = "auto") -> str:
    """The index type to build for ``num_vectors`` vectors: ``requested`` itself unless it is ``"auto"``, in which case
    ``"flat"`` (exact) below :data:`EXACT_LIMIT` vectors and ``"hnsw"`` from there on."""
    if requested not in INDEX_TYPES:
        raise InputError(f"unknown index type {requested!r}; expected one of {', '.join(INDEX_TYPES)}")
    if isinstance(num_vectors, bool) or not isinstance(num_vectors, (int, np.integer)) or num_vectors < 0:
        raise InputError(f"num_vectors must be a non-negative integer, got {num_vectors!r}")
    if requested != "auto":
        return requested
    return "flat" if num_vectors < EXACT_LIMIT else "hnsw"


def _as_float32_matrix(array: Any, what: str) -> np.ndarray:
    """``array`` as a C-contiguous float32 [N, d] matrix with N, d > 0 and only finite values, else a ValueError that
    says what is wrong with it."""
    if not isinstance(array, np.ndarray):
        raise InputError(f"{what} must be a numpy array, got {type(array).__name__}")
    if array.ndim != 2:
        raise InputError(f"{what} must be a 2-D array [num_vectors, dim], got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{what} is empty: shape {array.shape}")
    # Integer or bool input is almost always a bug upstream (ids or masks passed as features), so it is refused
    # rather than silently cast; float16/float64 are widened/narrowed to the float32 that faiss takes.
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{what} must have a floating-point dtype, got {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise InputError(f"{what} has {bad.size} row(s) with NaN or infinite values (rows {shown})")
    return array


def _default_nlist(num_vectors: int) -> int:
    # ~4 sqrt(N) lists (the usual faiss guidance), but never so many that k-means would have fewer than 39 training
    # points per centroid, which leaves empty or degenerate lists.
    return max(1, min(int(4 * math.sqrt(num_vectors)), num_vectors // _MIN_TRAIN_PER_CENTROID, 65_536))


def _default_pq_m(dim: int) -> int:
    # 8 dimensions per sub-quantizer (48 bytes for d=384): coarse, but the exact re-rank recovers the ordering. It
    # must divide d, so take the largest divisor of d not above d/8 (1 for tiny d).
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def build_index(
    vectors: np.ndarray,
    index_type: str = "auto",
    *,
    hnsw_m: int = DEFAULT_HNSW_M,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
    ef_search: int = DEFAULT_EF_SEARCH,
    nlist: int | None = None,
    pq_m: int | None = None,
    nprobe: int = DEFAULT_NPROBE,
    k_factor: int = DEFAULT_K_FACTOR,
    seed: int = 0,
) -> faiss.Index:
    """An inner-product index over ``vectors`` [N, d] (L2-normalised; ids are row numbers 0..N-1).

    ``index_type`` is resolved by :func:`choose_index_type`. ``hnsw_m`` / ``ef_construction`` / ``ef_search`` apply to
    hnsw; ``nlist`` (default ~4 sqrt(N)), ``pq_m`` (sub-quantizers, must divide d; default d/8 or the nearest divisor
    below), ``nprobe`` and ``k_factor`` to ivfpq. ``seed`` fixes the ivfpq training sample and k-means; an hnsw build
    on more than one thread is not bit-reproducible (insertion order races), though its recall is.
    """
    vectors = _as_float32_matrix(vectors, "vectors")
    num_vectors, dim = vectors.shape
    kind = choose_index_type(num_vectors, index_type)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        _check_positive(hnsw_m=hnsw_m, ef_construction=ef_construction)
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    else:
        index = _build_ivfpq(vectors, nlist, pq_m, seed)
    set_search_params(index, ef_search=ef_search, nprobe=nprobe, k_factor=k_factor)
    index.add(vectors)
    return index


def _build_ivfpq(vectors: np.ndarray, nlist: int | None, pq_m: int | None, seed: int) -> faiss.Index:
    num_vectors, dim = vectors.shape
    if num_vectors < _MIN_IVFPQ_VECTORS:
        raise InputError(f"ivfpq needs at least {_MIN_IVFPQ_VECTORS} vectors to train, got {num_vectors}; use flat")
    nlist = _default_nlist(num_vectors) if nlist is None else nlist
    pq_m = _default_pq_m(dim) if pq_m is None else pq_m
    _check_positive(nlist=nlist, pq_m=pq_m)
    if nlist > num_vectors:
        raise InputError(f"nlist={nlist} exceeds the number of vectors ({num_vectors})")
    if dim % pq_m:
        raise InputError(f"pq_m={pq_m} must divide the vector dimension {dim}")
    # 8-bit codes (256 centroids per sub-quantizer) need a few thousand training points; small sets get fewer bits
    # instead of a k-means with more centroids than points.
    nbits = min(8, int(math.log2(num_vectors // _MIN_TRAIN_PER_CENTROID)))
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    ivf.pq.cp.seed = seed
    train = vectors
    if num_vectors > _MAX_TRAIN_POINTS:
        rows = np.random.default_rng(seed).choice(num_vectors, _MAX_TRAIN_POINTS, replace=False)
        train = vectors[np.sort(rows)]
    ivf.train(train)
    # IndexRefineFlat keeps a flat copy of the vectors and re-scores the k * k_factor best PQ candidates exactly.
    return faiss.IndexRefineFlat(ivf)


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")


def _unwrap(index: faiss.Index) -> tuple[str, faiss.Index]:
    """(type name, the concrete faiss object whose parameters matter) for an index built by :func:`build_index`."""
    index = faiss.downcast_index(index)
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        # Scores would be L2 distances (smaller = better) and every threshold downstream would be inverted.
        raise InputError(f"index uses metric {index.metric_type}, not inner product: {type(index).__name__}")
    if isinstance(index, faiss.IndexHNSWFlat):
        return "hnsw", index
    if isinstance(index, faiss.IndexRefineFlat):
        base = faiss.downcast_index(index.base_index)
        if isinstance(base, faiss.IndexIVFPQ):
            return "ivfpq", index
    elif isinstance(index, faiss.IndexFlatIP):
        return "flat", index
    raise InputError(f"not an index built by build_index: {type(index).__name__}")


def set_search_params(
    index: faiss.Index, ef_search: int | None = None, nprobe: int | None = None, k_factor: int | None = None
) -> None:
    """Set the search-time parameters that apply to this index type and ignore the rest (``None`` = leave as is):
    ``ef_search`` for hnsw; ``nprobe`` (lists scanned, capped at nlist) and ``k_factor`` (candidates re-ranked per
    result) for ivfpq; nothing for flat. Ignoring inapplicable ones lets a caller pass one recorded configuration to
    any index."""
    given = {"ef_search": ef_search, "nprobe": nprobe, "k_factor": k_factor}
    _check_positive(**{name: value for name, value in given.items() if value is not None})
    kind, concrete = _unwrap(index)
    if kind == "hnsw" and ef_search is not None:
        concrete.hnsw.efSearch = int(ef_search)
    elif kind == "ivfpq":
        if nprobe is not None:
            ivf = faiss.downcast_index(concrete.base_index)
            ivf.nprobe = int(min(nprobe, ivf.nlist))
        if k_factor is not None:
            concrete.k_factor = float(k_factor)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best matches of each query: (scores float32 [Q, k], ids int64 [Q, k]), best first.

    ``k`` is clipped to the number of indexed vectors. An approximate index can still return fewer than ``k`` hits for
    a query (hnsw with a small ``ef_search``, ivfpq when the probed lists hold fewer than ``k`` vectors); the missing
    slots are always at the end of the row, with id ``-1`` and score ``-inf``, so that a caller can mask with
    ``ids >= 0`` and thresholds on scores never accept them.
    """
    queries = _as_float32_matrix(queries, "queries")
    if queries.shape[1] != index.d:
        raise InputError(f"queries have dimension {queries.shape[1]}, the index has {index.d}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    k = int(min(k, index.ntotal))
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    scores, ids = index.search(queries, k)
    # faiss pads with id -1 and a score of -FLT_MAX (or +inf for some paths); normalise to -inf.
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    scores[ids < 0] = -np.inf
    return scores, ids


def describe_index(index: faiss.Index) -> dict[str, Any]:
    """The index's type, size and parameters as JSON-ready values, for the index manifest.

    hnsw adds ``hnsw_m``, ``ef_construction``, ``ef_search``; ivfpq adds ``nlist``, ``pq_m``, ``pq_nbits``,
    ``nprobe``, ``k_factor``. ``search_params_of(description)`` extracts the search-time part for
    :func:`set_search_params`."""
    kind, concrete = _unwrap(index)
    description: dict[str, Any] = {
        "type": kind,
        "num_vectors": int(index.ntotal),
        "dim": int(index.d),
        "metric": "inner_product",
    }
    if kind == "hnsw":
        hnsw = concrete.hnsw
        # Level 0 holds 2*M links per node, the upper levels M; nb_neighbors(1) recovers M from a loaded index.
        description.update(
            hnsw_m=int(hnsw.nb_neighbors(1)), ef_construction=int(hnsw.efConstruction), ef_search=int(hnsw.efSearch)
        )
    elif kind == "ivfpq":
        ivf = faiss.downcast_index(concrete.base_index)
        description.update(
            nlist=int(ivf.nlist),
            pq_m=int(ivf.pq.M),
            pq_nbits=int(ivf.pq.nbits),
            nprobe=int(ivf.nprobe),
            k_factor=int(concrete.k_factor),
        )
    return description


def search_params_of(description: dict[str, Any]) -> dict[str, int]:
    """The search-time parameters in a :func:`describe_index` result, as keyword arguments for
    :func:`set_search_params`."""
    return {name: int(description[name]) for name in SEARCH_PARAMS if name in description}


def write_faiss(path: str | Path, write: Callable[[Any], None], needed: int | None = None) -> str:
    """Atomically write a faiss object to ``path`` (dino_scale.io.atomic_write); returns the sha256 of its bytes.

    ``write(writer)`` serialises into a faiss IOWriter, e.g. ``lambda w: faiss.write_index(index, w)``. The bytes go
    through a Python file object rather than faiss's own FILE* writer, which reports a full disk late (at fclose, as
    an error raised by some later, unrelated faiss call) or not at all, leaving a truncated file behind: here a
    failed write raises the OSError itself, which atomic_write turns into a WriteFailed naming ``path`` after
    removing the temporary file. ``needed``: the size expected, for that message.
    """
    digest = hashlib.sha256()

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:

            def put(chunk: bytes) -> int:
                f.write(chunk)
                digest.update(chunk)
                return len(chunk)

            write(faiss.PyCallbackIOWriter(put))

    atomic_write(path, to_file, needed=needed)
    return digest.hexdigest()


def save_index(index: faiss.Index, path: str | Path) -> str:
    """Write ``index`` to ``path`` atomically: a crash or error mid-write leaves any previous file at ``path`` intact.
    Returns the sha256 of the file written.

    The index is written to a temporary file in the same directory (so that the final rename cannot cross file
    systems), fsynced, then moved over ``path`` with ``os.replace``; the directory is fsynced so the rename itself
    survives a power loss. The file gets the usual umask-derived permissions, unlike ``tempfile.mkstemp``'s 0600,
    because indexes are read by other processes and users (serving, dedup jobs). A failed write (a full disk) raises
    dino_scale.errors.WriteFailed naming ``path``; no temporary file is left.
    """
    needed = int(index.ntotal) * int(index.d) * 4
    return write_faiss(path, lambda writer: faiss.write_index(index, writer), needed=needed)


def faiss_reason(error: BaseException) -> str:
    """The gist of a faiss exception, on one line: its C++ location and the file name faiss repeats dropped."""
    lines = str(error).strip().splitlines()
    text = lines[-1] if lines else type(error).__name__
    if "read error in" in text:  # "Error: 'ret == (1)' failed: read error in F: 0 != 1 (<a stale errno>)"
        return "the file ends too early (truncated or empty)"
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)
    return re.sub(r" in \S+$", "", text) or type(error).__name__


def load_index(path: str | Path) -> faiss.Index:
    """Read an index written by :func:`save_index`. FileNotFoundError if ``path`` does not exist; ValueError naming
    ``path`` if it is not a faiss index (faiss itself raises a bare RuntimeError) or not one of our index types."""
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise InputError(f"{path} is not a file")
        raise NotFound(f"faiss index not found: {path}")
    try:
        index = faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as error:  # a crafted header can ask for any amount of memory
        raise InputError(f"{path} is not a readable faiss index: {faiss_reason(error)}") from None
    try:
        _unwrap(index)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from error
    # read_index already returns the concrete class; a downcast_index() copy would not own the C++ object, which is
    # freed with `index` when this function returns (use after free).
    return index
