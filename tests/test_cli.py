"""The CLI around importing official DINO checkpoints and starting training from them."""

import argparse
import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dino_scale.cli import main as cli
from dino_scale.config import load_config
from dino_scale.models import create_backbone
from dino_scale.train import train

REPO = Path(__file__).resolve().parent.parent
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
ARCH = "vit_tiny_patch16_224"
STUDENT_SHIFT = 0.01  # official_checkpoint's student = teacher + this, so the two are told apart


def official_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A file laid out like facebookresearch/dino's checkpoint.pth (DDP student, plain teacher, argparse args)."""
    torch.manual_seed(123)
    backbone = create_backbone(ARCH, **TINY).state_dict()
    head = {"head.mlp.0.weight": torch.randn(8, 48), "head.last_layer.weight_v": torch.randn(16, 8)}
    torch.save(
        {
            "student": {f"module.backbone.{k}": v + STUDENT_SHIFT for k, v in backbone.items()}
            | {f"module.{k}": v for k, v in head.items()},
            "teacher": {f"backbone.{k}": v for k, v in backbone.items()} | head,
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_tiny", patch_size=8),
        },
        path,
    )
    return backbone


def test_convert_official_checkpoint_to_safetensors(tmp_path: Path) -> None:
    expected = official_checkpoint(tmp_path / "checkpoint.pth")
    out = tmp_path / "teacher.safetensors"
    args = ["convert", "--checkpoint", str(tmp_path / "checkpoint.pth"), "--arch", ARCH]
    result = CliRunner().invoke(cli, [*args, "--timm-kwargs", json.dumps(TINY), "--out", str(out)])
    assert result.exit_code == 0, result.output
    converted = load_file(out)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    student_out = tmp_path / "student.safetensors"
    result = CliRunner().invoke(
        cli, [*args, "--which", "student", "--timm-kwargs", json.dumps(TINY), "--out", str(student_out)]
    )
    assert result.exit_code == 0, result.output
    assert torch.equal(load_file(student_out)["cls_token"], expected["cls_token"] + STUDENT_SHIFT)


def test_convert_refuses_another_architecture(tmp_path: Path) -> None:
    official_checkpoint(tmp_path / "checkpoint.pth")
    other = dict(TINY, embed_dim=96)
    result = CliRunner().invoke(
        cli,
        ["convert", "--checkpoint", str(tmp_path / "checkpoint.pth"), "--arch", ARCH, "--timm-kwargs",
         json.dumps(other), "--out", str(tmp_path / "x.safetensors")],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "checkpoint.pth" in result.output and "another architecture" in result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_training_can_start_from_an_official_backbone(tmp_path: Path) -> None:
    expected = official_checkpoint(tmp_path / "checkpoint.pth")
    cfg = load_config(
        "tiny-test.json",
        [
            f"data.train_shards={json.dumps(str(REPO / 'shards/sample/train'))}",
            f"output_dir={json.dumps(str(tmp_path / 'run'))}",
            f"model.init_backbone={json.dumps(str(tmp_path / 'checkpoint.pth'))}",
            "dino.momentum_teacher=1.0",  # the teacher then keeps the imported weights exactly
            "max_steps=1",
        ],
    )
    train(cfg)
    teacher = load_file(tmp_path / "run" / "teacher_backbone.safetensors")
    assert all(torch.equal(teacher[k], expected[k]) for k in expected)
