"""dino_scale.train.checkpoint and the run-directory layout: single-file checkpoints written atomically, pruned,
and found again (latest.json first)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from support import same_tensors
from torch import nn

from dino_scale.io import load_checkpoint
from dino_scale.run_dir import find_latest_checkpoint
from dino_scale.train.checkpoint import save_checkpoint


def ckpt_files(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").iterdir()}



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
