"""`dino-scale eval knn | linear | copy-detection`: the paper's evaluations of frozen features, with JSON reports.

* **k-NN** (paper §4.1 / eval_knn.py): L2-normalised features; the class score of a test image is
  ``Σ_{n ∈ top-k} exp(s_n / 0.07) · [y_n = c]`` over its k most cosine-similar training images.
* **Linear** (eval_linear.py): a linear classifier on frozen features, see :mod:`dino_scale.linear_probe`.
* **Copy detection** (paper §4.2.2, Copydays "strong"): each query is a strongly edited copy of a database image;
  the database is every image, so all but the original are distractors. With one true match per query,
  ``AP(q) = 1 / rank of its original`` and mAP is their mean. micro-AP pools the (query, database image) pairs of
  all queries into one list ranked by similarity and takes the average precision of the true pairs in it, so one
  threshold has to work for every query (the DISC 2021 metric).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dino_scale import checkpoint as ckpt
from dino_scale.augment import IMAGENET_MEAN, IMAGENET_STD
from dino_scale.embed import (
    ARTIFACT_SUFFIXES,
    DEFAULT_IMAGE_SIZE,
    EmbeddingModel,
    ImageItem,
    check_descriptor,
    embed,
    embed_all,
    iterate_crops,
    learn_whitening,
    list_image_files,
    list_labelled,
    load_embedding_model,
    newest_artifact,
)
from dino_scale.export import backbone_from_sidecar, load_sidecar
from dino_scale.inference import build_backbone, load_source
from dino_scale.knn import knn_accuracy
from dino_scale.runtimes import RuntimeUnavailable

KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
# Pairs beyond this many are too many to rank exactly for micro-AP; each query then contributes its top 100.
_MICRO_AP_MAX_PAIRS = 20_000_000


def _write_report(report: dict[str, Any], json_out: str | None) -> None:
    if json_out:
        ckpt.atomic_write_text(json_out, json.dumps(report, indent=2) + "\n")


def _aligned_labels(
    train_classes: list[str], test_classes: list[str], test_labels: torch.Tensor, where: str
) -> torch.Tensor:
    """Test labels in the training set's class numbering (matched by class name where both sets name them)."""
    if not train_classes or not test_classes or train_classes == test_classes:
        return test_labels
    missing = sorted(set(test_classes) - set(train_classes))
    if missing:
        raise ValueError(f"{where}: classes {missing[:5]} are not in the training set's classes")
    mapping = torch.tensor([train_classes.index(name) for name in test_classes])
    return mapping[test_labels]


def _labelled_features(
    model: EmbeddingModel, source: str, batch_size: int, workers: int | None, progress: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str], int]:
    items, classes = list_labelled(source)
    vectors, indices, skipped = embed_all(
        model, items, "cls", batch_size=batch_size, workers=workers, progress=progress
    )
    labels = torch.tensor([items[i].label for i in indices], dtype=torch.long)
    return torch.from_numpy(vectors), labels, classes, len(skipped)


def knn_eval(
    model: str | None,
    train: str,
    test: str,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    image_size: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    json_out: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Weighted k-NN top-1/top-5 (in %) for each k, features = the model's L2-normalised ``cls`` output."""
    if not ks or min(ks) < 1:
        raise ValueError(f"-k values must be >= 1, got {list(ks)}")
    embedding_model = load_embedding_model(model, image_size, ("cls",), device=device)
    echo(f"model: {embedding_model.path} ({embedding_model.kind}, {embedding_model.image_size}px)")
    train_x, train_y, train_classes, train_skipped = _labelled_features(
        embedding_model, train, batch_size, workers, progress
    )
    test_x, test_y, test_classes, test_skipped = _labelled_features(
        embedding_model, test, batch_size, workers, progress
    )
    test_y = _aligned_labels(train_classes, test_classes, test_y, "--test")
    results = {}
    for k in ks:
        results[str(k)] = knn_accuracy(train_x, train_y, test_x, test_y, k=k, temperature=temperature)
        echo(f"k={k:<4d} top-1 {results[str(k)]['top1']:6.2f}%  top-5 {results[str(k)]['top5']:6.2f}%")
    report = {
        "eval": "knn",
        "model": embedding_model.describe(),
        "train": {"source": train, "images": len(train_y), "skipped": train_skipped, "classes": len(train_classes)},
        "test": {"source": test, "images": len(test_y), "skipped": test_skipped},
        "temperature": temperature,
        "results": results,
    }
    _write_report(report, json_out)
    return report


# ----------------------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------------------


def _probe_backbone(model: str | None, image_size: int | None, which: str) -> tuple[torch.nn.Module, int, str]:
    """The PyTorch backbone behind ``model``: a run / checkpoint directly, an artifact through its sidecar's source
    (intermediate blocks are not among an artifact's outputs)."""
    path = Path(model) if model is not None else newest_artifact()
    if path.is_file() and path.suffix in ARTIFACT_SUFFIXES:
        meta = load_sidecar(path)
        size = image_size or int(meta["model"]["image_size"])
        try:
            backbone = backbone_from_sidecar(meta, size)
        except RuntimeUnavailable as error:
            raise FileNotFoundError(f"the linear probe: {error}; pass --model RUN_DIR_OR_CHECKPOINT") from None
        return backbone, size, meta["source"]["path"]
    size = image_size or DEFAULT_IMAGE_SIZE
    backbone, _, _ = build_backbone(load_source(path, which), size)
    return backbone, size, str(path)


def linear_eval(
    model: str | None,
    train: str,
    test: str,
    n_last_blocks: int = 4,
    avgpool_patchtokens: bool = False,
    epochs: int = 100,
    image_size: int | None = None,
    which: str = "teacher",
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    json_out: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Linear probe on frozen features: CLS of the last ``n_last_blocks`` blocks (+ mean patch token)."""
    from dino_scale.export import resolve_device
    from dino_scale.linear_probe import extract_probe_features, train_linear_probe

    backbone, size, weights = _probe_backbone(model, image_size, which)
    torch_device = resolve_device(device)
    backbone.to(torch_device)
    echo(
        f"model: {weights} ({size}px), features: CLS of the last {n_last_blocks} block(s)"
        + (" + mean patch token" if avgpool_patchtokens else "")
    )
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def features(source: str) -> tuple[torch.Tensor, torch.Tensor, list[str], int]:
        items, classes = list_labelled(source)
        skipped: list[tuple[int, str]] = []

        def batches():  # noqa: ANN202 - a generator of (normalised images, labels)
            for batch in iterate_crops(items, size, batch_size, workers, progress=progress):
                skipped.extend(batch.skipped)
                if batch.crops is not None:
                    labels = torch.tensor([items[i].label for i in batch.indices])
                    yield (batch.crops.float() / 255.0 - mean) / std, labels

        x, y = extract_probe_features(backbone, batches(), n_last_blocks, avgpool_patchtokens, torch_device)
        return x, y, classes, len(skipped)

    train_x, train_y, train_classes, train_skipped = features(train)
    test_x, test_y, test_classes, test_skipped = features(test)
    test_y = _aligned_labels(train_classes, test_classes, test_y, "--test")
    num_classes = len(train_classes) or int(max(train_y.max(), test_y.max())) + 1
    results = train_linear_probe(train_x, train_y, test_x, test_y, num_classes=num_classes, epochs=epochs)
    echo(f"linear probe: top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}%  (lr {results['best_lr']})")
    report = {
        "eval": "linear",
        "model": {"weights": weights, "image_size": size},
        "features": {"n_last_blocks": n_last_blocks, "avgpool_patchtokens": avgpool_patchtokens},
        "train": {"source": train, "images": len(train_y), "skipped": train_skipped},
        "test": {"source": test, "images": len(test_y), "skipped": test_skipped},
        "results": results,
    }
    _write_report(report, json_out)
    return report


# ----------------------------------------------------------------------------------------------------------
# Copy detection
# ----------------------------------------------------------------------------------------------------------


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
        raise ValueError(f"--queries must be >= 1, got {queries}")
    embedding_model = load_embedding_model(model, image_size, check_descriptor(descriptor), device=device)
    echo(
        f"model: {embedding_model.path} ({embedding_model.kind}, {embedding_model.image_size}px), "
        f"descriptor {descriptor}"
    )
    database, _ = list_image_files(images)
    if len(database) < 2:
        raise ValueError(f"--images {images}: copy detection needs at least 2 images, found {len(database)}")
    whitening = None
    if whiten_on is not None:
        loader = {"batch_size": batch_size, "workers": workers, "progress": progress}
        whitening, _, _ = learn_whitening(embedding_model, whiten_on, descriptor, whiten_dim, **loader)
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
    _write_report(report, json_out)
    return report
