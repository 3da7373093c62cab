"""Frozen-backbone features: the one loop that runs a backbone over labelled batches, for every evaluation.

Two kinds of feature per image:

* pooled (``n_last_blocks=None``): the backbone's own output, as DINO's k-NN evaluation reads it (ViT: the
  final-norm CLS token; CNN: global average pooling);
* probe (``n_last_blocks=n``), as the paper's linear evaluation (eval_linear.py) reads it:
  ``concat_{i = L-n+1..L} norm(h_i)[:, 0]``, where ``h_i`` is the token sequence after block i and ``norm`` the
  backbone's final norm; token 0 is CLS (timm puts register tokens after it). With ``avgpool_patchtokens`` the mean
  of the last block's normed patch tokens is appended. CNNs give their pooled feature (n must be 1).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dino_scale.errors import InputError
from dino_scale.models.backbones import is_vit


def probe_features(
    backbone: nn.Module, images: torch.Tensor, n_last_blocks: int = 4, avgpool_patchtokens: bool = False
) -> torch.Tensor:
    """Probe features [B, n*D] (+D with `avgpool_patchtokens`) of images [B, 3, H, W] (see the module docstring).

    Other timm backbones give the pooled pre-logits feature forward_head(forward_features(x), pre_logits=True); only
    n_last_blocks = 1 and no patch-token pooling make sense there.
    """
    if n_last_blocks < 1:
        raise InputError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
    if not is_vit(backbone):
        if n_last_blocks != 1 or avgpool_patchtokens:
            raise InputError(
                f"{type(backbone).__name__} is not a ViT: it has one pooled feature, so use n_last_blocks=1 and "
                f"avgpool_patchtokens=False (got n_last_blocks={n_last_blocks}, "
                f"avgpool_patchtokens={avgpool_patchtokens})"
            )
        if not (hasattr(backbone, "forward_features") and hasattr(backbone, "forward_head")):
            raise InputError(f"{type(backbone).__name__} is neither a timm ViT nor a timm model with forward_head")
        return backbone.forward_head(backbone.forward_features(images), pre_logits=True)

    if getattr(backbone, "cls_token", None) is None:
        raise InputError(f"{type(backbone).__name__} has no CLS token (class_token=False); the probe reads CLS tokens")
    depth = len(backbone.blocks)
    if n_last_blocks > depth:
        raise InputError(f"n_last_blocks={n_last_blocks} exceeds the backbone's {depth} blocks")
    # indices=n selects the last n blocks; norm=True applies backbone.norm to each; prefix tokens come back separately
    # so that CLS is prefix token 0 whatever the number of register tokens.
    outputs = backbone.forward_intermediates(
        images,
        indices=n_last_blocks,
        norm=True,
        return_prefix_tokens=True,
        output_fmt="NLC",
        intermediates_only=True,
    )
    features = [prefix[:, 0] for _, prefix in outputs]
    if avgpool_patchtokens:
        patch_tokens, _ = outputs[-1]
        features.append(patch_tokens.mean(dim=1))
    return torch.cat(features, dim=-1)


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    n_last_blocks: int | None = None,
    avgpool_patchtokens: bool = False,
    device: torch.device | str = "cpu",
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features [N, F] (float32, CPU; L2-normalised with `normalize`) and labels [N] over (images, labels)
    batches: pooled features, or probe features of the last `n_last_blocks` blocks.

    The backbone runs in eval mode (no drop-path, BatchNorm on running statistics); its mode is restored after.
    """
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for images, targets in batches:
            images = images.to(device)
            if n_last_blocks is None:
                batch_features = backbone(images).float()
            else:
                batch_features = probe_features(backbone, images, n_last_blocks, avgpool_patchtokens).float()
            if normalize:
                batch_features = F.normalize(batch_features, dim=1)
            features.append(batch_features.cpu())
            labels.append(torch.as_tensor(targets).reshape(-1).cpu())
    finally:
        backbone.train(was_training)
    if not features:
        raise InputError("the feature extraction got no images")
    return torch.cat(features), torch.cat(labels)
