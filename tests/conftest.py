"""Shared fixtures. Tests mirror the package: tests/unit/<room>/ for each room of dino_scale, tests/integration/
for what crosses rooms or processes (multi-process training, the command line, the demo, benchmark scripts).
Helpers that are not fixtures live in support.py. `pytest -m "not slow"` is the fast loop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support import brief_run

INTEGRATION = Path(__file__).parent / "integration"
FAULTS = Path(__file__).parent / "faults"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration trains, exports or launches processes: slow by definition. Everything
    under tests/faults is the fault-injection suite (`pytest -m faults`); its tests that train are marked slow."""
    for item in items:
        parents = Path(item.fspath).parents
        if INTEGRATION in parents:
            item.add_marker(pytest.mark.slow)
        if FAULTS in parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: fanning each op out over threads only adds synchronisation, which turns into seconds per test
    when the two cores are shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny-test recipe briefly trained on the sample shards (shared by the export, retrieval, attention tests)."""
    return brief_run(tmp_path_factory.mktemp("vit"), "tiny-test.json")
