"""The package's exceptions: one root, a few kinds. Every message names the file, key or value at fault.

    DinoScaleError                  the root: `except DinoScaleError` catches everything dino-scale raises on purpose
    ├── InputError (ValueError)     bad input: a value, a key, a file's content; a recipe (ConfigError)
    │   ├── ConfigError             a recipe or `--set` override that cannot be used
    │   └── NotFound (FileNotFoundError)   a file, folder or shard that is not there
    ├── CheckpointError             a checkpoint that exists but cannot be read safely
    ├── Unavailable                 a backend, runtime, package or device that this machine lacks
    ├── NonFiniteError              training produced NaN / inf
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


class Unavailable(DinoScaleError, RuntimeError):
    """What was asked for cannot run here (a backend, runtime, package or device is missing); the message says
    which, and what to do instead."""


class NonFiniteError(DinoScaleError, RuntimeError):
    """Training produced NaN / inf; the message names the step and the quantity. No checkpoint is written after it."""


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
