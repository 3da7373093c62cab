"""The CLI around importing official DINO checkpoints and starting training from them."""

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from support import ARCH, REPO, STUDENT_SHIFT, TINY, official_checkpoint

from dino_scale.cli import main as cli
from dino_scale.config import load_config
from dino_scale.train.loop import train


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
