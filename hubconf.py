"""torch.hub entry points of dino-scale: trained backbones as timm models, from a local checkout.

    import torch

    model = torch.hub.load("/path/to/dino-scale", "load_backbone", source="local", path="runs/my-run")
    features = model(images)  # [B, model.num_features], images at model.dino_image_size

Nothing is downloaded (no pretrained weights are fetched): ``path`` names weights on this machine. torch.hub puts the
checkout on ``sys.path``, so the package need not be installed, only its dependencies (``pip install -e .`` installs
them).
"""

from __future__ import annotations

from typing import Any

dependencies = ["torch", "timm"]


def load_backbone(
    path: str,
    which: str = "teacher",
    image_size: int | None = None,
    device: str = "cpu",
    arch: str | None = None,
    timm_kwargs: dict[str, Any] | None = None,
) -> Any:
    """A trained DINO backbone as a timm model in eval mode (forward: the pooled CLS feature, no classifier).

    ``path``: a run directory, a checkpoint (``.pt`` file or folder), a ``.safetensors`` backbone, or an official
    facebookresearch/dino ``.pth`` (backbone-only files need ``arch``, e.g. ``"vit_small_patch16_224"``).
    ``which``: "teacher" (default) or "student". ``image_size``: the input size; by default the one the model was
    trained at, recorded on the model as ``dino_image_size`` and in ``pretrained_cfg["input_size"]``.
    ``arch`` / ``timm_kwargs`` override what the weights record. See ``dino_scale.load_backbone``.
    """
    from dino_scale import load_backbone as api

    return api(path, which=which, image_size=image_size, device=device, arch=arch, timm_kwargs=timm_kwargs)
