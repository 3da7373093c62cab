"""dino_scale.train.checkpoint and the run-directory layout: checkpoints written atomically with a manifest, pruned
without ever losing the last intact one, found again (latest.json first), verified before they are loaded, and the
newest usable one chosen on resume."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from support import same_tensors
from torch import nn

from dino_scale import run_dir as layout
from dino_scale.errors import CheckpointError, ConfigError, IncompatibleCheckpoint, WriteFailed
from dino_scale.io import atomic_torch_save, file_sha256, load_checkpoint
from dino_scale.run_dir import Verdict, find_latest_checkpoint, resume_candidates, verify
from dino_scale.train import checkpoint
from dino_scale.train.checkpoint import commit_checkpoint_dir, resume_newest, save_checkpoint


def ckpt_files(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").iterdir()}


def with_manifests(*names: str) -> set[str]:
    """Step files plus their manifests, and latest.json."""
    return {"latest.json", *names, *(f"{n}.manifest.json" for n in names if n.endswith(".pt"))}


@pytest.fixture
def umask_022() -> Any:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_save_checkpoint_round_trip(tmp_path: Path, umask_022: None) -> None:
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
    # The manifest beside it records the file's size and sha256; the files get the usual modes.
    manifest = json.loads((tmp_path / "checkpoints" / "step_00000123.pt.manifest.json").read_text())
    assert manifest["format"] == layout.MANIFEST_FORMAT and manifest["step"] == 123
    assert manifest["files"] == {"step_00000123.pt": {"bytes": path.stat().st_size, "sha256": file_sha256(path)}}
    for name in ckpt_files(tmp_path):
        assert stat.S_IMODE((tmp_path / "checkpoints" / name).stat().st_mode) == 0o644, name
    assert verify(path) == Verdict(None, True)


def _partial_torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    f.write(b"PK\x03\x04 half a checkpoint")
    raise RuntimeError("No space left on device")


@pytest.mark.parametrize(
    "failure", ["torch.save", "replace-step-file", "replace-manifest", "replace-latest", "interrupt"]
)
def test_crash_mid_write_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    first = save_checkpoint(tmp_path, 1, {"w": torch.ones(3)})
    latest_before = (tmp_path / "checkpoints" / "latest.json").read_bytes()

    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        name = Path(dst).name
        if failure == "replace-step-file" and name == "step_00000002.pt":
            raise OSError(errno.EIO, "simulated crash during rename")
        if failure == "replace-manifest" and name == "step_00000002.pt.manifest.json":
            raise OSError(errno.EIO, "simulated crash during rename")
        if failure == "replace-latest" and name == "latest.json":
            raise OSError(errno.EIO, "simulated crash during rename")
        if failure == "interrupt":
            raise KeyboardInterrupt
        real_replace(src, dst)

    if failure == "torch.save":
        monkeypatch.setattr(torch, "save", _partial_torch_save)
    else:
        monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises((OSError, RuntimeError, KeyboardInterrupt)) as raised:
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)})
    monkeypatch.undo()
    if failure.startswith("replace"):  # an OSError while writing: one line naming the file
        assert isinstance(raised.value, WriteFailed) and "\n" not in str(raised.value)
        assert "step_00000002.pt" in str(raised.value) or "latest.json" in str(raised.value)

    # The previous checkpoint and latest.json are untouched and nothing of the failed save remains.
    assert (tmp_path / "checkpoints" / "latest.json").read_bytes() == latest_before
    assert torch.equal(load_checkpoint(first)["w"], torch.ones(3))
    assert find_latest_checkpoint(tmp_path) == first
    assert ckpt_files(tmp_path) == with_manifests("step_00000001.pt")


def test_full_disk_is_one_line_with_free_and_needed_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)})

    def no_space(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(WriteFailed) as raised:
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(1000)})
    message = str(raised.value)
    assert "\n" not in message and "step_00000002.pt" in message
    assert "No space left on device" in message and "free in" in message and "needs about 3.9 KiB" in message
    assert ckpt_files(tmp_path) == with_manifests("step_00000001.pt")


def test_leftover_temp_files_are_cleaned_by_next_save(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.ones(1)})
    (tmp_path / "checkpoints" / ".step_00000002.pt.abc123.tmp").write_bytes(b"PK torn")  # a SIGKILLed save
    (tmp_path / "checkpoints" / ".step_00000002.partial").mkdir()  # a SIGKILLed folder save
    (tmp_path / "checkpoints" / "step_00000009.pt.manifest.json").write_text("{}")  # its file is gone
    save_checkpoint(tmp_path, 3, {"w": torch.ones(1)})
    assert ckpt_files(tmp_path) == with_manifests("step_00000001.pt", "step_00000003.pt")


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=2)
    assert ckpt_files(tmp_path) == with_manifests("step_00000004.pt", "step_00000005.pt")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000005.pt"

    # Resuming from an older step: the file just written is kept even though higher steps exist.
    save_checkpoint(tmp_path, 3, {"step": 3}, keep_last=2)
    assert ckpt_files(tmp_path) == with_manifests("step_00000005.pt", "step_00000003.pt")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000003.pt"

    other = tmp_path / "keep_all"
    for step in range(1, 5):
        save_checkpoint(other, step, {"step": step}, keep_last=0)
    assert len(ckpt_files(other)) == 9


def test_rotation_keeps_intact_checkpoints_before_damaged_ones(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": torch.full((100,), float(step))}, keep_last=3)
    directory = tmp_path / "checkpoints"
    for step in (2, 3):  # the two newest are truncated: neither counts as one of the checkpoints to keep
        path = directory / f"step_{step:08d}.pt"
        path.write_bytes(path.read_bytes()[:50])
    save_checkpoint(tmp_path, 4, {"w": torch.full((100,), 4.0)}, keep_last=2)
    assert ckpt_files(tmp_path) == with_manifests("step_00000001.pt", "step_00000004.pt")

    # keep=1 keeps only the one just written, which was verified as it was written
    save_checkpoint(tmp_path, 5, {"w": torch.ones(1)}, keep_last=1)
    assert ckpt_files(tmp_path) == with_manifests("step_00000005.pt")


def test_rotation_after_falling_back_drops_the_abandoned_timeline_first(tmp_path: Path) -> None:
    for step in (2, 4):
        save_checkpoint(tmp_path, step, {"w": torch.full((100,), float(step))}, keep_last=0)
    # Resumed from 2 (4 was damaged in a way sizes do not show), the run saves 3: 2 stays, 4 goes.
    save_checkpoint(tmp_path, 3, {"w": torch.ones(1)}, keep_last=2)
    assert ckpt_files(tmp_path) == with_manifests("step_00000002.pt", "step_00000003.pt")


def test_rotation_deletes_nothing_when_the_new_checkpoint_does_not_look_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"w": torch.ones(1)}, keep_last=1)
    real = checkpoint.digest_files
    # A manifest that does not match the file on disk (as if the disk had returned other bytes).
    monkeypatch.setattr(
        checkpoint,
        "digest_files",
        lambda root, names, fsync=False: {
            name: {**entry, "bytes": entry["bytes"] + 1} for name, entry in real(root, names).items()
        },
    )
    save_checkpoint(tmp_path, 3, {"w": torch.ones(1)}, keep_last=1)
    assert ckpt_files(tmp_path) == with_manifests("step_00000002.pt", "step_00000003.pt")


def test_save_checkpoint_rejects_state_weights_only_cannot_load(tmp_path: Path) -> None:
    state = {"config": {"data": {"root": Path("/data")}}, "w": torch.ones(1)}
    with pytest.raises(TypeError, match=r"state\['config'\]\['data'\]\['root'\] has type pathlib\..*Path"):
        save_checkpoint(tmp_path, 1, state)
    assert not (tmp_path / "checkpoints").exists()


# --- folder checkpoints ----------------------------------------------------------------------------------------


def staged(tmp_path: Path, step: int, value: float) -> Path:
    staging = layout.staging_path(tmp_path, step)
    (staging / "shards").mkdir(parents=True)
    atomic_torch_save({"teacher": torch.full((4,), value)}, staging / "trainer_state.pt")
    atomic_torch_save({"w": torch.full((8,), value)}, staging / "shards" / "rank0.pt")
    return staging


def test_folder_checkpoint_gets_a_manifest_and_replaces_the_same_step(tmp_path: Path, umask_022: None) -> None:
    final = layout.checkpoint_path(tmp_path, 2, folder=True)
    commit_checkpoint_dir(staged(tmp_path, 2, 1.0), final)
    manifest = json.loads((final / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["shards/rank0.pt", "trainer_state.pt"]
    assert verify(final) == Verdict(None, True)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in final.rglob("*") if p.is_file())

    commit_checkpoint_dir(staged(tmp_path, 2, 2.0), final)  # the same step again: replaced as a whole
    assert load_checkpoint(final / "trainer_state.pt")["teacher"][0] == 2.0
    assert ckpt_files(tmp_path) == {"latest.json", "step_00000002"}

    (final / "stray.pt").write_bytes(b"x")
    assert verify(final).problem == f"{final / 'stray.pt'} is not in its manifest"


def test_failed_folder_commit_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = commit_checkpoint_dir(staged(tmp_path, 1, 1.0), layout.checkpoint_path(tmp_path, 1, folder=True))
    real_replace = os.replace

    def read_only(src: Any, dst: Any) -> None:
        if Path(dst).name == "step_00000002":
            raise OSError(errno.EROFS, "Read-only file system")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(WriteFailed, match=r"^cannot write .*step_00000002: Read-only file system$"):
        commit_checkpoint_dir(staged(tmp_path, 2, 2.0), layout.checkpoint_path(tmp_path, 2, folder=True))
    monkeypatch.undo()
    assert find_latest_checkpoint(tmp_path) == first
    assert ckpt_files(tmp_path) == {"latest.json", "step_00000001"}


# --- verification ------------------------------------------------------------------------------------------------


def test_verify_names_what_is_wrong(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {"w": torch.arange(1000, dtype=torch.float32)})
    manifest = layout.manifest_path(path)
    good = path.read_bytes()

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x04
    path.write_bytes(bytes(flipped))
    assert verify(path).problem == f"{path} does not match the sha256 in its manifest (damaged)"
    path.write_bytes(good[:-1])
    assert "truncated" in verify(path).problem
    path.write_bytes(good)
    assert verify(path).problem is None

    entry = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**entry, "files": {"../elsewhere.pt": entry["files"][path.name]}}))
    assert "outside" in verify(path).problem
    manifest.write_text("{ not json")
    assert "cannot be read" in verify(path).problem

    # Written before manifests: no manifest, nothing to verify against, but the zip CRCs still catch a flip.
    manifest.unlink()
    assert verify(path) == Verdict(None, False)
    path.write_bytes(bytes(flipped))
    problem = verify(path).problem
    assert problem is not None and "CRC" in problem


# --- finding and choosing checkpoints ------------------------------------------------------------------------------


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


def test_resume_candidates_start_at_latest_json_and_go_back(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=0)
    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "latest.json").write_text(json.dumps({"step": 4, "file": "step_00000004.pt"}))
    assert [p.name for p in resume_candidates(tmp_path)] == ["step_00000004.pt", "step_00000002.pt"]
    (ckpt_dir / "latest.json").write_text(json.dumps({"step": 5, "file": "step_00000005.pt"}))  # missing: reported
    assert [p.name for p in resume_candidates(tmp_path)] == ["step_00000005.pt", "step_00000004.pt", "step_00000002.pt"]
    for outside in ("/etc/passwd", "../../step_00000009.pt", "step_00000006.pt/../../x"):
        (ckpt_dir / "latest.json").write_text(json.dumps({"step": 9, "file": outside}))
        assert [p.name for p in resume_candidates(tmp_path)] == [
            "step_00000006.pt",
            "step_00000004.pt",
            "step_00000002.pt",
        ]


def test_resume_falls_back_to_the_newest_usable_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": torch.full((10,), float(step))}, keep_last=0)
    ckpt_dir = tmp_path / "checkpoints"
    damaged = ckpt_dir / "step_00000003.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    loads: list[str] = []

    def load(path: Path) -> float:
        loads.append(path.name)
        return float(load_checkpoint(path)["w"][0])

    with caplog.at_level(logging.WARNING, logger="dino_scale"):
        assert resume_newest(tmp_path, load) == (ckpt_dir / "step_00000002.pt", 2.0)
    assert loads == ["step_00000002.pt"]  # the damaged one was never handed to the loader
    assert f"checkpoint {damaged} is unusable" in caplog.text and "truncated" in caplog.text

    # A checkpoint the loader refuses (a foreign structure) is skipped the same way.
    def picky(path: Path) -> float:
        if path.name == "step_00000002.pt":
            raise KeyError("student")
        return load(path)

    assert resume_newest(tmp_path, picky) == (ckpt_dir / "step_00000001.pt", 1.0)

    # Another rank saw a problem this one did not: every rank moves on together.
    other_rank = iter([None, "rank 1 found step_00000002.pt damaged"] + [None] * 10)
    assert resume_newest(tmp_path, load, gather=lambda mine: [mine, next(other_rank)])[0].name == "step_00000001.pt"

    # None usable: one line listing what was tried.
    with pytest.raises(CheckpointError) as raised:
        resume_newest(tmp_path, lambda path: (_ for _ in ()).throw(RuntimeError("no\nway")))
    message = str(raised.value)
    assert "\n" not in message and raised.value.argument == "resume"
    assert message.startswith(f"no usable checkpoint in {ckpt_dir}: tried step_00000003.pt (")
    assert "step_00000002.pt (RuntimeError: no way)" in message and "step_00000001.pt (" in message


def test_resume_stops_at_once_where_an_older_checkpoint_would_not_help(tmp_path: Path) -> None:
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"w": torch.ones(1)}, keep_last=0)
    tried: list[str] = []

    def refuse(error: Exception) -> Any:
        def load(path: Path) -> None:
            tried.append(path.name)
            raise error

        return load

    with pytest.raises(ConfigError, match="global batch"):
        resume_newest(tmp_path, refuse(ConfigError("the checkpoint was written with another global batch")))
    with pytest.raises(IncompatibleCheckpoint):
        resume_newest(tmp_path, refuse(IncompatibleCheckpoint("ZeRO-3 on another process count")))
    assert tried == ["step_00000002.pt", "step_00000002.pt"]
    assert resume_newest(tmp_path / "empty", refuse(RuntimeError())) is None


def test_checkpoints_without_a_manifest_load_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(1)})
    layout.manifest_path(path).unlink()  # as written before manifests existed
    with caplog.at_level(logging.WARNING, logger="dino_scale"):
        assert resume_newest(tmp_path, lambda p: "loaded") == (path, "loaded")
    assert "has no manifest" in caplog.text and "cannot be verified" in caplog.text
