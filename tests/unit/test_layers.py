"""The house rules (pyproject's import-linter contract) hold, and the contract does catch a back-edge."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with the repository's contract, on the dino_scale package found under `root`."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": str(LINT_IMPORTS.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not LINT_IMPORTS.exists():
        pytest.skip("import-linter is not installed (pip install -e .[dev])")
    root = tmp_path_factory.mktemp("house")
    shutil.copytree(REPO / "dino_scale", root / "dino_scale", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_package_keeps_its_layers(package_copy: Path) -> None:
    result = lint_imports(package_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "back_edge", "importer", "imported"),
    [
        ("train/loop.py", "from dino_scale.export import graph", "train", "export"),  # independent siblings
        ("models/weights.py", "from dino_scale.train import checkpoint", "models", "train"),  # a room below train
        ("io.py", "from dino_scale.data import decode", "io", "data"),  # a shared module
    ],
)
def test_a_back_edge_breaks_the_contract(
    package_copy: Path, tmp_path: Path, module: str, back_edge: str, importer: str, imported: str
) -> None:
    root = tmp_path / "pkg"
    shutil.copytree(package_copy, root)
    target = root / "dino_scale" / module
    # Inside a function, as a lazy import would be: the contract sees those too.
    target.write_text(target.read_text() + f"\n\ndef _lazy_back_edge():\n    {back_edge}\n")
    result = lint_imports(root)
    assert result.returncode != 0, result.stdout
    assert "0 kept, 1 broken" in result.stdout, result.stdout
    assert f"dino_scale.{importer} is not allowed to import dino_scale.{imported}" in result.stdout, result.stdout
