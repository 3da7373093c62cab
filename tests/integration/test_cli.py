"""The CLI around importing official DINO checkpoints and starting training from them."""

import json
from pathlib import Path

import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file
from support import ARCH, REPO, STUDENT_SHIFT, TINY, official_checkpoint

from dino_scale.cli import main as cli
from dino_scale.config import load_config
from dino_scale.io import safetensors_metadata, save_safetensors
from dino_scale.models.weights import load_source
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


def convert(source: Path, out: Path, *extra: str, timm_kwargs: dict = TINY) -> Result:
    args = ["convert", "--checkpoint", str(source), "--arch", ARCH, "--timm-kwargs", json.dumps(timm_kwargs)]
    return CliRunner().invoke(cli, [*args, *extra, "--out", str(out)])


def test_convert_records_the_size_the_weights_were_trained_at(tmp_path: Path) -> None:
    official_checkpoint(tmp_path / "checkpoint.pth")
    for extra, size, said in (
        ([], 224, "image size 224 (the size the model was trained at: every official DINO model is trained at 224"),
        (["--image-size", "32"], 32, "image size 32 (as given: --image-size)"),
    ):
        out = tmp_path / f"{size}.safetensors"
        result = convert(tmp_path / "checkpoint.pth", out, *extra)
        assert result.exit_code == 0, result.output
        assert result.output.startswith(said), result.output
        assert safetensors_metadata(out)["image_size"] == str(size)
        source = load_source(out)  # what export / index / eval then run it at by default
        assert source.image_size == size and f"image_size in the metadata of {out}" in str(source.image_size_origin)
    # Converting a converted file keeps its record, whatever the timm kwargs say.
    result = convert(tmp_path / "32.safetensors", tmp_path / "c.st", timm_kwargs=dict(TINY, img_size=48))
    assert result.exit_code == 0 and safetensors_metadata(tmp_path / "c.st")["image_size"] == "32", result.output
    # A source that records no size: the timm model's own input size (img_size of the timm kwargs).
    bare = tmp_path / "bare.safetensors"
    save_safetensors(load_file(tmp_path / "32.safetensors"), bare)
    result = convert(bare, tmp_path / "d.st", timm_kwargs=dict(TINY, img_size=48))
    assert result.exit_code == 0 and safetensors_metadata(tmp_path / "d.st")["image_size"] == "48", result.output
    assert "img_size in the timm_kwargs of" in result.output


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
