"""timm backbones as DINO uses them, and what kind of network one is."""

from __future__ import annotations

import inspect
import json
import re
import sys
from typing import Any

import timm
from timm.models import model_entrypoint
from torch import nn

from dino_scale.config import RESERVED_TIMM_KWARGS
from dino_scale.errors import ConfigError, InputError

# timm names of the vision-transformer families whose CLS token DINO pools (and whose grid follows the input size).
VIT_ARCH_PREFIXES = ("vit_", "deit_")

# What Python says when a class is given a keyword argument its __init__ does not take.
_UNEXPECTED_KWARG = re.compile(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")


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

    `timm_kwargs` that the arch does not take, or with which timm cannot build it, raise a one-line ConfigError that
    blames `model.timm_kwargs` (the recipe key; commands that take them as a flag blame that instead) and names the
    arch and the kwargs at fault.
    """
    reserved = sorted(set(timm_kwargs) & RESERVED_TIMM_KWARGS.keys())
    if reserved:
        raise ConfigError(
            f"{reserved[0]} cannot be set for {arch}: {RESERVED_TIMM_KWARGS[reserved[0]]}",
            argument="model.timm_kwargs",
        )
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "drop_path_rate": drop_path_rate}
    if is_vit_arch(arch):
        kwargs.update(global_pool="token", dynamic_img_size=True)
    kwargs.update(timm_kwargs)
    try:
        return timm.create_model(arch, **kwargs)
    except Exception as error:
        if isinstance(error, RuntimeError) and str(error).startswith("Unknown model"):
            raise InputError(f"timm has no model named {arch!r} ({error})") from None
        if not timm_kwargs:  # timm failed on our own arguments alone: a bug, not a recipe fault
            raise
        raise ConfigError(_kwargs_fault(arch, timm_kwargs, error), argument="model.timm_kwargs") from None


def _kwargs_fault(arch: str, timm_kwargs: dict[str, Any], error: Exception) -> str:
    """One line: the arch, the kwargs at fault (those the arch does not take, else all of them) and timm's reason."""
    reason = " ".join(f"{type(error).__name__}: {error}".split())
    reason = reason if len(reason) <= 300 else reason[:297] + "..."
    unknown = _unaccepted(arch, timm_kwargs, error)
    if unknown:
        return f"{arch} does not take {', '.join(unknown)} ({reason})"
    return f"{arch} cannot be built with {_kwargs_text(timm_kwargs)} ({reason})"


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    text = json.dumps(kwargs, default=repr)
    return text if len(text) <= 200 else text[:197] + "..."


def _unaccepted(arch: str, timm_kwargs: dict[str, Any], error: Exception) -> list[str]:
    """The names in `timm_kwargs` that the arch's model class does not take, when `error` says it was given one
    (Python names only the first; the class's signature tells the rest). Empty when the error is another one."""
    match = _UNEXPECTED_KWARG.search(str(error)) if isinstance(error, TypeError) else None
    if match is None or match.group(2) not in timm_kwargs:
        return []
    try:
        module = sys.modules[model_entrypoint(arch).__module__]
        parameters = inspect.signature(getattr(module, match.group(1))).parameters
    except Exception:  # another layout of timm: the one name Python gave is still right
        return [match.group(2)]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return [match.group(2)]
    return [name for name in timm_kwargs if name not in parameters] or [match.group(2)]
