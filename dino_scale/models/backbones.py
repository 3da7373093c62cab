"""timm backbones as DINO uses them, and what kind of network one is."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import re
import sys
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import model_entrypoint
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dino_scale.config import RESERVED_TIMM_KWARGS
from dino_scale.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# timm names of the vision-transformer families whose CLS token DINO pools (and whose grid follows the input size).
VIT_ARCH_PREFIXES = ("vit_", "deit_")

# How a ViT's position embeddings reach a grid other than the stored one (see `official_pos_embed`).
POS_EMBED_INTERPOLATIONS = ("official", "timm")
# The attribute on which create_backbone records the method a ViT actually runs (weights.load_backbone_weights
# resamples a table of another size with that same method, so a fixed-size model equals the dynamic one).
POS_EMBED_INTERPOLATION_ATTR = "dino_pos_embed_interpolation"

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


def fused_attention_layers(backbone: nn.Module) -> tuple[int, int]:
    """(attention layers that run torch's fused scaled_dot_product_attention, attention layers with timm's switch).

    timm turns it off for ONNX-exportable models and when TIMM_FUSED_ATTN=0; training wants it on (flash / memory-
    efficient kernels on a GPU instead of materialising the attention matrix)."""
    layers = [module for module in backbone.modules() if hasattr(module, "fused_attn")]
    return sum(bool(module.fused_attn) for module in layers), len(layers)


def create_backbone(
    arch: str, drop_path_rate: float = 0.0, pos_embed_interpolation: str = "official", **timm_kwargs: Any
) -> nn.Module:
    """A timm backbone that returns one pooled feature vector per image (`num_features` wide).

    ViTs pool the CLS token after the final norm (as DINO does) and accept any input size divisible by the patch
    size (`dynamic_img_size`), so the same weights run the 224 global and 96 local crops. Never downloads weights.

    `pos_embed_interpolation` says how a ViT's position embeddings reach the token grid of each input:
    "official" as facebookresearch/dino (:func:`official_pos_embed`: bicubic with scale factor (n + 0.1) / sqrt(N),
    no antialias; the stored table unchanged at its own square grid), "timm" with timm's antialiased bicubic
    resampling to the exact grid. "official" replaces the instance's ``_pos_embed`` (what forward,
    forward_features and forward_intermediates call) with ours; everything else stays timm's. It needs the layout
    of the official ViT: a class token with its own embedding, no register tokens, ``no_embed_class`` False, an
    absolute ``pos_embed`` on a square grid, no ``dynamic_img_pad``. Another layout (e.g. ``reg_tokens`` in
    `timm_kwargs`) has no official counterpart: it keeps timm's resampling with a logged warning rather than an
    error, because the export, evaluation and index commands build any checkpoint's recorded architecture and could
    not be told otherwise. The method actually run is recorded on the model as ``dino_pos_embed_interpolation``.
    CNNs ignore the option.

    `timm_kwargs` that the arch does not take, or with which timm cannot build it, raise a one-line ConfigError that
    blames `model.timm_kwargs` (the recipe key; commands that take them as a flag blame that instead) and names the
    arch and the kwargs at fault.
    """
    if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
        raise ConfigError(
            f"pos_embed_interpolation must be one of {', '.join(POS_EMBED_INTERPOLATIONS)}, "
            f"got {pos_embed_interpolation!r}",
            argument="model.pos_embed_interpolation",
        )
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
        model = timm.create_model(arch, **kwargs)
    except Exception as error:
        if isinstance(error, RuntimeError) and str(error).startswith("Unknown model"):
            raise InputError(f"timm has no model named {arch!r} ({error})") from None
        if not timm_kwargs:  # timm failed on our own arguments alone: a bug, not a recipe fault
            raise
        raise ConfigError(_kwargs_fault(arch, timm_kwargs, error), argument="model.timm_kwargs") from None
    if is_vit(model):
        use_pos_embed_interpolation(model, pos_embed_interpolation, arch)
    return model


# ----------------------------------------------------------------------------------------------------------
# Position embeddings as the official DINO code interpolates them
# ----------------------------------------------------------------------------------------------------------


def official_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The position embeddings [1, 1 + rows * cols, C] that facebookresearch/dino adds to the tokens of an input
    whose patch grid is `rows` x `cols`, from a stored table [1, 1 + N, C] (class token first, then a square grid
    of side s = sqrt(N), row-major).

    At the stored grid (rows == cols == s) the table is returned as it is. Otherwise the class token's embedding is
    kept and the patch part, as an image [1, C, s, s], is resized by bicubic interpolation (align_corners False, no
    antialias) with scale factors ((rows + 0.1) / s, (cols + 0.1) / s), giving a rows x cols grid. The scale
    factors, not the output size, set where the samples fall: the 0.1 moves them slightly off a plain resize to
    rows x cols, exactly as the official code does. Computed in float32 for half-precision tables.

    Orientation: the official code names the input dimensions ``B, nc, w, h = x.shape``, so its "w" is the height
    (dimension 2, the grid's rows) and its "h" the width; its first scale factor ("w0") therefore goes with the
    rows, which is what is done here (for a square input the order cannot matter; for a non-square one this
    reproduces the official result exactly, which is the right orientation for row-major patch tokens).
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, 1 + N, C], got {tuple(pos_embed.shape)}")
    num_patches = pos_embed.shape[1] - 1
    side = math.isqrt(num_patches)
    if num_patches < 1 or side * side != num_patches:
        raise ValueError(f"pos_embed holds {num_patches} patch positions, not a square grid")
    if rows == side and cols == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    class_part, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if grid.dtype in (torch.float16, torch.bfloat16):
        grid = grid.float()
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    if tuple(grid.shape[-2:]) != (rows, cols):  # the official code asserts the same
        raise ValueError(f"bicubic resize of a {side}x{side} grid gave {tuple(grid.shape[-2:])}, not {(rows, cols)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(pos_embed.dtype)
    return torch.cat((class_part, grid), dim=1)


def official_layout_problem(model: nn.Module) -> str | None:
    """Why a timm ViT's token layout has no counterpart in the official DINO ViT, or None when it has one."""
    if not isinstance(model, VisionTransformer) or type(model)._pos_embed is not VisionTransformer._pos_embed:
        return f"it is a {type(model).__name__}, not timm's plain VisionTransformer"
    if getattr(model, "pos_embed", None) is None:
        return "it has no absolute position embedding"
    if getattr(model, "cls_token", None) is None:
        return "it has no class token"
    if getattr(model, "reg_token", None) is not None or int(getattr(model, "num_prefix_tokens", 1)) != 1:
        return "it has register tokens"
    if getattr(model, "no_embed_class", False):
        return "its class token has no position embedding (no_embed_class)"
    if getattr(model.patch_embed, "dynamic_img_pad", False):
        return "it pads inputs to whole patches (dynamic_img_pad)"
    if not _is_square_table(model):
        return "its position-embedding table is not a square grid"
    return None


def _is_square_table(model: nn.Module) -> bool:
    grid = tuple(int(n) for n in getattr(model.patch_embed, "grid_size", (0, 0)))
    return len(grid) == 2 and grid[0] == grid[1] and model.pos_embed.shape[1] == 1 + grid[0] * grid[1]


def use_pos_embed_interpolation(model: nn.Module, method: str, arch: str | None = None) -> str:
    """Make a timm ViT interpolate its position embeddings with `method` ("official" or "timm"); returns the method
    it now runs ("timm" where the layout has no official counterpart, with a warning naming `arch`)."""
    if method not in POS_EMBED_INTERPOLATIONS:
        raise ValueError(f"pos_embed_interpolation must be one of {POS_EMBED_INTERPOLATIONS}, got {method!r}")
    name = arch or type(model).__name__
    if method == "official":
        problem = official_layout_problem(model)
        if problem is not None:
            log.warning(
                "%s: the official DINO position-embedding interpolation does not apply (%s); "
                "timm's resampling is used instead",
                name,
                problem,
            )
            method = "timm"
    if method == "official":
        # A partial of a module-level function (not a bound method) so that the model still deep-copies (the copy
        # gets a partial of the copy) and pickles.
        model._pos_embed = functools.partial(_official_pos_embed, model)
    else:
        model.__dict__.pop("_pos_embed", None)  # back to the class's own method
    setattr(model, POS_EMBED_INTERPOLATION_ATTR, method)
    return method


def _official_pos_embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's VisionTransformer._pos_embed for the official layout (class token, no registers, embeddings for the
    class token too), with :func:`official_pos_embed` in place of timm's resampling: the class token goes in front of
    the patch tokens, the embeddings are added to all tokens, then position dropout (patch dropout follows in
    timm's forward_features, as before)."""
    if model.dynamic_img_size:  # patch tokens come as [B, rows, cols, C]
        batch, rows, cols, dim = x.shape
        x = x.reshape(batch, rows * cols, dim)
        pos_embed = official_pos_embed(model.pos_embed, rows, cols)
    else:  # a fixed grid: the input is the table's size (timm asserts it), where the table is used as it is
        pos_embed = model.pos_embed
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    return model.pos_drop(x + pos_embed)


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
