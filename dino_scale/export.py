"""Export a trained backbone to ONNX, TensorRT or AOTInductor, gated on parity with the PyTorch model.

Every artifact ``NAME.<ext>`` gets a sidecar ``NAME.<ext>.json`` (the contract is in export/README.md). The artifact is
written under a temporary name, run in its own runtime on random inputs and on real images, compared with the
fp32 PyTorch model, and only then moved into place; a failed gate leaves nothing behind.

Parity measures, per output and per row (image) ``a`` of the artifact against the reference ``r``:

* relative error ``‖a − r‖_∞ / ‖r‖_∞`` (fp32 artifacts: max over rows ≤ 1e-4),
* cosine similarity ``a·r / (‖a‖‖r‖)`` (fp16 / bf16 artifacts: min over rows ≥ 0.999).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_scale import checkpoint as ckpt
from dino_scale.augment import IMAGENET_MEAN, IMAGENET_STD
from dino_scale.inference import (
    INPUT_NAME,
    PRECISIONS,
    BackboneSource,
    ExportInputError,
    InferenceModel,
    build_backbone,
    default_artifact_stem,
    environment_versions,
    example_input,
    file_sha256,
    find_latest_run,
    input_shape,
    load_source,
    output_shapes,
    parse_outputs,
    patch_size_of,
)
from dino_scale.runtimes import AotiRunner, OnnxRuntimeRunner, Runner, RuntimeUnavailable, onnxruntime_providers

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "tensorrt": ".engine", "aoti": ".pt2"}
MAX_RELATIVE_ERROR_FP32 = 1e-4
MIN_COSINE_REDUCED = 0.999
DEFAULT_PARITY_SHARDS = Path("shards/sample/val")
SIDECAR_VERSION = 1


class ParityError(RuntimeError):
    """The exported artifact disagrees with the PyTorch model; the message holds the numbers."""


@dataclass
class ExportOptions:
    """Everything `dino-scale export` accepts; see its --help for each field."""

    format: str = "onnx"
    checkpoint: str | None = None
    out: str | None = None
    which: str = "teacher"
    arch: str | None = None
    timm_kwargs: dict[str, Any] | None = None
    image_size: int = 224
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
class ParityReport:
    """Per input set and output: the worst row's relative error and cosine similarity."""

    precision: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    max_relative_error: float = MAX_RELATIVE_ERROR_FP32
    min_cosine: float = MIN_COSINE_REDUCED

    @property
    def passed(self) -> bool:
        return all(row["passed"] for row in self.rows)

    def add(self, runtime: str, inputs: str, name: str, artifact: torch.Tensor, reference: torch.Tensor) -> None:
        a = artifact.detach().float().cpu().flatten(1)
        r = reference.detach().float().cpu().flatten(1)
        if a.shape != r.shape:
            raise ParityError(
                f"{runtime} output {name!r} has shape {tuple(artifact.shape)}, expected "
                f"{tuple(reference.shape)} ({inputs})"
            )
        finite = bool(torch.isfinite(a).all())
        relative = ((a - r).abs().amax(dim=1) / r.abs().amax(dim=1).clamp_min(1e-30)).max().item()
        cosine = torch.nn.functional.cosine_similarity(a.double(), r.double(), dim=1, eps=1e-30).min().item()
        if self.precision == "fp32":
            passed = finite and relative <= self.max_relative_error
        else:
            passed = finite and cosine >= self.min_cosine
        self.rows.append(
            {
                "runtime": runtime,
                "inputs": inputs,
                "output": name,
                "batch": int(a.shape[0]),
                "max_relative_error": relative,
                "min_cosine": cosine,
                "passed": passed,
            }
        )

    def table(self) -> str:
        rule = (
            f"max relative error <= {self.max_relative_error:g}"
            if self.precision == "fp32"
            else f"min cosine >= {self.min_cosine}"
        )
        lines = [f"parity ({self.precision}; pass if {rule}):"]
        for row in self.rows:
            lines.append(
                f"  {row['runtime']:<24} {row['inputs']:<22} {row['output']:<10} batch {row['batch']:<3} "
                f"rel err {row['max_relative_error']:.2e}  cos {row['min_cosine']:.6f}  "
                f"{'ok' if row['passed'] else 'FAIL'}"
            )
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "rule": "max_relative_error" if self.precision == "fp32" else "min_cosine",
            "threshold": self.max_relative_error if self.precision == "fp32" else self.min_cosine,
            "max_relative_error": max(row["max_relative_error"] for row in self.rows),
            "min_cosine": min(row["min_cosine"] for row in self.rows),
            "checks": self.rows,
        }


@dataclass
class ExportResult:
    artifact: Path
    sidecar: Path
    parity: ParityReport
    metadata: dict[str, Any]


# ----------------------------------------------------------------------------------------------------------
# Writers, one per format
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Parity gate
# ----------------------------------------------------------------------------------------------------------


def parity_inputs(
    model: InferenceModel, image_size: int, batches: Iterable[int], shards: str | Path | None, max_batch: int = 8
) -> list[tuple[str, torch.Tensor]]:
    """Random inputs at each batch size, plus up to 8 (at most ``max_batch``) real images from ``shards``."""
    inputs = [(f"random b{b}", example_input(model.uint8_input, image_size, batch=b, seed=b)) for b in batches]
    if shards is not None:
        images = real_images(shards, image_size, count=min(8, max_batch), as_uint8=model.uint8_input)
        if images is not None:
            inputs.append((f"images {Path(str(shards)).name}", images))
    return inputs


def real_images(shards: str | Path, image_size: int, count: int, as_uint8: bool) -> torch.Tensor | None:
    """The first ``count`` images of the shards, centre-cropped to ``image_size``: uint8 NHWC or normalised NCHW."""
    from dino_scale.augment import eval_crop, eval_transform
    from dino_scale.data import expand_shards, make_eval_loader

    try:
        urls = expand_shards(str(shards))
    except FileNotFoundError:
        return None
    transform = eval_crop(image_size) if as_uint8 else eval_transform(image_size, IMAGENET_MEAN, IMAGENET_STD)
    for images, _ in make_eval_loader(urls, transform, batch_size=count):
        return images.permute(0, 2, 3, 1).contiguous() if as_uint8 else images
    return None


def check_parity(
    runners: list[Runner],
    reference: InferenceModel,
    inputs: list[tuple[str, torch.Tensor]],
    precision: str,
    max_relative_error: float = MAX_RELATIVE_ERROR_FP32,
    min_cosine: float = MIN_COSINE_REDUCED,
) -> ParityReport:
    """Run every runner on every input and compare each output with the fp32 PyTorch reference on the CPU."""
    report = ParityReport(precision, max_relative_error=max_relative_error, min_cosine=min_cosine)
    reference = reference.cpu().eval()
    for label, images in inputs:
        with torch.inference_mode():
            expected = reference(images)
        for runner in runners:
            produced = runner(images)
            if runner.device.type == "cuda":
                torch.cuda.synchronize()
            if len(produced) != len(expected):
                raise ParityError(f"{runner.name} returned {len(produced)} outputs, expected {len(expected)}")
            for name, got, want in zip(reference.outputs, produced, expected, strict=True):
                report.add(runner.name, label, name, got, want)
    return report


# ----------------------------------------------------------------------------------------------------------
# The export command
# ----------------------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExportInputError(f"--device {device}: torch sees no CUDA GPU here")
    return torch.device(device)


def _validate(options: ExportOptions) -> None:
    if options.format not in FORMATS:
        raise ExportInputError(f"--format {options.format!r}: choose from {', '.join(FORMATS)}")
    if options.precision not in PRECISIONS:
        raise ExportInputError(f"--precision {options.precision!r}: choose from {', '.join(PRECISIONS)}")
    if options.format == "onnx" and options.precision == "bf16":
        raise ExportInputError(
            "--bf16 with --format onnx: ONNX Runtime has no bf16 kernels for most of a ViT; use --fp16, or bf16 "
            "through --format tensorrt / aoti"
        )
    if options.opt_batch is None:
        options.opt_batch = max(options.min_batch, min(64, options.max_batch))
    if not 1 <= options.min_batch <= options.opt_batch <= options.max_batch:
        raise ExportInputError(
            f"batch profile must satisfy 1 <= --min-batch ({options.min_batch}) <= --opt-batch "
            f"({options.opt_batch}) <= --max-batch ({options.max_batch})"
        )
    if options.which not in ("teacher", "student"):
        raise ExportInputError(f"--which {options.which!r}: choose teacher or student")


def artifact_path(options: ExportOptions, source: BackboneSource) -> Path:
    suffix = FORMATS[options.format]
    if options.out is None:
        return Path(options.export_dir) / f"{default_artifact_stem(source)}{suffix}"
    out = Path(options.out)
    if out.suffix != suffix:
        raise ExportInputError(f"--out {out}: a {options.format} artifact must end in {suffix}")
    if out.stem.startswith("."):
        raise ExportInputError(f"--out {out}: names starting with '.' are reserved for temporary files")
    return out


def sidecar_path(artifact: Path) -> Path:
    """NAME.onnx -> NAME.onnx.json: one sidecar per artifact, even for several formats of one model."""
    return artifact.with_name(artifact.name + ".json")


def run_export(options: ExportOptions, echo: Callable[[str], None] = print) -> ExportResult:
    """Load, export, gate and publish one artifact plus its sidecar. Raises ExportInputError / ParityError."""
    _validate(options)
    checkpoint = options.checkpoint
    if checkpoint is None:
        checkpoint = str(find_latest_run(options.runs_root))
        echo(f"no --checkpoint given: using the most recent run, {checkpoint}")
    source = load_source(checkpoint, options.which)
    backbone, arch, timm_kwargs = build_backbone(source, options.image_size, options.arch, options.timm_kwargs)
    outputs = parse_outputs(options.outputs, backbone)
    device = resolve_device(options.device)
    if options.format == "tensorrt":
        from dino_scale.tensorrt_engine import import_tensorrt

        import_tensorrt()  # raises RuntimeUnavailable naming what is missing, before anything is written
    shards = options.parity_shards or (str(DEFAULT_PARITY_SHARDS) if DEFAULT_PARITY_SHARDS.exists() else None)
    if options.parity_shards:
        from dino_scale.data import expand_shards

        try:
            expand_shards(options.parity_shards)
        except FileNotFoundError as error:
            raise ExportInputError(f"--parity-shards: {error}") from None
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
        inputs = parity_inputs(reference, options.image_size, batches, shards, options.max_batch)
        report = check_parity(
            runners, reference, inputs, options.precision, options.max_relative_error, options.min_cosine
        )
        echo(report.table())
        if not report.passed:
            raise ParityError(f"{out.name} failed the parity gate and was not written.\n{report.table()}")
        metadata = sidecar(options, source, exported, arch, timm_kwargs, out, staging, details, report)
        staging.replace(out)
        ckpt.atomic_write_text(sidecar_path(out), json.dumps(metadata, indent=2) + "\n")
    finally:
        staging.unlink(missing_ok=True)
        staging_onnx.unlink(missing_ok=True)
    echo(f"exported {out} (+ {sidecar_path(out).name})")
    return ExportResult(out, sidecar_path(out), report, metadata)


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
    from dino_scale.tensorrt_engine import TensorRTRunner, build_engine, has_precision_flags, import_tensorrt

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


def sidecar(
    options: ExportOptions,
    source: BackboneSource,
    model: InferenceModel,
    arch: str,
    timm_kwargs: dict[str, Any],
    out: Path,
    staged: Path,
    details: dict[str, Any],
    report: ParityReport,
) -> dict[str, Any]:
    """The artifact's self-description (export/README.md documents every field)."""
    size = options.image_size
    return {
        "sidecar_version": SIDECAR_VERSION,
        "format": options.format,
        "artifact": {"file": out.name, "sha256": file_sha256(staged), "bytes": staged.stat().st_size, **details},
        "model": {
            "arch": arch,
            "timm_kwargs": timm_kwargs,
            "patch_size": patch_size_of(model.backbone),
            "image_size": size,
            "num_features": int(model.backbone.num_features),
            "precision": options.precision,
        },
        "preprocessing": {
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "resize": f"shorter side to int({size} * 256 / 224) bicubic, centre crop {size} (done by the client)",
            "normalisation": "in the graph: (x / 255 - mean) / std"
            if model.uint8_input
            else "by the client: (x / 255 - mean) / std",
        },
        "inputs": [
            {
                "name": INPUT_NAME,
                "dtype": "uint8" if model.uint8_input else "float32",
                "layout": "NHWC" if model.uint8_input else "NCHW",
                "shape": input_shape(model, size),
            }
        ],
        "outputs": [
            {"name": name, "dtype": "float32", "shape": shape, "description": OUTPUT_DESCRIPTIONS[name]}
            for name, shape in output_shapes(model, size).items()
        ],
        "source": {
            "path": str(source.path),
            "sha256": source.sha256(),
            "which": source.which,
            "run": source.run_name,
            "step": source.step,
        },
        "parity": report.summary(),
        "versions": environment_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": options.command,
    }


OUTPUT_DESCRIPTIONS = {
    "cls": "pooled backbone feature (ViT: final-norm CLS token; CNN: global average pool)",
    "patch_gem": "GeM (p=4) of the final patch tokens / feature map, clamped at 1e-6; concat with cls for copy "
    "detection",
    "attn": "last block's CLS-query attention over patch tokens, softmax probabilities per head, [heads, h, w]",
}


def load_sidecar(artifact: str | Path) -> dict[str, Any]:
    """The sidecar of an artifact, checked to belong to it (same sha256)."""
    artifact = Path(artifact)
    path = sidecar_path(artifact)
    if not artifact.is_file():
        raise FileNotFoundError(f"--model: {artifact} does not exist")
    if not path.is_file():
        raise ExportInputError(f"{artifact} has no sidecar {path.name} beside it; re-export it with dino-scale export")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ExportInputError(f"{path} is not valid JSON: {error}") from None
    if meta.get("artifact", {}).get("sha256") != file_sha256(artifact):
        raise ExportInputError(f"{path} describes another file than {artifact} (sha256 differs); re-export it")
    return meta


def backbone_from_sidecar(meta: dict[str, Any], image_size: int | None = None) -> nn.Module:
    """The timm backbone an artifact was exported from, at ``image_size`` (default: the artifact's); needs the source
    checkpoint on disk."""
    source_path = Path(meta["source"]["path"])
    if not source_path.exists():
        raise RuntimeUnavailable(f"the PyTorch model needs the source checkpoint {source_path}, which is gone")
    source = load_source(source_path, meta["source"]["which"])
    model_meta = meta["model"]
    size = image_size or model_meta["image_size"]
    backbone, _, _ = build_backbone(source, size, model_meta["arch"], model_meta["timm_kwargs"])
    return backbone


def inference_model_from_sidecar(meta: dict[str, Any], precision: str | None = None) -> InferenceModel:
    """Rebuild the PyTorch model an artifact was exported from (needs the source checkpoint on disk)."""
    model_meta = meta["model"]
    backbone = backbone_from_sidecar(meta)
    outputs = [o["name"] for o in meta["outputs"]]
    uint8 = meta["inputs"][0]["dtype"] == "uint8"
    return InferenceModel(backbone, outputs, uint8, compute_dtype=PRECISIONS[precision or model_meta["precision"]])
