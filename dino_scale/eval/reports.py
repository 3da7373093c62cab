"""What every evaluation shares: labelled sets and their features through one path, labels aligned by class name,
and the JSON report."""

from __future__ import annotations

from typing import Any

import torch

from dino_scale.data.items import ImageItem, list_labelled
from dino_scale.errors import InputError, blame
from dino_scale.io import atomic_write_json
from dino_scale.retrieval.embed import EmbeddingModel, embed_all


def write_report(report: dict[str, Any], json_out: str | None) -> None:
    """Write the report as JSON to ``json_out`` (atomically) where given; a failure blames ``json_out``."""
    if json_out:
        with blame("json_out"):
            atomic_write_json(json_out, report)


def aligned_labels(
    train_classes: list[str], test_classes: list[str], test_labels: torch.Tensor, where: str
) -> torch.Tensor:
    """Test labels in the training set's class numbering (matched by class name where both sets name them)."""
    if not train_classes or not test_classes or train_classes == test_classes:
        return test_labels
    missing = sorted(set(test_classes) - set(train_classes))
    if missing:
        raise InputError(f"classes {missing[:5]} are not in the training set's classes", argument=where)
    mapping = torch.tensor([train_classes.index(name) for name in test_classes])
    return mapping[test_labels]


def labelled_set(source: str, argument: str) -> tuple[list[ImageItem], list[str]]:
    """The labelled items and class names of a class-folder tree or labelled shards; errors blame `argument`."""
    with blame(argument):
        return list_labelled(source)


def labelled_features(
    model: EmbeddingModel,
    listed: tuple[list[ImageItem], list[str]],
    batch_size: int,
    workers: int | None,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[str], int]:
    """L2-normalised `cls` features, labels, class names and the number of unreadable images of a labelled set
    (the items and class names :func:`labelled_set` listed)."""
    items, classes = listed
    vectors, indices, skipped = embed_all(
        model, items, "cls", batch_size=batch_size, workers=workers, progress=progress
    )
    labels = torch.tensor([items[i].label for i in indices], dtype=torch.long)
    return torch.from_numpy(vectors), labels, classes, len(skipped)
