"""The paper's weighted k-NN classifier over frozen features (a non-parametric model of the labels).

A matrix product and a top-k, exact and in memory: the end-of-training check and `dino-scale eval knn` both score
with it. Features must be L2-normalised (dino_scale.models.features).
"""

from __future__ import annotations

import torch


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores [N_test, C]: score_c = sum over the k nearest train vectors n (cosine similarity s_n) with
    label c of exp(s_n / temperature). Features must be L2-normalised."""
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        similarity = test_features[start : start + chunk_size] @ train_features.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(similarity.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_index], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (in %) of the weighted k-NN vote."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes)
    ranked = scores.argsort(dim=1, descending=True)
    top1 = (ranked[:, 0] == test_labels).float().mean().item() * 100
    top5 = (ranked[:, : min(5, num_classes)] == test_labels[:, None]).any(dim=1).float().mean().item() * 100
    return {"top1": top1, "top5": top5}
