"""The one error path of every command: a DinoScaleError becomes a one-line message and exit status 1 (a preempted
training run: errors.PREEMPTED_EXIT_STATUS).

Library code names the value or file at fault and, where it knows, the argument it blames (errors.blame); this
command class turns that argument into the command's flag (`--test: nowhere does not exist`). Anything else that
escapes a command is a bug, and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

import click

from dino_scale.errors import DinoScaleError


def describe(error: DinoScaleError, params: list[click.Parameter]) -> str:
    """The error's message in the command's terms: where it blames a parameter of the command, a message that opens
    with the parameter's name opens with its flag instead (`min_batch 8 ...` -> `--min-batch 8 ...`), and any other
    message gets the flag in front (`--test: ...`). A blamed name that is no parameter (a recipe key such as
    `data.train_shards`) is put in front as it is."""
    message = str(error)
    if error.argument is None:
        return message
    flag = error.argument
    for param in params:
        if param.name == error.argument and param.opts:
            flag = next((opt for opt in param.opts if opt.startswith("--")), param.opts[0])
            break
    if message.startswith(flag):
        return message
    if flag != error.argument and message.startswith(f"{error.argument} "):
        return flag + message[len(error.argument) :]
    return f"{flag}: {message}"


class Command(click.Command):
    """click.Command whose invocation reports DinoScaleError as a one-line error (see the module docstring)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DinoScaleError as error:
            failure = click.ClickException(describe(error, self.params))
            failure.exit_code = getattr(error, "exit_status", 1)  # a preempted run exits so that it can be requeued
            raise failure from None


class Group(click.Group):
    """A command group whose commands (and sub-groups) all use :class:`Command`."""

    command_class = Command
    group_class = type  # sub-groups are of this same class
