"""The README's shell commands, run: every command of a ```bash block that a CPU runs in seconds is executed, in
order, in a scratch folder that holds what the README assumes (the sample shards, a `photos/` folder, a `query.jpg`);
the rest is on SKIP, each entry with its reason, and an entry that no longer matches a command fails the test.

The commands run in this process through the click commands (`dino-scale ...` and `python -m dino_scale.train ...`
are the same entry points), which saves a Python start per command; the shell's quoting and comments are read with
shlex. A README line that is neither and is not skipped fails: add a runner or a SKIP entry with its reason.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import REPO, photo

pytestmark = pytest.mark.slow

SKIP = {
    "bash scripts/demo.sh": "the demo itself: minutes (the README's first command, run by hand and recorded)",
    "bash scripts/test.sh": "the test command: this suite",
    "/data/": "needs the user's own data set",
    "deepspeed ": "a multi-GPU launcher",
    "torchrun ": "a multi-process launcher",
    "--config vits16.json": "a ViT-S/16 at 224 px: hours on a CPU",
    "--config vitb8.json": "a ViT-B/8 at 224 px: days on a CPU",
    "--format tensorrt": "needs TensorRT and a CUDA GPU",
    "--format aoti": "AOTInductor compiles for minutes",
    "export/vits16.onnx": "a ViT-S/16 artifact (bench of every runtime, torch.compile included)",
    "dino_deitsmall16_pretrain.pth": "the official checkpoint is a download",
}
"""Substring of a command -> why the suite does not run it. Batch scripts (a block opening with `#!`) are not run."""


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined, comment-only and empty lines left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        if block.startswith("#!"):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


COMMANDS = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
RUN = [c for c in COMMANDS if not any(key in c for key in SKIP)]


def test_the_readme_has_commands_to_run_and_every_skip_entry_is_used() -> None:
    assert len(RUN) >= 12, RUN
    unused = [key for key in SKIP if not any(key in c for c in COMMANDS)]
    assert not unused, f"SKIP entries that match no README command any more: {unused}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new user's folder: the sample shards beside their own photos (two classes) and a query picture."""
    root = tmp_path_factory.mktemp("readme")
    (root / "shards").mkdir()
    (root / "shards" / "sample").symlink_to(REPO / "shards" / "sample")
    for index in range(12):
        folder = root / "photos" / ("cats" if index % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        photo(96, 80, seed=index).save(folder / f"{index}.jpg")
    photo(96, 80, seed=3).crop((4, 4, 92, 76)).save(root / "query.jpg")
    return root


def run_command(command: str) -> None:
    from dino_scale.cli import main
    from dino_scale.train.command import train_command

    args = shlex.split(command, comments=True)
    if args[:1] == ["dino-scale"]:
        entry, args = main, args[1:]
    elif args[:3] == ["python", "-m", "dino_scale.train"]:
        entry, args = train_command, args[3:]
    else:
        pytest.fail(f"no runner for this README command; run it here or add it to SKIP with a reason: {command}")
    result = CliRunner().invoke(entry, args, catch_exceptions=False)
    assert result.exit_code == 0, f"{command}\n{result.output[-4000:]}"


@pytest.mark.parametrize("command", RUN, ids=[f"{i:02d}-{c[:60]}" for i, c in enumerate(RUN)])
def test_readme_command_runs(command: str, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(scratch)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_command(command)
