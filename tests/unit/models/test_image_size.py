"""The size a model runs at by default: the size it was trained at, read from wherever the source records it (a run's
config.json, a checkpoint's stored config, safetensors metadata, official DINO args), else the timm model's own input
size; and the line that says which (dino_scale.models.weights.choose_image_size)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support import ARCH, TINY, official_checkpoint

from dino_scale.io import atomic_torch_save, save_safetensors
from dino_scale.models.backbones import create_backbone
from dino_scale.models.weights import choose_image_size, load_source, trained_image_size

NO_SIZE = {k: v for k, v in TINY.items() if k != "img_size"}


def weights() -> dict[str, torch.Tensor]:
    return create_backbone(ARCH, **TINY).state_dict()


def backbone_file(path: Path, timm_kwargs: dict[str, Any] = TINY, **metadata: str) -> Path:
    """A safetensors backbone as training writes it (arch, timm_kwargs, plus the given metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(weights(), path, metadata={"arch": ARCH, "timm_kwargs": json.dumps(timm_kwargs), **metadata})
    return path


def run_dir(root: Path, crop: int) -> Path:
    """A run directory with a config.json (data.global_crop_size) and a teacher backbone without a size record."""
    config = {"model": {"arch": ARCH, "timm_kwargs": NO_SIZE}, "data": {"global_crop_size": crop}}
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    backbone_file(root / "teacher_backbone.safetensors", NO_SIZE)
    return root


def test_a_run_directory_gives_its_global_crop_size(tmp_path: Path) -> None:
    run = run_dir(tmp_path / "run", crop=48)
    size = choose_image_size(load_source(run))
    assert size.value == 48
    assert size.describe() == (
        f"image size 48 (the size the model was trained at: data.global_crop_size in {run / 'config.json'})"
    )
    # The backbone file of the run, named directly, reads the same config.
    assert trained_image_size(load_source(run / "teacher_backbone.safetensors")).value == 48


def test_safetensors_metadata_records_the_size_and_wins_over_the_run_config(tmp_path: Path) -> None:
    path = backbone_file(tmp_path / "b.safetensors", image_size="40")
    size = trained_image_size(load_source(path))
    assert (size.value, size.origin) == (40, f"the size the model was trained at: image_size in the metadata of {path}")
    run = run_dir(tmp_path / "run", crop=48)
    backbone_file(run / "teacher_backbone.safetensors", NO_SIZE, image_size="56")
    assert trained_image_size(load_source(run / "teacher_backbone.safetensors")).value == 56


def test_a_checkpoint_gives_the_crop_size_of_its_stored_config(tmp_path: Path) -> None:
    path = tmp_path / "step_00000004.pt"
    config = {"model": {"arch": ARCH, "timm_kwargs": TINY}, "data": {"global_crop_size": 24}}
    atomic_torch_save({"teacher": {f"backbone.{k}": v for k, v in weights().items()}, "config": config}, path)
    size = trained_image_size(load_source(path))
    assert size.value == 24 and f"data.global_crop_size in the config stored in {path}" in size.origin


def test_an_official_dino_checkpoint_was_trained_at_224(tmp_path: Path) -> None:
    official_checkpoint(tmp_path / "checkpoint.pth")
    size = choose_image_size(load_source(tmp_path / "checkpoint.pth"))
    assert size.value == 224 and "official DINO" in size.origin


@pytest.mark.parametrize(
    ("arch", "timm_kwargs", "expected", "said"),
    [
        (ARCH, TINY, 32, f"img_size in the timm_kwargs of {ARCH}"),  # what the recipes' timm_kwargs set
        (ARCH, NO_SIZE, 224, f"timm's input_size of {ARCH}"),
        ("vit_base_patch16_384", {}, 384, "timm's input_size of vit_base_patch16_384"),
    ],
)
def test_without_a_record_the_timm_model_input_size_is_the_fallback(
    tmp_path: Path, arch: str, timm_kwargs: dict[str, Any], expected: int, said: str
) -> None:
    source = load_source(backbone_file(tmp_path / "bare.safetensors", timm_kwargs))
    assert source.image_size is None
    size = trained_image_size(source, arch, timm_kwargs)
    assert size.value == expected and said in size.origin and "nothing records" in size.origin


def test_an_explicit_size_wins_and_says_so(tmp_path: Path) -> None:
    source = load_source(run_dir(tmp_path / "run", crop=48))
    assert choose_image_size(source, 64).describe() == "image size 64 (as given: --image-size)"
