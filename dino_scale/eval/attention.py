"""`dino-scale attention`: last-layer CLS attention maps of a ViT, as in the paper's figures.

For each head h the map is ``A_h = softmax(q_cls · Kᵀ · scale)`` over the patch tokens (see
:class:`dino_scale.export.graph.InferenceModel`). The mask of a head keeps the smallest set of patches whose
attention sums to at least ``keep`` (0.6 in the paper): sort ``A_h`` descending and keep patches while the
cumulative mass before them is below ``keep``.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dino_scale.data.decode import decode_image
from dino_scale.errors import InputError, blame
from dino_scale.export.graph import InferenceModel
from dino_scale.io import atomic_write_json
from dino_scale.models.backbones import patch_size_of
from dino_scale.models.weights import build_backbone, load_source


def mass_mask(attention: torch.Tensor, keep: float) -> torch.Tensor:
    """Boolean masks [heads, h, w] of the fewest patches holding ``keep`` of each head's attention mass."""
    heads = attention.shape[0]
    flat = attention.reshape(heads, -1).double()
    flat = flat / flat.sum(dim=1, keepdim=True)
    ordered, order = flat.sort(dim=1, descending=True)
    mass_before = ordered.cumsum(dim=1) - ordered
    keep_sorted = mass_before < keep
    mask = torch.zeros_like(keep_sorted)
    mask.scatter_(1, order, keep_sorted)
    return mask.reshape(attention.shape)


def head_colours(heads: int) -> list[tuple[int, int, int]]:
    """Evenly spaced, saturated hues: one distinguishable colour per head."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h / heads, 0.9, 1.0)) for h in range(heads)]


def render_attention(
    image: Image.Image, attention: torch.Tensor, patch: int, keep: float, out_dir: Path
) -> dict[str, Any]:
    """Write ``head_{i}.png`` (attention scaled to its maximum, one pixel block per patch), ``masks.png`` (each
    head's ``keep``-mass mask in its own colour over the image) and ``image.png``; return a summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    heads = attention.shape[0]
    scale = (patch, patch)
    written = []
    for head in range(heads):
        peak = attention[head].max().clamp_min(1e-12)
        grey = (attention[head] / peak * 255).round().to(torch.uint8).numpy()
        grey = np.kron(grey, np.ones(scale, dtype=np.uint8))  # nearest upsampling: one block per patch
        path = out_dir / f"head_{head}.png"
        Image.fromarray(grey, mode="L").save(path)
        written.append(path.name)
    masks = mass_mask(attention, keep)
    overlay = np.asarray(image, dtype=np.float32).copy()
    for head, colour in enumerate(head_colours(heads)):
        pixels = np.kron(masks[head].numpy(), np.ones(scale, dtype=bool))
        overlay[pixels] = 0.6 * overlay[pixels] + 0.4 * np.asarray(colour, dtype=np.float32)
    Image.fromarray(overlay.round().astype(np.uint8)).save(out_dir / "masks.png")
    image.save(out_dir / "image.png")
    flat = attention.reshape(heads, -1)
    kept = (flat * masks.reshape(heads, -1)).sum(1) / flat.sum(1)
    return {
        "heads": heads,
        "grid": list(attention.shape[1:]),
        "keep": keep,
        "mask_fraction": masks.reshape(heads, -1).float().mean(1).tolist(),
        "mass_kept": kept.tolist(),
        "files": [*written, "masks.png", "image.png"],
    }


def attention_maps(
    model_source: str,
    image_path: str,
    out_dir: str,
    image_size: int = 224,
    keep: float = 0.6,
    which: str = "teacher",
    arch: str | None = None,
) -> dict[str, Any]:
    """Load a ViT from a run / checkpoint, run it on one image resized to ``image_size``², write the PNGs."""
    if not 0.0 < keep <= 1.0:
        raise InputError(f"keep must be in (0, 1], got {keep}", argument="keep")
    with blame("model_source"):
        source = load_source(model_source, which)
    backbone, _, _ = build_backbone(source, image_size, arch)
    patch = patch_size_of(backbone)
    if patch is None:
        raise InputError(
            f"attention maps need a vision transformer; {type(backbone).__name__} has no attention", "model_source"
        )
    model = InferenceModel(backbone, ("attn",), uint8_input=True)
    try:
        data = Path(image_path).read_bytes()
    except OSError as error:
        raise InputError(f"cannot read {image_path}: {error}", argument="image_path") from None
    try:
        image = decode_image(data)
    except Exception as error:  # PIL raises several types for undecodable data
        raise InputError(f"{image_path} is not a readable image ({error})", argument="image_path") from None
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image).copy()).unsqueeze(0)
    with torch.inference_mode():
        (attention,) = model(pixels)
    summary = render_attention(image, attention[0], patch, keep, Path(out_dir))
    summary.update(source=str(source.path), image=str(image_path), image_size=image_size)
    atomic_write_json(Path(out_dir) / "attention.json", summary)
    return summary
