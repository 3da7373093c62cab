"""Typed, validated training recipes.

A recipe is a JSON file. Everything except the `deepspeed` block is validated here (unknown keys, wrong types and
impossible values stop before any work, naming the file and the dotted key). The `deepspeed` block is DeepSpeed's
own config schema; we read the few keys the training loop itself needs from it (micro batch, accumulation,
precision, clipping) so that each of those numbers lives in one place, and hand the whole block to DeepSpeed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dino_scale.errors import ConfigError

BACKENDS = ("auto", "local", "ddp", "deepspeed", "fsdp")


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class ModelConfig(_Strict):
    arch: str = "vit_small_patch16_224"
    """timm model name of the backbone (`timm.create_model(arch, pretrained=False, num_classes=0)`)."""
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for timm.create_model, e.g. depth/embed_dim for tiny CPU models."""
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    """Stochastic depth on the student only; the teacher never drops paths."""
    out_dim: int = Field(65536, gt=0)
    hidden_dim: int = Field(2048, gt=0)
    bottleneck_dim: int = Field(256, gt=0)
    head_layers: int = Field(3, ge=1)
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    grad_checkpointing: bool = False
    """Recompute the student's backbone blocks in backward (timm's set_grad_checkpointing): less activation memory
    for about a third more compute; what lets ViT-B/8 fit a useful per-GPU batch."""
    init_backbone: str | None = None
    """Start student and teacher backbones from these weights: one of our runs / checkpoints / safetensors, or an
    official facebookresearch/dino checkpoint (full or backbone-only). The head starts fresh."""


class DataConfig(_Strict):
    train_shards: str = "shards/sample/train"
    """WebDataset shards: a directory, a glob or a brace pattern (`data/train-{000000..000127}.tar`)."""
    samples_per_epoch: int | None = Field(None, gt=0)
    """Epoch length in samples; by default read from shards.json beside the shards or counted."""
    num_workers: int = Field(8, ge=0)
    shuffle_buffer: int = Field(5000, ge=1)
    global_crop_size: int = Field(224, gt=0)
    local_crop_size: int = Field(96, gt=0)
    local_crops_number: int = Field(8, ge=0)
    global_crops_scale: list[float] = Field(default_factory=lambda: [0.4, 1.0], min_length=2, max_length=2)
    local_crops_scale: list[float] = Field(default_factory=lambda: [0.05, 0.4], min_length=2, max_length=2)

    @model_validator(mode="after")
    def _check_scales(self) -> DataConfig:
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {[low, high]}")
        return self


class OptimConfig(_Strict):
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = Field(5e-4, gt=0.0)
    """Peak learning rate for a global batch of 256; scaled linearly by global batch / 256."""
    min_lr: float = Field(1e-6, ge=0.0)
    warmup_epochs: float = Field(10, ge=0.0)
    weight_decay: float = Field(0.04, ge=0.0)
    weight_decay_end: float = Field(0.4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD / LARS momentum (AdamW uses its default betas)."""
    freeze_last_layer: float = Field(1, ge=0.0)
    """Epochs during which the head's last layer gets no updates (stabilises the start of training)."""


class DinoConfig(_Strict):
    student_temp: float = Field(0.1, gt=0.0)
    warmup_teacher_temp: float = Field(0.04, gt=0.0)
    teacher_temp: float = Field(0.07, gt=0.0)
    warmup_teacher_temp_epochs: float = Field(30, ge=0.0)
    center_momentum: float = Field(0.9, ge=0.0, le=1.0)
    momentum_teacher: float = Field(0.996, ge=0.0, le=1.0)
    """Teacher EMA momentum at step 0; it follows a cosine to 1.0 at the last step."""


class EvalConfig(_Strict):
    knn_train_shards: str | None = None
    """Labelled shards used as the k-NN memory bank at the end of training (None: no k-NN evaluation)."""
    knn_val_shards: str | None = None
    knn_k: int = Field(20, gt=0)
    knn_temperature: float = Field(0.07, gt=0.0)
    image_size: int = Field(224, gt=0)
    batch_size: int = Field(128, gt=0)


_AUTOCAST_DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "torch.float16": "float16",
}


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    """Samples per process per forward."""
    accumulation_steps: int
    global_batch: int
    """Samples per optimizer step over all processes: micro_batch x accumulation_steps x world size."""


class TrainConfig(_Strict):
    name: str = "dino"
    """Run name; the default output directory is runs/<name>."""
    output_dir: str | None = None
    seed: int = 0
    epochs: int = Field(100, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps (smoke runs); schedules still span `epochs`."""
    backend: Literal["auto", "local", "ddp", "deepspeed", "fsdp"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(1000, gt=0)
    """Optimizer steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: int = Field(3, gt=0)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    dino: DinoConfig = Field(default_factory=DinoConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    """DeepSpeed's own config schema; see the `micro_batch_size` etc. properties for the keys we read."""

    @model_validator(mode="after")
    def _check_deepspeed_block(self) -> TrainConfig:
        ds = self.deepspeed
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            value = ds.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"deepspeed.{key} must be a positive integer, got {value!r}")
        if "train_micro_batch_size_per_gpu" not in ds:
            raise ValueError("deepspeed.train_micro_batch_size_per_gpu is required (the per-device batch)")
        clip = ds.get("gradient_clipping", 0.0)
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
            raise ValueError(f"deepspeed.gradient_clipping must be a number >= 0, got {clip!r}")
        for key in ("bf16", "fp16", "torch_autocast"):
            block = ds.get(key, {})
            if not isinstance(block, dict) or not isinstance(block.get("enabled", False), bool):
                raise ValueError(f'deepspeed.{key} must be an object like {{"enabled": true}}, got {block!r}')
        autocast_dtype = ds.get("torch_autocast", {}).get("dtype", "bfloat16")
        if autocast_dtype not in _AUTOCAST_DTYPES:
            raise ValueError(
                f"deepspeed.torch_autocast.dtype must be one of {sorted(_AUTOCAST_DTYPES)}, got {autocast_dtype!r}"
            )
        enabled = [k for k in ("bf16", "fp16", "torch_autocast") if ds.get(k, {}).get("enabled", False)]
        if len(enabled) > 1:
            raise ValueError(f"deepspeed: only one of bf16 / fp16 / torch_autocast may be enabled, got {enabled}")
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr ({self.optim.min_lr}) exceeds optim.lr ({self.optim.lr})")
        return self

    # The keys below are read from the deepspeed block so that DeepSpeed and our loop never disagree.
    @property
    def micro_batch_size(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def clip_grad(self) -> float:
        return float(self.deepspeed.get("gradient_clipping", 0.0))

    @property
    def autocast_dtype(self) -> str | None:
        """'bfloat16', 'float16' or None. DeepSpeed's `torch_autocast` keeps fp32 weights (what the EMA wants);
        its `bf16` / `fp16` modes keep low-precision weights with fp32 master copies in the optimizer."""
        ds = self.deepspeed
        if ds.get("torch_autocast", {}).get("enabled", False):
            return _AUTOCAST_DTYPES[ds["torch_autocast"].get("dtype", "bfloat16")]
        if ds.get("bf16", {}).get("enabled", False):
            return "bfloat16"
        if ds.get("fp16", {}).get("enabled", False):
            return "float16"
        return None

    @property
    def bf16(self) -> bool:
        return self.autocast_dtype == "bfloat16"

    @property
    def fp16(self) -> bool:
        return self.autocast_dtype == "float16"

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    def batch_plan(self, world_size: int) -> BatchPlan:
        """Micro batch, accumulation steps and global batch for `world_size` processes, resolved as DeepSpeed does:
        `train_batch_size` (the global batch), when the recipe sets it, fixes the accumulation steps."""
        ds = self.deepspeed
        micro = self.micro_batch_size
        per_step = micro * world_size
        if "train_batch_size" in ds:
            global_batch = int(ds["train_batch_size"])
            accumulation, rest = divmod(global_batch, per_step)
            if rest or accumulation < 1:
                raise ConfigError(
                    f"deepspeed.train_batch_size={global_batch} is not a multiple of micro batch {micro} x "
                    f"{world_size} process(es) = {per_step}; change train_micro_batch_size_per_gpu or the number "
                    "of processes, or drop train_batch_size to let the global batch follow the world size"
                )
            given = ds.get("gradient_accumulation_steps")
            if given is not None and given != accumulation:
                raise ConfigError(
                    f"deepspeed.train_batch_size={global_batch} needs gradient_accumulation_steps={accumulation} "
                    f"with micro batch {micro} on {world_size} process(es), but the recipe sets {given}"
                )
            return BatchPlan(micro, accumulation, global_batch)
        accumulation = int(ds.get("gradient_accumulation_steps", 1))
        return BatchPlan(micro, accumulation, per_step * accumulation)

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def shipped_recipes_dir() -> Path:
    """The recipes that ship with the package (the repository's top-level configs/ folder)."""
    try:
        packaged = Path(str(resources.files("dino_scale.recipes")))
        if packaged.is_dir():
            return packaged
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name: str | Path) -> Path:
    """A path that exists as given wins; a bare recipe name (`vitb8.json`, `vitb8`) falls back to the shipped one."""
    path = Path(name)
    if path.is_file():
        return path
    if len(path.parts) == 1:
        for candidate in (path.name, f"{path.name}.json"):
            shipped = shipped_recipes_dir() / candidate
            if shipped.is_file():
                return shipped
    available = sorted(p.name for p in shipped_recipes_dir().glob("*.json"))
    raise ConfigError(f"config file not found: {name} (shipped recipes: {', '.join(available) or 'none'})")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-3` -> (["optim", "lr"], 0.001). Values are JSON when they parse as JSON, else strings."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set has an empty key segment in {key!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys into nested dicts, creating intermediate objects (e.g. deepspeed.zero_optimization.stage)."""
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {'.'.join(parts[: depth + 1])} is not an object")
            node = child
        node[parts[-1]] = value
    return raw


def _format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif "input" in item and item["type"] != "value_error":
            message = f"{message} (got {item['input']!r})"
        lines.append(f"  {key}: {message}" if key else f"  {message}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(source, error)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a recipe, apply `--set` overrides, validate. Errors name the file and the key."""
    resolved = resolve_config_path(path)
    try:
        raw = json.loads(resolved.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"config {resolved} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {resolved} must hold a JSON object at the top level")
    raw = apply_overrides(raw, list(overrides or []))
    source = str(resolved) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return config_from_dict(raw, source)
