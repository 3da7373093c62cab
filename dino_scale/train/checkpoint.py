"""Writing training checkpoints: one file (local, ddp) or a folder committed by rename (deepspeed, fsdp).

Every file goes through the atomic writers of dino_scale.io; ``latest.json`` moves only after the checkpoint it
names is complete, so a run killed mid-save resumes from the previous one. The layout is dino_scale.run_dir's.
"""

from __future__ import annotations

import operator
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_scale import run_dir as layout
from dino_scale.errors import InputError
from dino_scale.io import TMP_SUFFIX, atomic_torch_save, atomic_write_json, fsync_dir

_SCALAR_TYPES = (
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    type(None),
    torch.Size,
    torch.dtype,
    torch.device,
)


def _check_weights_only_loadable(obj: Any, where: str) -> None:
    """Raise TypeError naming the first value that ``torch.load(weights_only=True)`` would refuse.

    Checked at save time because otherwise the mistake (a Path or numpy scalar in the config, say) only
    surfaces when resuming, possibly days later.
    """
    kind = type(obj)
    if kind in (torch.Tensor, nn.Parameter) or kind in _SCALAR_TYPES:
        return
    if isinstance(obj, torch.Tensor):
        raise TypeError(f"{where} is a tensor subclass ({kind.__qualname__}); store a plain torch.Tensor")
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in _SCALAR_TYPES:
                raise TypeError(f"{where} has a key of type {type(key).__qualname__}: {key!r}")
            _check_weights_only_loadable(value, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set):
        for i, value in enumerate(obj):
            _check_weights_only_loadable(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} has type {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) "
        "refuses; store tensors, state dicts, numbers, strings, bools, None, lists and dicts only"
    )


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _prune(ckpt_dir: Path, keep: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints (never ``keep``), and debris of interrupted saves."""
    if keep_last > 0:
        others = [p for _, p in layout.step_checkpoints(ckpt_dir) if p != keep]
        for stale in others[: max(0, len(others) - (keep_last - 1))]:
            _remove(stale)
    # Temp files and staging folders left behind by a hard kill (SIGKILL, power loss) would otherwise pile up.
    for leftover in ckpt_dir.glob(f".step_*{TMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
    for leftover in ckpt_dir.glob(f".{layout.LATEST_FILE}.*{TMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def commit_checkpoint_dir(staging: Path, final: Path, keep_last: int = 3) -> Path:
    """Move a fully written staging folder to its final name, then point ``latest.json`` at it.

    The rename is atomic, so a folder under a ``step_N`` name is always complete; ``latest.json`` moves only after
    it. Call from one process, after every writer has finished (a barrier).
    """
    if final.exists():  # re-saving the same step (e.g. after resuming exactly there): replace it
        _remove(final)
    for written in staging.rglob("*"):
        if written.is_file():
            with open(written, "rb") as f:
                os.fsync(f.fileno())
    os.replace(staging, final)
    fsync_dir(final.parent)
    atomic_write_json(final.parent / layout.LATEST_FILE, {"step": int(final.name[5:]), "file": final.name}, indent=None)
    _prune(final.parent, final, keep_last)
    for leftover in final.parent.glob(f".step_*{layout.STAGING_SUFFIX}"):
        _remove(leftover)
    return final


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write ``run_dir/checkpoints/step_{step:08d}.pt`` and point ``latest.json`` at it, both atomically.

    ``state`` must only hold things ``torch.load(weights_only=True)`` accepts (tensors, state dicts, numbers,
    strings, bools, None, lists, dicts); this is checked before anything is written.

    Afterwards, all but the ``keep_last`` newest step files are deleted (``keep_last <= 0`` keeps all). The
    file just written and the one ``latest.json`` names are never deleted. Single writer per run dir assumed
    (call this from rank 0 only).

    Returns the path of the new checkpoint file.
    """
    if isinstance(step, bool):
        raise TypeError(f"step must be an int, got {step!r}")
    step = operator.index(step)  # also accepts numpy / 0-d integer tensors, stored as a plain int name
    if step < 0:
        raise InputError(f"step must be non-negative, got {step}")
    _check_weights_only_loadable(state, "state")

    path = layout.checkpoint_path(run_dir, step, folder=False)
    atomic_torch_save(state, path)
    # The step file is complete and durable before latest.json moves, so latest.json never names a torn file.
    atomic_write_json(path.parent / layout.LATEST_FILE, {"step": step, "file": path.name}, indent=None)

    _prune(path.parent, path, keep_last)
    return path
