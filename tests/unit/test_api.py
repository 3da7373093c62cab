"""The Python API: `from dino_scale import load_backbone` (lazy: `import dino_scale` imports no torch) and the
torch.hub entry point of the checkout's hubconf.py give a verified timm model at the size the weights were trained
at, whose forward is the backbone's pooled feature."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from support import ARCH, REPO, STUDENT_SHIFT, TINY, official_checkpoint

from dino_scale.errors import InputError
from dino_scale.io import save_safetensors

NO_SIZE = {k: v for k, v in TINY.items() if k != "img_size"}


def reference(weights: dict[str, torch.Tensor], size: int = 32) -> torch.nn.Module:
    """Plain timm with the same weights (the table at its own size: no resampling), independent of dino_scale."""
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, global_pool="token", **{**TINY, "img_size": size})
    model.load_state_dict(weights)
    return model.eval()


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run directory trained (as far as its config says) at 32 px, with a teacher backbone."""
    torch.manual_seed(0)
    weights = timm.create_model(ARCH, pretrained=False, num_classes=0, **TINY).state_dict()
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": {"arch": ARCH, "timm_kwargs": NO_SIZE}, "data": {"global_crop_size": 32}}
    (run / "config.json").write_text(json.dumps(config))
    metadata = {"arch": ARCH, "timm_kwargs": json.dumps(NO_SIZE)}
    save_safetensors(weights, run / "teacher_backbone.safetensors", metadata=metadata)
    return run, weights


def test_import_dino_scale_stays_light() -> None:
    code = (
        "import sys, dino_scale; assert 'torch' not in sys.modules, 'torch imported'; "
        "from dino_scale import load_backbone; assert 'torch' in sys.modules; print(load_backbone.__module__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "dino_scale.models.weights"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        import dino_scale

        dino_scale.nothing  # noqa: B018 - the module's __getattr__ must still refuse unknown names


def test_load_backbone_gives_the_trained_model_at_its_trained_size(run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    from dino_scale import load_backbone

    path, weights = run
    model = load_backbone(path)
    assert not model.training and model.num_classes == 0
    assert model.dino_image_size == 32 and "data.global_crop_size" in model.dino_image_size_origin
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)
    assert timm.data.resolve_data_config({}, model=model)["mean"] == (0.485, 0.456, 0.406)  # DINO's, not 0.5
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(images), reference(weights)(images), atol=1e-5)
    assert model(images).shape == (3, 48)
    # Another size: the position embeddings are resampled once, and the model says its size.
    assert load_backbone(path, image_size=48).dino_image_size == 48
    with pytest.raises(InputError, match="not divisible by the patch size 8"):
        load_backbone(path, image_size=30)


def test_an_official_checkpoint_needs_its_arch_named_and_gives_teacher_or_student(tmp_path: Path) -> None:
    from dino_scale import load_backbone

    weights = official_checkpoint(tmp_path / "checkpoint.pth")  # records arch vit_tiny_patch8_224: not a timm name
    teacher = load_backbone(tmp_path / "checkpoint.pth", image_size=32, arch=ARCH, timm_kwargs=TINY)
    student = load_backbone(tmp_path / "checkpoint.pth", "student", image_size=32, arch=ARCH, timm_kwargs=TINY)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(images), reference(weights)(images), atol=1e-5)
        shifted = {k: v + STUDENT_SHIFT for k, v in weights.items()}
        assert torch.allclose(student(images), reference(shifted)(images), atol=1e-5)
    # Without an image size: the 224 official DINO trains at.
    assert load_backbone(tmp_path / "checkpoint.pth", arch=ARCH, timm_kwargs=TINY).dino_image_size == 224


def test_torch_hub_loads_from_the_checkout(run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, weights = run
    model = torch.hub.load(str(REPO), "load_backbone", source="local", path=str(path), trust_repo=True)
    assert model.dino_image_size == 32 and not model.training
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(images), reference(weights)(images), atol=1e-5)
    resized = torch.hub.load(str(REPO), "load_backbone", source="local", path=str(path), image_size=48)
    assert resized.dino_image_size == 48 and resized.pretrained_cfg["input_size"] == (3, 48, 48)
