"""TensorRT engine building and running.

The CPU tests always run: option validation, the error when TensorRT is missing, and build_engine's logic
(flags, profile, timing cache, TensorRT 10 vs 11 typing) against a stand-in ``tensorrt`` module that records
what it is asked. The GPU tests build and run real engines and are skipped without tensorrt and a CUDA GPU.
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dino_scale.errors import Unavailable
from dino_scale.export.tensorrt import TensorRTRunner, build_engine, import_tensorrt

IMAGE_SHAPE = (3, 16, 16)
BUILD_ARGS: dict[str, Any] = {"input_name": "images", "input_shape": IMAGE_SHAPE}


class TinyNet(nn.Module):
    """A conv feature extractor computing in ``dtype`` with float32 input and output, like our exports."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(self.dtype)).float()


def export_onnx(model: nn.Module, path: Path) -> Path:
    """Export ``model`` as our exporter does: dynamo, input "images" with a dynamic batch, output "cls"."""
    torch.onnx.export(
        model.eval(),
        (torch.randn(2, *IMAGE_SHAPE),),
        str(path),
        dynamo=True,
        input_names=["images"],
        output_names=["cls"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=64)}},
        external_data=False,
    )
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One set of weights, exported to ONNX twice: computing in fp32 and in fp16."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    half = copy.deepcopy(model)
    half.dtype = torch.float16
    half.net.half()
    folder = tmp_path_factory.mktemp("onnx")
    return {
        "model": model,
        "fp32": export_onnx(model, folder / "tiny_fp32.onnx"),
        "fp16": export_onnx(half, folder / "tiny_fp16.onnx"),
    }


# ----------------------------------------------------------------------------------------------------------
# CPU: validation and the missing-package error
# ----------------------------------------------------------------------------------------------------------


def test_import_tensorrt_without_the_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(Unavailable) as info:
        import_tensorrt()
    assert "tensorrt" in str(info.value)
    assert "pip install" in str(info.value)


def test_import_tensorrt_needs_a_gpu_and_version_10(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.9.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Unavailable, match="NVIDIA GPU"):
        import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(Unavailable, match="too old"):
        import_tensorrt()


def test_build_engine_checks_batch_flags_before_anything_else(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # TensorRT is not even importable, the file not there
    with pytest.raises(ValueError, match="--min-batch") as info:
        build_engine(
            tmp_path / "missing.onnx",
            tmp_path / "x.engine",
            **BUILD_ARGS,
            min_batch=8,
            opt_batch=8,
            max_batch=4,
            precision="fp32",
        )
    assert "--max-batch" in str(info.value)


@pytest.mark.parametrize(
    ("batches", "flag"),
    [((0, 1, 1), "--min-batch"), ((1, 9, 8), "--opt-batch"), ((2, 1, 8), "--opt-batch"), ((1, 1, 0), "--max-batch")],
)
def test_build_engine_rejects_bad_batch_ranges(tmp_path: Path, batches: tuple[int, int, int], flag: str) -> None:
    low, opt, high = batches
    with pytest.raises(ValueError, match=flag):
        build_engine(
            tmp_path / "m.onnx",
            tmp_path / "m.engine",
            **BUILD_ARGS,
            min_batch=low,
            opt_batch=opt,
            max_batch=high,
            precision="fp32",
        )


def test_build_engine_rejects_an_unknown_precision(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int8"):
        build_engine(
            tmp_path / "m.onnx",
            tmp_path / "m.engine",
            **BUILD_ARGS,
            min_batch=1,
            opt_batch=1,
            max_batch=1,
            precision="int8",
        )


def test_build_engine_names_a_missing_onnx_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        build_engine(
            tmp_path / "missing.onnx",
            tmp_path / "m.engine",
            **BUILD_ARGS,
            min_batch=1,
            opt_batch=1,
            max_batch=1,
            precision="fp32",
        )


# ----------------------------------------------------------------------------------------------------------
# CPU: build_engine's logic against a stand-in tensorrt module
# ----------------------------------------------------------------------------------------------------------


def fake_tensorrt(version: str = "10.9.0", *, parse_ok: bool = True, build_ok: bool = True) -> types.ModuleType:
    """A stand-in for the builder half of the tensorrt API; ``trt.calls`` records what build_engine asked for.

    From version 11 on it has no FP16 / BF16 builder flags, as the real TensorRT 11.
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls: dict[str, Any] = {"flags": []}
    trt.calls = calls
    weak = int(version.split(".")[0]) < 11
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", **({"FP16": "FP16", "BF16": "BF16"} if weak else {}))
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class Logger:
        WARNING, VERBOSE = "W", "V"

        def __init__(self, severity: str) -> None:
            self.min_severity = severity

    class Network:
        def __init__(self, flags: int) -> None:
            calls["network_flags"] = flags
            self.inputs: list[Any] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, index: int) -> Any:
            return self.inputs[index]

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network
            self.num_errors = 0 if parse_ok else 2

        def parse_from_file(self, path: str) -> bool:
            calls["parsed"] = path
            self.network.inputs = [types.SimpleNamespace(name="images", shape=(-1, *IMAGE_SHAPE))]
            return parse_ok

        def get_error(self, index: int) -> str:
            return f"node {index}: unsupported operator"

    class TimingCache:
        def __init__(self, blob: bytes) -> None:
            self.blob = blob

        def serialize(self) -> bytes:
            return self.blob + b"+timings"

    class Profile:
        def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
            calls["profile"] = (name, low, opt, high)

    class Config:
        def set_flag(self, flag: str) -> None:
            calls["flags"].append(flag)

        def clear_flag(self, flag: str) -> None:
            calls.setdefault("cleared", []).append(flag)

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            calls["pool"] = (pool, size)

        def add_optimization_profile(self, profile: Profile) -> int:
            return 0

        def create_timing_cache(self, blob: bytes) -> TimingCache:
            calls.setdefault("cache_loaded", []).append(bytes(blob))
            return TimingCache(bytes(blob))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            calls["cache_ignore_mismatch"] = ignore_mismatch
            return True

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            return b"serialized engine" if build_ok else None

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


def use_fake(monkeypatch: pytest.MonkeyPatch, trt: types.ModuleType) -> types.ModuleType:
    """Make ``import tensorrt`` return ``trt`` and pretend a GPU is there, for this test only."""
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return trt


def test_build_engine_tensorrt10_fp16_is_weakly_typed_with_profile_workspace_and_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_models: dict[str, Any]
) -> None:
    trt = use_fake(monkeypatch, fake_tensorrt("10.9.0"))
    cache = tmp_path / "cache" / "timing.cache"
    result = build_engine(
        tiny_models["fp32"],
        tmp_path / "out" / "m.engine",
        **BUILD_ARGS,
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        precision="fp16",
        timing_cache=cache,
        workspace_gib=1.5,
    )
    assert result["strongly_typed"] is False and result["precision"] == "fp16" and result["tensorrt"] == "10.9.0"
    assert result["profile"] == {"min": 1, "opt": 4, "max": 8}
    assert trt.calls["network_flags"] == 0 and trt.calls["flags"] == ["FP16"]
    assert trt.calls["profile"] == ("images", (1, *IMAGE_SHAPE), (4, *IMAGE_SHAPE), (8, *IMAGE_SHAPE))
    assert trt.calls["pool"] == ("WORKSPACE", int(1.5 * (1 << 30)))
    assert (tmp_path / "out" / "m.engine").read_bytes() == b"serialized engine"
    # The timing cache starts empty, is written back, and is what the next build loads.
    assert trt.calls["cache_loaded"] == [b""] and trt.calls["cache_ignore_mismatch"] is False
    assert cache.read_bytes() == b"+timings"
    build_engine(
        tiny_models["fp32"],
        tmp_path / "out" / "m.engine",
        **BUILD_ARGS,
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        precision="fp32",
        timing_cache=cache,
    )
    assert trt.calls["cache_loaded"][-1] == b"+timings" and cache.read_bytes() == b"+timings+timings"
    assert trt.calls["cleared"] == ["TF32"]  # fp32 means fp32: TF32 would miss the 1e-4 parity bound
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temp files left behind


def test_build_engine_strongly_typed_on_request_in_tensorrt10(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_models: dict[str, Any]
) -> None:
    trt = use_fake(monkeypatch, fake_tensorrt("10.9.0"))
    result = build_engine(
        tiny_models["fp16"],
        tmp_path / "m.engine",
        **BUILD_ARGS,
        min_batch=1,
        opt_batch=1,
        max_batch=2,
        precision="fp16",
        strongly_typed=True,
    )
    assert result["strongly_typed"] is True
    assert trt.calls["network_flags"] == 1 << 1 and trt.calls["flags"] == []  # no precision flag on strong typing


def test_build_engine_tensorrt11_is_strongly_typed_and_needs_an_onnx_at_that_precision(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_models: dict[str, Any]
) -> None:
    trt = use_fake(monkeypatch, fake_tensorrt("11.4.0"))
    args = {**BUILD_ARGS, "min_batch": 1, "opt_batch": 1, "max_batch": 2}
    with pytest.raises(ValueError, match="Export the ONNX with --precision fp16") as info:
        build_engine(tiny_models["fp32"], tmp_path / "m.engine", **args, precision="fp16")
    assert "strongly typed" in str(info.value) and "parsed" not in trt.calls  # refused before any TensorRT work
    with pytest.raises(ValueError, match="would not be fp32"):
        build_engine(tiny_models["fp16"], tmp_path / "m.engine", **args, precision="fp32")
    result = build_engine(tiny_models["fp16"], tmp_path / "m.engine", **args, precision="fp16")
    assert result["strongly_typed"] is True
    assert trt.calls["network_flags"] == 0 and trt.calls["flags"] == []  # TensorRT 11: no flag needed or allowed
    assert build_engine(tiny_models["fp32"], tmp_path / "m.engine", **args, precision="fp32")["strongly_typed"]


def test_build_engine_reports_parser_errors_and_failed_builds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_models: dict[str, Any]
) -> None:
    args = {**BUILD_ARGS, "min_batch": 1, "opt_batch": 1, "max_batch": 2, "precision": "fp32"}
    use_fake(monkeypatch, fake_tensorrt(parse_ok=False))
    with pytest.raises(RuntimeError, match="could not parse") as info:
        build_engine(tiny_models["fp32"], tmp_path / "m.engine", **args)
    assert "node 0: unsupported operator" in str(info.value) and "node 1: unsupported operator" in str(info.value)
    use_fake(monkeypatch, fake_tensorrt(build_ok=False))
    with pytest.raises(RuntimeError, match="failed to build the engine for .*tiny_fp32.onnx"):
        build_engine(tiny_models["fp32"], tmp_path / "m.engine", **args)
    assert not (tmp_path / "m.engine").exists()
    with pytest.raises(ValueError, match="does not fit"):
        build_engine(tiny_models["fp32"], tmp_path / "m.engine", **{**args, "input_shape": (3, 32, 32)})
    with pytest.raises(ValueError, match="no input 'pixels'"):
        build_engine(tiny_models["fp32"], tmp_path / "m.engine", **{**args, "input_name": "pixels"})


# ----------------------------------------------------------------------------------------------------------
# GPU: real engines
# ----------------------------------------------------------------------------------------------------------


def _tensorrt_usable() -> bool:
    """Whether real TensorRT engines can be built and run here."""
    try:
        import_tensorrt()
    except Unavailable:
        return False
    return True


needs_tensorrt = pytest.mark.skipif(not _tensorrt_usable(), reason="needs the tensorrt package and a CUDA GPU")


def _cosine_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of ``a`` with the same row of ``b``, in float64."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


@needs_tensorrt
def test_fp32_engine_matches_torch_and_enforces_the_profile(tmp_path: Path, tiny_models: dict[str, Any]) -> None:
    cache = tmp_path / "timing.cache"
    engine = tmp_path / "tiny_fp32.engine"
    result = build_engine(
        tiny_models["fp32"],
        engine,
        **BUILD_ARGS,
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        precision="fp32",
        timing_cache=cache,
    )
    assert engine.stat().st_size > 0 and cache.stat().st_size > 0
    assert result["profile"] == {"min": 1, "opt": 4, "max": 8} and result["build_s"] >= 0
    runner = TensorRTRunner(engine, ["cls"])
    assert runner.name == "tensorrt" and runner.device.type == "cuda" and runner.input_name == "images"
    for batch in (1, 7):
        images = torch.randn(batch, *IMAGE_SHAPE)
        with torch.no_grad():
            reference = tiny_models["model"](images)
        (output,) = runner(images)
        torch.cuda.synchronize()
        assert output.shape == reference.shape and output.dtype == torch.float32
        error = (output.cpu() - reference).abs().max()
        assert error <= 1e-4 * reference.abs().max(), f"batch {batch}: max abs error {error}"
    with pytest.raises(ValueError, match=r"1\.\.8"):
        runner(torch.randn(9, *IMAGE_SHAPE))
    # A rebuild reads the cache written by the first build.
    build_engine(
        tiny_models["fp32"],
        tmp_path / "again.engine",
        **BUILD_ARGS,
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        precision="fp32",
        timing_cache=cache,
    )


@needs_tensorrt
@pytest.mark.parametrize("mode", ["weakly-typed", "strongly-typed"])
def test_fp16_engine_matches_torch(tmp_path: Path, tiny_models: dict[str, Any], mode: str) -> None:
    trt = import_tensorrt()
    strongly_typed = mode == "strongly-typed"
    if not strongly_typed and not hasattr(trt.BuilderFlag, "FP16"):
        pytest.skip(f"TensorRT {trt.__version__} has no weakly typed fp16 (removed in TensorRT 11)")
    # Weak typing lowers an fp32 ONNX itself; strong typing runs the fp16 ONNX as exported.
    onnx_path = tiny_models["fp16" if strongly_typed else "fp32"]
    engine = tmp_path / f"tiny_fp16_{mode}.engine"
    cache = tmp_path / "timing.cache"
    result = build_engine(
        onnx_path,
        engine,
        **BUILD_ARGS,
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        precision="fp16",
        timing_cache=cache,
        strongly_typed=strongly_typed,
    )
    assert cache.stat().st_size > 0
    assert result["strongly_typed"] is (strongly_typed or int(trt.__version__.split(".")[0]) >= 11)
    runner = TensorRTRunner(engine, ["cls"])
    for batch in (1, 7):
        images = torch.randn(batch, *IMAGE_SHAPE)
        with torch.no_grad():
            reference = tiny_models["model"](images)
        (output,) = runner(images)
        assert _cosine_per_row(output.cpu(), reference).min() >= 0.999
    with pytest.raises(ValueError, match=r"1\.\.8"):
        runner(torch.randn(9, *IMAGE_SHAPE))
