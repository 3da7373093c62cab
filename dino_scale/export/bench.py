"""`dino-scale bench`: throughput and latency of an exported model in every runtime this machine has.

For an artifact ``NAME.<ext>`` the runtimes are: PyTorch eager and torch.compile (the model rebuilt from the
sidecar's source checkpoint), ONNX Runtime with each usable execution provider (``NAME.onnx``), TensorRT
(``NAME.engine``) and AOTInductor (``NAME.pt2``). A sibling artifact that is missing is built into a temporary
folder when its runtime is present, so one command compares everything. Each runtime gets ``warmup`` untimed
calls, then ``iterations`` timed calls on the same device-resident batch; on a GPU each call is timed on the
device with CUDA events. Throughput is ``batch / median latency``.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dino_scale.devices import resolve_device
from dino_scale.errors import InputError, Unavailable, blame
from dino_scale.export.graph import INPUT_NAME, InferenceModel, example_input
from dino_scale.export.runtimes import AotiRunner, OnnxRuntimeRunner, Runner, TorchRunner, onnxruntime_providers
from dino_scale.export.sidecar import (
    ARTIFACT_SUFFIXES,
    EXPORT_ROOT,
    artifact_image_size,
    environment_versions,
    inference_model_from_sidecar,
    load_sidecar,
    sidecar_path,
)
from dino_scale.export.tensorrt import TensorRTRunner, build_engine, import_tensorrt
from dino_scale.export.writers import export_aoti, export_onnx
from dino_scale.io import atomic_write_json


@dataclass
class BenchOptions:
    model: str
    batch: int = 128
    runtimes: str | None = None
    warmup: int = 5
    iterations: int = 30
    device: str = "auto"
    json_out: str | None = None


@dataclass
class BenchRow:
    runtime: str
    images_per_s: float | None = None
    latency_ms: dict[str, float] | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "images_per_s": self.images_per_s,
            "latency_ms": self.latency_ms,
            "note": self.note,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def time_runner(runner: Runner, images: torch.Tensor, warmup: int, iterations: int) -> list[float]:
    """Seconds per call, device-timed on CUDA (events), wall-timed on the CPU."""
    images = images.to(runner.device)
    cuda = runner.device.type == "cuda"
    for _ in range(warmup):
        runner(images)
    if cuda:
        torch.cuda.synchronize()
    seconds = []
    for _ in range(iterations):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner(images)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000.0)
        else:
            began = time.perf_counter()
            runner(images)
            seconds.append(time.perf_counter() - began)
    return seconds


def summarise(name: str, seconds: list[float], batch: int, note: str = "") -> BenchRow:
    ordered = sorted(seconds)
    median = statistics.median(ordered)
    latency = {f"p{q}": 1000 * percentile(ordered, q) for q in (50, 90, 99)}
    latency["median"] = 1000 * median
    return BenchRow(name, batch / median, latency, note)


class _Candidates:
    """Builds each runtime's runner lazily, keeping artifacts it had to build in one temporary folder."""

    def __init__(
        self,
        artifact: Path,
        meta: dict[str, Any],
        device: torch.device,
        scratch: Path,
        max_batch: int,
        echo: Callable[[str], None],
    ) -> None:
        self.artifact, self.meta, self.device, self.scratch = artifact, meta, device, scratch
        self.max_batch = max_batch
        self.echo = echo
        self._model: InferenceModel | None = None
        self.notes: dict[str, str] = {}

    def torch_model(self) -> InferenceModel:
        if self._model is None:
            self._model = inference_model_from_sidecar(self.meta)
        return self._model

    def sibling(self, suffix: str, runtime: str) -> tuple[Path, dict[str, Any]] | None:
        """NAME<suffix> beside the benchmarked artifact and its sidecar, if exported from the same checkpoint."""
        path = self.artifact.with_suffix(suffix)
        if path == self.artifact:
            return path, self.meta
        try:
            meta = load_sidecar(path)
        except InputError:
            return None
        if meta.get("source", {}).get("sha256") != self.meta["source"]["sha256"]:
            return None
        self.notes[runtime] = f"{path.name}, {meta['model']['precision']}"
        return path, meta

    def onnx(self) -> Path:
        found = self.sibling(".onnx", "onnxruntime")
        if found is not None:
            return found[0]
        path = self.scratch / "model.onnx"
        if not path.exists():
            self.echo("  building a temporary ONNX file from the source checkpoint")
            export_onnx(self.torch_model().cpu(), path, self.meta["model"]["image_size"])
        self.notes.setdefault("onnxruntime", "ONNX exported for this benchmark")
        return path

    def names(self) -> list[str]:
        names = ["pytorch-eager", "torch.compile"]
        providers = onnxruntime_providers_or_empty()
        if self.device.type == "cpu":
            providers = [p for p in providers if p == "CPUExecutionProvider"]
        names += [f"onnxruntime:{p.removesuffix('ExecutionProvider')}" for p in providers]
        if self.device.type == "cuda":
            names.append("tensorrt")
        names.append("aoti")
        return names

    def runner(self, name: str) -> Runner:
        precision = self.meta["model"]["precision"]
        shapes = {o["name"]: o["shape"] for o in self.meta["outputs"]}
        if name in ("pytorch-eager", "torch.compile"):
            return TorchRunner(self.torch_model(), self.device, compile_model=name == "torch.compile")
        if name.startswith("onnxruntime:"):
            provider = name.split(":", 1)[1] + "ExecutionProvider"
            return OnnxRuntimeRunner(
                self.onnx(), provider, shapes, fp16=precision == "fp16", cache_dir=self.scratch / "ort-trt-cache"
            )
        if name == "tensorrt":
            import_tensorrt()
            found = self.sibling(".engine", "tensorrt")
            engine = found[0] if found is not None else None
            if engine is None:
                engine = self.scratch / "model.engine"
                self.echo("  building a temporary TensorRT engine")
                self.notes["tensorrt"] = "engine built for this benchmark"
                layout = self.meta["inputs"][0]["shape"][1:]
                build_engine(
                    self.onnx(),
                    engine,
                    input_name=INPUT_NAME,
                    input_shape=tuple(layout),
                    min_batch=1,
                    opt_batch=self.max_batch,
                    max_batch=self.max_batch,
                    precision=precision,
                    timing_cache=self.scratch / "timing.cache",
                )
            return TensorRTRunner(engine, [o["name"] for o in self.meta["outputs"]])
        if name == "aoti":
            found = self.sibling(".pt2", "aoti")
            # AOTI packages are compiled for one device type
            package = found[0] if found is not None and found[1]["artifact"].get("device") == self.device.type else None
            if package is None:
                package = self.scratch / "model.pt2"
                self.echo("  compiling a temporary AOTInductor package")
                self.notes["aoti"] = "compiled for this benchmark"
                export_aoti(
                    self.torch_model(), package, self.meta["model"]["image_size"], self.device, max(self.max_batch, 2)
                )
            return AotiRunner(package, self.device)
        raise InputError(f"unknown runtime {name!r}", argument="runtimes")


def onnxruntime_providers_or_empty() -> list[str]:
    try:
        return onnxruntime_providers()
    except Unavailable:
        return []


def exported_from(source: Path, root: Path = EXPORT_ROOT) -> list[Path]:
    """The artifacts under ``root`` (with a sidecar) exported from ``source``: a run directory, or a checkpoint or
    backbone file, matched by the path their sidecar records."""
    source = source.resolve()
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.suffix not in ARTIFACT_SUFFIXES or not sidecar_path(path).is_file():
            continue
        try:
            recorded = Path(json.loads(sidecar_path(path).read_text(encoding="utf-8"))["source"]["path"]).resolve()
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if recorded == source or source in recorded.parents:
            found.append(path)
    return found


def check_artifact(model: Path) -> None:
    """Refuse what is not an exported artifact in one line that says what to do: bench times the exported graph of
    an artifact (NAME.onnx / .engine / .pt2 beside its sidecar), so a run directory or checkpoint is exported first
    (its artifacts already in export/ are named)."""
    if (model.is_file() and model.suffix in ARTIFACT_SUFFIXES) or not model.exists():
        return  # load_sidecar names what is wrong with it
    kind = "a directory" if model.is_dir() else "not an exported artifact"
    if model.is_dir() and (model / "config.json").is_file():
        kind = "a run directory"
    elif model.is_file():
        kind = f"a {model.suffix or 'suffix-less'} file, not an exported artifact"
    found = exported_from(model)
    if found:
        advice = f"its exported artifacts: {', '.join(str(path) for path in found)}"
    else:
        advice = f"export it first: dino-scale export --checkpoint {model}"
    raise InputError(
        f"{model} is {kind}; bench takes an exported artifact ({', '.join(ARTIFACT_SUFFIXES)} with its sidecar "
        f"JSON) -- {advice}",
        argument="model",
    )


def run_bench(options: BenchOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Benchmark every requested runtime; print a table, optionally write JSON. Returns the results."""
    artifact = Path(options.model)
    check_artifact(artifact)
    with blame("model"):
        meta = load_sidecar(artifact)
    device = resolve_device(options.device)
    image_size = int(meta["model"]["image_size"])
    echo(artifact_image_size(artifact, meta).describe())
    uint8_input = meta["inputs"][0]["dtype"] == "uint8"
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="dino-scale-bench-") as scratch:
        candidates = _Candidates(artifact, meta, device, Path(scratch), options.batch, echo)
        names = candidates.names()
        if options.runtimes:
            wanted = [n.strip() for n in options.runtimes.split(",") if n.strip()]
            unknown = [n for n in wanted if n not in names]
            if unknown:
                raise InputError(
                    f"runtimes {unknown} not available on {device.type} here (choose from {names})", argument="runtimes"
                )
            names = wanted
        echo(
            f"benchmarking {artifact.name}: batch {options.batch}, {image_size}px, {meta['model']['precision']}, "
            f"{device_name(device)}"
        )
        images = example_input(uint8_input, image_size, options.batch)
        for name in names:
            try:
                runner = candidates.runner(name)
                seconds = time_runner(runner, images, options.warmup, options.iterations)
                note = candidates.notes.get(name.split(":")[0], "")
                rows.append(summarise(name, seconds, options.batch, note))
            except (Unavailable, ImportError) as error:
                rows.append(BenchRow(name, note=f"unavailable: {error}"))
            except Exception as error:  # noqa: BLE001 - one broken runtime must not hide the others' numbers
                rows.append(BenchRow(name, note=f"failed: {type(error).__name__}: {str(error).splitlines()[0]}"))
            echo(format_row(rows[-1]))
    result = {
        "model": str(artifact),
        "model_sha256": meta["artifact"]["sha256"],
        "arch": meta["model"]["arch"],
        "image_size": image_size,
        "precision": meta["model"]["precision"],
        "batch": options.batch,
        "warmup": options.warmup,
        "iterations": options.iterations,
        "device": device_name(device),
        "timing": "CUDA events" if device.type == "cuda" else "wall clock (perf_counter)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": environment_versions(),
        "results": [row.as_dict() for row in rows],
    }
    if options.json_out:
        with blame("json_out"):
            atomic_write_json(options.json_out, result)
        echo(f"wrote {options.json_out}")
    return result


def format_row(row: BenchRow) -> str:
    if row.images_per_s is None:
        return f"  {row.runtime:<24} {row.note}"
    latency = row.latency_ms or {}
    return (
        f"  {row.runtime:<24} {row.images_per_s:>10.1f} img/s   latency p50 {latency['p50']:.2f} ms  "
        f"p90 {latency['p90']:.2f} ms  p99 {latency['p99']:.2f} ms  {row.note}"
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
