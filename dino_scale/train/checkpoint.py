"""Writing training checkpoints, and finding the newest one that can be trusted again.

A checkpoint is one file (local, ddp) or a folder committed by rename (deepspeed, fsdp); the layout is
dino_scale.run_dir's. Every file goes through the atomic writers of dino_scale.io, or is fsynced before the folder
is renamed into place.

Manifest: the last thing written for a checkpoint, before ``latest.json`` moves to it, is its manifest
(``step_N.pt.manifest.json`` beside a file, ``manifest.json`` inside a folder)::

    {"format": "dino-scale checkpoint manifest", "version": 1, "step": N,
     "files": {"<name relative to the folder, or the file's own name>": {"bytes": 123, "sha256": "..."}, ...}}

The sizes and hashes are read back from the files on disk after they were fsynced. Resuming (`resume_newest`)
checks a checkpoint against its manifest before anything of it is loaded: every listed file present with its size
and sha256, no unlisted file in a folder, no name leading out of it. A checkpoint that fails (damaged, truncated,
a file missing or added), or that its backend then cannot read (a foreign structure), is reported by path and the
next older one is tried; all ranks decide together. Checkpoints written before manifests existed load unverified
(with a warning; the zip CRCs of their torch files are still checked).

Write failures (a full disk, a read-only folder) end in one WriteFailed line; what the failed save wrote is
removed, so the previous checkpoint and latest.json stay as they were. Rotation (`keep_last`) never deletes the
checkpoint just written, and counts only intact checkpoints, so damaged ones never crowd out a good one.
"""

from __future__ import annotations

import logging
import operator
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from dino_scale import run_dir as layout
from dino_scale.errors import CheckpointError, ConfigError, IncompatibleCheckpoint, InputError, WriteFailed
from dino_scale.io import TMP_SUFFIX, atomic_torch_save, atomic_write_json, file_sha256, fsync_dir, write_failure

log = logging.getLogger("dino_scale")

# A reason quoted in a warning or in the final error is cut here, so that the error stays one readable line.
_REASON_CHARS = 400
_LISTED = 5  # checkpoints named in the final error (each one also had its warning)

T = TypeVar("T")


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


# --- manifests -------------------------------------------------------------------------------------------------


def digest_files(root: Path, names: list[str], fsync: bool = False) -> dict[str, dict[str, Any]]:
    """{name: {"bytes", "sha256"}} of files under ``root``, read back from the disk (``fsync``: flush each first)."""
    entries = {}
    for name in names:
        path = root / name
        if fsync:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        entries[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return entries


def write_manifest(path: Path, step: int, entries: dict[str, dict[str, Any]]) -> None:
    """Write a manifest (atomically) at ``path`` (see the module docstring)."""
    manifest = {"format": layout.MANIFEST_FORMAT, "version": layout.MANIFEST_VERSION, "step": step, "files": entries}
    atomic_write_json(path, manifest, indent=1, sort_keys=True)


# --- resuming ------------------------------------------------------------------------------------------------------


def one_line(error: BaseException | str) -> str:
    """An error as one short line: DCP's CheckpointException (a BaseException whose text is a traceback per rank)
    becomes the first rank's exception; whitespace collapses; very long messages are cut."""
    if isinstance(error, BaseException):
        failures = getattr(error, "failures", None)
        if isinstance(failures, dict) and failures:
            rank, (inner, _) = sorted(failures.items(), key=lambda item: item[0])[0]
            text = f"rank {rank}: {one_line(inner)}"
        elif isinstance(error, (CheckpointError, InputError, WriteFailed)):
            text = str(error)
        else:
            text = f"{type(error).__name__}: {error}"
    else:
        text = error
    text = " ".join(text.split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def _dcp_exception() -> type[BaseException]:
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def resume_newest(
    run_dir: str | Path,
    load: Callable[[Path], T],
    gather: Callable[[Any], list[Any]] = lambda obj: [obj],
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Path, T] | None:
    """Load the newest usable checkpoint of a run with ``load(path)``; returns (its path, what load returned), or
    None when the run has no checkpoint.

    Candidates come newest first (run_dir.resume_candidates). Each is verified against its manifest (every rank
    hashes a share of the files) before ``load`` touches the model; one that fails, or that ``load`` cannot read,
    is reported with a warning naming it and why, and the next older one is tried. Every rank calls this with the
    same arguments; ``gather`` (all-gather of a small object) makes them decide the same. When none is usable: a
    one-line CheckpointError listing what was tried. ConfigError (this run's recipe cannot continue the run, e.g.
    another global batch) and IncompatibleCheckpoint stop at once: an older checkpoint would not do either.
    """
    candidates = layout.resume_candidates(run_dir)
    if not candidates:
        return None
    checkpoint_exception = _dcp_exception()
    tried: list[str] = []
    for path in candidates:
        verdict = layout.verify(path, rank, world_size)
        problems = [p for p in gather(verdict.problem) if p is not None]
        if problems:
            reason = problems[0]
        else:
            if not verdict.verified:
                log.warning(
                    "checkpoint %s has no manifest (written before dino-scale recorded checksums): its contents "
                    "cannot be verified",
                    path,
                )
            error: str | None = None
            try:
                result = load(path)
            except (ConfigError, IncompatibleCheckpoint):
                raise
            except (Exception, checkpoint_exception) as caught:  # DCP's CheckpointException is a BaseException
                error = one_line(caught)
            errors = [e for e in gather(error) if e is not None]
            if not errors:
                return path, result
            reason = errors[0]
        reason = one_line(reason)
        log.warning("checkpoint %s is unusable: %s; trying the previous one", path, reason)
        tried.append(f"{path.name} ({reason.replace(f'{path.parent}{os.sep}', '')})")  # names relative to the folder
    listed = "; ".join(tried[:_LISTED])
    if len(tried) > _LISTED:
        listed += f"; and {len(tried) - _LISTED} older one(s) (see the warnings above)"
    raise CheckpointError(
        f"no usable checkpoint in {layout.checkpoint_dir(run_dir)}: tried {listed}. Repair or remove them, or start "
        "the run again without --resume",
        argument="resume",
    )


def check_trainer_state(state: Any, teacher: nn.Module, center: torch.Tensor, source: Path) -> None:
    """Refuse (CheckpointError naming ``source``) a trainer state that is not ours or does not fit this run's
    teacher and center, before any of it is loaded."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a dino-scale training checkpoint")
    missing = [key for key in ("teacher", "center", "step", "data_position", "rng") if key not in state]
    if missing:
        raise CheckpointError(f"{source} is not a dino-scale training checkpoint (it has no {missing[0]!r})")
    saved, expected = state["teacher"], teacher.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(expected):
        keys = sorted(set(expected) - set(saved)) if isinstance(saved, dict) else []
        raise CheckpointError(f"{source}: its teacher does not match this model (missing {keys[:3]})")
    for name, tensor in expected.items():
        value = saved[name]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            raise CheckpointError(f"{source}: its teacher's {name} does not have this model's shape")
    if not isinstance(state["center"], torch.Tensor) or state["center"].shape != center.shape:
        raise CheckpointError(f"{source}: its loss center does not fit this model's output dimension")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(state["data_position"], dict):
        raise CheckpointError(f"{source}: its step or data position is malformed")


# --- writing ---------------------------------------------------------------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_checkpoint(path: Path) -> None:
    _remove(path)
    if path.name.endswith(".pt"):
        layout.manifest_path(path).unlink(missing_ok=True)


def _prune(ckpt_dir: Path, keep: Path, keep_last: int) -> None:
    """Keep ``keep`` (just written) and the ``keep_last - 1`` newest other checkpoints that look intact (manifest,
    names and sizes; checkpoints older than manifests count as intact), those of the current timeline (below
    ``keep``) first; delete the rest, damaged ones included, and the debris of interrupted saves. Nothing is
    deleted when ``keep`` itself does not look intact."""
    if keep_last > 0:
        problem = layout.quick_problem(keep)
        if problem is not None:
            log.warning("not rotating checkpoints: the one just written does not look intact (%s)", problem)
            return
        others = [p for _, p in layout.step_checkpoints(ckpt_dir) if p != keep]
        intact = [p for p in others if layout.quick_problem(p) is None]
        # Checkpoints above the new one (a timeline abandoned by resuming from an older step) go first.
        step = layout.step_of(keep)
        intact.sort(key=lambda p: (layout.step_of(p) < step, layout.step_of(p)))
        kept = set(intact[len(intact) - (keep_last - 1) :]) if keep_last > 1 else set()
        for stale in others:
            if stale not in kept:
                _remove_checkpoint(stale)
    for manifest in ckpt_dir.glob(f"step_*.pt{layout.MANIFEST_SUFFIX}"):
        if not (ckpt_dir / manifest.name[: -len(layout.MANIFEST_SUFFIX)]).exists():
            manifest.unlink(missing_ok=True)
    remove_debris(ckpt_dir)


def remove_debris(ckpt_dir: Path) -> None:
    """Temp files and staging folders left behind by a hard kill (SIGKILL, power loss) or a failed save."""
    for leftover in ckpt_dir.glob(f".step_*{TMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
    for leftover in ckpt_dir.glob(f".{layout.LATEST_FILE}.*{TMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
    for leftover in ckpt_dir.glob(f".step_*{layout.STAGING_SUFFIX}"):
        _remove(leftover)


def _point_latest(ckpt_dir: Path, checkpoint: Path) -> None:
    atomic_write_json(
        ckpt_dir / layout.LATEST_FILE, {"step": layout.step_of(checkpoint), "file": checkpoint.name}, indent=None
    )


def _as_write_failure(error: BaseException, path: Path, needed: int | None = None) -> BaseException:
    if isinstance(error, OSError) and not isinstance(error, WriteFailed):
        return write_failure(path, error, needed)
    return error


def commit_checkpoint_dir(
    staging: Path, final: Path, keep_last: int = 3, digests: dict[str, dict[str, Any]] | None = None
) -> Path:
    """Write the manifest of a fully written staging folder, move it to its final name, point ``latest.json`` at it.

    ``digests``: the files' sizes and hashes when the ranks computed them (default: computed here). The rename is
    atomic, so a folder under a ``step_N`` name is always complete; ``latest.json`` moves only after it. On any
    failure what this save wrote is removed and the previous checkpoint stays the latest (an OSError becomes a
    one-line WriteFailed). Call from one process, after every writer has finished (a barrier).
    """
    ckpt_dir = final.parent
    aside = ckpt_dir / f".{final.name}.replaced{layout.STAGING_SUFFIX}"
    placed = False
    try:
        if digests is None:
            digests = digest_files(staging, layout.checkpoint_files(staging), fsync=True)
        write_manifest(layout.manifest_path(staging), layout.step_of(final), digests)
        for folder in (staging, *(p for p in staging.rglob("*") if p.is_dir())):
            fsync_dir(folder)
        if final.exists():  # re-saving the same step (e.g. after falling back from a damaged one): replace it
            os.replace(final, aside)
        os.replace(staging, final)
        placed = True
        fsync_dir(ckpt_dir)
        _point_latest(ckpt_dir, final)
    except BaseException as error:
        if placed:
            _remove(final)
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        _remove(staging)
        converted = _as_write_failure(error, final)
        if converted is error:
            raise
        raise converted from error
    _remove(aside)
    _prune(ckpt_dir, final, keep_last)
    return final


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write ``run_dir/checkpoints/step_{step:08d}.pt``, its manifest, and point ``latest.json`` at it, all atomically.

    ``state`` must only hold things ``torch.load(weights_only=True)`` accepts (tensors, state dicts, numbers,
    strings, bools, None, lists, dicts); this is checked before anything is written.

    Afterwards, all but the ``keep_last`` newest intact step files are deleted (``keep_last <= 0`` keeps all); the
    file just written is never deleted. On a failure (WriteFailed for a full disk or a read-only folder) nothing of
    this save is left and latest.json still names the previous checkpoint. Single writer per run dir assumed (call
    this from rank 0 only).

    Returns the path of the new checkpoint file.
    """
    if isinstance(step, bool):
        raise TypeError(f"step must be an int, got {step!r}")
    step = operator.index(step)  # also accepts numpy / 0-d integer tensors, stored as a plain int name
    if step < 0:
        raise InputError(f"step must be non-negative, got {step}")
    _check_weights_only_loadable(state, "state")

    path = layout.checkpoint_path(run_dir, step, folder=False)
    manifest = layout.manifest_path(path)
    placed = False
    try:
        atomic_torch_save(state, path)
        placed = True
        write_manifest(manifest, step, digest_files(path.parent, [path.name]))
        # The step file and its manifest are complete and durable before latest.json moves.
        _point_latest(path.parent, path)
    except BaseException as error:
        if placed:
            _remove_checkpoint(path)
        converted = _as_write_failure(error, path)
        if converted is error:
            raise
        raise converted from error
    _prune(path.parent, path, keep_last)
    return path
