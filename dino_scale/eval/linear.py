"""Linear probe on frozen backbone features, following the DINO paper's linear evaluation (eval_linear.py).

Features (ViT): the CLS token of each of the last n blocks, each passed through the backbone's final norm, concatenated
(n = 4 for ViT-S, n = 1 for ViT-B in the paper); with `avgpool_patchtokens` the mean of the last block's normed patch
tokens is appended. Other backbones (e.g. ResNet) give their pooled feature vector (n must be 1).

Classifier: one linear layer y = W x + b (W ~ N(0, 0.01^2), b = 0), cross-entropy, SGD with momentum 0.9, no weight
decay, cosine learning-rate schedule, as in the paper. The learning rate is chosen from a grid on a held-out part of
the training set, then the classifier is retrained on the whole training set and scored on the test set.

Deliberate differences from the paper, for speed and robustness:

* Features are extracted once and cached, so there is no data augmentation (the paper re-runs the frozen backbone on
  random-resized-crop + flip views every epoch). Training on cached tensors costs a matrix product per batch, which
  makes 100 epochs and a learning-rate grid cheap; the price is typically a small drop in top-1 versus the paper.
* Features are standardised per dimension with the training split's mean and standard deviation (the effect of the
  affine-free BatchNorm in front of the linear head in MAE / MoCo v3 probing). The probe stays linear in the raw
  features (the statistics fold into W and b), but one learning-rate grid then fits every backbone: raw ResNet
  features and CLS tokens of a randomly initialised ViT differ in scale by orders of magnitude. `standardize=False`
  trains on raw features, as the paper's ViT code does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dino_scale.data.items import ImageItem
from dino_scale.data.loaders import labelled_batches
from dino_scale.devices import resolve_device
from dino_scale.errors import InputError, NotFound, Unavailable, blame
from dino_scale.eval.reports import aligned_labels, labelled_set, write_report
from dino_scale.export.sidecar import ARTIFACT_SUFFIXES, artifact_image_size, backbone_from_sidecar, load_sidecar
from dino_scale.models.features import extract_features
from dino_scale.models.weights import ImageSize, build_backbone, choose_image_size, load_source
from dino_scale.retrieval.embed import newest_artifact
from dino_scale.train.schedules import cosine_schedule

# Log-spaced over three decades: with standardised features the best rate for a cross-entropy linear head sits in
# this range for small and large label sets alike.
DEFAULT_LEARNING_RATES: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
MOMENTUM = 0.9


def _check_split(name: str, features: torch.Tensor, labels: torch.Tensor) -> None:
    if features.ndim != 2:
        raise InputError(f"{name} features must be [N, F], got shape {tuple(features.shape)}")
    if labels.ndim != 1:
        raise InputError(f"{name} labels must be [N], got shape {tuple(labels.shape)}")
    if features.shape[0] == 0:
        raise InputError(f"{name} set is empty")
    if features.shape[0] != labels.shape[0]:
        raise InputError(f"{name}: {features.shape[0]} feature rows but {labels.shape[0]} labels")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise InputError(f"{name} labels must be integer class indices, got {labels.dtype}")


def _stratified_holdout(labels: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask of round(fraction * N) held-out samples (at least 1, at most N - 1), spread over classes in
    proportion to their size: each sample gets the position (rank + 1/2) / n_c of a random rank within its class,
    and the lowest positions are held out."""
    count = labels.shape[0]
    holdout = min(max(round(fraction * count), 1), count - 1)
    position = torch.empty(count, dtype=torch.float64)
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        rank = torch.randperm(members.numel(), generator=generator)
        position[members] = (rank.double() + 0.5) / members.numel()
    # Ties between classes (equal positions) are broken randomly so no class is favoured by its label value.
    order = torch.randperm(count, generator=generator)
    chosen = order[position[order].argsort(stable=True)[:holdout]]
    mask = torch.zeros(count, dtype=torch.bool)
    mask[chosen] = True
    return mask


def _standardise(train: torch.Tensor, evaluate: torch.Tensor, enabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not enabled:
        return train, evaluate
    mean = train.mean(dim=0)
    # Constant dimensions (std 0) would divide by zero; they carry no information, so they just stay at 0.
    std = train.std(dim=0, unbiased=False).clamp_min(1e-6)
    return (train - mean) / std, (evaluate - mean) / std


def _fit_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    learning_rates: Sequence[float],
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one linear classifier per learning rate, all in the same loop on the same batches.

    Weights W [L, F, C] and biases b [L, C] for L rates; loss = sum_l CE(x W_l + b_l, y) so each classifier gets
    exactly its own gradient. SGD with momentum (PyTorch's form): v <- 0.9 v + g, theta <- theta - lr_l * s_t * v,
    with s_t the cosine factor 1 -> 0 over all steps.
    """
    feature_dim = features.shape[1]
    rates = torch.tensor(list(learning_rates), dtype=features.dtype, device=features.device)
    init = torch.randn(feature_dim, num_classes, generator=generator, dtype=features.dtype) * 0.01
    weight = init.to(features.device).expand(len(rates), -1, -1).clone().requires_grad_(True)
    bias = torch.zeros(len(rates), num_classes, dtype=features.dtype, device=features.device, requires_grad=True)
    velocity = [torch.zeros_like(weight), torch.zeros_like(bias)]
    steps_per_epoch = math.ceil(features.shape[0] / batch_size)
    scale = cosine_schedule(1.0, 0.0, epochs * steps_per_epoch)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(features.shape[0], generator=generator).to(features.device)
        for start in range(0, features.shape[0], batch_size):
            index = order[start : start + batch_size]
            logits = torch.einsum("nf,lfc->lnc", features[index], weight) + bias[:, None]
            target = labels[index].expand(len(rates), -1)
            # reduction="sum" over classifiers of per-classifier means: flatten and rescale by the batch size.
            loss = F.cross_entropy(logits.reshape(-1, num_classes), target.reshape(-1), reduction="sum") / len(index)
            grad_weight, grad_bias = torch.autograd.grad(loss, (weight, bias))
            with torch.no_grad():
                for parameter, grad, buffer, shape in (
                    (weight, grad_weight, velocity[0], (-1, 1, 1)),
                    (bias, grad_bias, velocity[1], (-1, 1)),
                ):
                    buffer.mul_(MOMENTUM).add_(grad)
                    parameter.sub_(rates.view(shape) * float(scale[step]) * buffer)
            step += 1
    return weight.detach(), bias.detach()


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """[L] percentage of rows whose label is among the top-k logits, for logits [L, N, C]."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return (top == labels[None, :, None]).any(dim=-1).float().mean(dim=-1) * 100.0


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    standardize: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Linear-probe accuracy of cached features (protocol in the module docstring).

    1. Hold out `val_fraction` of the training set (seeded, stratified by class); train one classifier per learning
       rate on the rest; keep the rate with the best held-out top-1 (the smallest rate on ties).
    2. Retrain with that rate on the whole training set; report test top-1 and top-5 in percent (top-5 is 100 when
       there are at most 5 classes).

    With val_fraction = 0 there is no search: `learning_rates` must then hold one rate, and val_top1 is None.
    Deterministic for a given seed on CPU (the global RNG is not touched).
    """
    _check_split("train", train_features, train_labels)
    _check_split("test", test_features, test_labels)
    if train_features.shape[1] != test_features.shape[1]:
        raise InputError(
            f"train features have {train_features.shape[1]} dimensions but test features {test_features.shape[1]}"
        )
    learning_rates = [float(rate) for rate in learning_rates]
    if not learning_rates or any(not rate > 0 for rate in learning_rates):
        raise InputError(f"learning_rates must be a non-empty list of positive rates, got {learning_rates}")
    if epochs < 1 or batch_size < 1:
        raise InputError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0 and len(learning_rates) > 1:
        raise InputError("val_fraction=0 leaves no held-out set to choose among several learning rates")

    train_labels = train_labels.long()
    test_labels = test_labels.long()
    smallest = int(min(train_labels.min(), test_labels.min()))
    largest = int(max(train_labels.max(), test_labels.max()))
    if smallest < 0:
        raise InputError(f"labels must be non-negative class indices, got {smallest}")
    num_classes = largest + 1 if num_classes is None else int(num_classes)
    if num_classes < 2:
        raise InputError(f"a linear probe needs at least 2 classes, got num_classes={num_classes}")
    if largest >= num_classes:
        raise InputError(f"label {largest} is out of range for num_classes={num_classes}")
    if train_labels.unique().numel() < 2:
        raise InputError("the training set holds a single class; a linear probe needs at least 2")
    if val_fraction > 0 and train_labels.shape[0] < 2:
        raise InputError("the training set needs at least 2 samples to hold out a validation part")

    generator = torch.Generator().manual_seed(seed)
    train_features = train_features.float()
    test_features = test_features.float()

    def fit_and_score(
        fit_x: torch.Tensor, fit_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor, rates: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fit_x, eval_x = _standardise(fit_x, eval_x, standardize)
        fit_x, fit_y, eval_x, eval_y = (t.to(device) for t in (fit_x, fit_y, eval_x, eval_y))
        weight, bias = _fit_linear(fit_x, fit_y, num_classes, rates, epochs, batch_size, generator)
        with torch.no_grad():
            logits = torch.einsum("nf,lfc->lnc", eval_x, weight) + bias[:, None]
        return _topk_correct(logits, eval_y, 1).cpu(), _topk_correct(logits, eval_y, 5).cpu()

    val_top1: float | None = None
    best_lr = learning_rates[0]
    if val_fraction > 0:
        held_out = _stratified_holdout(train_labels, val_fraction, generator)
        val_scores, _ = fit_and_score(
            train_features[~held_out],
            train_labels[~held_out],
            train_features[held_out],
            train_labels[held_out],
            learning_rates,
        )
        # Ties go to the smallest rate (the gentlest optimisation that does as well): argmax returns the first
        # maximum, so scan the rates in ascending order.
        ascending = sorted(range(len(learning_rates)), key=lambda i: learning_rates[i])
        best = ascending[int(val_scores[ascending].argmax())]
        best_lr, val_top1 = learning_rates[best], float(val_scores[best])

    top1, top5 = fit_and_score(train_features, train_labels, test_features, test_labels, [best_lr])
    return {
        "top1": float(top1[0]),
        "top5": float(top5[0]),
        "best_lr": best_lr,
        "val_top1": val_top1,
        "epochs": epochs,
        "learning_rates": learning_rates,
        "num_train": int(train_features.shape[0]),
        "num_test": int(test_features.shape[0]),
        "num_classes": num_classes,
        "feature_dim": int(train_features.shape[1]),
    }


# ----------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------


def _probe_backbone(model: str | None, image_size: int | None, which: str) -> tuple[torch.nn.Module, ImageSize, str]:
    """The PyTorch backbone behind ``model``: a run / checkpoint directly, an artifact through its sidecar's source
    (intermediate blocks are not among an artifact's outputs). The size: ``image_size`` where given, else the
    artifact's, else the size the model was trained at."""
    with blame("model"):
        path = Path(model) if model is not None else newest_artifact()
        if path.is_file() and path.suffix in ARTIFACT_SUFFIXES:
            meta = load_sidecar(path)
            size = ImageSize(image_size, "as given: --image-size") if image_size else artifact_image_size(path, meta)
            try:
                backbone = backbone_from_sidecar(meta, size.value)
            except Unavailable as error:
                raise NotFound(f"the linear probe: {error}; name a run directory or checkpoint instead") from None
            return backbone, size, meta["source"]["path"]
        source = load_source(path, which)
    size = choose_image_size(source, image_size)
    backbone, _, _ = build_backbone(source, size.value)
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
    """Linear probe on frozen features: CLS of the last ``n_last_blocks`` blocks (+ mean patch token). The labelled
    sets are listed first, so that a wrong --train / --test is named before any model is loaded."""
    train_set, test_set = labelled_set(train, "train"), labelled_set(test, "test")
    backbone, image, weights = _probe_backbone(model, image_size, which)
    size = image.value
    torch_device = resolve_device(device)
    backbone.to(torch_device)
    echo(
        f"model: {weights} ({size}px), features: CLS of the last {n_last_blocks} block(s)"
        + (" + mean patch token" if avgpool_patchtokens else "")
    )
    echo(image.describe())

    def features(listed: tuple[list[ImageItem], list[str]]) -> tuple[torch.Tensor, torch.Tensor, list[str], int]:
        items, classes = listed
        skipped: list[tuple[int, str]] = []
        batches = labelled_batches(items, size, batch_size, workers, progress=progress, skipped=skipped)
        x, y = extract_features(backbone, batches, n_last_blocks, avgpool_patchtokens, torch_device)
        return x, y, classes, len(skipped)

    train_x, train_y, train_classes, train_skipped = features(train_set)
    test_x, test_y, test_classes, test_skipped = features(test_set)
    test_y = aligned_labels(train_classes, test_classes, test_y, "test")
    num_classes = len(train_classes) or int(max(train_y.max(), test_y.max())) + 1
    results = train_linear_probe(train_x, train_y, test_x, test_y, num_classes=num_classes, epochs=epochs)
    echo(f"linear probe: top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}%  (lr {results['best_lr']})")
    report = {
        "eval": "linear",
        "model": {"weights": weights, "image_size": size, "image_size_origin": image.origin},
        "features": {"n_last_blocks": n_last_blocks, "avgpool_patchtokens": avgpool_patchtokens},
        "train": {"source": train, "images": len(train_y), "skipped": train_skipped},
        "test": {"source": test, "images": len(test_y), "skipped": test_skipped},
        "results": results,
    }
    write_report(report, json_out)
    return report
