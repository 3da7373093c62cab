"""dino-scale: DINO self-supervised training, from one CPU to many GPUs.

The Python API is :func:`load_backbone` (``from dino_scale import load_backbone``): a trained backbone as a timm
model. It is imported on first use, so that ``import dino_scale`` (and the command line's start-up) stays light:
nothing here imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load_backbone", "__version__"]

if TYPE_CHECKING:
    from dino_scale.models.weights import load_backbone


def __getattr__(name: str) -> Any:
    """``dino_scale.load_backbone``, imported (with torch and timm) only when asked for."""
    if name == "load_backbone":
        from dino_scale.models.weights import load_backbone

        return load_backbone
    raise AttributeError(f"module 'dino_scale' has no attribute {name!r}")
