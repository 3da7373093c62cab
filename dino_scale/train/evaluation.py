"""The end-of-training check: k-NN top-1 of the trained teacher next to a randomly initialised network of the same
architecture, on the recipe's labelled sets, through the same feature path as `dino-scale eval`."""

from __future__ import annotations

import logging

import torch
from torch import nn

from dino_scale.config import TrainConfig
from dino_scale.data.loaders import labelled_batches
from dino_scale.models.backbones import create_backbone
from dino_scale.models.features import extract_features
from dino_scale.models.knn import knn_accuracy
from dino_scale.train.inputs import KnnSets

log = logging.getLogger("dino_scale")


def knn_vs_random_init(
    cfg: TrainConfig, backbone: nn.Module, device: torch.device, sets: KnnSets | None
) -> dict[str, float]:
    """{"knn_top1_teacher", "knn_top1_random_init"} in % on `sets` (listed before training), or {} without sets."""
    ev = cfg.eval
    if sets is None:
        return {}
    train_items, val_items = sets.train, sets.val

    def top1(model: nn.Module) -> float:
        model = model.to(device)
        features = [
            extract_features(
                model,
                labelled_batches(items, ev.image_size, ev.batch_size, cfg.data.num_workers),
                device=device,
                normalize=True,
            )
            for items in (train_items, val_items)
        ]
        (train_x, train_y), (val_x, val_y) = features
        return knn_accuracy(train_x, train_y, val_x, val_y, ev.knn_k, ev.knn_temperature)["top1"]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        random_backbone = create_backbone(
            cfg.model.arch, 0.0, pos_embed_interpolation=cfg.model.pos_embed_interpolation, **cfg.model.timm_kwargs
        )
    result = {"knn_top1_teacher": top1(backbone), "knn_top1_random_init": top1(random_backbone)}
    log.info(
        "k-NN top-1 on %s (k=%d): trained teacher %.1f%%  vs  random init %.1f%%",
        ev.knn_val_shards,
        ev.knn_k,
        result["knn_top1_teacher"],
        result["knn_top1_random_init"],
    )
    print(
        f"k-NN top-1 (k={ev.knn_k}) on held-out {ev.knn_val_shards}: "
        f"trained teacher {result['knn_top1_teacher']:.1f}% | random init {result['knn_top1_random_init']:.1f}%",
        flush=True,
    )
    return result
