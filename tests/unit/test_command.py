"""The command line's one error path (dino_scale.command) and its start-up cost."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from dino_scale.command import Command, describe
from dino_scale.errors import InputError, NotFound, blame


@click.command(cls=Command)
@click.option("--test-set", "test_set")
@click.option("--min-batch", "min_batch", type=int)
@click.option("-k", "k", type=int)
def tool(test_set: str | None, min_batch: int | None, k: int | None) -> None:
    if test_set is not None:
        with blame("test_set"):
            raise NotFound(f"{test_set} does not exist")
    if min_batch is not None:
        raise InputError(f"min_batch {min_batch} is larger than max_batch 4", argument="min_batch")
    if k is not None:
        raise InputError("k must be >= 1", argument="k")
    raise RuntimeError("a bug, not bad input")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--test-set", "nowhere"], "Error: --test-set: nowhere does not exist"),
        (["--min-batch", "8"], "Error: --min-batch 8 is larger than max_batch 4"),
        (["-k", "0"], "Error: -k must be >= 1"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(args: list[str], line: str) -> None:
    result = CliRunner().invoke(tool, args)
    assert result.exit_code == 1
    assert result.output.strip() == line


def test_a_bug_keeps_its_traceback() -> None:
    result = CliRunner().invoke(tool, [])
    assert isinstance(result.exception, RuntimeError) and result.exit_code == 1
    assert "Error:" not in result.output


def test_a_blamed_name_that_is_no_parameter_is_put_in_front() -> None:
    error = InputError("shard 'x.tar' does not exist", argument="data.train_shards")
    assert describe(error, tool.params) == "data.train_shards: shard 'x.tar' does not exist"
    assert describe(InputError("plain"), tool.params) == "plain"


def test_blame_keeps_the_innermost_argument() -> None:
    with pytest.raises(InputError) as info, blame("outer"), blame("inner"):
        raise InputError("x")
    assert info.value.argument == "inner"


def test_the_command_line_starts_without_torch() -> None:
    """`dino-scale --help` must not pay for torch: every command imports what it runs when it runs."""
    code = "import sys, dino_scale.cli; print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
