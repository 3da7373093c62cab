"""The inference model that export, benchmark and indexing run: a frozen backbone with selectable outputs.

Outputs (any non-empty combination, always in this order):

* ``cls``: the pooled feature of the backbone, as DINO's k-NN eval uses it (ViT: the normalised CLS token;
  CNN: global average pooling), shape ``[B, D]``.
* ``patch_gem``: generalised-mean pooling of the output patch tokens (ViT) or of the last feature map (CNN),
  ``gem(x) = (1/N Σ_n clamp(x_n, 1e-6)^p)^(1/p)`` with p = 4, shape ``[B, D]``; concatenated with ``cls`` it is
  the paper's copy-detection descriptor.
* ``attn``: the last block's attention of the CLS query over the patch tokens, one map per head,
  ``softmax(q_cls · Kᵀ · scale)``, shape ``[B, heads, H/p, W/p]`` (ViT only).

Inputs: float32 ``[B, 3, S, S]`` already normalised with the sidecar's mean/std, or (``uint8_input``) raw
``[B, S, S, 3]`` RGB bytes that the graph itself normalises: ``(x / 255 - mean) / std``. No resize happens in
the graph; the image size is fixed at export time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dino_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalization_constants
from dino_scale.errors import InputError
from dino_scale.models.backbones import is_vit, patch_size_of

OUTPUT_NAMES = ("cls", "patch_gem", "attn")
INPUT_NAME = "images"
GEM_P = 4.0
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_outputs(spec: str | Sequence[str], backbone: nn.Module | None = None) -> tuple[str, ...]:
    """``"cls,patch_gem"`` -> ``("cls", "patch_gem")``, validated (and checked against the backbone if given)."""
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n).strip() for n in spec]
    names = [n for n in names if n]
    if not names:
        raise InputError(f"outputs is empty; choose from {', '.join(OUTPUT_NAMES)}", argument="outputs")
    unknown = [n for n in names if n not in OUTPUT_NAMES]
    if unknown:
        raise InputError(f"unknown output(s) {unknown}; choose from {', '.join(OUTPUT_NAMES)}", argument="outputs")
    if len(set(names)) != len(names):
        raise InputError(f"outputs names an output twice: {spec!r}", argument="outputs")
    if backbone is not None and "attn" in names and not is_vit(backbone):
        raise InputError(
            f"outputs attn needs a vision transformer; {type(backbone).__name__} has no attention "
            "(use cls or cls,patch_gem)",
            argument="outputs",
        )
    return tuple(n for n in OUTPUT_NAMES if n in names)


class InferenceModel(nn.Module):
    """Backbone + in-graph preprocessing + the selected outputs, returned as a tuple in ``outputs`` order.

    The normalisation is folded into one multiply-add, ``x · 1/(255·std) − mean/std`` for uint8 input, and
    the backbone runs in ``compute_dtype`` while inputs and outputs stay float32 (uint8 in), so a client's
    preprocessing does not depend on the artifact's precision.
    """

    def __init__(
        self,
        backbone: nn.Module,
        outputs: Sequence[str] = ("cls",),
        uint8_input: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.outputs = parse_outputs(outputs, backbone)
        self.backbone = backbone.to(compute_dtype).eval().requires_grad_(False)
        self.uint8_input = uint8_input
        self.compute_dtype = compute_dtype
        scale, shift = normalization_constants(mean, std)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images
        if self.uint8_input:  # [B, H, W, 3] bytes -> normalised [B, 3, H, W]
            x = x.permute(0, 3, 1, 2).to(torch.float32) * self.input_scale + self.input_shift
        x = x.to(self.compute_dtype)
        results = self._vit_outputs(x) if is_vit(self.backbone) else self._cnn_outputs(x)
        return tuple(results[name].float() for name in self.outputs)

    def _vit_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        vit = self.backbone
        grid = (x.shape[-2] // patch_size_of(vit), x.shape[-1] // patch_size_of(vit))
        # timm's forward_features, unrolled so that the last block's input is at hand for the attention map.
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for block in vit.blocks[:-1]:
            tokens = block(tokens)
        results: dict[str, torch.Tensor] = {}
        if "attn" in self.outputs:
            results["attn"] = self._cls_attention(vit.blocks[-1], tokens, grid)
        tokens = vit.norm(vit.blocks[-1](tokens))
        if "cls" in self.outputs:
            results["cls"] = vit.forward_head(tokens, pre_logits=True)
        if "patch_gem" in self.outputs:
            results["patch_gem"] = gem(tokens[:, self.num_prefix_tokens :], dim=1)
        return results

    def _cls_attention(self, block: nn.Module, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """softmax(q_cls · Kᵀ · scale) of one block, CLS query only, patch keys only, as [B, heads, h, w].

        Written out because timm's attention runs fused (scaled_dot_product_attention) and never materialises
        the probabilities; only the CLS row is computed here, so the cost is one extra qkv projection.
        """
        attention = block.attn
        batch, length, _ = tokens.shape
        qkv = attention.qkv(block.norm1(tokens))
        qkv = qkv.reshape(batch, length, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
        query, key = attention.q_norm(qkv[0][:, :, :1]), attention.k_norm(qkv[1])
        probabilities = ((query * attention.scale) @ key.transpose(-2, -1)).float().softmax(dim=-1)
        return probabilities[:, :, 0, self.num_prefix_tokens :].reshape(batch, attention.num_heads, *grid)

    def _cnn_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feature_map = self.backbone.forward_features(x)
        results: dict[str, torch.Tensor] = {}
        if "cls" in self.outputs:
            results["cls"] = self.backbone.forward_head(feature_map, pre_logits=True)
        if "patch_gem" in self.outputs:
            results["patch_gem"] = gem(feature_map.flatten(2), dim=2)
        return results


def gem(x: torch.Tensor, dim: int, p: float = GEM_P, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean over ``dim``: (mean(clamp(x, eps)^p))^(1/p), computed in float32 (x^4 overflows fp16)."""
    return x.float().clamp(min=eps).pow(p).mean(dim=dim).pow(1.0 / p)


def output_shapes(model: InferenceModel, image_size: int) -> dict[str, list[int | str]]:
    """Shape of each output with the batch axis as "batch"."""
    backbone = model.backbone
    width = int(backbone.num_features)
    shapes: dict[str, list[int | str]] = {"cls": ["batch", width], "patch_gem": ["batch", width]}
    patch = patch_size_of(backbone)
    if patch is not None:
        heads = int(backbone.blocks[-1].attn.num_heads)
        shapes["attn"] = ["batch", heads, image_size // patch, image_size // patch]
    return {name: shapes[name] for name in model.outputs}


def input_shape(model: InferenceModel, image_size: int) -> list[int | str]:
    return ["batch", image_size, image_size, 3] if model.uint8_input else ["batch", 3, image_size, image_size]


def example_input(uint8_input: bool, image_size: int, batch: int, seed: int = 0) -> torch.Tensor:
    """Random input in an artifact's layout and dtype: uint8 NHWC bytes, or normalised-range float NCHW."""
    generator = torch.Generator().manual_seed(seed)
    if uint8_input:
        return torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8, generator=generator)
    return torch.randn(batch, 3, image_size, image_size, generator=generator)
