"""Checkpoint I/O: atomic saves, safe loads, and backbone import from our runs and official DINO releases.

Design rules, enforced everywhere in this module:

* Nothing is ever unpickled with ``weights_only=False``. Torch files are read with
  ``torch.load(path, map_location="cpu", weights_only=True)``; the only class we add to the allowlist is
  :class:`argparse.Namespace` (see :func:`_torch_load`), because official DINO checkpoints store their
  ``args`` as one.
* Every write is atomic: the bytes go to a temporary file in the destination directory, which is flushed,
  fsynced and then moved over the final name with :func:`os.replace`. A crash leaves either the old file or
  the new one under the final name, never a torn one.
* Errors name the file (and, where relevant, the key) at fault.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import operator
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "extract_backbone_state_dict",
    "find_latest_checkpoint",
    "load_backbone_weights",
    "load_checkpoint",
    "load_safetensors",
    "save_checkpoint",
    "safetensors_metadata",
    "save_safetensors",
    "select_backbone",
]

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
LATEST_FILE = "latest.json"
TEACHER_BACKBONE_FILE = "teacher_backbone.safetensors"
# A checkpoint is a file `step_N.pt` (single-process / DDP) or a folder `step_N` (sharded backends).
_STEP_FILE_RE = re.compile(r"^step_(\d+)(\.pt)?$")
_STAGING_SUFFIX = ".partial"
# Temp files start with "." and end with ".tmp" so that no glob/regex for final names can ever match them.
_TMP_SUFFIX = ".tmp"

# Classes that may appear in an official DINO checkpoint besides tensors and containers. argparse.Namespace
# is a plain attribute bag: torch's weights_only unpickler creates it with ``cls.__new__`` and fills it with
# ``__dict__.update`` (no ``__setstate__``, no ``__init__`` side effects), so allowlisting it cannot run code.
_EXTRA_SAFE_GLOBALS: list[Any] = [argparse.Namespace]

# Key prefixes added by wrappers rather than by the backbone itself: DistributedDataParallel ("module.") and
# torch.compile ("_orig_mod."). They can appear in either order, so they are stripped repeatedly.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys that belong to a DINOHead (projection MLP + weight-normed last layer), never to a backbone.
_DINO_HEAD_PREFIXES = ("head.mlp.", "head.last_layer.")
# Container keys under which state dicts are commonly nested in released checkpoints.
_NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict", "module")


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read safely (corrupt, truncated, or disallowed objects)."""


# ----------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: on POSIX the directory entry is only durable after fsyncing the directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename itself is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read the umask is to set it; restore it at once
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_path)`` on a temp file next to ``path``, fsync it, then atomically rename it.

    The temp file lives in the same directory so that ``os.replace`` is a same-filesystem rename (atomic).
    On any failure (including KeyboardInterrupt) the temp file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets the usual permissions
    try:
        write(tmp)
        # Flush the data to disk before the rename, otherwise a power loss could leave a renamed empty file.
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically: readers see either the previous file or the complete new one."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temporary file in the same folder, fsync, rename)."""

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------------------

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


def _step_files(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """All final ``step_*.pt`` files and ``step_*`` folders in ``ckpt_dir`` as (step, path), sorted by step."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for entry in ckpt_dir.iterdir():
        match = _STEP_FILE_RE.match(entry.name)
        if match and (entry.is_file() if match.group(2) else entry.is_dir()):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _prune(ckpt_dir: Path, keep: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints (never ``keep``), and debris of interrupted saves."""
    if keep_last > 0:
        others = [p for _, p in _step_files(ckpt_dir) if p != keep]
        for stale in others[: max(0, len(others) - (keep_last - 1))]:
            _remove(stale)
    # Temp files and staging folders left behind by a hard kill (SIGKILL, power loss) would otherwise pile up.
    for leftover in ckpt_dir.glob(f".step_*{_TMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
    for leftover in ckpt_dir.glob(f".{LATEST_FILE}.*{_TMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def checkpoint_dir_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_SUBDIR / f"step_{step:08d}"


def checkpoint_staging_dir(run_dir: str | Path, step: int) -> Path:
    """Where a folder checkpoint is written before it is renamed into place (never matched as a checkpoint)."""
    return Path(run_dir) / CHECKPOINT_SUBDIR / f".step_{step:08d}{_STAGING_SUFFIX}"


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
    _fsync_dir(final.parent)
    atomic_write_text(final.parent / LATEST_FILE, json.dumps({"step": int(final.name[5:]), "file": final.name}) + "\n")
    _prune(final.parent, final, keep_last)
    for leftover in final.parent.glob(f".step_*{_STAGING_SUFFIX}"):
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
        raise ValueError(f"step must be non-negative, got {step}")
    _check_weights_only_loadable(state, "state")

    ckpt_dir = Path(run_dir) / CHECKPOINT_SUBDIR
    name = f"step_{step:08d}.pt"
    path = ckpt_dir / name
    atomic_torch_save(state, path)
    # The step file is complete and durable before latest.json moves, so latest.json never names a torn file.
    atomic_write_text(ckpt_dir / LATEST_FILE, json.dumps({"step": step, "file": name}) + "\n")

    _prune(ckpt_dir, path, keep_last)
    return path


def _read_latest_json(ckpt_dir: Path) -> Path | None:
    """The file named by ``latest.json`` if the JSON is valid and the file exists, else None."""
    try:
        info = json.loads((ckpt_dir / LATEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = info.get("file") if isinstance(info, dict) else None
    # Only accept a bare step-file name: never follow a path out of the checkpoint directory.
    if not isinstance(name, str) or not _STEP_FILE_RE.match(name):
        return None
    path = ckpt_dir / name
    return path if path.exists() else None


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest checkpoint of a run: the file named by ``latest.json`` if valid, else the highest ``step_*.pt``.

    ``latest.json`` wins over a higher-numbered step file on purpose: after resuming from an older step,
    higher files from the abandoned timeline may still exist. Temp files from interrupted saves are ignored.
    Returns None if the run has no checkpoint.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINT_SUBDIR
    latest = _read_latest_json(ckpt_dir)
    if latest is not None:
        return latest
    if (ckpt_dir / LATEST_FILE).exists():
        logger.warning("Ignoring invalid %s; falling back to the highest step file", ckpt_dir / LATEST_FILE)
    files = _step_files(ckpt_dir)
    return files[-1][1] if files else None


# ----------------------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------------------


def _require_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"Expected a checkpoint file but got a directory: {path}")


def _unsafe_globals(path: Path) -> list[str]:
    """Best-effort list of pickled globals that weights_only refuses (static scan, nothing executed)."""
    try:
        with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) format or unreadable: the caller's error is still informative
        return []


def _torch_load(path: Path) -> Any:
    """``torch.load(..., weights_only=True)`` with argparse.Namespace allowlisted, and readable errors.

    Verified with torch 2.14.1: plain ``weights_only=True`` raises UnpicklingError "Unsupported global: GLOBAL
    argparse.Namespace" on official DINO checkpoints; inside ``torch.serialization.safe_globals([Namespace])``
    they load, while every other non-allowlisted global (custom classes, ``os.system``, ...) is still refused.
    The context manager only widens the allowlist for the duration of this call.
    """
    _require_file(path)
    try:
        with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        unsafe = _unsafe_globals(path)
        if unsafe or "weights only load failed" in str(err).lower():
            detail = f" (found: {', '.join(unsafe)})" if unsafe else ""
            raise CheckpointError(
                f"Refusing to load {path}: it contains pickled Python objects that are not plain tensors or "
                f"containers{detail}. Loading it would allow arbitrary code execution, so only "
                "weights_only=True loads are performed. If you trust the file, re-save its state dicts with "
                "plain tensors."
            ) from err
        raise CheckpointError(f"Cannot read checkpoint {path}: {type(err).__name__}: {err}") from err


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint written by :func:`save_checkpoint` onto the CPU, with ``weights_only=True``.

    Raises FileNotFoundError if ``path`` does not exist, CheckpointError if it is corrupt, truncated, refused
    by the safe unpickler, or not a dict.
    """
    path = Path(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"Checkpoint {path} holds a {type(obj).__qualname__}, expected a dict")
    return obj


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Atomically write ``state_dict`` as a safetensors file.

    Tensors are stored as contiguous CPU clones: safetensors rejects non-contiguous tensors and tensors that
    share storage (e.g. tied weights), and cloning also detaches them from any live training state.
    """
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"safetensors keys must be str, got {key!r} while writing {path}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"safetensors values must be tensors; key {key!r} is {type(value).__qualname__}")
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise TypeError(f"safetensors metadata keys and values must be str; offending keys: {bad[:5]}")

    def write(tmp: Path) -> None:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)

    atomic_write(path, write)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file onto the CPU. Raises FileNotFoundError / CheckpointError naming the file."""
    path = Path(path)
    _require_file(path)
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as err:
        raise CheckpointError(f"Cannot read safetensors file {path}: {type(err).__name__}: {err}") from err


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header ({} when it has none)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise CheckpointError(f"Cannot read safetensors file {path}: {type(err).__name__}: {err}") from err


def is_safetensors_file(path: Path) -> bool:
    """Sniff the format rather than trust the suffix: safetensors = u64 little-endian header length, then JSON.

    The first byte alone says nothing (a header length of 128 + 256k starts with 0x80, like a pickle); a JSON
    header that fits in the file does.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[:2] == b"PK":  # zip: torch.save
        return False
    header_length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + header_length <= path.stat().st_size


# ----------------------------------------------------------------------------------------------------------
# Backbone extraction (our checkpoints, run dirs, safetensors, official DINO releases)
# ----------------------------------------------------------------------------------------------------------


def _strip_wrapper_prefixes(key: str) -> str:
    while True:
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        else:
            return key


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_backbone(obj: Any, which: str, source: str) -> dict[str, torch.Tensor]:
    """Find the backbone state dict inside a loaded checkpoint object and normalise its keys to timm names."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} holds a {type(obj).__qualname__}, not a checkpoint dict or state dict")
    state: Any = obj
    # (a)/(d): full training checkpoints (ours or official DINO) hold both networks.
    if not _is_state_dict(state) and ("teacher" in state or "student" in state):
        if which not in state or not isinstance(state[which], Mapping):
            present = [k for k in ("teacher", "student") if isinstance(state.get(k), Mapping)]
            raise ValueError(f"{source} has no {which!r} state dict (it has: {present})")
        state = state[which]
    # (e): released weights are sometimes nested one or two levels deep.
    for _ in range(3):
        if _is_state_dict(state):
            break
        nested = next((k for k in _NESTED_STATE_KEYS if isinstance(state.get(k), Mapping)), None)
        if nested is None:
            break
        state = state[nested]

    tensors = {_strip_wrapper_prefixes(str(k)): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"No tensors found in {source}; top-level keys: {list(obj)[:10]}")

    if any(k.startswith("backbone.") for k in tensors):
        # Wrapper module (ours or DINO's MultiCropWrapper): keep backbone params only, drop "head.*" etc.
        tensors = {
            _strip_wrapper_prefixes(k[len("backbone.") :]): v for k, v in tensors.items() if k.startswith("backbone.")
        }
    else:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(_DINO_HEAD_PREFIXES)}
    if not tensors:
        raise ValueError(f"No backbone weights found in {source}")
    return tensors


def extract_backbone_state_dict(source: str | Path, which: str = "teacher") -> dict[str, torch.Tensor]:
    """Return the backbone weights (timm key names, head dropped) from any supported checkpoint source.

    ``source`` may be, auto-detected:

    * a training checkpoint from :func:`save_checkpoint` (``student``/``teacher`` wrapper state dicts),
    * a run directory (its latest checkpoint, else its ``teacher_backbone.safetensors``),
    * a safetensors file of backbone weights (detected by content, not suffix),
    * an official facebookresearch/dino full checkpoint (``module.``/``backbone.``/``head.`` prefixes,
      ``args`` stored as argparse.Namespace),
    * an official backbone-only ``.pth`` (optionally under ``state_dict``/``model``, optionally prefixed).

    ``which`` ("teacher" or "student") selects the network in full checkpoints and is ignored for sources that
    hold a single backbone.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint source not found: {path}")

    if path.is_dir():
        latest = find_latest_checkpoint(path)
        if latest is not None:
            path = latest
        elif (path / TEACHER_BACKBONE_FILE).is_file():
            if which != "teacher":
                raise ValueError(
                    f"Run directory {source} has no training checkpoint, only {TEACHER_BACKBONE_FILE}; "
                    f"the {which} backbone is not available"
                )
            path = path / TEACHER_BACKBONE_FILE
        else:
            raise FileNotFoundError(
                f"No checkpoint in run directory {source}: looked for {CHECKPOINT_SUBDIR}/{LATEST_FILE}, "
                f"{CHECKPOINT_SUBDIR}/step_*.pt and {TEACHER_BACKBONE_FILE}"
            )

    obj: Any = load_safetensors(path) if is_safetensors_file(path) else _torch_load(path)
    return select_backbone(obj, which, str(path))


# ----------------------------------------------------------------------------------------------------------
# Loading into a timm model
# ----------------------------------------------------------------------------------------------------------


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the model's classifier per timm's pretrained_cfg ("head" for ViT, "fc" for ResNet)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names or ())


def _maybe_resample_pos_embed(
    model: nn.Module, state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str
) -> None:
    """Resample an absolute ``pos_embed`` trained at another resolution to the model's grid (in place)."""
    if "pos_embed" not in state or "pos_embed" not in expected:
        return
    old, new = state["pos_embed"], expected["pos_embed"]
    if old.shape == new.shape or old.ndim != 3 or new.ndim != 3 or old.shape[-1] != new.shape[-1]:
        return  # same size, or a different architecture: leave it to the mismatch report
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        return
    num_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    old_side = math.isqrt(old.shape[1] - num_prefix) if old.shape[1] > num_prefix else 0
    if old_side * old_side != old.shape[1] - num_prefix or old_side == 0:
        return  # not a square grid with the same prefix tokens: cannot infer the old grid safely
    from timm.layers import resample_abs_pos_embed  # local import: only ViT checkpoints need it

    state["pos_embed"] = resample_abs_pos_embed(
        old, new_size=list(grid), old_size=[old_side, old_side], num_prefix_tokens=num_prefix
    )
    logger.info("Resampled pos_embed from %s: grid %dx%d -> %dx%d", source, old_side, old_side, *grid)


def _format_keys(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_backbone_weights(
    backbone: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "<memory>"
) -> None:
    """Strictly load backbone weights into a timm model, with a readable error on architecture mismatch.

    Tolerated differences: ``pos_embed`` of another image size is resampled with timm's helper;
    classifier weights (``head.*`` / ``fc.*``) in the source are ignored when the model has no classifier
    (num_classes=0); BatchNorm ``num_batches_tracked`` buffers may be absent (old torchvision weights).
    Anything else raises a ValueError naming ``source`` with up to 5 missing keys, 5 unexpected keys and
    the shape mismatches; the model is left untouched in that case.
    """
    expected = backbone.state_dict()
    state = dict(state_dict)

    # A classifier in the file (torchvision resnet "fc", a timm "head") is not part of a headless backbone.
    for prefix in _classifier_prefixes(backbone):
        if not any(k.startswith(prefix) for k in expected):
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}

    _maybe_resample_pos_embed(backbone, state, expected, source)

    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [
            f"Checkpoint {source} does not match the model ({type(backbone).__name__}, "
            f"{len(expected)} tensors; checkpoint has {len(state)}). "
            "Is it a checkpoint of another architecture?"
        ]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:5]))
            if len(mismatched) > 5:
                lines[-1] += f"; ... (+{len(mismatched) - 5} more)"
        raise ValueError("\n".join(lines))

    backbone.load_state_dict(state, strict=True)
