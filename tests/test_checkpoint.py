"""Tests for dino_scale.checkpoint: atomic saves, safe loads, backbone import from every supported source."""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import safetensors
import timm
import torch
import torchvision
from timm.layers import resample_abs_pos_embed
from torch import nn

from dino_scale import checkpoint as ckpt
from dino_scale.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    extract_backbone_state_dict,
    find_latest_checkpoint,
    load_backbone_weights,
    load_checkpoint,
    load_safetensors,
    save_checkpoint,
    save_safetensors,
)

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


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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


def ckpt_files(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").iterdir()}


# --- atomic writes and training checkpoints -----------------------------------------------------------------


def test_atomic_torch_save_round_trip(tmp_path: Path) -> None:
    obj = {
        "w": torch.randn(3, 4),
        "bf16": torch.randn(2, dtype=torch.bfloat16),
        "rng": torch.get_rng_state(),
        "meta": {"n": 3, "lr": 0.5, "name": "x", "flag": True, "none": None, "lst": [1, 2.0]},
    }
    target = tmp_path / "nested" / "obj.pt"
    atomic_torch_save(obj, target)
    loaded = load_checkpoint(target)
    assert torch.equal(loaded["w"], obj["w"]) and torch.equal(loaded["bf16"], obj["bf16"])
    assert torch.equal(loaded["rng"], obj["rng"]) and loaded["rng"].dtype == torch.uint8
    assert loaded["meta"] == obj["meta"]
    assert os.listdir(target.parent) == ["obj.pt"]  # no temp file left behind


def test_save_checkpoint_round_trip(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    state = {"student": model.state_dict(), "optimizer": opt.state_dict(), "step": 123, "config": {"a": [1]}}
    path = save_checkpoint(tmp_path, 123, state)
    assert path == tmp_path / "checkpoints" / "step_00000123.pt"
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest == {"step": 123, "file": "step_00000123.pt"}
    loaded = load_checkpoint(path)
    assert same_tensors(loaded["student"], state["student"])
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert loaded["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    assert loaded["step"] == 123 and loaded["config"] == {"a": [1]}


def _partial_torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    f.write(b"PK\x03\x04 half a checkpoint")
    raise RuntimeError("No space left on device")


@pytest.mark.parametrize("failure", ["torch.save", "replace-step-file", "replace-latest", "interrupt"])
def test_crash_mid_write_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    first = save_checkpoint(tmp_path, 1, {"w": torch.ones(3)})
    latest_before = (tmp_path / "checkpoints" / "latest.json").read_bytes()

    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        name = Path(dst).name
        if failure == "replace-step-file" and name.startswith("step_"):
            raise OSError("simulated crash during rename")
        if failure == "replace-latest" and name == "latest.json":
            raise OSError("simulated crash during rename")
        if failure == "interrupt":
            raise KeyboardInterrupt
        real_replace(src, dst)

    if failure == "torch.save":
        monkeypatch.setattr(torch, "save", _partial_torch_save)
    else:
        monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises((OSError, RuntimeError, KeyboardInterrupt)):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)})
    monkeypatch.undo()

    # The previous checkpoint and latest.json are untouched and nothing but final names remain.
    assert (tmp_path / "checkpoints" / "latest.json").read_bytes() == latest_before
    assert torch.equal(load_checkpoint(first)["w"], torch.ones(3))
    assert find_latest_checkpoint(tmp_path) == first
    expected = {"step_00000001.pt", "latest.json"}
    if failure == "replace-latest":
        # The new step file was completely written before latest.json was due to move; it must be whole.
        expected.add("step_00000002.pt")
        assert torch.equal(load_checkpoint(tmp_path / "checkpoints" / "step_00000002.pt")["w"], torch.zeros(3))
    assert ckpt_files(tmp_path) == expected


def test_failed_overwrite_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "teacher.pt"
    atomic_torch_save({"w": torch.ones(2)}, target)
    monkeypatch.setattr(torch, "save", _partial_torch_save)
    with pytest.raises(RuntimeError, match="No space left"):
        atomic_torch_save({"w": torch.zeros(2)}, target)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(target)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["teacher.pt"]


def test_leftover_temp_files_are_cleaned_by_next_save(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.ones(1)})
    (tmp_path / "checkpoints" / ".step_00000002.pt.abc123.tmp").write_bytes(b"PK torn")  # a SIGKILLed save
    save_checkpoint(tmp_path, 3, {"w": torch.ones(1)})
    assert ckpt_files(tmp_path) == {"step_00000001.pt", "step_00000003.pt", "latest.json"}


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=2)
    assert ckpt_files(tmp_path) == {"step_00000004.pt", "step_00000005.pt", "latest.json"}
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000005.pt"

    # Resuming from an older step: the file just written is kept even though higher steps exist.
    save_checkpoint(tmp_path, 3, {"step": 3}, keep_last=2)
    assert ckpt_files(tmp_path) == {"step_00000005.pt", "step_00000003.pt", "latest.json"}
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000003.pt"

    other = tmp_path / "keep_all"
    for step in range(1, 5):
        save_checkpoint(other, step, {"step": step}, keep_last=0)
    assert len(ckpt_files(other)) == 5


def test_save_checkpoint_rejects_state_weights_only_cannot_load(tmp_path: Path) -> None:
    state = {"config": {"data": {"root": Path("/data")}}, "w": torch.ones(1)}
    with pytest.raises(TypeError, match=r"state\['config'\]\['data'\]\['root'\] has type pathlib\..*Path"):
        save_checkpoint(tmp_path, 1, state)
    assert not (tmp_path / "checkpoints").exists()


# --- find_latest_checkpoint ---------------------------------------------------------------------------------


def test_find_latest_checkpoint(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path / "does-not-exist") is None
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    (ckpt_dir / ".step_99999999.pt.x1.tmp").write_bytes(b"torn")
    (ckpt_dir / "step_99999999.pt.tmp").write_bytes(b"torn")
    assert find_latest_checkpoint(tmp_path) is None  # temp files are not checkpoints

    # 9-digit step sorts after 8-digit ones numerically even though "1" < "9" as text.
    for step in (7, 99_999_998, 123_456_789):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=0)
    newest = ckpt_dir / "step_123456789.pt"
    assert find_latest_checkpoint(tmp_path) == newest

    (ckpt_dir / "latest.json").write_text(json.dumps({"step": 7, "file": "step_00000007.pt"}))
    assert find_latest_checkpoint(tmp_path) == ckpt_dir / "step_00000007.pt"  # latest.json wins when valid

    (ckpt_dir / "latest.json").unlink()
    assert find_latest_checkpoint(tmp_path) == newest

    for bad in ("{not json", "[]", json.dumps({"file": "step_00000042.pt"}), json.dumps({"file": "../x.pt"})):
        (ckpt_dir / "latest.json").write_text(bad)
        assert find_latest_checkpoint(tmp_path) == newest, bad


# --- safe loading -------------------------------------------------------------------------------------------

SIDE_EFFECTS: list[str] = []


class Custom:
    """A user class; unpickling it would run __setstate__, i.e. arbitrary code."""

    def __init__(self) -> None:
        self.payload = "x"

    def __setstate__(self, state: dict[str, Any]) -> None:
        SIDE_EFFECTS.append("code ran")
        self.__dict__.update(state)


def test_load_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "obj": Custom()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "Custom" in msg and "weights_only" in msg
    with pytest.raises(CheckpointError, match="Custom"):
        extract_backbone_state_dict(path)
    # Allowlisting Namespace for DINO's args must not open the door to objects nested inside it.
    torch.save({"teacher": {"w": torch.ones(1)}, "args": argparse.Namespace(x=Custom())}, path)
    with pytest.raises(CheckpointError, match="Custom"):
        extract_backbone_state_dict(path)
    assert SIDE_EFFECTS == []


def test_corrupt_and_missing_files_name_the_path(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    atomic_torch_save({"w": torch.randn(1000)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)
    not_st = tmp_path / "bad.safetensors"
    not_st.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_safetensors(not_st)

    missing = tmp_path / "nope" / "step_00000001.pt"
    for fn in (load_checkpoint, load_safetensors, extract_backbone_state_dict):
        with pytest.raises(FileNotFoundError, match="step_00000001.pt"):
            fn(missing)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_run"):
        extract_backbone_state_dict(tmp_path / "empty_run")


def test_safetensors_round_trip(tmp_path: Path) -> None:
    base = torch.randn(4, 6)
    state = {"t": base.t(), "tied_a": base, "tied_b": base, "i": torch.arange(3)}  # non-contiguous + shared
    path = tmp_path / "w.safetensors"
    save_safetensors(state, path, metadata={"arch": "vit_tiny"})
    loaded = load_safetensors(path)
    assert same_tensors(loaded, {k: v.contiguous() for k, v in state.items()})
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"arch": "vit_tiny"}
    assert os.listdir(tmp_path) == ["w.safetensors"]
    with pytest.raises(TypeError, match="'n'"):
        save_safetensors({"n": 3}, tmp_path / "x.safetensors")  # type: ignore[dict-item]


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


def test_safetensors_detection_does_not_depend_on_the_first_byte(tmp_path: Path) -> None:
    """A header length of 0x..80 starts the file with 0x80, the pickle marker; it is still safetensors."""
    for padding in range(256):  # find a metadata size that makes the header length end in 0x80
        path = tmp_path / "w.safetensors"
        ckpt.save_safetensors({"w": torch.ones(2)}, path, metadata={"pad": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length ending in 0x80 found")
    assert ckpt.is_safetensors_file(path)
    assert torch.equal(ckpt.extract_backbone_state_dict(path)["w"], torch.ones(2))
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)  # raw pickle, starts 0x80
    assert not ckpt.is_safetensors_file(legacy)
