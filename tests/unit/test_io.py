"""dino_scale.io: atomic writes, loads that refuse pickled code, safetensors."""

from __future__ import annotations

import argparse
import errno
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from support import same_tensors

from dino_scale.errors import CheckpointError, WriteFailed
from dino_scale.io import (
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    file_sha256,
    is_safetensors_file,
    load_checkpoint,
    load_safetensors,
    safetensors_metadata,
    save_safetensors,
)
from dino_scale.models.weights import extract_backbone_state_dict


def _partial_torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    f.write(b"PK\x03\x04 half a checkpoint")
    raise RuntimeError("No space left on device")


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


def test_failed_overwrite_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "teacher.pt"
    atomic_torch_save({"w": torch.ones(2)}, target)
    monkeypatch.setattr(torch, "save", _partial_torch_save)
    with pytest.raises(RuntimeError, match="No space left"):
        atomic_torch_save({"w": torch.zeros(2)}, target)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(target)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["teacher.pt"]


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


def test_safetensors_detection_does_not_depend_on_the_first_byte(tmp_path: Path) -> None:
    """A header length of 0x..80 starts the file with 0x80, the pickle marker; it is still safetensors."""
    for padding in range(256):  # find a metadata size that makes the header length end in 0x80
        path = tmp_path / "w.safetensors"
        save_safetensors({"w": torch.ones(2)}, path, metadata={"pad": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length ending in 0x80 found")
    assert is_safetensors_file(path)
    assert torch.equal(extract_backbone_state_dict(path)["w"], torch.ones(2))
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)  # raw pickle, starts 0x80
    assert not is_safetensors_file(legacy)


def test_full_disk_is_one_line_naming_the_path_free_space_and_need(tmp_path: Path) -> None:
    def fill_up(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(WriteFailed) as caught:
        atomic_write(target, fill_up, needed=3 * 2**20)
    message = str(caught.value)
    assert message.startswith(f"cannot write {target}: No space left on device (") and "\n" not in message
    assert " free in " in message and "it needs about 3.0 MiB" in message
    assert isinstance(caught.value, OSError)  # callers catching OSError keep working
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_read_only_folder_is_one_line_naming_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(WriteFailed, match=rf"^cannot write {tmp_path / 'x.json'}: Permission denied$"):
        atomic_write_json(tmp_path / "x.json", {"a": 1})


def test_torch_save_on_a_full_disk_estimates_the_tensor_bytes(tmp_path: Path, monkeypatch) -> None:
    def no_space(obj: Any, f: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(WriteFailed, match=r"it needs about 4\.0 MiB"):
        atomic_torch_save({"w": torch.zeros(2**20), "step": 3}, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


# Writes the same tensors and metadata (in an order given on the command line) in a fresh interpreter: safetensors
# keeps metadata in a hash map whose order is seeded per process, which is what made the bytes differ run to run.
WRITE_SAFETENSORS = """
import sys, torch
from dino_scale.io import save_safetensors
keys = sys.argv[2].split(",")
tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
save_safetensors(tensors, sys.argv[1], metadata={k: f"value-{k}" for k in keys})
"""


def test_safetensors_bytes_are_reproducible_and_mode_is_normal(tmp_path: Path) -> None:
    keys = ["arch", "timm_kwargs", "step", "source", "sha", "zeta", "alpha", "mid"]
    digests = set()
    for run, order in enumerate((keys, keys[::-1], keys, keys[3:] + keys[:3])):
        path = tmp_path / f"w{run}.safetensors"
        subprocess.run([sys.executable, "-c", WRITE_SAFETENSORS, str(path), ",".join(order)], check=True)
        digests.add(file_sha256(path))
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_current_umask()
    assert len(digests) == 1
    assert safetensors_metadata(tmp_path / "w0.safetensors") == {k: f"value-{k}" for k in keys}
    assert same_tensors(load_safetensors(tmp_path / "w1.safetensors"), load_safetensors(tmp_path / "w0.safetensors"))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_os_error_hidden_behind_another_is_still_a_write_failure(tmp_path: Path, monkeypatch) -> None:
    # What torch.save does when the disk fills mid-file: the OSError, then a RuntimeError from closing its zip writer.
    def save(obj: Any, f: Any) -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1376576 vs 1376464")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(WriteFailed, match=r"^cannot write .*ckpt\.pt: No space left on device \("):
        atomic_torch_save({"w": torch.zeros(4)}, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []
