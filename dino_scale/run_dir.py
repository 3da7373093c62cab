"""The run-directory layout: where a training run keeps what, and how readers find it.

    runs/<name>/
        config.json                     the resolved recipe
        metrics.jsonl                   one record per logged step, then `final` / `final_knn` records
        tensorboard/                    the same records as TensorBoard event files (when tensorboard is installed)
        curves.png                      `dino-scale plot`'s figure of the run
        knn.json                        end-of-training k-NN of the teacher vs a random init
        teacher_backbone.safetensors    the teacher backbone, timm key names
        checkpoints/
            latest.json                 {"step": N, "file": "step_0000000N[.pt]"}: the newest complete checkpoint
            step_0000000N.pt            one file (local, ddp) ...
            step_0000000N.pt.manifest.json    ... with its manifest beside it,
            step_0000000N/              ... or a folder (deepspeed, fsdp) holding trainer_state.pt (teacher, center,
                trainer_state.pt        step, data position, RNG of every rank), the backend's own sharded files,
                student_full.pt         and, where the backend can write it, the student by parameter name,
                manifest.json           and the manifest of every other file in the folder

A manifest (written last, before latest.json moves) holds the size and sha256 of every file of its checkpoint;
resuming verifies it before anything is loaded (dino_scale.train.checkpoint). Checkpoints written before manifests
existed have none: they still load, unverified.

Training writes this layout (dino_scale.train), export / retrieval / evaluation read it (dino_scale.models.weights);
both go through the names here.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dino_scale.errors import NotFound
from dino_scale.io import file_sha256

log = logging.getLogger(__name__)

RUNS_ROOT = Path("runs")
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
KNN_FILE = "knn.json"
TEACHER_BACKBONE_FILE = "teacher_backbone.safetensors"
CHECKPOINT_SUBDIR = "checkpoints"
LATEST_FILE = "latest.json"
TRAINER_STATE_FILE = "trainer_state.pt"
# Written in every single-file checkpoint and, for DeepSpeed ZeRO 1/2, beside the sharded files: the student's full
# fp32 weights and optimizer state keyed by parameter name. It is what lets a run resume on another process count.
PORTABLE_STUDENT_FILE = "student_full.pt"
# A folder checkpoint is written under this suffix and renamed into place when complete.
STAGING_SUFFIX = ".partial"
# The manifest of a checkpoint: inside a folder checkpoint, or beside a single file (`step_N.pt.manifest.json`).
MANIFEST_FILE = "manifest.json"
MANIFEST_SUFFIX = ".manifest.json"
# A checkpoint is a file `step_N.pt` (single-process / DDP) or a folder `step_N` (sharded backends).
STEP_NAME_RE = re.compile(r"^step_(\d+)(\.pt)?$")


TENSORBOARD_SUBDIR = "tensorboard"
CURVES_FILE = "curves.png"
RUN_ARTIFACTS = (
    CONFIG_FILE,
    METRICS_FILE,
    KNN_FILE,
    TEACHER_BACKBONE_FILE,
    CHECKPOINT_SUBDIR,
    TENSORBOARD_SUBDIR,
    CURVES_FILE,
)
"""What a training run writes into its run directory (and `--overwrite` removes: nothing else is touched)."""


def run_artifacts(run_dir: str | Path) -> list[Path]:
    """The artifacts of an earlier run present in ``run_dir`` (an empty checkpoints/ or tensorboard/ folder does not
    count)."""
    run_dir = Path(run_dir)
    found = []
    for name in RUN_ARTIFACTS:
        path = run_dir / name
        if path.is_dir():
            if any(path.iterdir()):
                found.append(path)
        elif path.exists() or path.is_symlink():
            found.append(path)
    return found


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_SUBDIR


def checkpoint_path(run_dir: str | Path, step: int, folder: bool) -> Path:
    """`checkpoints/step_N` (a folder checkpoint) or `checkpoints/step_N.pt` (a single file)."""
    name = f"step_{step:08d}"
    return checkpoint_dir(run_dir) / (name if folder else f"{name}.pt")


def staging_path(run_dir: str | Path, step: int) -> Path:
    """Where a folder checkpoint is written before it is renamed into place (never matched as a checkpoint)."""
    return checkpoint_dir(run_dir) / f".step_{step:08d}{STAGING_SUFFIX}"


def manifest_path(checkpoint: Path) -> Path:
    """The manifest of a checkpoint: `step_N.pt.manifest.json` beside a single file, `manifest.json` in a folder
    (a staging folder too)."""
    if checkpoint.name.endswith(".pt"):
        return checkpoint.with_name(checkpoint.name + MANIFEST_SUFFIX)
    return checkpoint / MANIFEST_FILE


def step_of(checkpoint: Path) -> int:
    match = STEP_NAME_RE.match(checkpoint.name)
    if match is None:
        raise ValueError(f"{checkpoint} is not named like a checkpoint (step_N or step_N.pt)")
    return int(match.group(1))


def step_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """All final ``step_*.pt`` files and ``step_*`` folders in ``ckpt_dir`` as (step, path), sorted by step."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for entry in ckpt_dir.iterdir():
        match = STEP_NAME_RE.match(entry.name)
        if match and (entry.is_file() if match.group(2) else entry.is_dir()):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _latest_json_name(ckpt_dir: Path) -> str | None:
    """The checkpoint name in ``latest.json`` if the JSON is valid and names one, else None."""
    try:
        info = json.loads((ckpt_dir / LATEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = info.get("file") if isinstance(info, dict) else None
    # Only accept a bare step-file name: never follow a path out of the checkpoint directory.
    if not isinstance(name, str) or not STEP_NAME_RE.match(name):
        return None
    return name


def _read_latest_json(ckpt_dir: Path) -> Path | None:
    """The file named by ``latest.json`` if the JSON is valid and the file exists, else None."""
    name = _latest_json_name(ckpt_dir)
    if name is None:
        return None
    path = ckpt_dir / name
    return path if path.exists() else None


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """The checkpoints a resumed run may continue from, the one to try first first: the one ``latest.json`` names
    (even when it is missing, so that the caller reports it), then every older one, newest first. Checkpoints above
    the one latest.json names are left out (they belong to a timeline that was abandoned by resuming from an older
    step). Without a valid latest.json: all, newest first.
    """
    ckpt_dir = checkpoint_dir(run_dir)
    found = step_checkpoints(ckpt_dir)
    name = _latest_json_name(ckpt_dir)
    if name is None:
        if (ckpt_dir / LATEST_FILE).exists():
            log.warning("Ignoring invalid %s; trying the step checkpoints from the highest", ckpt_dir / LATEST_FILE)
        return [path for _, path in reversed(found)]
    named = ckpt_dir / name
    step = step_of(named)
    return [named, *(path for s, path in reversed(found) if s < step)]


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest checkpoint of a run: the file named by ``latest.json`` if valid, else the highest ``step_*.pt``.

    ``latest.json`` wins over a higher-numbered step file on purpose: after resuming from an older step,
    higher files from the abandoned timeline may still exist. Temp files from interrupted saves are ignored.
    Returns None if the run has no checkpoint.
    """
    ckpt_dir = checkpoint_dir(run_dir)
    latest = _read_latest_json(ckpt_dir)
    if latest is not None:
        return latest
    if (ckpt_dir / LATEST_FILE).exists():
        log.warning("Ignoring invalid %s; falling back to the highest step file", ckpt_dir / LATEST_FILE)
    files = step_checkpoints(ckpt_dir)
    return files[-1][1] if files else None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def find_latest_run(runs_root: str | Path = RUNS_ROOT) -> Path:
    """The most recently written run directory under ``runs_root`` (one with a config.json and weights)."""
    root = Path(runs_root)
    candidates = []
    for run in root.iterdir() if root.is_dir() else []:
        has_weights = (run / TEACHER_BACKBONE_FILE).is_file() or checkpoint_dir(run).is_dir()
        if is_run_dir(run) and has_weights:
            written = [p.stat().st_mtime for p in (run / METRICS_FILE, run / CONFIG_FILE) if p.exists()]
            candidates.append((max(written), run))
    if not candidates:
        raise NotFound(
            f"no training run found under {root}/ (a folder with {CONFIG_FILE} and weights); name a run directory "
            "or checkpoint instead"
        )
    return max(candidates)[1]


def run_name_of_checkpoint(path: Path) -> str | None:
    """runs/NAME/checkpoints/step_N.pt (or .../step_N/trainer_state.pt) -> NAME; None for other files."""
    for parent in path.parents:
        if parent.name == CHECKPOINT_SUBDIR:
            return parent.parent.name if is_run_dir(parent.parent) else None
    return None


def folder_checkpoint_file(folder: Path, which: str) -> Path:
    """The file of a folder checkpoint that holds the teacher (trainer state) or the student (portable copy)."""
    name = TRAINER_STATE_FILE if which == "teacher" else PORTABLE_STUDENT_FILE
    if not (folder / name).is_file():
        hint = (
            " (ZeRO-3 and FSDP checkpoints keep the student sharded; export the teacher)"
            if which == "student"
            else "; is it a checkpoint folder of ours?"
        )
        raise NotFound(f"{folder} has no {name}{hint}")
    return folder / name


# --- checking a checkpoint against its manifest (training writes the manifests: dino_scale.train.checkpoint) ------

MANIFEST_FORMAT = "dino-scale checkpoint manifest"
MANIFEST_VERSION = 1
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _reason(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def checkpoint_files(folder: Path) -> list[str]:
    """The files of a folder checkpoint (what its manifest lists): every file under it but the manifest, as sorted
    paths relative to the folder."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.relative_to(folder).as_posix() != MANIFEST_FILE
    )


def _root_and_expected(checkpoint: Path) -> tuple[Path, list[str] | None]:
    """Where a checkpoint's manifest names are relative to, and the names it must list (None: a folder's files)."""
    if checkpoint.name.endswith(".pt"):
        return checkpoint.parent, [checkpoint.name]
    return checkpoint, None


def _safe_name(root: Path, name: Any) -> bool:
    """A relative name that stays inside ``root`` (no absolute path, no `..`, no link leading out)."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return False
    if any(part in ("", ".", "..") for part in name.split("/")):
        return False
    try:
        (root / name).resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


def read_manifest(checkpoint: Path) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """(the manifest's file entries, None), (None, None) when the checkpoint has no manifest (written before
    manifests existed), or (None, what is wrong with it)."""
    path = manifest_path(checkpoint)
    if not path.exists():
        return None, None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return None, f"its manifest {path} cannot be read ({_reason(error)})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None, f"{path} is not a dino-scale checkpoint manifest"
    version = manifest.get("version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        return None, f"{path} has manifest version {version!r}; this dino-scale reads version {MANIFEST_VERSION}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return None, f"{path} lists no files"
    root, _ = _root_and_expected(checkpoint)
    for name, entry in files.items():
        if not _safe_name(root, name):
            return None, f"{path} names {name!r}, a path outside {root}"
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int)
            and not isinstance(entry.get("bytes"), bool)
            and isinstance(entry.get("sha256"), str)
            and _SHA256_RE.match(entry["sha256"])
        )
        if not ok:
            return None, f"{path} has a malformed entry for {name!r}"
    return files, None


def check_files(checkpoint: Path, entries: dict[str, dict[str, Any]]) -> str | None:
    """What is wrong with a checkpoint's files by its manifest's names and sizes (cheap: no reading), or None."""
    manifest = manifest_path(checkpoint)
    root, expected = _root_and_expected(checkpoint)
    listed = set(entries)
    if expected is not None:
        if set(expected) != listed:
            return f"{manifest} does not list {checkpoint.name} (it lists {sorted(listed)[:3]})"
    else:
        unlisted = sorted(set(checkpoint_files(checkpoint)) - listed)
        if unlisted:
            return f"{checkpoint / unlisted[0]} is not in its manifest"
    for name in sorted(listed):
        path = root / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entries[name]["bytes"]:
            return f"{path} has {size} bytes, its manifest says {entries[name]['bytes']} (truncated or overwritten)"
    return None


def check_hashes(checkpoint: Path, entries: dict[str, dict[str, Any]], names: list[str]) -> str | None:
    """The first of ``names`` whose sha256 differs from the manifest's, as a reason, or None."""
    root, _ = _root_and_expected(checkpoint)
    for name in names:
        path = root / name
        try:
            actual = file_sha256(path)
        except OSError as error:
            return f"{path} cannot be read ({_reason(error)})"
        if actual != entries[name]["sha256"]:
            return f"{path} does not match the sha256 in its manifest (damaged)"
    return None


def _check_zip_crcs(checkpoint: Path, names: list[str]) -> str | None:
    """For checkpoints without a manifest: the CRC32 of every member of the torch (zip) files among ``names``."""
    root, _ = _root_and_expected(checkpoint)
    for name in names:
        path = root / name
        if not zipfile.is_zipfile(path):
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as error:
            return f"{path} is not a readable torch file ({_reason(error)})"
        if bad is not None:
            return f"{path}: its member {bad} fails its CRC check (damaged)"
    return None


def quick_problem(checkpoint: Path) -> str | None:
    """What is visibly wrong with a checkpoint without reading its data (manifest, names, sizes), or None. A
    checkpoint without a manifest passes (it predates them)."""
    entries, problem = read_manifest(checkpoint)
    if problem is not None or entries is None:
        return problem
    return check_files(checkpoint, entries)


@dataclass(frozen=True)
class Verdict:
    problem: str | None  # None: the checkpoint may be loaded
    verified: bool  # False: it has no manifest, so nothing could be verified


def verify(checkpoint: Path, rank: int = 0, world_size: int = 1) -> Verdict:
    """Check a checkpoint against its manifest before loading it. With several processes each hashes its share of
    the files (rank ``rank`` of ``world_size``); the caller combines their verdicts."""
    if not checkpoint.exists():
        return Verdict(f"{checkpoint} is missing", False)
    entries, problem = read_manifest(checkpoint)
    if problem is not None:
        return Verdict(problem, True)
    if entries is None:
        root, expected = _root_and_expected(checkpoint)
        names = expected if expected is not None else checkpoint_files(checkpoint)
        if expected is None and not names:
            return Verdict(f"{checkpoint} is an empty folder", False)
        return Verdict(_check_zip_crcs(checkpoint, names[rank::world_size]), False)
    problem = check_files(checkpoint, entries)
    if problem is None:
        problem = check_hashes(checkpoint, entries, sorted(entries)[rank::world_size])
    return Verdict(problem, True)
