"""The package's exceptions: one root, a few kinds. Every message names the file, key or value at fault.

    DinoScaleError                  the root: `except DinoScaleError` catches everything dino-scale raises on purpose
    ├── InputError (ValueError)     bad input: a value, a key, a file's content; a recipe (ConfigError)
    │   ├── ConfigError             a recipe or `--set` override that cannot be used
    │   └── NotFound (FileNotFoundError)   a file, folder or shard that is not there
    ├── CheckpointError             a checkpoint that exists but cannot be read safely
    │   └── IncompatibleCheckpoint  an intact checkpoint this configuration cannot continue from
    ├── Unavailable                 a backend, runtime, package or device that this machine lacks
    ├── WriteFailed (OSError)       a file could not be written (disk full, read-only, no permission)
    ├── NonFiniteError              training produced NaN / inf
    ├── CollapseError               the teacher collapsed (uniform or one dimension) and the monitor stopped the run
    ├── PeerLost                    another process of the job died in the middle of a collective
    └── ParityError                 an exported artifact disagrees with the PyTorch model

Library code phrases messages in terms of values and files; an error may also carry the name of the argument it
blames (`blame`), which the command line turns into its flag (`--test: ...`). The built-in bases (ValueError,
FileNotFoundError, RuntimeError) stay, so callers that catch those keep working.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class DinoScaleError(Exception):
    """Root of every exception dino-scale raises on purpose. `argument`: the parameter blamed, if known."""

    argument: str | None = None

    def __init__(self, message: str = "", argument: str | None = None) -> None:
        super().__init__(message)
        if argument is not None:
            self.argument = argument


class InputError(DinoScaleError, ValueError):
    """A value, key or file's content that cannot be used; the message names it."""


class ConfigError(InputError):
    """A recipe that cannot be used; the message names the file and the dotted key at fault."""


class NotFound(InputError, FileNotFoundError):
    """A file, folder, shard or run that does not exist; the message names the path or pattern."""


class CheckpointError(DinoScaleError, RuntimeError):
    """A checkpoint file exists but cannot be read safely (corrupt, truncated, disallowed objects, wrong layout)."""


class IncompatibleCheckpoint(CheckpointError):
    """A checkpoint of ours, intact, that this run's configuration cannot continue from (written by another number of
    processes with ZeRO-3, a sharded folder of another backend, ...). The older checkpoints of the run were written
    the same way, so resuming stops with this message instead of falling back to them."""


class Unavailable(DinoScaleError, RuntimeError):
    """What was asked for cannot run here (a backend, runtime, package or device is missing); the message says
    which, and what to do instead."""


class WriteFailed(DinoScaleError, OSError):
    """A file could not be written (no space left, quota, read-only file system, permission); the message names the
    path, the reason and, for a full disk, the free space and the space needed. Nothing half-written is left."""


class PeerLost(DinoScaleError, RuntimeError):
    """Another process of a multi-process job died (a collective lost its peer); the message names the last
    checkpoint to resume from."""


class CollapseError(DinoScaleError, RuntimeError):
    """The collapse monitor saw the teacher collapse (monitor.collapse = "stop"); the message holds the figures."""


class NonFiniteError(DinoScaleError, RuntimeError):
    """Training produced NaN / inf; the message names the step and the quantity. No checkpoint is written after it."""


PREEMPTED_EXIT_STATUS = 75
"""The exit status of a training process stopped by a signal after writing its checkpoint: EX_TEMPFAIL of
sysexits.h, "try again later", so that a job script can requeue exactly these (README, "Preemption and SLURM")."""


class Preempted(DinoScaleError):
    """Training stopped on SIGTERM / SIGINT / SIGUSR1 after finishing its optimizer step and writing a checkpoint on
    every rank; the message names the checkpoint. Commands exit with PREEMPTED_EXIT_STATUS."""

    exit_status = PREEMPTED_EXIT_STATUS


class ParityError(DinoScaleError, RuntimeError):
    """An exported artifact disagrees with the PyTorch model; the message holds the numbers."""


@contextlib.contextmanager
def blame(argument: str) -> Iterator[None]:
    """Attach `argument` (a parameter name) to a DinoScaleError raised inside, unless it already blames one.

    Library entry points wrap the work they do for one argument, e.g. ``with blame("test"): list_labelled(test)``,
    so that the command line can say which flag was at fault without the library speaking in flags.
    """
    try:
        yield
    except DinoScaleError as error:
        if error.argument is None:
            error.argument = argument
        raise
