"""`dino-scale export`: load a backbone, write the artifact under a temporary name, gate it on parity with the
PyTorch model (dino_scale.export.parity), and only then move it into place beside its sidecar. A failed gate leaves
nothing behind.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dino_scale import run_dir as layout
from dino_scale.devices import resolve_device
from dino_scale.errors import InputError, ParityError, blame
from dino_scale.export.graph import INPUT_NAME, PRECISIONS, InferenceModel, input_shape, output_shapes, parse_outputs
from dino_scale.export.parity import (
    MAX_RELATIVE_ERROR_FP32,
    MIN_COSINE_REDUCED,
    PARITY_IMAGES,
    ParityReport,
    check_parity,
    parity_inputs,
    real_images,
)
from dino_scale.export.runtimes import AotiRunner, OnnxRuntimeRunner, Runner, onnxruntime_providers
from dino_scale.export.sidecar import sidecar, sidecar_path
from dino_scale.export.tensorrt import TensorRTRunner, build_engine, has_precision_flags, import_tensorrt
from dino_scale.export.writers import export_aoti, export_onnx, onnx_opset
from dino_scale.io import atomic_write_json
from dino_scale.models.weights import BackboneSource, build_backbone, choose_image_size, load_source

FORMATS = {"onnx": ".onnx", "tensorrt": ".engine", "aoti": ".pt2"}
DEFAULT_PARITY_SHARDS = Path("shards/sample/val")


@dataclass
class ExportOptions:
    """Everything `dino-scale export` accepts; see its --help for each field."""

    format: str = "onnx"
    checkpoint: str | None = None
    out: str | None = None
    which: str = "teacher"
    arch: str | None = None
    timm_kwargs: dict[str, Any] | None = None
    image_size: int | None = None  # None: the size the model was trained at (models.weights.choose_image_size)
    outputs: str = "cls"
    uint8_input: bool = False
    precision: str = "fp32"
    opset: int | None = None
    min_batch: int = 1
    opt_batch: int | None = None  # TensorRT's tuning batch; None: min(64, max_batch)
    max_batch: int = 256
    timing_cache: str | None = None
    device: str = "auto"
    parity_shards: str | None = None
    parity_batches: tuple[int, ...] = (1, 7)
    max_relative_error: float = MAX_RELATIVE_ERROR_FP32
    min_cosine: float = MIN_COSINE_REDUCED
    runs_root: str = "runs"
    export_dir: str = "export"
    command: str | None = None


@dataclass
class ExportResult:
    artifact: Path
    sidecar: Path
    parity: ParityReport
    metadata: dict[str, Any]


def _validate(options: ExportOptions) -> None:
    """The option checks of the export command (ExportOptions mirrors its flags, so they are named as flags)."""
    if options.format not in FORMATS:
        raise InputError(f"--format {options.format!r}: choose from {', '.join(FORMATS)}")
    if options.precision not in PRECISIONS:
        raise InputError(f"--precision {options.precision!r}: choose from {', '.join(PRECISIONS)}")
    if options.format == "onnx" and options.precision == "bf16":
        raise InputError(
            "--bf16 with --format onnx: ONNX Runtime has no bf16 kernels for most of a ViT; use --fp16, or bf16 "
            "through --format tensorrt / aoti"
        )
    if options.opt_batch is None:
        options.opt_batch = max(options.min_batch, min(64, options.max_batch))
    if not 1 <= options.min_batch <= options.opt_batch <= options.max_batch:
        raise InputError(
            f"batch profile must satisfy 1 <= --min-batch ({options.min_batch}) <= --opt-batch "
            f"({options.opt_batch}) <= --max-batch ({options.max_batch})"
        )
    if options.which not in ("teacher", "student"):
        raise InputError(f"--which {options.which!r}: choose teacher or student")


def artifact_path(options: ExportOptions, source: BackboneSource) -> Path:
    suffix = FORMATS[options.format]
    if options.out is None:
        return Path(options.export_dir) / f"{default_artifact_stem(source)}{suffix}"
    out = Path(options.out)
    if out.suffix != suffix:
        raise InputError(f"--out {out}: a {options.format} artifact must end in {suffix}")
    if out.stem.startswith("."):
        raise InputError(f"--out {out}: names starting with '.' are reserved for temporary files")
    return out


def default_artifact_stem(source: BackboneSource) -> str:
    """export/<run name>.<ext> for our runs, else the source file's stem."""
    return source.run_name or source.path.stem


def run_export(options: ExportOptions, echo: Callable[[str], None] = print) -> ExportResult:
    """Load, export, gate and publish one artifact plus its sidecar. Raises InputError / ParityError / Unavailable."""
    _validate(options)
    with blame("checkpoint"):
        checkpoint = options.checkpoint
        if checkpoint is None:
            checkpoint = str(layout.find_latest_run(options.runs_root))
            echo(f"no --checkpoint given: using the most recent run, {checkpoint}")
        source = load_source(checkpoint, options.which)
    size = choose_image_size(source, options.image_size, options.arch, options.timm_kwargs)
    options.image_size = size.value  # what the artifact is built for, and what its sidecar records
    echo(size.describe())
    backbone, arch, timm_kwargs = build_backbone(source, options.image_size, options.arch, options.timm_kwargs)
    outputs = parse_outputs(options.outputs, backbone)
    device = resolve_device(options.device)
    if options.format == "tensorrt":
        import_tensorrt()  # raises Unavailable naming what is missing, before anything is written
    real = _parity_images(options, echo)
    out = artifact_path(options, source)
    out.parent.mkdir(parents=True, exist_ok=True)

    reference = InferenceModel(copy.deepcopy(backbone), outputs, options.uint8_input)
    exported = InferenceModel(backbone, outputs, options.uint8_input, compute_dtype=PRECISIONS[options.precision])
    staging = out.with_name(f".{out.stem}.partial{out.suffix}")
    staging_onnx = out.with_name(f".{out.stem}.partial.onnx")
    start = time.monotonic()
    try:
        details, runners = _write_artifact(options, exported, staging, staging_onnx, device)
        echo(f"wrote {options.format} artifact in {time.monotonic() - start:.1f} s; checking parity")
        batches = [min(max(b, options.min_batch), options.max_batch) for b in options.parity_batches]
        inputs = parity_inputs(reference, options.image_size, batches, real)
        report = check_parity(
            runners, reference, inputs, options.precision, options.max_relative_error, options.min_cosine
        )
        echo(report.table())
        if not report.passed:
            raise ParityError(f"{out.name} failed the parity gate and was not written.\n{report.table()}")
        metadata = sidecar(options, source, exported, arch, timm_kwargs, out, staging, details, report)
        staging.replace(out)
        atomic_write_json(sidecar_path(out), metadata)
    finally:
        staging.unlink(missing_ok=True)
        staging_onnx.unlink(missing_ok=True)
    echo(f"exported {out} (+ {sidecar_path(out).name})")
    return ExportResult(out, sidecar_path(out), report, metadata)


def _parity_images(options: ExportOptions, echo: Callable[[str], None]) -> tuple[str, torch.Tensor] | None:
    """The parity gate's real images (labelled for its table), read before anything is written: from
    ``--parity-shards`` (shards or an image folder), which must hold readable images, else from the checkout's
    sample shards when the working directory has them. Never skipped silently: without them a line says so and how
    to run the check."""
    count = min(PARITY_IMAGES, options.max_batch)
    size = int(options.image_size or 0)
    if options.parity_shards is not None:
        with blame("parity_shards"):
            images = real_images(options.parity_shards, size, count, options.uint8_input)
            if images is None:
                raise InputError(f"{options.parity_shards} holds no readable image for the parity gate")
        return f"images {Path(options.parity_shards).name}", images
    images = real_images(DEFAULT_PARITY_SHARDS, size, count, options.uint8_input, missing_ok=True)
    if images is None:
        echo(
            f"parity gate: real-image check skipped ({DEFAULT_PARITY_SHARDS} is not under {Path.cwd()} or holds no "
            "readable image); run it with --parity-shards DIR (shards or a folder of images); random inputs still "
            "gate the export"
        )
        return None
    return f"images {DEFAULT_PARITY_SHARDS.name}", images


def _write_artifact(
    options: ExportOptions, model: InferenceModel, staging: Path, staging_onnx: Path, device: torch.device
) -> tuple[dict[str, Any], list[Runner]]:
    """Write the artifact under its staging name; return format details and the runners that gate it."""
    shapes = output_shapes(model, options.image_size)
    if options.format == "onnx":
        exporter = export_onnx(model, staging, options.image_size, options.opset)
        providers = [p for p in onnxruntime_providers() if p != "TensorrtExecutionProvider"]
        runners: list[Runner] = [
            OnnxRuntimeRunner(staging, p, shapes, strict_fp32=options.precision == "fp32") for p in providers
        ]
        return {"exporter": exporter, "opset": onnx_opset(staging), "gated_providers": providers}, runners
    if options.format == "aoti":
        export_aoti(model, staging, options.image_size, device, options.max_batch)
        details = {"device": device.type, "dynamic_batch": {"min": 1, "max": options.max_batch}}
        return details, [AotiRunner(staging, device)]
    # TensorRT 10 lowers an fp32 ONNX with its FP16/BF16 builder flags; TensorRT 11 dropped those flags, so there
    # the ONNX is exported at the compute precision and built strongly typed.
    strongly_typed = not has_precision_flags(import_tensorrt(), options.precision)
    onnx_model = (
        model
        if strongly_typed
        else InferenceModel(copy.deepcopy(model.backbone).float(), model.outputs, model.uint8_input)
    )
    exporter = export_onnx(onnx_model, staging_onnx, options.image_size, options.opset)
    build = build_engine(
        staging_onnx,
        staging,
        input_name=INPUT_NAME,
        input_shape=tuple(input_shape(model, options.image_size)[1:]),
        min_batch=options.min_batch,
        opt_batch=options.opt_batch,
        max_batch=options.max_batch,
        precision=options.precision,
        timing_cache=Path(options.timing_cache) if options.timing_cache else None,
        strongly_typed=strongly_typed,
    )
    return {"exporter": exporter, **build}, [TensorRTRunner(staging, model.outputs)]
