"""The sidecar: ``NAME.<ext>.json`` beside every artifact, its self-description (export/README.md documents every
field), and the one reader of it (checked to belong to its artifact) that bench, retrieval and evaluation use."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dino_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dino_scale.errors import InputError, NotFound, Unavailable
from dino_scale.export.graph import INPUT_NAME, PRECISIONS, InferenceModel, input_shape, output_shapes
from dino_scale.export.parity import ParityReport
from dino_scale.io import file_sha256
from dino_scale.models.backbones import patch_size_of
from dino_scale.models.weights import BackboneSource, ImageSize, build_backbone, load_source

SIDECAR_VERSION = 1
# The artifacts `dino-scale export` writes (each with its sidecar), and the folder it writes them to by default.
ARTIFACT_SUFFIXES = (".onnx", ".engine", ".pt2")
EXPORT_ROOT = Path("export")


def sidecar_path(artifact: Path) -> Path:
    """NAME.onnx -> NAME.onnx.json: one sidecar per artifact, even for several formats of one model."""
    return artifact.with_name(artifact.name + ".json")


class ArtifactSettings(Protocol):
    """What the sidecar records of the export's settings (dino_scale.export.exporter.ExportOptions has them)."""

    format: str
    precision: str
    image_size: int
    command: str | None


def sidecar(
    options: ArtifactSettings,
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
    if artifact.is_dir():
        raise InputError(f"{artifact} is a directory, not an exported artifact ({', '.join(ARTIFACT_SUFFIXES)})")
    if not artifact.is_file():
        raise NotFound(f"{artifact} does not exist")
    if not path.is_file():
        raise InputError(f"{artifact} has no sidecar {path.name} beside it; re-export it with dino-scale export")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise InputError(f"{path} is not valid JSON: {error}") from None
    if meta.get("artifact", {}).get("sha256") != file_sha256(artifact):
        raise InputError(f"{path} describes another file than {artifact} (sha256 differs); re-export it")
    return meta


def artifact_image_size(artifact: Path, meta: dict[str, Any]) -> ImageSize:
    """The size an exported artifact takes (fixed in its graph), as its sidecar records it."""
    return ImageSize(int(meta["model"]["image_size"]), f"the size {artifact.name} was exported at: its sidecar")


def backbone_from_sidecar(meta: dict[str, Any], image_size: int | None = None) -> nn.Module:
    """The timm backbone an artifact was exported from, at ``image_size`` (default: the artifact's); needs the source
    checkpoint on disk."""
    source_path = Path(meta["source"]["path"])
    if not source_path.exists():
        raise Unavailable(f"the PyTorch model needs the source checkpoint {source_path}, which is gone")
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


def environment_versions() -> dict[str, str]:
    """Versions of what built an artifact (absent packages are left out)."""
    versions = {"python": platform.python_version()}
    for package in ("dino-scale", "torch", "timm", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    if torch.version.cuda:
        versions["cuda"] = str(torch.version.cuda)
    return versions
