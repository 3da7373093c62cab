"""ONNX Runtime sessions on the CPU run the process's intra-op thread count (what --threads chose), not one thread per
core on top of the DataLoader workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from dino_scale.export.runtimes import OnnxRuntimeRunner


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def identity_onnx(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["cls"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("cls", TensorProto.FLOAT, ["batch", 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("count", [1, 2])
def test_cpu_sessions_take_the_torch_thread_count(tmp_path: Path, threads: None, count: int) -> None:
    torch.set_num_threads(count)
    runner = OnnxRuntimeRunner(identity_onnx(tmp_path / "m.onnx"))
    assert runner.session.get_session_options().intra_op_num_threads == count
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert torch.equal(runner(x)[0], x)
