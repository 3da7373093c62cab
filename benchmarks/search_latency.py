"""Single-query search latency and recall@k of ``dino_scale.retrieval.vector_index`` indexes.

Product target: p50 <= 5 ms per query on CPU with an approximate index over 1M x 384 random unit vectors, with
recall@10 >= 0.95 reported beside it.

Method: seeded random unit vectors (float32) as the database; queries are fresh vectors from the same distribution.
The index is built with ``vector_index.build_index``; exact top-k ground truth comes from ``faiss.IndexFlatIP``
(batched). Each query is then searched alone (batch of 1, ``vector_index.search``, so input validation is included),
timed with ``time.perf_counter`` after a warm-up on separate queries, for every search-parameter setting of the sweep.

``--data random`` (default) draws uniformly on the sphere. That is the worst case for every approximate index: in 384
dimensions all points are almost equally far apart (the 1st and the 100th neighbour of a query differ by ~0.03 in
cosine), so a graph or a partition has no structure to exploit and recall costs nearly linear work. ``--data
clustered`` (vectors scattered around N/100 random centres) is closer to real image descriptors, which live near a
low-dimensional manifold.

Usage:
    python benchmarks/search_latency.py --num-vectors 1000000 --dim 384 --queries 1000 --index-type hnsw \\
        --ef-search 64 128 256 512 1024 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dino_scale.retrieval import vector_index  # noqa: E402


def unit_vectors(num: int, dim: int, rng: np.random.Generator, chunk: int = 100_000) -> np.ndarray:
    """``num`` uniform random unit vectors, generated in chunks to keep float64 temporaries small."""
    out = np.empty((num, dim), np.float32)
    for start in range(0, num, chunk):
        block = rng.standard_normal((min(chunk, num - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def clustered_vectors(
    num: int, centres: np.ndarray, rng: np.random.Generator, spread: float, chunk: int = 100_000
) -> np.ndarray:
    """Unit vectors scattered around ``centres``: noise of norm ~``spread`` added to a random centre, renormalised."""
    dim = centres.shape[1]
    out = np.empty((num, dim), np.float32)
    for start in range(0, num, chunk):
        size = min(chunk, num - start)
        block = centres[rng.integers(0, len(centres), size)]
        block = block + spread / np.sqrt(dim) * rng.standard_normal((size, dim), dtype=np.float32)
        out[start : start + size] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def make_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(database, timed queries, warm-up queries), all seeded."""
    rng = np.random.default_rng(args.seed)
    total = args.num_vectors + args.queries + args.warmup
    if args.data == "random":
        data = unit_vectors(total, args.dim, rng)
    else:
        centres = unit_vectors(max(1, args.num_vectors // 100), args.dim, rng)
        data = clustered_vectors(total, centres, rng, args.spread)
    base, queries = data[: args.num_vectors], data[args.num_vectors : args.num_vectors + args.queries]
    return base, queries, data[args.num_vectors + args.queries :]


def ground_truth(base: np.ndarray, queries: np.ndarray, k: int, batch: int = 256) -> np.ndarray:
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    return np.concatenate([flat.search(queries[i : i + batch], k)[1] for i in range(0, len(queries), batch)])


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k found in the returned top-k."""
    hits = [np.intersect1d(f[f >= 0], t).size for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / truth.shape[1]


def time_queries(index: faiss.Index, queries: np.ndarray, warmup: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-query seconds, ids [Q, k]) for one query at a time."""
    for query in warmup:
        vector_index.search(index, query[None], k)
    seconds = np.empty(len(queries))
    ids = np.empty((len(queries), k), np.int64)
    for i, query in enumerate(queries):
        start = time.perf_counter()
        _, found = vector_index.search(index, query[None], k)
        seconds[i] = time.perf_counter() - start
        ids[i, : found.shape[1]] = found[0]
    return seconds, ids


def sweep_settings(args: argparse.Namespace, kind: str) -> list[dict[str, int]]:
    """The search-parameter settings to time: one row per ef_search (hnsw), per (nprobe, k_factor) (ivfpq)."""
    if kind == "hnsw":
        return [{"ef_search": ef} for ef in args.ef_search or [vector_index.DEFAULT_EF_SEARCH]]
    if kind == "ivfpq":
        nprobes = args.nprobe or [vector_index.DEFAULT_NPROBE]
        k_factors = args.k_factor or [vector_index.DEFAULT_K_FACTOR]
        return [{"nprobe": n, "k_factor": f} for n, f in product(nprobes, k_factors)]
    return [{}]


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000, help="timed single queries")
    parser.add_argument("--warmup", type=int, default=50, help="untimed queries before each setting")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--data", choices=("random", "clustered"), default="random")
    parser.add_argument("--spread", type=float, default=1.0, help="clustered data: noise norm around a centre")
    parser.add_argument("--index-type", choices=vector_index.INDEX_TYPES, default="hnsw")
    parser.add_argument("--hnsw-m", type=int, default=vector_index.DEFAULT_HNSW_M)
    parser.add_argument("--ef-construction", type=int, default=vector_index.DEFAULT_EF_CONSTRUCTION)
    parser.add_argument("--ef-search", type=int, nargs="+", help="hnsw: values to sweep")
    parser.add_argument("--nlist", type=int)
    parser.add_argument("--pq-m", type=int)
    parser.add_argument("--nprobe", type=int, nargs="+", help="ivfpq: values to sweep")
    parser.add_argument("--k-factor", type=int, nargs="+", help="ivfpq: values to sweep")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="faiss threads for build/ground truth")
    parser.add_argument(
        "--search-threads",
        type=int,
        default=1,
        help="faiss threads while timing; faiss parallelises over queries, so a batch of 1 gains nothing from more "
        "and pays the OpenMP fork/join",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-index", type=Path, help="save the built index (re-run sweeps with --load-index)")
    parser.add_argument("--load-index", type=Path, help="skip the build: load an index built from the same data")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args(argv)

    faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()
    base, queries, warmup = make_data(args)
    print(f"data: {args.data} {base.shape} float32, {len(queries)} queries ({time.perf_counter() - started:.1f} s)")

    started = time.perf_counter()
    truth = ground_truth(base, queries, args.k)
    print(f"exact ground truth (IndexFlatIP, {args.threads} threads): {time.perf_counter() - started:.1f} s")

    build_seconds = None
    if args.load_index:
        index = vector_index.load_index(args.load_index)
        if (index.ntotal, index.d) != base.shape:
            parser.error(f"{args.load_index} holds {index.ntotal} x {index.d} vectors, the data is {base.shape}")
        print(f"loaded {args.load_index}")
    else:
        started = time.perf_counter()
        index = vector_index.build_index(
            base,
            args.index_type,
            hnsw_m=args.hnsw_m,
            ef_construction=args.ef_construction,
            nlist=args.nlist,
            pq_m=args.pq_m,
            seed=args.seed,
        )
        build_seconds = time.perf_counter() - started
        print(f"build ({args.threads} threads): {build_seconds:.1f} s")
        if args.save_index:
            vector_index.save_index(index, args.save_index)
    description = vector_index.describe_index(index)
    print("index:", json.dumps(description))
    del base  # the index holds its own copy

    faiss.omp_set_num_threads(args.search_threads)
    rows = []
    header = f"{'setting':>24} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'QPS':>8} {'recall@' + str(args.k):>10}"
    print(header)
    for setting in sweep_settings(args, description["type"]):
        vector_index.set_search_params(index, **setting)
        seconds, ids = time_queries(index, queries, warmup, args.k)
        ms = seconds * 1e3
        row = {
            **setting,
            "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)),
            "qps": float(len(seconds) / seconds.sum()),
            f"recall@{args.k}": recall_at_k(ids, truth),
        }
        rows.append(row)
        label = " ".join(f"{name}={value}" for name, value in setting.items()) or "exact"
        print(
            f"{label:>24} {row['p50_ms']:8.2f} {row['p90_ms']:8.2f} {row['p99_ms']:8.2f} {row['qps']:8.0f} "
            f"{row[f'recall@{args.k}']:10.3f}",
            flush=True,
        )

    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "data": args.data,
        "num_vectors": args.num_vectors,
        "dim": args.dim,
        "queries": args.queries,
        "threads": args.threads,
        "search_threads": args.search_threads,
        "index": description,
        "build_seconds": build_seconds,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
