"""`dino-scale eval knn`, the paper's k-NN evaluation (§4.1, eval_knn.py): L2-normalised features; the class score
of a test image is ``Σ_{n ∈ top-k} exp(s_n / 0.07) · [y_n = c]`` over its k most cosine-similar training images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dino_scale.errors import InputError
from dino_scale.eval.reports import aligned_labels, labelled_features, labelled_set, write_report
from dino_scale.models.knn import knn_accuracy
from dino_scale.retrieval.embed import load_embedding_model

KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07


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
    """Weighted k-NN top-1/top-5 (in %) for each k, features = the model's L2-normalised ``cls`` output. Both
    labelled sets are listed before the model is loaded, so that a wrong --train / --test is named at once."""
    if not ks or min(ks) < 1:
        raise InputError(f"k values must be >= 1, got {list(ks)}", argument="ks")
    train_set, test_set = labelled_set(train, "train"), labelled_set(test, "test")
    embedding_model = load_embedding_model(model, image_size, ("cls",), device=device)
    echo(f"model: {embedding_model.path} ({embedding_model.kind}, {embedding_model.image_size}px)")
    echo(embedding_model.size_line())
    train_x, train_y, train_classes, train_skipped = labelled_features(
        embedding_model, train_set, batch_size, workers, progress
    )
    test_x, test_y, test_classes, test_skipped = labelled_features(
        embedding_model, test_set, batch_size, workers, progress
    )
    test_y = aligned_labels(train_classes, test_classes, test_y, "test")
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
    write_report(report, json_out)
    return report
