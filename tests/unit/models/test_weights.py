"""dino_scale.models.weights: backbone weights from every supported source (our runs, checkpoints and safetensors,
official DINO releases) loaded strictly into timm models."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from support import same_tensors
from timm.layers import resample_abs_pos_embed
from torch import nn

from dino_scale.errors import CheckpointError
from dino_scale.io import save_safetensors
from dino_scale.models.weights import extract_backbone_state_dict, load_backbone_weights, load_source
from dino_scale.train.checkpoint import save_checkpoint

EMBED = 48


def tiny_vit(seed: int = 0, img_size: int = 32, **overrides: Any) -> nn.Module:
    """A ~60k-parameter ViT with the same key layout as the real ones (vit_tiny/small/base)."""
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(img_size=img_size, patch_size=8, depth=2, embed_dim=EMBED, num_heads=3)
    kwargs.update(overrides)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    # Make norm/bias params non-trivial so that a silently skipped key would change the outputs.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(123))


def dino_head_params() -> dict[str, torch.Tensor]:
    """Key layout of the official DINOHead (3-layer MLP + weight-normed last layer)."""
    return {
        "head.mlp.0.weight": torch.randn(32, EMBED),
        "head.mlp.0.bias": torch.randn(32),
        "head.mlp.2.weight": torch.randn(16, 32),
        "head.last_layer.weight_g": torch.ones(64, 1),
        "head.last_layer.weight_v": torch.randn(64, 16),
    }


class Wrapper(nn.Module):
    """Stands in for the training wrapper: backbone params under "backbone.", head params under "head."."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(EMBED, 32), nn.GELU(), nn.Linear(32, 16))


# --- backbone extraction ------------------------------------------------------------------------------------


def _official_full_checkpoint(student: nn.Module, teacher: nn.Module) -> dict[str, Any]:
    """Layout of facebookresearch/dino's checkpoint.pth (student under DDP, teacher not)."""
    head = dino_head_params()
    return {
        "student": {
            **{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
            **{f"module.{k}": v for k, v in head.items()},
        },
        "teacher": {
            **{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
            **{k: v + 1 for k, v in head.items()},
        },
        "optimizer": torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9).state_dict(),
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, global_crops_scale=[0.4, 1.0]),
        "dino_loss": {"center": torch.zeros(1, 64)},
        "fp16_scaler": None,
    }


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_official_full_checkpoint_reproduces_outputs(tmp_path: Path, which: str) -> None:
    student, teacher = tiny_vit(seed=1), tiny_vit(seed=2)
    path = tmp_path / "checkpoint.pth"
    torch.save(_official_full_checkpoint(student, teacher), path)
    # Why the Namespace allowlist exists: plain weights_only loading refuses these files.
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(path, map_location="cpu", weights_only=True)

    reference = {"teacher": teacher, "student": student}[which]
    weights = extract_backbone_state_dict(path, which=which)
    assert same_tensors(weights, reference.state_dict())  # head and prefixes gone
    fresh = tiny_vit(seed=3)
    load_backbone_weights(fresh, weights, source=str(path))
    with torch.no_grad():
        assert torch.equal(fresh(images()), reference(images()))
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # allowlist not leaked process-wide


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="plain"),
        pytest.param(lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}, id="state_dict+module"),
        pytest.param(lambda sd: {"model": {f"backbone.{k}": v for k, v in sd.items()}, "epoch": 1}, id="model+bb"),
        pytest.param(
            lambda sd: {f"module.backbone.{k}": v for k, v in sd.items()} | dino_head_params(),
            id="module+bb+head",
        ),
        pytest.param(lambda sd: {k: v for k, v in sd.items()} | dino_head_params(), id="plain+dino-head"),
        pytest.param(
            lambda sd: {"teacher": {f"_orig_mod.backbone.{k}": v for k, v in sd.items()}},
            id="compiled-wrapper",
        ),
    ],
)
def test_backbone_only_official_pth(tmp_path: Path, wrap: Any) -> None:
    source = tiny_vit(seed=4)
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(wrap(source.state_dict()), path)
    weights = extract_backbone_state_dict(path)
    assert same_tensors(weights, source.state_dict())
    fresh = tiny_vit(seed=5)
    load_backbone_weights(fresh, weights, source=str(path))
    with torch.no_grad():
        assert torch.equal(fresh(images()), source(images()))


def test_a_damaged_checkpoint_is_refused_not_exported(tmp_path: Path) -> None:
    teacher = Wrapper(tiny_vit(seed=7))
    run_dir = tmp_path / "run"
    path = save_checkpoint(run_dir, 7, {"student": teacher.state_dict(), "teacher": teacher.state_dict(), "step": 7})
    assert same_tensors(extract_backbone_state_dict(path), teacher.backbone.state_dict())
    data = bytearray(path.read_bytes())
    tensor_bytes = teacher.backbone.blocks[0].mlp.fc1.weight.detach().numpy().tobytes()
    at = bytes(data).index(tensor_bytes[:64]) + 10  # inside a weight's stored bytes: the zip header stays valid
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    for source in (path, run_dir):  # the checkpoint named, or found in its run directory
        with pytest.raises(CheckpointError, match=r"cannot be trusted: .*does not match the sha256 in its manifest"):
            extract_backbone_state_dict(source)


def test_our_checkpoint_run_dir_and_safetensors(tmp_path: Path) -> None:
    student, teacher = Wrapper(tiny_vit(seed=6)), Wrapper(tiny_vit(seed=7))
    run_dir = tmp_path / "run"
    state = {
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "step": 7,
        "loss_center": torch.ones(16),
    }
    path = save_checkpoint(run_dir, 7, state)

    teacher_bb, student_bb = teacher.backbone.state_dict(), student.backbone.state_dict()
    assert same_tensors(extract_backbone_state_dict(path), teacher_bb)
    assert same_tensors(extract_backbone_state_dict(path, which="student"), student_bb)
    assert same_tensors(extract_backbone_state_dict(run_dir, which="student"), student_bb)
    with pytest.raises(ValueError, match="which"):
        extract_backbone_state_dict(path, which="ema")

    # A run dir holding only the exported teacher backbone, and the safetensors file itself (any suffix).
    exported = tmp_path / "exported"
    save_safetensors(teacher_bb, exported / "teacher_backbone.safetensors", metadata={"arch": "tiny"})
    assert same_tensors(extract_backbone_state_dict(exported), teacher_bb)
    with pytest.raises(ValueError, match="student"):
        extract_backbone_state_dict(exported, which="student")
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes((exported / "teacher_backbone.safetensors").read_bytes())
    weights = extract_backbone_state_dict(renamed)
    fresh = tiny_vit(seed=8)
    load_backbone_weights(fresh, weights, source=str(renamed))
    with torch.no_grad():
        assert torch.equal(fresh(images()), teacher.backbone(images()))


# --- loading into timm models -------------------------------------------------------------------------------


def test_official_dino_vit_key_names_match_timm() -> None:
    """facebookresearch/dino's vit_small key layout (depth 12, dim 384, patch 16) is exactly timm's."""
    dim, depth = 384, 12
    dino: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 197, dim),
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    for i in range(depth):
        for name, shape in {
            "norm1": (dim,),
            "attn.qkv": (3 * dim, dim),
            "attn.proj": (dim, dim),
            "norm2": (dim,),
            "mlp.fc1": (4 * dim, dim),
            "mlp.fc2": (dim, 4 * dim),
        }.items():
            dino[f"blocks.{i}.{name}.weight"] = shape
            dino[f"blocks.{i}.{name}.bias"] = shape[:1]
    with torch.device("meta"):
        model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == dino


def test_torchvision_resnet_loads_into_timm_resnet(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():  # non-default BN statistics so that skipping a buffer would show
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    full = tv.state_dict()
    path = tmp_path / "dino_resnet.pth"
    torch.save(full, path)  # torchvision classifier "fc.*" still present
    weights = extract_backbone_state_dict(path)
    weights.pop("layer1.0.bn1.num_batches_tracked")  # absent in some old releases: torch fills it in

    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    load_backbone_weights(model, weights, source=str(path))
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), tv(x))

    # A model with a classifier needs fc.*: the official fc-less release must then be reported, not ignored.
    no_fc = {k: v for k, v in full.items() if not k.startswith("fc.")}
    with_head = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match=r"missing keys \(2\): fc.bias, fc.weight"):
        load_backbone_weights(with_head, no_fc, source="dino_resnet.pth")


def test_pos_embed_is_resampled_for_another_image_size() -> None:
    source = tiny_vit(seed=9, img_size=32)  # 4x4 grid
    target = tiny_vit(seed=10, img_size=48)  # 6x6 grid
    weights = source.state_dict()
    load_backbone_weights(target, weights, source="vit32.pth")
    expected = resample_abs_pos_embed(weights["pos_embed"], new_size=[6, 6], num_prefix_tokens=1)
    assert target.pos_embed.shape == (1, 37, EMBED)
    assert torch.equal(target.pos_embed.detach(), expected)
    assert torch.equal(target.pos_embed[:, :1].detach(), weights["pos_embed"][:, :1])  # cls slot untouched
    target_sd = target.state_dict()
    assert all(torch.equal(target_sd[k], v) for k, v in weights.items() if k != "pos_embed")
    assert weights["pos_embed"].shape == (1, 17, EMBED)  # caller's dict not modified


def test_wrong_architecture_error_is_readable() -> None:
    weights = tiny_vit(seed=11).state_dict()
    bigger = tiny_vit(seed=12, depth=4, embed_dim=64, num_heads=4)
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_backbone_weights(bigger, weights, source="runs/a/teacher_backbone.safetensors")
    msg = str(info.value)
    assert msg.startswith("Checkpoint runs/a/teacher_backbone.safetensors does not match the model")
    assert "another architecture" in msg
    missing_line = next(line for line in msg.splitlines() if "missing keys" in line)
    assert "missing keys (24)" in missing_line and "blocks.2." in missing_line and "(+19 more)" in missing_line
    assert missing_line.count("blocks.") == 5
    assert "shape mismatches" in msg and f"checkpoint (1, 1, {EMBED}) vs model (1, 1, 64)" in msg
    assert "unexpected keys" not in msg
    assert same_tensors(bigger.state_dict(), before)  # nothing was partially loaded

    resnet_weights = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): bn1.bias, bn1.num_batches_tracked") as info:
        load_backbone_weights(tiny_vit(), resnet_weights, source="resnet.pth")
    assert "missing keys (30): blocks.0.attn.proj.bias" in str(info.value)


# --- the position-embedding interpolation a source records ---------------------------------------------------------


def test_sources_record_their_pos_embed_interpolation(tmp_path: Path) -> None:
    """build_backbone resamples with what the weights were trained with (see test_pos_embed.py); where a source does
    not say (official releases, older runs), nothing is recorded and the official method applies."""
    teacher = Wrapper(tiny_vit(seed=13))
    state = {"student": teacher.state_dict(), "teacher": teacher.state_dict(), "step": 1}
    config = {"model": {"arch": "vit_tiny_patch16_224", "timm_kwargs": {}, "pos_embed_interpolation": "timm"}}
    ours = save_checkpoint(tmp_path / "run", 1, {**state, "config": config})
    assert load_source(ours).pos_embed_interpolation == "timm"
    older = save_checkpoint(tmp_path / "old", 1, {**state, "config": {"model": {"arch": "vit_tiny_patch16_224"}}})
    assert load_source(older).pos_embed_interpolation is None

    backbone = teacher.backbone.state_dict()
    recorded = tmp_path / "recorded.safetensors"
    save_safetensors(backbone, recorded, metadata={"arch": "tiny", "pos_embed_interpolation": "official"})
    assert load_source(recorded).pos_embed_interpolation == "official"
    junk = tmp_path / "junk.safetensors"
    save_safetensors(backbone, junk, metadata={"arch": "tiny", "pos_embed_interpolation": "nearest"})
    assert load_source(junk).pos_embed_interpolation is None

    official = tmp_path / "checkpoint.pth"
    torch.save(_official_full_checkpoint(teacher.backbone, teacher.backbone), official)
    assert load_source(official).pos_embed_interpolation is None
