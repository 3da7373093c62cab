"""`dino-scale attention`: last-layer CLS attention maps of a ViT, one figure per image, as in the paper's figures.

For each head h the map is ``A_h = softmax(q_cls · Kᵀ · scale)`` over the patch tokens (see
:class:`dino_scale.export.graph.InferenceModel`). The mask of a head keeps the smallest set of patches whose
attention sums to at least ``keep`` (0.6 in the paper): sort ``A_h`` descending and keep patches while the
cumulative mass before them is below ``keep`` (official DINO's visualize_attention.py).

Each figure is one row of panels: the model's input (the image resized and centre-cropped as every evaluation
does), each head's map upsampled to the input size in a colour map, and the input with every head's mask outlined
in that head's colour. Beside the figures, attention.json holds the numbers (per image and head: the share of
patches in the mask and the attention mass it holds).
"""

from __future__ import annotations

import colorsys
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from dino_scale.data.augment import eval_crop
from dino_scale.data.decode import decode_image
from dino_scale.data.items import list_image_files
from dino_scale.errors import InputError, NotFound, blame
from dino_scale.export.graph import InferenceModel
from dino_scale.io import atomic_write, atomic_write_json
from dino_scale.models.backbones import patch_size_of
from dino_scale.models.weights import build_backbone, choose_image_size, load_source

log = logging.getLogger(__name__)

SUMMARY_FILE = "attention.json"
PANEL_INCHES = 2.5  # each panel's side; a figure is (heads + 2) panels wide
DPI = 100
COLOUR_MAP = "inferno"


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


def head_colours(heads: int) -> list[tuple[float, float, float]]:
    """Evenly spaced, saturated hues (RGB in [0, 1]): one colour per head that stands out on a photo."""
    return [colorsys.hsv_to_rgb(h / heads, 1.0, 1.0) for h in range(heads)]


def _upsample(grid: np.ndarray, patch: int) -> np.ndarray:
    """A [h, w] patch grid at pixel size [h*p, w*p]: each patch a block (nearest), so no value is invented."""
    return np.kron(grid, np.ones((patch, patch), dtype=grid.dtype))


def attention_figure(image: np.ndarray, attention: torch.Tensor, patch: int, keep: float, title: str = "") -> Figure:
    """One row of ``heads + 2`` square panels: ``image`` (uint8 [S, S, 3], the model's input), each head's map
    (upsampled to S x S, colour map :data:`COLOUR_MAP`, titled with the head number in the head's colour), and the
    image with each head's ``keep``-mass mask outlined in the head's colour (matplotlib contour at 0.5).

    A bare :class:`Figure` (no pyplot): nothing needs a display, nothing stays registered after it is saved.
    """
    heads = attention.shape[0]
    colours = head_colours(heads)
    masks = mass_mask(attention, keep).numpy()
    panels = heads + 2
    figure = Figure(figsize=(PANEL_INCHES * panels, PANEL_INCHES + 0.4), dpi=DPI, layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(image)
    axes[0].set_title(f"input {image.shape[1]}x{image.shape[0]}")
    for head in range(heads):
        axes[1 + head].imshow(_upsample(attention[head].numpy(), patch), cmap=COLOUR_MAP, interpolation="nearest")
        axes[1 + head].set_title(f"head {head}", color=colours[head], fontweight="bold")
    outline = axes[-1]
    outline.imshow(image)
    # A zero border closes the outlines of masks that touch the image's edge (they run along the edge).
    rows, cols = np.arange(-1, image.shape[0] + 1), np.arange(-1, image.shape[1] + 1)
    for head in range(heads):
        mask = np.pad(_upsample(masks[head].astype(np.float32), patch), 1)
        outline.contour(cols, rows, mask, levels=[0.5], colors=[colours[head]], linewidths=2.0)
    outline.set_title(f"{keep:.0%} mass masks")
    if title:
        figure.suptitle(title, fontsize="small")
    return figure


@dataclass(frozen=True)
class ImageFile:
    """An image to draw: its path, and the name relative to the input that names its figure."""

    path: Path
    name: str


def _images(images: Path, out_dir: Path) -> list[ImageFile]:
    """The image file, or every image file under the folder (recursive, sorted), figures folder left out."""
    if images.is_file():
        return [ImageFile(images, images.name)]
    if not images.is_dir():
        raise NotFound(f"{images} does not exist", argument="images")
    with blame("images"):
        items, _ = list_image_files(images)
    root, out = images.resolve(), out_dir.resolve()
    # A figures folder inside the image folder must not feed a second run its own PNGs.
    found = [Path(item.path) for item in items if not Path(item.path).is_relative_to(out)]
    if not found:
        raise InputError(f"{images} holds no image files", argument="images")
    return [ImageFile(path, path.relative_to(root).as_posix()) for path in found]


def figure_name(name: str) -> str:
    """The figure of image ``name`` (its path relative to the input): the same path with ``.png`` appended, so that
    a.jpg and a.png, or x/a.jpg and y/a.jpg, never share a figure."""
    return f"{name}.png"


def attention_maps(
    model_source: str | Path,
    images: str | Path,
    out_dir: str | Path,
    image_size: int | None = None,
    keep: float = 0.6,
    which: str = "teacher",
    arch: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Draw the last-layer CLS attention of a ViT (a run directory or checkpoint) on an image file or on every image
    under a folder: one PNG per image (:func:`attention_figure`) in ``out_dir``, named :func:`figure_name` of the
    image's path relative to the folder (subfolders mirrored), and ``out_dir/attention.json``.

    ``image_size`` (default: the size the model was trained at, dino_scale.models.weights.trained_image_size): the
    image's shorter side is resized to image_size x 256/224 and the centre image_size² crop is what the model sees,
    as in every evaluation. Unreadable images are skipped with a warning and counted; none readable at all is an
    InputError. Returns the summary written to attention.json; ``echo`` gets the image size line and the summary.
    """
    if not 0.0 < keep <= 1.0:
        raise InputError(f"keep must be in (0, 1], got {keep}", argument="keep")
    images, out_dir = Path(images), Path(out_dir)
    files = _images(images, out_dir)
    with blame("model_source"):
        source = load_source(model_source, which)
    chosen = choose_image_size(source, image_size, arch)
    size = chosen.value
    if echo is not None:
        echo(chosen.describe())  # the size a model runs at is never a silent default
    backbone, _, _ = build_backbone(source, size, arch)
    patch = patch_size_of(backbone)
    if patch is None:
        raise InputError(
            f"attention maps need a vision transformer; {type(backbone).__name__} has no attention", "model_source"
        )
    model = InferenceModel(backbone, ("attn",), uint8_input=True).eval()
    crop = eval_crop(size)
    written: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    heads = 0
    for file in files:
        try:
            pixels = crop(decode_image(file.path.read_bytes())).permute(1, 2, 0).contiguous()  # uint8 [S, S, 3]
        except Exception as error:  # PIL raises many types for undecodable data; an OSError for unreadable files
            reason = f"{type(error).__name__}: {error}"
            log.warning("skipped %s: not a readable image (%s)", file.path, reason)
            skipped.append({"file": file.name, "error": reason})
            continue
        with torch.inference_mode():
            (attention,) = model(pixels.unsqueeze(0))
        attention = attention[0]
        heads = attention.shape[0]
        figure = attention_figure(pixels.numpy(), attention, patch, keep, title=file.name)
        target = out_dir / figure_name(file.name)
        atomic_write(target, lambda tmp, figure=figure: figure.savefig(tmp, format="png", dpi=DPI))
        masks = mass_mask(attention, keep).reshape(heads, -1)
        flat = attention.reshape(heads, -1)
        written.append(
            {
                "file": file.name,
                "figure": figure_name(file.name),
                "heads": heads,
                "mask_fraction": masks.float().mean(1).tolist(),
                "mass_kept": ((flat * masks).sum(1) / flat.sum(1)).tolist(),
            }
        )
    if not written:
        reasons = "; ".join(f"{s['file']}: {s['error']}" for s in skipped[:3])
        what = f"{images} is not a readable image" if images.is_file() else f"no readable image under {images}"
        raise InputError(f"{what} ({reasons})", argument="images")
    summary = {
        "source": str(source.path),
        "images": str(images),
        "image_size": size,
        "image_size_origin": chosen.origin,
        "patch_size": patch,
        "grid": [size // patch, size // patch],
        "heads": heads,
        "keep": keep,
        "written": len(written),
        "skipped": len(skipped),
        "figures": written,
        "skipped_files": skipped,
    }
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    if echo is not None:
        echo(
            f"wrote {len(written)} attention figure(s) ({heads} heads, {size}x{size} px input) to {out_dir}"
            + (f"; skipped {len(skipped)} unreadable image(s)" if skipped else "")
        )
    return summary
