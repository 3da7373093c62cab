"""`dino-scale eval copy-detection` (paper §4.2.2, Copydays "strong"): each query is a strongly edited copy of a
database image; the database is every image, so all but the original are distractors. With one true match per
query, ``AP(q) = 1 / rank of its original`` and mAP is their mean. micro-AP pools the (query, database image) pairs
of all queries into one list ranked by similarity and takes the average precision of the true pairs in it, so one
threshold has to work for every query (the DISC 2021 metric)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np

from dino_scale.data.items import ImageItem, list_image_files, list_image_source
from dino_scale.errors import InputError, blame
from dino_scale.eval.reports import write_report
from dino_scale.retrieval.embed import check_descriptor, embed, embed_all, learn_whitening, load_embedding_model

# Pairs beyond this many are too many to rank exactly for micro-AP; each query then contributes its top 100.
_MICRO_AP_MAX_PAIRS = 20_000_000


def ranks_of_originals(similarity: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """1-based rank of each query's original among all database images (ties count against it)."""
    positive_scores = similarity[np.arange(len(positives)), positives]
    return (
        1
        + (similarity > positive_scores[:, None]).sum(axis=1)
        + ((similarity == positive_scores[:, None]).sum(axis=1) - 1)
    )


def micro_average_precision(scores: np.ndarray, is_match: np.ndarray, num_positives: int) -> float:
    """AP of one ranked list of pairs: ``Σ_i P@i · match_i / num_positives`` over pairs sorted by score (desc)."""
    if num_positives == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    matches = is_match[order].astype(np.float64)
    precision_at = np.cumsum(matches) / np.arange(1, len(matches) + 1)
    return float((precision_at * matches).sum() / num_positives)


def copy_detection_metrics(similarity: np.ndarray, positives: np.ndarray) -> dict[str, float]:
    """mAP, micro-AP and recall@1/@10 of queries (rows) against a database (columns), one original each."""
    ranks = ranks_of_originals(similarity, positives)
    n_queries, n_db = similarity.shape
    match = np.zeros_like(similarity, dtype=bool)
    match[np.arange(n_queries), positives] = True
    if similarity.size <= _MICRO_AP_MAX_PAIRS:
        micro = micro_average_precision(similarity.ravel(), match.ravel(), n_queries)
    else:
        top = np.argpartition(-similarity, 100, axis=1)[:, :100]
        rows = np.arange(n_queries)[:, None]
        micro = micro_average_precision(similarity[rows, top].ravel(), match[rows, top].ravel(), n_queries)
    return {
        "mAP": float((1.0 / ranks).mean()),
        "micro_AP": micro,
        "recall@1": float((ranks == 1).mean()),
        "recall@10": float((ranks <= 10).mean()),
    }


def copy_detection_eval(
    model: str | None,
    images: str,
    queries: int = 200,
    descriptor: str = "cls+gem",
    whiten_on: str | None = None,
    whiten_dim: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    json_out: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Strong synthetic copies of ``queries`` randomly chosen images, searched among all images of ``images``."""
    if queries < 1:
        raise InputError(f"queries must be >= 1, got {queries}", argument="queries")
    with blame("descriptor"):
        outputs = check_descriptor(descriptor)
    # The image sets first: a wrong --images / --whiten-on is named before any model is loaded.
    with blame("images"):
        database, _ = list_image_files(images)
    if len(database) < 2:
        raise InputError(f"copy detection needs at least 2 images, found {len(database)} in {images}", "images")
    whiten_items = None
    if whiten_on is not None:
        with blame("whiten_on"):
            whiten_items = list_image_source(whiten_on)
    embedding_model = load_embedding_model(model, image_size, outputs, device=device)
    echo(
        f"model: {embedding_model.path} ({embedding_model.kind}, {embedding_model.image_size}px), "
        f"descriptor {descriptor}"
    )
    echo(embedding_model.size_line())
    whitening = None
    if whiten_items is not None:
        loader = {"batch_size": batch_size, "workers": workers, "progress": progress}
        with blame("whiten_on"):
            whitening, _, _ = learn_whitening(embedding_model, whiten_items, descriptor, whiten_dim, **loader)
    db_vectors, db_indices, db_skipped = embed_all(
        embedding_model,
        database,
        descriptor,
        whitening=whitening,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
    )
    rng = random.Random(seed)
    chosen = rng.sample(db_indices, min(queries, len(db_indices)))
    query_items = [
        ImageItem(key=f"copy-{n}", path=database[i].path, copy_seed=seed * 1_000_003 + n) for n, i in enumerate(chosen)
    ]
    batches = list(embed(embedding_model, query_items, descriptor, whitening, batch_size, workers, progress=progress))
    q_vectors = np.concatenate([b.vectors for b in batches if b.indices])
    q_indices = [i for b in batches for i in b.indices]
    q_edits = [info.get("edits", []) for b in batches for info in b.info]
    column = {db_index: column for column, db_index in enumerate(db_indices)}
    positives = np.array([column[chosen[q]] for q in q_indices])
    similarity = q_vectors @ db_vectors.T
    metrics = copy_detection_metrics(similarity, positives)
    ranks = ranks_of_originals(similarity, positives)
    by_edit: dict[str, list[float]] = {}
    for edits, rank in zip(q_edits, ranks, strict=True):
        for name in set(edits):
            by_edit.setdefault(name, []).append(1.0 / rank)
    echo(
        f"{len(q_indices)} queries against {len(db_indices)} images: mAP {metrics['mAP']:.4f}, micro-AP "
        f"{metrics['micro_AP']:.4f}, recall@1 {metrics['recall@1']:.4f}"
    )
    report = {
        "eval": "copy-detection",
        "model": embedding_model.describe(),
        "descriptor": descriptor,
        "whitening": {"learned_on": whiten_on, "out_dim": whitening.out_dim} if whitening else None,
        "database": {"source": images, "images": len(db_indices), "skipped": len(db_skipped)},
        "queries": len(q_indices),
        "seed": seed,
        "results": metrics,
        "mAP_by_edit": {name: float(np.mean(v)) for name, v in sorted(by_edit.items())},
        "per_query": [
            {"original": database[chosen[q]].path, "rank": int(rank), "edits": edits}
            for q, rank, edits in zip(q_indices, ranks, q_edits, strict=True)
        ],
    }
    write_report(report, json_out)
    return report
