"""Writers, one per artifact format: ONNX (dynamo exporter, TorchScript fallback) and AOTInductor packages.
TensorRT engines are built from the ONNX by dino_scale.export.tensorrt."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from dino_scale.export.graph import INPUT_NAME, InferenceModel, example_input

log = logging.getLogger(__name__)


def export_onnx(model: InferenceModel, path: Path, image_size: int, opset: int | None = None) -> str:
    """Write ``model`` as ONNX (dynamic batch axis) and check it with onnx.checker. Returns the exporter used.

    The dynamo exporter (torch.export + onnxscript) is used first. Models it cannot trace fall back to the
    TorchScript exporter, because users must not be blocked by a tracing gap in one timm architecture; the
    reason is logged, and the exporter used is recorded in the sidecar.
    """
    import onnx

    example = example_input(model.uint8_input, image_size, batch=2).to(next(model.parameters()).device)
    names = {"input_names": [INPUT_NAME], "output_names": list(model.outputs)}
    try:
        with warnings.catch_warnings(), _quiet_onnx_logs():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                opset_version=opset,
                external_data=False,
                verbose=False,
                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1)}},
                **names,
            )
        exporter = "dynamo"
    except Exception as error:  # noqa: BLE001 - any tracing failure: try the other exporter, then report both
        log.warning(
            "dynamo ONNX export failed (%s: %s); falling back to the TorchScript exporter",
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
        )
        path.unlink(missing_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset or 17,
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in model.outputs}},
                **names,
            )
        exporter = "torchscript"
    onnx.checker.check_model(str(path), full_check=True)
    return exporter


@contextlib.contextmanager
def _quiet_onnx_logs() -> Iterator[None]:
    """torch.onnx and its graph optimiser log every pass at INFO; keep the user's terminal readable."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_aoti(model: InferenceModel, path: Path, image_size: int, device: torch.device, max_batch: int) -> None:
    """torch.export with a dynamic batch axis, compiled by AOTInductor into a ``.pt2`` package for ``device``."""
    model = model.to(device)
    example = example_input(model.uint8_input, image_size, batch=2).to(device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.inference_mode(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes={INPUT_NAME: {0: batch}})
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def onnx_opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
