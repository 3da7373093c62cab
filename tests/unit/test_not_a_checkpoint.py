"""A file that is something else than a checkpoint (an exported model, an image, ...) is refused in one line saying
what it is -- not as "pickled Python objects", which is what torch's unpickler makes of any file it cannot read."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from support import ARCH, TINY, photo

from dino_scale.errors import CheckpointError
from dino_scale.io import atomic_torch_save, load_checkpoint, not_a_checkpoint, save_safetensors
from dino_scale.models.backbones import create_backbone
from dino_scale.models.weights import load_source


def onnx_file(path: Path) -> Path:
    """A one-node ONNX model as torch's exporter lays it out (ir_version, producer, graph, opset)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph, producer_name="pytorch"), path)
    return path


def image_file(path: Path, fmt: str) -> Path:
    photo(32, 24).save(path, format=fmt)
    return path


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("model.bin", onnx_file, "is an ONNX model, not a checkpoint: pass it to index/search/eval/bench as --model"),
        ("x.jpg", lambda p: image_file(p, "JPEG"), "is an image (JPEG), not a checkpoint"),
        ("x.png", lambda p: image_file(p, "PNG"), "is an image (PNG), not a checkpoint"),
        ("x.webp", lambda p: image_file(p, "WEBP"), "is an image (WebP), not a checkpoint"),
        ("m.onnx.json", lambda p: p.write_text(json.dumps({"format": "onnx"})), "is a JSON file, not a checkpoint"),
        ("notes.txt", lambda p: p.write_text("hello"), "is not a checkpoint: neither a zip archive written by torch"),
        ("empty.pt", lambda p: p.write_bytes(b""), "is empty, not a checkpoint"),
        ("m.engine", lambda p: p.write_bytes(b"ftrt\x00\x01" * 50), "is a TensorRT engine, not a checkpoint"),
    ],
)
def test_what_the_file_is_is_named(tmp_path: Path, name: str, make, expected: str) -> None:
    path = tmp_path / name
    make(path)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert message.startswith(f"{path} {expected}"), message
    assert "pickled" not in message and "\n" not in message
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_source(path)


def test_zip_archives_that_torch_did_not_write(tmp_path: Path) -> None:
    package = tmp_path / "model.pt2"
    with zipfile.ZipFile(package, "w") as archive:
        archive.writestr("model/data/aotinductor/model/model.so", b"\x7fELF")
    assert not_a_checkpoint(package) == (
        f"{package} is an AOTInductor package, not a checkpoint: pass it to index/search/eval/bench as --model"
    )
    other = tmp_path / "images.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("a.jpg", b"\xff\xd8\xff")
    assert not_a_checkpoint(other) == f"{other} is a zip archive that torch.save did not write, not a checkpoint"


def test_a_safetensors_backbone_where_a_training_checkpoint_is_read(tmp_path: Path) -> None:
    path = tmp_path / "teacher.pt"  # the suffix lies; the content decides
    save_safetensors(create_backbone(ARCH, **TINY).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"is a safetensors file \(backbone weights only\), not a checkpoint"):
        load_checkpoint(path)


def test_torch_files_are_left_to_torch(tmp_path: Path) -> None:
    """Real checkpoints, and damaged or refused torch files, are not "something else": their own errors stand."""
    good = tmp_path / "good.pt"
    atomic_torch_save({"w": torch.ones(2)}, good)
    assert not_a_checkpoint(good) is None and torch.equal(load_checkpoint(good)["w"], torch.ones(2))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    assert not_a_checkpoint(truncated) is None
    legacy = tmp_path / "legacy.pt"
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer, _use_new_zipfile_serialization=False)
    legacy.write_bytes(buffer.getvalue())
    assert not_a_checkpoint(legacy) is None and torch.equal(load_checkpoint(legacy)["w"], torch.ones(2))
