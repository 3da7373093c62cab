"""timm backbones as DINO uses them, and what kind of network one is."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from dino_scale.errors import InputError

# timm names of the vision-transformer families whose CLS token DINO pools (and whose grid follows the input size).
VIT_ARCH_PREFIXES = ("vit_", "deit_")


def is_vit_arch(arch: str) -> bool:
    """Whether a timm model name is a vision transformer (before the model exists)."""
    return arch.startswith(VIT_ARCH_PREFIXES)


def is_vit(backbone: nn.Module) -> bool:
    """Whether a built timm model is a vision transformer: patch embedding, position embedding and blocks."""
    return hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed") and hasattr(backbone, "_pos_embed")


def patch_size_of(backbone: nn.Module) -> int | None:
    """The ViT patch size (square patches), or None for CNNs."""
    if not is_vit(backbone):
        return None
    size = backbone.patch_embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def create_backbone(arch: str, drop_path_rate: float = 0.0, **timm_kwargs: Any) -> nn.Module:
    """A timm backbone that returns one pooled feature vector per image (`num_features` wide).

    ViTs pool the CLS token after the final norm (as DINO does) and accept any input size divisible by the patch
    size (`dynamic_img_size`), so the same weights run the 224 global and 96 local crops. Never downloads weights.
    """
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "drop_path_rate": drop_path_rate}
    if is_vit_arch(arch):
        kwargs.update(global_pool="token", dynamic_img_size=True)
    kwargs.update(timm_kwargs)
    try:
        return timm.create_model(arch, **kwargs)
    except RuntimeError as error:  # timm raises RuntimeError for unknown model names
        raise InputError(f"timm has no model named {arch!r} ({error})") from None
