"""What a run needs, checked before its first step: the run directory (fresh, continued or replaced), what a resumed
recipe changes, and the labelled sets of the end-of-training k-NN.

Every rank runs these checks on the same files and reaches the same verdict, so a refusal stops all of them before
any work, with one line naming the directory, key or path at fault.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from dino_scale import run_dir as layout
from dino_scale.config import ConfigChanges, TrainConfig, config_changes
from dino_scale.data.items import ImageItem, list_labelled
from dino_scale.errors import ConfigError, DinoScaleError, blame

log = logging.getLogger("dino_scale")


def _describe(artifacts: list[Path]) -> str:
    names = []
    for path in artifacts:
        if path.name == layout.CHECKPOINT_SUBDIR:
            count = len(layout.step_checkpoints(path))
            names.append(f"{count} checkpoint(s)")
        else:
            names.append(path.name + ("/" if path.is_dir() else ""))
    return ", ".join(names)


def check_run_dir(cfg: TrainConfig, resume: bool, overwrite: bool) -> ConfigChanges | None:
    """Refuse to start a fresh run in a directory that holds another run (unless `overwrite`), and on `resume`
    compare the recipe with the run's config.json: shape-changing keys are refused; the other changes are returned
    (to be logged). Reads only; `clear_run_dir` removes what `overwrite` replaces."""
    run_dir = cfg.resolved_output_dir()
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the directory and --overwrite replaces it: choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} is a file, not a directory", argument="output_dir")
    artifacts = layout.run_artifacts(run_dir) if run_dir.is_dir() else []
    if not resume:
        if artifacts and not overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run ({_describe(artifacts)}): continue it with --resume, replace it with "
                "--overwrite, or choose another --output-dir",
                argument="output_dir",
            )
        return None
    previous = run_dir / layout.CONFIG_FILE
    if not previous.is_file():
        return None
    try:
        before = json.loads(previous.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        log.warning("--resume: cannot read %s to compare recipes (%s)", previous, error)
        return None
    changes = config_changes(before if isinstance(before, dict) else {}, cfg.to_dict())
    if changes.shape:
        raise ConfigError(
            f"--resume: {run_dir}'s checkpoints were trained with another network or optimizer shape: "
            f"{'; '.join(changes.shape)}. Resume with the recipe of {previous}, or start a new run in another "
            "--output-dir (model.init_backbone can start it from this run's teacher)"
        )
    return changes


def log_changes(changes: ConfigChanges | None) -> None:
    """Say what a resumed run changed: hyperparameters as a warning (the run no longer matches an uninterrupted
    one), run-control settings (logging, checkpoints, workers, evaluation, ...) as information."""
    if changes is None:
        return
    if changes.hyperparameters:
        log.warning(
            "--resume with changed hyperparameters (the run no longer matches an uninterrupted one): %s",
            "; ".join(changes.hyperparameters),
        )
    if changes.run_control:
        log.info("--resume with changed settings: %s", "; ".join(changes.run_control))


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: remove the earlier run's artifacts (only the names a run writes, layout.RUN_ARTIFACTS; any other
    file in the directory stays)."""
    artifacts = layout.run_artifacts(run_dir)
    if not artifacts:
        return
    log.warning("--overwrite: removing the earlier run's %s from %s", _describe(artifacts), run_dir)
    for path in artifacts:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@dataclass(frozen=True)
class KnnSets:
    """The labelled sets of the end-of-training k-NN (eval.knn_train_shards / eval.knn_val_shards), listed before
    the first step so that a wrong path stops the run before training rather than after it."""

    train: list[ImageItem]
    val: list[ImageItem]


def list_knn_sets(cfg: TrainConfig) -> KnnSets | None:
    """None when the recipe names no k-NN sets (both keys are needed)."""
    ev = cfg.eval
    if not (ev.knn_train_shards and ev.knn_val_shards):
        return None
    hint = " (a relative path is looked up in the working directory, then beside the recipe file)"
    sets = []
    for key, source in (("eval.knn_train_shards", ev.knn_train_shards), ("eval.knn_val_shards", ev.knn_val_shards)):
        with blame(key):
            try:
                items, _ = list_labelled(source)
            except DinoScaleError as error:
                if not Path(source).is_absolute():
                    error.args = (f"{error}{hint}",)
                raise
        sets.append(items)
    return KnnSets(*sets)
