"""What a run checks before its first step: `--set` values typed by their key, relative paths found beside the recipe,
the run directory (fresh / --resume / --overwrite), what a resumed recipe may change, the k-NN sets, and threads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from support import SAMPLE_TRAIN, SAMPLE_VAL

from dino_scale import devices
from dino_scale.config import config_changes, load_config, parse_override
from dino_scale.errors import ConfigError, DinoScaleError
from dino_scale.train import command as train_command_module
from dino_scale.train.inputs import clear_run_dir
from dino_scale.train.loop import train

# --- `--set` ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("name=2024", "2024"),  # a text key keeps the text (was the integer 2024, refused as "not a string")
        ("output_dir=007", "007"),
        ('output_dir="/a b/c"', "/a b/c"),  # a JSON string literal is unquoted
        ("data.train_shards=[1]", "[1]"),
        ("eval.knn_train_shards=null", None),  # a key that may be null takes null
        ("optim.lr=1e-3", 1e-3),
        ("max_steps=5", 5),
        ("model.use_bn_in_head=true", True),
        ("device=cpu", "cpu"),
        ("model.timm_kwargs.depth=2", 2),  # free-form blocks stay JSON
        ('deepspeed.bf16={"enabled": true}', {"enabled": True}),
    ],
)
def test_set_values_are_json_only_where_the_key_is_not_text(item: str, expected: object) -> None:
    assert parse_override(item)[1] == expected


def test_a_numeric_name_loads(tmp_path: Path) -> None:
    assert load_config("tiny-test.json", ["name=2024"]).name == "2024"


# --- relative paths -------------------------------------------------------------------------------------------------


def test_a_recipes_relative_paths_are_found_beside_it_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "data" / "train").mkdir(parents=True)
    recipe = project / "recipe.json"
    recipe.write_text(json.dumps({"data": {"train_shards": "data/train"}, "eval": {"knn_val_shards": "data/val"},
                                  "deepspeed": {"train_micro_batch_size_per_gpu": 4}}))  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(recipe)
    assert cfg.data.train_shards == str(project / "data" / "train")
    assert cfg.eval.knn_val_shards == "data/val"  # found nowhere: left as written, for the run to name it
    (elsewhere / "data" / "train").mkdir(parents=True)
    assert load_config(recipe).data.train_shards == str(elsewhere / "data" / "train")  # the working directory first
    assert load_config(recipe, ["data.train_shards=mine"]).data.train_shards == "mine"  # --set: as given


def test_shipped_recipes_find_the_sample_shards_outside_the_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo")
    assert Path(cfg.data.train_shards) == Path(SAMPLE_TRAIN)
    assert Path(cfg.eval.knn_val_shards) == Path(SAMPLE_VAL)


def tiny(tmp_path: Path, *overrides: str) -> list[str]:
    return [f"data.train_shards={SAMPLE_TRAIN}", f"output_dir={tmp_path / 'run'}", "data.samples_per_epoch=16",
            "epochs=1", *overrides]  # fmt: skip


def test_a_missing_knn_set_stops_the_run_before_any_work_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny-test.json", tiny(tmp_path, f"eval.knn_train_shards={SAMPLE_TRAIN}",
                                             "eval.knn_val_shards=shards/sample/val"))  # fmt: skip
    with pytest.raises(DinoScaleError) as caught:
        train(cfg)
    assert caught.value.argument == "eval.knn_val_shards"
    assert "shards/sample/val" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()  # nothing was started


# --- run directories ------------------------------------------------------------------------------------------------


def earlier_run(run_dir: Path, **changes: object) -> None:
    run_dir.mkdir(parents=True)
    recipe = load_config("tiny-test.json", [f"output_dir={run_dir}"]).to_dict()
    recipe["model"].update(changes)
    (run_dir / "config.json").write_text(json.dumps(recipe))
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')


def test_a_fresh_run_refuses_a_directory_holding_another_run(tmp_path: Path) -> None:
    earlier_run(tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run \(config.json, metrics.jsonl\).*--resume.*--overwrite"):
        train(load_config("tiny-test.json", tiny(tmp_path)))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_resume_and_overwrite_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="choose one"):
        train(load_config("tiny-test.json", tiny(tmp_path)), resume=True, overwrite=True)


def test_overwrite_removes_only_the_files_a_run_writes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    earlier_run(run_dir)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "step_00000004.pt").write_bytes(b"x")
    (run_dir / "notes.txt").write_text("mine")
    clear_run_dir(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


def test_resume_refuses_a_shape_change_in_one_line_naming_the_keys(tmp_path: Path) -> None:
    earlier_run(tmp_path / "run", out_dim=512, hidden_dim=32)
    with pytest.raises(ConfigError) as caught:
        train(load_config("tiny-test.json", tiny(tmp_path)), resume=True)
    message = str(caught.value)
    assert "model.hidden_dim: 32 -> 64" in message and "model.out_dim: 512 -> 256" in message
    assert "\n" not in message


def test_config_changes_sorts_keys_into_shape_hyperparameters_and_run_control() -> None:
    before = load_config("demo").to_dict()
    after = load_config("demo", ["optim.lr=0.001", "model.timm_kwargs.depth=2", "max_steps=3", "eval.knn_k=5",
                                 "data.num_workers=0", "seed=1"]).to_dict()  # fmt: skip
    changes = config_changes(before, after)
    assert changes.shape == ["model.timm_kwargs.depth: 4 -> 2"]
    assert changes.hyperparameters == ["optim.lr: 0.002 -> 0.001", "seed: 0 -> 1"]
    assert changes.run_control == ["data.num_workers: 2 -> 0", "eval.knn_k: 20 -> 5", "max_steps: 360 -> 3"]
    assert config_changes(before, before) == config_changes(after, after)
    assert not config_changes(before, before).hyperparameters


# --- the train command's flags, threads ------------------------------------------------------------------------------


def test_train_command_passes_device_threads_and_overwrite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = {}

    def fake_train(cfg, resume: bool = False, overwrite: bool = False) -> dict:
        seen.update(device=cfg.device, threads=cfg.threads, overwrite=overwrite, resume=resume, name=cfg.name)
        return {}

    monkeypatch.setattr("dino_scale.train.loop.train", fake_train)
    result = CliRunner().invoke(
        train_command_module.train_command,
        ["--config", "tiny-test.json", "--device", "cpu", "--threads", "3", "--overwrite", "--set", "name=2024"],
    )
    assert result.exit_code == 0, result.output
    assert seen == {"device": "cpu", "threads": 3, "overwrite": True, "resume": False, "name": "2024"}


def test_threads_share_the_cores_among_processes_and_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(devices, "available_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert devices.set_threads(None, workers=2) == 14
        assert torch.get_num_threads() == 14
        assert devices.set_threads(None, workers=2, processes=4) == 2  # 4 cores each, 2 of them for the workers
        assert devices.set_threads(None, workers=8, processes=4) == 1  # never below one
        assert devices.set_threads(5, workers=8) == 5  # asked for: as asked
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert devices.set_threads(None, workers=2) == 3  # the user's environment is an explicit choice too
        assert devices.set_threads(6, workers=2) == 6
    finally:
        torch.set_num_threads(before)


def test_data_workers_run_one_thread_each() -> None:
    from dino_scale.data.loaders import make_train_loader

    def augmentation(image, generator) -> list[torch.Tensor]:
        return [torch.full((1,), float(torch.get_num_threads()))]

    torch.set_num_threads(2)
    try:
        batches = make_train_loader([f"{SAMPLE_TRAIN}/train-000000.tar"], augmentation, 4, 2, 0, 0, num_workers=1)
        threads = {float(v) for batch in batches for v in batch.views[0].flatten()}
    finally:
        torch.set_num_threads(1)
    assert threads == {1.0}


def test_resume_logs_changed_hyperparameters(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from dino_scale.train.inputs import check_run_dir, log_changes

    earlier_run(tmp_path / "run")
    cfg = load_config("tiny-test.json", [f"output_dir={tmp_path / 'run'}", "optim.lr=0.001", "log_every=5"])
    with caplog.at_level(logging.INFO, logger="dino_scale"):
        log_changes(check_run_dir(cfg, resume=True, overwrite=False))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "optim.lr: 0.0005 -> 0.001" in warnings[0]
    assert any("log_every: 1 -> 5" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_setting_one_data_source_replaces_the_recipes_other() -> None:
    images = load_config("tiny-test.json", ["data.train_images=photos/"])
    assert (images.data.train_images, images.data.train_shards) == ("photos/", None)
    assert load_config("tiny-test.json", ["data.train_shards=mine"]).data.train_images is None
    with pytest.raises(ConfigError, match="not both"):
        load_config("tiny-test.json", ["data.train_images=photos/", "data.train_shards=mine"])
    with pytest.raises(ConfigError, match=r"set data.train_shards .* or data.train_images"):
        load_config("tiny-test.json", ["data.train_shards=null"])


def test_the_processes_sharing_the_machine_come_from_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    from dino_scale.train.loop import local_processes

    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert local_processes() == 1
    monkeypatch.setenv("LOCAL_SIZE", "4")  # the deepspeed launcher
    assert local_processes() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun
    assert local_processes() == 8


def test_a_key_the_earlier_recipe_predates_is_no_change_at_its_default() -> None:
    before = load_config("demo").to_dict()
    del before["data"]["augment_on"], before["threads"]  # written before these keys existed
    assert config_changes(before, load_config("demo").to_dict()) == config_changes(before, before)
    changed = config_changes(before, load_config("demo", ["data.augment_on=device"]).to_dict())
    assert changed.hyperparameters == ["data.augment_on: 'workers' -> 'device'"]
