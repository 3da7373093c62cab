"""End-to-end behaviour of the training loop on the shipped sample shards with a tiny ViT."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from support import REPO, SAMPLE_TRAIN, sample_config, step_records

from dino_scale import run_dir as layout
from dino_scale.cli import main as cli
from dino_scale.config import load_config
from dino_scale.errors import NonFiniteError
from dino_scale.io import load_checkpoint
from dino_scale.models.dino import MultiCropWrapper
from dino_scale.train.loop import train


def tiny(tmp_path: Path, *overrides: str):
    return sample_config(tmp_path, *overrides)


# samples_per_epoch=32 with micro batch 8 -> 4 steps per epoch, so 6 steps cross an epoch boundary.
SHORT = ("data.samples_per_epoch=32", "epochs=3", "checkpoint_every=3")


def test_resume_gives_the_same_next_steps_as_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(tiny(straight, *SHORT, "max_steps=6"))
    interrupted = tmp_path / "interrupted"
    train(tiny(interrupted, *SHORT, "max_steps=3"))
    assert layout.find_latest_checkpoint(interrupted).name == "step_00000003.pt"
    train(tiny(interrupted, *SHORT, "max_steps=6"), resume=True)

    straight_losses = {m["step"]: m["loss"] for m in step_records(straight) if "loss" in m}
    resumed_losses = {m["step"]: m["loss"] for m in step_records(interrupted) if "loss" in m}
    assert sorted(resumed_losses) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # step 4 is the first after the resume; 5 crosses into epoch 1
        assert resumed_losses[step] == straight_losses[step], step
    a = load_file(straight / "teacher_backbone.safetensors")
    b = load_file(interrupted / "teacher_backbone.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_directory_contract(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, *SHORT, "max_steps=4")
    train(cfg)
    records = step_records(tmp_path)
    required = {
        "step",
        "epoch",
        "loss",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "teacher_entropy",
        "kl",
        "images_per_s",
    }
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(required <= set(r) for r in records)
    assert records[-1]["epoch"] == 0 and records[0]["teacher_temp"] == pytest.approx(0.04)
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()
    # The teacher backbone loads into the timm model of the recipe, keys as timm names them.
    weights = load_file(tmp_path / "teacher_backbone.safetensors")
    model = timm.create_model(cfg.model.arch, pretrained=False, num_classes=0, **cfg.model.timm_kwargs)
    model.load_state_dict(weights)
    state = load_checkpoint(layout.find_latest_checkpoint(tmp_path))
    assert {"student", "teacher", "optimizer", "center", "step", "data_position", "rng", "config"} <= set(state)
    assert state["step"] == 4 and state["data_position"] == {
        "epoch": 1,
        "step_in_epoch": 0,
        "samples_seen": 32,
        "global_batch": 8,
        "world_size": 1,
    }
    assert torch.equal(state["teacher"]["backbone.cls_token"], weights["cls_token"])


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, monkeypatch) -> None:
    real_forward = MultiCropWrapper.forward
    calls = {"n": 0}

    def poisoned(self, views):
        # Each step runs the teacher, then the student: call 8 is the student's forward at step index 3.
        calls["n"] += 1
        output = real_forward(self, views)
        return output * float("nan") if calls["n"] == 8 else output

    monkeypatch.setattr(MultiCropWrapper, "forward", poisoned)
    # Step index 3 is the log's step 4; the message names the last checkpoint, the one to resume from.
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite student_output, loss.*step_00000002\.pt"):
        train(tiny(tmp_path, *SHORT, "checkpoint_every=2"))
    latest = layout.find_latest_checkpoint(tmp_path)
    assert latest.name == "step_00000002.pt"
    state = load_checkpoint(latest)
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_corrupt_sample_is_skipped_counted_and_training_goes_on(tmp_path: Path, caplog) -> None:
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    with (
        tarfile.open(REPO / "shards/sample/val/val-000000.tar") as source,
        tarfile.open(shard_dir / "mixed-000000.tar", "w") as target,
    ):
        members = [m for m in source.getmembers() if m.isfile()][:46]  # 23 samples: .cls + .jpg each
        for member in members:
            target.addfile(member, source.extractfile(member))
        for name, payload in (("broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("broken.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            target.addfile(info, io.BytesIO(payload))
    run_dir = tmp_path / "run"
    cfg = load_config(
        "tiny-test.json",
        [
            f"data.train_shards={json.dumps(str(shard_dir))}",
            f"output_dir={json.dumps(str(run_dir))}",
            "epochs=1",
        ],
    )
    train(cfg)  # 24 samples (one of them broken) -> exactly 3 steps of 8 that read every sample once
    records = step_records(run_dir)
    assert records[-1]["step"] == 3
    assert records[-1]["skipped_samples"] == 1
    assert "skipped 1 unreadable sample(s): broken" in caplog.text  # the key is logged


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    def invoke_train(*args: str):
        return CliRunner().invoke(cli, ["train", "--output-dir", str(tmp_path / "run"), *args])

    missing = str(tmp_path / "nothing-{000..003}.tar")
    result = invoke_train("--config", "tiny-test.json", "--set", f"data.train_shards={missing}")
    assert result.exit_code != 0
    assert "nothing-{000..003}.tar" in result.output
    result = invoke_train("--config", str(tmp_path / "absent.json"))
    assert result.exit_code != 0 and "config file not found" in result.output and "absent.json" in result.output
    result = invoke_train("--config", "tiny-test.json", "--set", "optim.lr=0")
    assert result.exit_code != 0 and "optim.lr" in result.output
    result = invoke_train("--config", "tiny-test.json", "--set", "backend=deepspeed")
    assert result.exit_code != 0 and "backend=deepspeed needs a launcher environment" in result.output


def test_too_little_data_for_one_batch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):
        train(tiny(tmp_path, "data.samples_per_epoch=7"))


def test_demo_recipe_loss_falls_and_teacher_beats_random_init_on_knn(tmp_path: Path) -> None:
    """The README's demo, end to end: the same recipe, shards and k-NN evaluation (about 3-4 minutes on 2 cores)."""
    repo_paths = [
        f"data.train_shards={json.dumps(SAMPLE_TRAIN)}",
        f"eval.knn_train_shards={json.dumps(SAMPLE_TRAIN)}",
        f"eval.knn_val_shards={json.dumps(str(REPO / 'shards/sample/val'))}",
        f"output_dir={json.dumps(str(tmp_path))}",
    ]
    cfg = load_config("demo.json", repo_paths)
    final = train(cfg)
    losses = [r["loss"] for r in step_records(tmp_path) if "loss" in r]
    assert len(losses) == cfg.max_steps // cfg.log_every
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    assert final["knn_top1_teacher"] > final["knn_top1_random_init"] + 3.0, final
    assert json.loads((tmp_path / "knn.json").read_text())["knn_top1_teacher"] == final["knn_top1_teacher"]

    # The demo's second half (scripts/demo_retrieval.sh): export -> index -> search -> eval knn on this run.
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "scripts/demo_retrieval.sh"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    query_key = next(line for line in lines if line.startswith("query: a mild copy")).split("#")[1]
    first_hit = lines[next(n for n, line in enumerate(lines) if line.startswith("query ")) + 1].split()
    assert first_hit[0] == "1" and first_hit[2].endswith(f"train-000002.tar#{query_key}"), done.stdout
    knn_eval = json.loads((tmp_path / "retrieval/knn_eval.json").read_text())
    # The exported ONNX at 64 px reproduces the training run's own k-NN number (same features, same k=20 vote).
    assert abs(knn_eval["results"]["20"]["top1"] - final["knn_top1_teacher"]) < 1.0, (knn_eval["results"], final)
