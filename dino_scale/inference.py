"""The inference model that export, benchmark and indexing run: a frozen backbone with selectable outputs.

Outputs (any non-empty combination, always in this order):

* ``cls``: the pooled feature of the backbone, as DINO's k-NN eval uses it (ViT: the normalised CLS token;
  CNN: global average pooling), shape ``[B, D]``.
* ``patch_gem``: generalised-mean pooling of the output patch tokens (ViT) or of the last feature map (CNN),
  ``gem(x) = (1/N Σ_n clamp(x_n, 1e-6)^p)^(1/p)`` with p = 4, shape ``[B, D]``; concatenated with ``cls`` it is
  the paper's copy-detection descriptor.
* ``attn``: the last block's attention of the CLS query over the patch tokens, one map per head,
  ``softmax(q_cls · Kᵀ · scale)``, shape ``[B, heads, H/p, W/p]`` (ViT only).

Inputs: float32 ``[B, 3, S, S]`` already normalised with the sidecar's mean/std, or (``uint8_input``) raw
``[B, S, S, 3]`` RGB bytes that the graph itself normalises: ``(x / 255 - mean) / std``. No resize happens in
the graph; the image size is fixed at export time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_scale import checkpoint as ckpt
from dino_scale.augment import IMAGENET_MEAN, IMAGENET_STD
from dino_scale.models import create_backbone

OUTPUT_NAMES = ("cls", "patch_gem", "attn")
INPUT_NAME = "images"
GEM_P = 4.0
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RUNS_ROOT = Path("runs")


class ExportInputError(ValueError):
    """Bad user input for export / inference: names the flag, file or value at fault."""


def parse_outputs(spec: str | Sequence[str], backbone: nn.Module | None = None) -> tuple[str, ...]:
    """``"cls,patch_gem"`` -> ``("cls", "patch_gem")``, validated (and checked against the backbone if given)."""
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n).strip() for n in spec]
    names = [n for n in names if n]
    if not names:
        raise ExportInputError(f"--outputs is empty; choose from {', '.join(OUTPUT_NAMES)}")
    unknown = [n for n in names if n not in OUTPUT_NAMES]
    if unknown:
        raise ExportInputError(f"--outputs: unknown output(s) {unknown}; choose from {', '.join(OUTPUT_NAMES)}")
    if len(set(names)) != len(names):
        raise ExportInputError(f"--outputs names an output twice: {spec!r}")
    if backbone is not None and "attn" in names and not is_vit(backbone):
        raise ExportInputError(
            f"--outputs attn needs a vision transformer; {type(backbone).__name__} has no attention "
            "(use cls or cls,patch_gem)"
        )
    return tuple(n for n in OUTPUT_NAMES if n in names)


def is_vit(backbone: nn.Module) -> bool:
    return hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed") and hasattr(backbone, "_pos_embed")


def patch_size_of(backbone: nn.Module) -> int | None:
    """The ViT patch size (square patches), or None for CNNs."""
    if not is_vit(backbone):
        return None
    size = backbone.patch_embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class InferenceModel(nn.Module):
    """Backbone + in-graph preprocessing + the selected outputs, returned as a tuple in ``outputs`` order.

    The normalisation is folded into one multiply-add, ``x · 1/(255·std) − mean/std`` for uint8 input, and
    the backbone runs in ``compute_dtype`` while inputs and outputs stay float32 (uint8 in), so a client's
    preprocessing does not depend on the artifact's precision.
    """

    def __init__(
        self,
        backbone: nn.Module,
        outputs: Sequence[str] = ("cls",),
        uint8_input: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.outputs = parse_outputs(outputs, backbone)
        self.backbone = backbone.to(compute_dtype).eval().requires_grad_(False)
        self.uint8_input = uint8_input
        self.compute_dtype = compute_dtype
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("input_scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("input_shift", -mean_t / std_t, persistent=False)
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images
        if self.uint8_input:  # [B, H, W, 3] bytes -> normalised [B, 3, H, W]
            x = x.permute(0, 3, 1, 2).to(torch.float32) * self.input_scale + self.input_shift
        x = x.to(self.compute_dtype)
        results = self._vit_outputs(x) if is_vit(self.backbone) else self._cnn_outputs(x)
        return tuple(results[name].float() for name in self.outputs)

    def _vit_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        vit = self.backbone
        grid = (x.shape[-2] // patch_size_of(vit), x.shape[-1] // patch_size_of(vit))
        # timm's forward_features, unrolled so that the last block's input is at hand for the attention map.
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for block in vit.blocks[:-1]:
            tokens = block(tokens)
        results: dict[str, torch.Tensor] = {}
        if "attn" in self.outputs:
            results["attn"] = self._cls_attention(vit.blocks[-1], tokens, grid)
        tokens = vit.norm(vit.blocks[-1](tokens))
        if "cls" in self.outputs:
            results["cls"] = vit.forward_head(tokens, pre_logits=True)
        if "patch_gem" in self.outputs:
            results["patch_gem"] = gem(tokens[:, self.num_prefix_tokens :], dim=1)
        return results

    def _cls_attention(self, block: nn.Module, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """softmax(q_cls · Kᵀ · scale) of one block, CLS query only, patch keys only, as [B, heads, h, w].

        Written out because timm's attention runs fused (scaled_dot_product_attention) and never materialises
        the probabilities; only the CLS row is computed here, so the cost is one extra qkv projection.
        """
        attention = block.attn
        batch, length, _ = tokens.shape
        qkv = attention.qkv(block.norm1(tokens))
        qkv = qkv.reshape(batch, length, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
        query, key = attention.q_norm(qkv[0][:, :, :1]), attention.k_norm(qkv[1])
        probabilities = ((query * attention.scale) @ key.transpose(-2, -1)).float().softmax(dim=-1)
        return probabilities[:, :, 0, self.num_prefix_tokens :].reshape(batch, attention.num_heads, *grid)

    def _cnn_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feature_map = self.backbone.forward_features(x)
        results: dict[str, torch.Tensor] = {}
        if "cls" in self.outputs:
            results["cls"] = self.backbone.forward_head(feature_map, pre_logits=True)
        if "patch_gem" in self.outputs:
            results["patch_gem"] = gem(feature_map.flatten(2), dim=2)
        return results


def gem(x: torch.Tensor, dim: int, p: float = GEM_P, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean over ``dim``: (mean(clamp(x, eps)^p))^(1/p), computed in float32 (x^4 overflows fp16)."""
    return x.float().clamp(min=eps).pow(p).mean(dim=dim).pow(1.0 / p)


def output_shapes(model: InferenceModel, image_size: int) -> dict[str, list[int | str]]:
    """Shape of each output with the batch axis as "batch"."""
    backbone = model.backbone
    width = int(backbone.num_features)
    shapes: dict[str, list[int | str]] = {"cls": ["batch", width], "patch_gem": ["batch", width]}
    patch = patch_size_of(backbone)
    if patch is not None:
        heads = int(backbone.blocks[-1].attn.num_heads)
        shapes["attn"] = ["batch", heads, image_size // patch, image_size // patch]
    return {name: shapes[name] for name in model.outputs}


def input_shape(model: InferenceModel, image_size: int) -> list[int | str]:
    return ["batch", image_size, image_size, 3] if model.uint8_input else ["batch", 3, image_size, image_size]


def example_input(uint8_input: bool, image_size: int, batch: int, seed: int = 0) -> torch.Tensor:
    """Random input in an artifact's layout and dtype: uint8 NHWC bytes, or normalised-range float NCHW."""
    generator = torch.Generator().manual_seed(seed)
    if uint8_input:
        return torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8, generator=generator)
    return torch.randn(batch, 3, image_size, image_size, generator=generator)


# ----------------------------------------------------------------------------------------------------------
# Where the weights come from
# ----------------------------------------------------------------------------------------------------------


@dataclass
class BackboneSource:
    """A backbone's weights plus what is known of its architecture, and the file they were read from."""

    path: Path
    """The file actually read (a checkpoint file, a folder checkpoint's trainer_state.pt, a safetensors file)."""
    weights: dict[str, torch.Tensor]
    arch: str | None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    which: str = "teacher"
    run_name: str | None = None
    step: int | None = None

    def sha256(self) -> str:
        return file_sha256(self.path)


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_latest_run(runs_root: str | Path = RUNS_ROOT) -> Path:
    """The most recently written run directory under ``runs_root`` (one with a config.json and weights)."""
    root = Path(runs_root)
    candidates = []
    for run in root.iterdir() if root.is_dir() else []:
        has_weights = (run / ckpt.TEACHER_BACKBONE_FILE).is_file() or (run / ckpt.CHECKPOINT_SUBDIR).is_dir()
        if run.is_dir() and (run / "config.json").is_file() and has_weights:
            written = [p.stat().st_mtime for p in (run / "metrics.jsonl", run / "config.json") if p.exists()]
            candidates.append((max(written), run))
    if not candidates:
        raise ExportInputError(
            f"no --checkpoint given and no training run found under {root}/ (a folder with config.json and "
            "weights); pass --checkpoint RUN_DIR_OR_FILE"
        )
    return max(candidates)[1]


def _arch_from_config(config: Any) -> tuple[str | None, dict[str, Any]]:
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return None, {}
    return model.get("arch"), dict(model.get("timm_kwargs") or {})


def _arch_from_official_args(args: Any) -> str | None:
    """An official DINO checkpoint stores argparse args: arch 'vit_small' + patch_size 16 -> timm's name."""
    arch, patch = getattr(args, "arch", None), getattr(args, "patch_size", None)
    if not isinstance(arch, str):
        return None
    if arch.startswith("vit_") and isinstance(patch, int):
        return f"{arch}_patch{patch}_224"
    return arch  # the official CNNs use torchvision names that timm shares (resnet50)


def load_source(source: str | Path, which: str = "teacher") -> BackboneSource:
    """Read backbone weights from any supported source, with the architecture where the source records it.

    Sources: a run directory (its latest checkpoint, else ``teacher_backbone.safetensors``), one of our
    checkpoint files or folders, a ``teacher_backbone.safetensors`` (arch in its metadata), or an official
    facebookresearch/dino checkpoint (arch from its stored args; backbone-only files need ``--arch``).
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint: {path} does not exist")
    run_name = None
    arch: str | None = None
    timm_kwargs: dict[str, Any] = {}
    if path.is_dir() and (path / "config.json").is_file():  # a run directory
        run_name = path.name
        try:
            arch, timm_kwargs = _arch_from_config(json.loads((path / "config.json").read_text(encoding="utf-8")))
        except ValueError as error:
            raise ExportInputError(f"{path / 'config.json'} is not valid JSON: {error}") from None
        latest = ckpt.find_latest_checkpoint(path)
        if latest is not None:
            path = latest
        elif (path / ckpt.TEACHER_BACKBONE_FILE).is_file():
            path = path / ckpt.TEACHER_BACKBONE_FILE
        else:
            raise FileNotFoundError(f"run directory {source} has no checkpoint and no {ckpt.TEACHER_BACKBONE_FILE}")
    if path.is_dir():  # a folder checkpoint of the sharded backends
        path = _folder_checkpoint_file(path, which)
    if run_name is None:
        run_name = _run_name_of_checkpoint(path)

    if ckpt.is_safetensors_file(path):
        metadata = ckpt.safetensors_metadata(path)
        if which != "teacher":
            raise ExportInputError(f"{path} holds a single backbone; --which {which} is not available from it")
        arch = metadata.get("arch") or arch
        if metadata.get("timm_kwargs"):
            timm_kwargs = json.loads(metadata["timm_kwargs"])
        step = int(metadata["step"]) if metadata.get("step", "").isdigit() else None
        return BackboneSource(
            path, ckpt.extract_backbone_state_dict(path, which), arch, timm_kwargs, which, run_name, step
        )

    obj = ckpt.load_checkpoint(path)
    if "config" in obj:  # ours
        arch, timm_kwargs = _arch_from_config(obj["config"])
    elif "args" in obj:  # official DINO
        arch = _arch_from_official_args(obj["args"]) or arch
    if "teacher" not in obj and "student" not in obj and path.name == "trainer_state.pt" and which == "student":
        raise ExportInputError(f"{path} holds the teacher only; the student is in the folder's student_full.pt")
    step = obj.get("step") if isinstance(obj.get("step"), int) else None
    try:
        weights = ckpt.select_backbone(obj, which, str(path))
    except ValueError as error:
        raise ExportInputError(str(error)) from None
    return BackboneSource(path, weights, arch, timm_kwargs, which, run_name, step)


def _folder_checkpoint_file(folder: Path, which: str) -> Path:
    """The file of a folder checkpoint that holds the wanted network (see backends/base.py)."""
    from dino_scale.backends.base import PORTABLE_STUDENT_FILE, TRAINER_STATE_FILE

    name = TRAINER_STATE_FILE if which == "teacher" else PORTABLE_STUDENT_FILE
    if not (folder / name).is_file():
        raise FileNotFoundError(
            f"{folder} has no {name}"
            + (
                " (ZeRO-3 and FSDP checkpoints keep the student sharded; export the teacher)"
                if which == "student"
                else "; is it a checkpoint folder of ours?"
            )
        )
    return folder / name


def build_backbone(
    source: BackboneSource, image_size: int, arch: str | None = None, timm_kwargs: dict[str, Any] | None = None
) -> tuple[nn.Module, str, dict[str, Any]]:
    """The timm backbone at a fixed ``image_size`` (pos_embed resampled once), with the source's weights.

    ``arch`` / ``timm_kwargs`` override what the source records; the recorded timm_kwargs are dropped when
    ``arch`` names another architecture, since they belong to the recorded one. Returns (backbone, arch, kwargs).
    """
    if image_size <= 0:
        raise ExportInputError(f"--image-size must be positive, got {image_size}")
    if timm_kwargs is None:
        timm_kwargs = source.timm_kwargs if arch in (None, source.arch) else {}
    arch = arch or source.arch
    if not arch:
        raise ExportInputError(
            f"{source.path} does not record its architecture; pass --arch (a timm name, e.g. vit_small_patch16_224)"
        )
    kwargs = dict(timm_kwargs)
    if arch.startswith(("vit_", "deit_")):
        # A fixed grid: pos_embed is resampled once at load time, so the graph holds no interpolation.
        kwargs.update(img_size=image_size, dynamic_img_size=False)
    try:
        backbone = create_backbone(arch, **kwargs)
    except (TypeError, ValueError) as error:
        raise ExportInputError(f"--arch {arch} with timm kwargs {json.dumps(kwargs)}: {error}") from None
    patch = patch_size_of(backbone)
    if patch is not None and image_size % patch:
        raise ExportInputError(
            f"--image-size {image_size} is not divisible by the patch size {patch} of {arch}; "
            f"use e.g. {max(patch, image_size // patch * patch)}"
        )
    try:
        ckpt.load_backbone_weights(backbone, source.weights, source=str(source.path))
    except ValueError as error:
        raise ExportInputError(f"{error}\n  (architecture used: {arch} {json.dumps(kwargs)})") from None
    kwargs.pop("dynamic_img_size", None)
    return backbone.eval(), arch, kwargs


def _run_name_of_checkpoint(path: Path) -> str | None:
    """runs/NAME/checkpoints/step_N.pt (or .../step_N/trainer_state.pt) -> NAME; None for other files."""
    for parent in path.parents:
        if parent.name == ckpt.CHECKPOINT_SUBDIR:
            return parent.parent.name if (parent.parent / "config.json").is_file() else None
    return None


def default_artifact_stem(source: BackboneSource) -> str:
    """export/<run name>.<ext> for our runs, else the source file's stem."""
    return source.run_name or source.path.stem


def environment_versions() -> dict[str, str]:
    """Versions of what built an artifact (absent packages are left out)."""
    import importlib.metadata
    import platform

    versions = {"python": platform.python_version()}
    for package in ("dino-scale", "torch", "timm", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    if torch.version.cuda:
        versions["cuda"] = str(torch.version.cuda)
    return versions
