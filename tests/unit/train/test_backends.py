"""The backend seam on one process: launcher detection, batch planning, block groups, name-keyed optimizer state,
and the clear errors a user gets before any step when a backend cannot start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import REPO

from dino_scale.config import load_config
from dino_scale.errors import Unavailable
from dino_scale.models.dino import build_student_teacher
from dino_scale.train.backends import choose_backend, launch_environment, make_backend
from dino_scale.train.backends.base import load_named_optimizer_state, named_optimizer_state, weight_blocks
from dino_scale.train.optim import create_optimizer

RENDEZVOUS = {"RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}


def set_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "CROSS_RANK", "LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def test_auto_backend_follows_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    assert choose_backend("auto", launch_environment()) == "local"
    set_env(monkeypatch, **RENDEZVOUS, WORLD_SIZE="2", TORCHELASTIC_RUN_ID="x")
    assert launch_environment().launcher == "torchrun"
    assert choose_backend("auto", launch_environment()) == "ddp"
    set_env(monkeypatch, **RENDEZVOUS, WORLD_SIZE="1", CROSS_RANK="0", LOCAL_SIZE="1")
    assert choose_backend("auto", launch_environment()) == "deepspeed"  # even for one process
    assert choose_backend("fsdp", launch_environment()) == "fsdp"  # an explicit choice wins


def test_global_batch_that_the_world_size_cannot_make_is_refused_before_starting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_env(monkeypatch, **RENDEZVOUS, WORLD_SIZE="3")
    cfg = load_config("tiny-test.json", ["deepspeed.train_batch_size=16", "backend=ddp"])
    with pytest.raises(ValueError, match="train_batch_size=16 is not a multiple of micro batch 8 x 3"):
        make_backend(cfg)


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed"])
def test_distributed_backend_without_launcher_says_how_to_launch(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    set_env(monkeypatch)
    with pytest.raises(Unavailable, match=f"backend={backend} needs a launcher environment.*torchrun"):
        make_backend(load_config("tiny-test.json", [f"backend={backend}"]))


def test_local_backend_refuses_a_multi_process_job(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch, **RENDEZVOUS, WORLD_SIZE="2")
    with pytest.raises(Unavailable, match="backend=local cannot run in a job of WORLD_SIZE=2"):
        make_backend(load_config("tiny-test.json", ["backend=local"]))


def test_missing_deepspeed_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from dino_scale.train.backends.deepspeed import _import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` raise ImportError
    with pytest.raises(Unavailable, match=r"needs the deepspeed package.*pip install 'dino-scale\[deepspeed\]'"):
        _import_deepspeed(torch.device("cpu"))


def test_weight_blocks_are_one_group_per_block_covering_every_parameter() -> None:
    student, teacher = build_student_teacher(load_config("tiny-test.json").model)
    groups = weight_blocks(student)
    names = [name for group in groups for name, _ in group]
    assert sorted(names) == sorted(name for name, _ in teacher.named_parameters())
    block_groups = [g for g in groups if g[0][0].startswith("backbone.blocks.")]
    assert len(block_groups) == 2  # the tiny recipe has depth 2
    assert all(len({name.split(".")[2] for name, _ in g}) == 1 for g in block_groups)


def test_named_optimizer_state_round_trips_into_a_fresh_optimizer() -> None:
    cfg = load_config("tiny-test.json")
    torch.manual_seed(0)
    student, _ = build_student_teacher(cfg.model)
    optimizer = create_optimizer(student, cfg.optim)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    student([torch.randn(2, 3, 32, 32)]).sum().backward()
    optimizer.step()
    named = named_optimizer_state(student, optimizer)
    assert "backbone.cls_token" in named["state"]
    fresh = create_optimizer(student, cfg.optim)
    load_named_optimizer_state(student, fresh, named, Path("memory"))
    for p in student.parameters():
        if p.requires_grad:
            assert torch.equal(fresh.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])
    named["state"].pop("backbone.cls_token")
    named["param_groups"][0]["params"].append("not.a.parameter")
    with pytest.raises(Exception, match="unexpected \\['not.a.parameter'\\]"):
        load_named_optimizer_state(student, create_optimizer(student, cfg.optim), named, Path("memory"))


@pytest.mark.slow  # starts a DeepSpeed job
def test_deepspeed_block_that_deepspeed_rejects_is_named_before_any_step(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
        "-m", "dino_scale.train", "--config", "tiny-test.json", "--output-dir", str(run_dir),
        "--set", "backend=deepspeed", "--set", 'deepspeed.zero_optimization={"stage": 2, "no_such_option": 1}',
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "DeepSpeed rejected the recipe's deepspeed block" in output and "no_such_option" in output
    assert not (run_dir / "metrics.jsonl").exists() or not json.loads(
        "[" + ",".join((run_dir / "metrics.jsonl").read_text().splitlines()) + "]"
    )


@pytest.mark.parametrize(
    ("stage", "mode", "precision", "engine_clip"),
    [
        (2, "per_param", None, 0.0),  # we clip each gradient before the engine's step: DeepSpeed must not clip again
        (3, "per_param", None, 0.0),
        (2, "global", None, 3.0),  # DeepSpeed's own global clipping, as before
        (0, "global", None, 0.0),  # plain ZeRO-0 clips as DDP does (before the last layer's gradients are dropped)
        (0, "global", '{"enabled": true}', 3.0),  # ZeRO-0 with DeepSpeed's bf16: its optimizer wrapper clips
        (0, "per_param", '{"enabled": true}', 0.0),
    ],
)
def test_deepspeed_clips_only_where_we_do_not(stage: int, mode: str, precision: str | None, engine_clip: float) -> None:
    pytest.importorskip("deepspeed")
    from dino_scale.train.backends.deepspeed import DeepSpeedBackend

    sets = [f"deepspeed.zero_optimization.stage={stage}", f"optim.clip_mode={mode}"]
    cfg = load_config("tiny-test.json", sets + ([f"deepspeed.bf16={precision}"] if precision else []))
    backend = DeepSpeedBackend.__new__(DeepSpeedBackend)  # engine_config() needs no process group
    backend.cfg, backend.batch = cfg, cfg.batch_plan(1)
    assert cfg.clip_grad == 3.0 and backend.engine_config()["gradient_clipping"] == engine_clip


def test_deepspeed_refuses_per_parameter_clipping_it_cannot_do_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("deepspeed")
    from dino_scale.errors import ConfigError

    set_env(monkeypatch, **RENDEZVOUS, WORLD_SIZE="1")
    offload = 'deepspeed.zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}'
    with pytest.raises(ConfigError, match=r"offload_optimizer.*set optim.clip_mode=global") as refused:
        make_backend(load_config("tiny-test.json", ["backend=deepspeed", offload]))
    assert "\n" not in str(refused.value)
    cfg = load_config("tiny-test.json", ["backend=deepspeed", offload, "optim.clip_mode=global"])
    assert cfg.optim.clip_mode == "global"  # what the message says to set is accepted
