"""Typed, validated training recipes.

A recipe is a JSON file. Everything except the `deepspeed` block is validated here (unknown keys, wrong types and
impossible values stop before any work, naming the file and the dotted key). The `deepspeed` block is DeepSpeed's
own config schema; we read the few keys the training loop itself needs from it (micro batch, accumulation,
precision, clipping) so that each of those numbers lives in one place, and hand the whole block to DeepSpeed.

Every number has a finite range far beyond any real use (the official DINO trains 800 epochs at most), so that a
typo (`epochs: 1e12`, `lr: 5e4`) stops here with a one-line message instead of exhausting memory or overflowing
later. A ConfigError from this module is one line: `invalid config FILE: key: problem; key: problem`.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dino_scale.errors import ConfigError

BACKENDS = ("auto", "local", "ddp", "deepspeed", "fsdp")

# Upper bounds shared by several settings (see the module docstring).
MAX_EPOCHS = 10_000
"""epochs, and every setting counted in epochs (warmups, freeze_last_layer)."""
MAX_STEPS = 10**9
"""Settings counted in optimizer steps (max_steps, log_every, checkpoint_every, monitor.patience_steps)."""
MAX_IMAGE_SIZE = 4096
"""Crop and evaluation sizes, in pixels."""
MAX_TEMPERATURE = 10.0
MIN_TEMPERATURE = 1e-3
"""Temperatures divide logits; the paper's are 0.04 - 0.1, and below 1e-3 low precision overflows."""
MAX_NESTING = 32
"""Objects and lists nest at most this deep in a recipe (DeepSpeed's blocks need 3); deeper ones are refused before
any recursive code (the JSON parser, validation, serialisation) meets them."""
MAX_DEEPSPEED_BATCH = 2**20
"""deepspeed.train_micro_batch_size_per_gpu and gradient_accumulation_steps; train_batch_size is bounded by 2**30."""
_INT64 = 2**63
RESERVED_TIMM_KWARGS = {
    "model_name": "the architecture is model.arch",
    "arch": "the architecture is model.arch",
    "drop_path_rate": "set model.drop_path_rate",
    "num_classes": "the backbone returns pooled features (num_classes=0) for the DINO head",
    "pretrained": "start from weights with model.init_backbone; timm never downloads here",
    "pretrained_cfg": "start from weights with model.init_backbone; timm never downloads here",
    "pretrained_cfg_overlay": "start from weights with model.init_backbone; timm never downloads here",
    "checkpoint_path": "start from weights with model.init_backbone",
    "cache_dir": "start from weights with model.init_backbone; timm never downloads here",
    "pos_embed_interpolation": "set model.pos_embed_interpolation",
}
"""timm.create_model arguments that model.timm_kwargs may not set, and what to do instead."""


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    # allow_inf_nan=False: JSON's NaN / Infinity would pass a `gt=0` bound and poison the schedules (NaN turns
    # clipping off); every float setting must be finite.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    arch: str = "vit_small_patch16_224"
    """timm model name of the backbone (`timm.create_model(arch, pretrained=False, num_classes=0)`)."""
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for timm.create_model, e.g. depth/embed_dim for tiny CPU models: identifier keys,
    values JSON scalars or lists of them; not the RESERVED_TIMM_KWARGS. Whether the arch takes them is known only
    when the backbone is built (dino_scale.models.backbones.create_backbone blames model.timm_kwargs then)."""
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    """Stochastic depth on the student only; the teacher never drops paths."""
    out_dim: int = Field(65536, gt=0, le=2**20)
    """Prototypes K (the paper ablates up to 262,144)."""
    hidden_dim: int = Field(2048, gt=0, le=65536)
    bottleneck_dim: int = Field(256, gt=0, le=65536)
    head_layers: int = Field(3, ge=1, le=32)
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    grad_checkpointing: bool = False
    """Recompute the student's backbone blocks in backward (timm's set_grad_checkpointing): less activation memory
    for about a third more compute; what lets ViT-B/8 fit a useful per-GPU batch."""
    compile: bool = False
    """torch.compile the student's and teacher's backbones: one graph per crop resolution (and grad mode), with static
    shapes, so no recompiles after the first step of each."""
    compile_backend: str = Field("inductor", min_length=1, max_length=64)
    """torch.compile's backend: "inductor" (generated kernels), or e.g. "aot_eager" (no code generation: quick to
    check graphs and recompiles)."""
    pos_embed_interpolation: Literal["official", "timm"] = "official"
    """How a ViT's position embeddings reach another grid (local crops, other image sizes): "official" as the
    official DINO code (bicubic, scale factor (n + 0.1) / sqrt(N), no antialias), or "timm" (timm's antialiased
    bicubic resampling to the exact grid)."""
    init_backbone: str | None = None
    """Start student and teacher backbones from these weights: one of our runs / checkpoints / safetensors, or an
    official facebookresearch/dino checkpoint (full or backbone-only). The head starts fresh."""

    @field_validator("timm_kwargs")
    @classmethod
    def _check_timm_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key, value in kwargs.items():
            if not key.isidentifier():
                raise ValueError(f"key {_short(key)} is not a Python identifier (a keyword argument name)")
            if key in RESERVED_TIMM_KWARGS:
                raise ValueError(f"{key} cannot be set here: {RESERVED_TIMM_KWARGS[key]}")
            for item in value if isinstance(value, list) else [value]:
                if item is None or isinstance(item, (bool, str)):
                    continue
                if isinstance(item, int) and -_INT64 <= item < _INT64:
                    continue
                if isinstance(item, float) and math.isfinite(item):
                    continue
                raise ValueError(
                    f"{key} must be a string, finite number, true/false, null or a list of them, got {_short(value)}"
                )
        return kwargs


ViewKernel = Literal["auto", "c", "torch"]
"""data.view_kernel's values (dino_scale.data.fused_view reads them from here)."""


class DataConfig(_Strict):
    train_shards: str | None = "shards/sample/train"
    """WebDataset shards: a directory, a glob or a brace pattern (`data/train-{000000..000127}.tar`); null when the run
    trains on data.train_images."""
    train_images: str | None = None
    """Train straight from a folder of images (searched recursively, as `dino-scale index --images`; an ImageFolder
    tree works as it is) instead of shards, with the same exact resume and unreadable-sample handling. Set this or
    data.train_shards, not both."""
    samples_per_epoch: int | None = Field(None, gt=0, le=10**10)
    """Epoch length in samples (at most 10^10, twice LAION-5B); by default read from shards.json beside the shards or
    counted."""
    num_workers: int = Field(8, ge=0, le=256)
    """DataLoader worker processes per training process."""
    shuffle_buffer: int = Field(5000, ge=1, le=10**6)
    """Encoded samples each worker holds to shuffle (at most 10^6: about 100 GB of JPEGs)."""
    global_crop_size: int = Field(224, gt=0, le=MAX_IMAGE_SIZE)
    local_crop_size: int = Field(96, gt=0, le=MAX_IMAGE_SIZE)
    local_crops_number: int = Field(8, ge=0, le=64)
    global_crops_scale: list[float] = Field(default_factory=lambda: [0.4, 1.0], min_length=2, max_length=2)
    local_crops_scale: list[float] = Field(default_factory=lambda: [0.05, 0.4], min_length=2, max_length=2)
    augment_on: Literal["auto", "workers", "device"] = "workers"
    """Where the multi-crop views are rendered. "workers" (the default): per sample in the DataLoader workers.
    "device": the workers only decode the images and draw each sample's view parameters (the same ones), and the views
    of the whole batch are rendered with batched ops on the training device (dino_scale.data.device_augment).
    "auto": device on CUDA, workers otherwise. The default stays "workers" until the device path is measured on a GPU:
    on one CPU core the batched renderer took ~309 ms per batch of 32 against ~143 ms for 32 per-sample renderings.
    Bit-identical views on CPU with data.view_kernel="torch" (within 1 grey level of the C kernel); on a GPU the
    crops are resized in float32 (1 grey level off on ~0.4% of the pixels), so this is a hyperparameter, not run
    control."""
    view_kernel: ViewKernel = "auto"
    """What renders a view's per-pixel stage in the workers after its crop and resize (colour jitter, grayscale, blur,
    the rounding to uint8, solarize): "c", a fused C kernel (dino_scale/data/fused_view.c, built at first use with the
    system C compiler, $CC or cc, and cached; an error before any work starts if it cannot be built); "torch", torch
    ops; "auto", the C kernel where it builds, else torch with a warning. Same formulas in float32: the two agree to
    within 1 grey level on ~1e-5 of the values. The C kernel renders 10 views of an image in ~1.5 ms on one core
    instead of ~3.9 (224 / 96 px). The batched device path (augment_on) renders with torch ops, bit-identical on CPU to
    "torch"."""
    decode_reduced: bool = False
    """Decode each JPEG at a reduced size (libjpeg's DCT scaling by 1/2, 1/4 or 1/8) where every view's crop still
    holds at least its output size in pixels, so no view is upsampled from the smaller image. The views are drawn from
    the full upright size as before; only their boxes move into the reduced image. Pays off on large photos: on one
    core, decode + DINO's 10 views of a 3000x2000 JPEG took 23 ms instead of 48 (1600x1060: 18 ms either way; the
    entropy decoding is not reduced). Off by default because the views' pixels differ from a full decode (README
    fidelity table). JPEGs small for their views decode in full, exactly as without it."""
    decode_on: Literal["workers", "device"] = "workers"
    """Where JPEGs are decoded with data.augment_on="device": "workers" (PIL), or "device": the workers read only the
    header (size, EXIF orientation), draw the views, and ship the encoded bytes, which are decoded batched on the
    training device (torchvision.io.decode_jpeg; nvJPEG on CUDA). Other formats, CMYK JPEGs and JPEGs with bytes after
    their end marker are always decoded in the workers; JPEGs decoded on the device are decoded in full
    (data.decode_reduced applies to the others)."""
    max_skipped_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Stop when more than this fraction of the samples read so far were unreadable and skipped (1.0: never). Judged
    at log steps once at least 1,000 samples have been read, so one bad image early on is not a verdict."""

    @model_validator(mode="after")
    def _check_scales(self) -> DataConfig:
        if self.train_images is not None:
            if "train_shards" in self.model_fields_set and self.train_shards is not None:
                raise ValueError("set data.train_shards or data.train_images, not both")
            object.__setattr__(self, "train_shards", None)  # the default shards are not this run's data
        elif self.train_shards is None:
            raise ValueError("set data.train_shards (WebDataset shards) or data.train_images (a folder of images)")
        if self.decode_on == "device" and self.augment_on == "workers":
            raise ValueError('decode_on="device" needs augment_on="device" (or "auto"): the workers render from pixels')
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {[low, high]}")
        return self


class OptimConfig(_Strict):
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = Field(5e-4, gt=0.0, le=100.0)
    """Peak learning rate for a global batch of 256; scaled linearly by global batch / 256. At most 100 (LARS runs
    use 0.3 - 4.8)."""
    min_lr: float = Field(1e-6, ge=0.0, le=100.0)
    warmup_epochs: float = Field(10, ge=0.0, le=MAX_EPOCHS)
    weight_decay: float = Field(0.04, ge=0.0, le=10.0)
    weight_decay_end: float = Field(0.4, ge=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD / LARS momentum (AdamW uses its default betas)."""
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """torch's kernels for AdamW / SGD: "fused" (one kernel for all parameters; what lets a dropped non-finite step be
    skipped on the device without a host read), "foreach" (torch's CUDA default, official DINO's), "for_loop"
    (torch's CPU default). "auto": fused where torch has it for the optimizer and device, else torch's default. The
    same formula in each; the last bits of the float rounding differ."""
    clip_mode: Literal["per_param", "global"] = "per_param"
    """How `deepspeed.gradient_clipping` clips: "per_param" as the official code (each parameter's gradient to that
    norm on its own), or "global" (the norm of all gradients together, torch's clip_grad_norm_)."""
    freeze_last_layer: float = Field(1, ge=0.0, le=MAX_EPOCHS)
    """Epochs during which the head's last layer gets no updates (stabilises the start of training)."""

    @model_validator(mode="after")
    def _check_implementation(self) -> OptimConfig:
        if self.name == "lars" and self.implementation != "auto":
            raise ValueError(f"implementation={self.implementation}: timm's LARS has one implementation (auto)")
        return self


class DinoConfig(_Strict):
    student_temp: float = Field(0.1, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    """Temperatures lie in [1e-3, 10]: they divide logits, and below 1e-3 low precision overflows."""
    warmup_teacher_temp: float = Field(0.04, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    teacher_temp: float = Field(0.07, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    warmup_teacher_temp_epochs: float = Field(30, ge=0.0, le=MAX_EPOCHS)
    teacher_temp_per: Literal["epoch", "step"] = "epoch"
    """The teacher temperature's warmup moves once per epoch, as the official code (a linear ramp over
    round(warmup_teacher_temp_epochs) epochs), or every optimizer step ("step")."""
    center_momentum: float = Field(0.9, ge=0.0, le=1.0)
    momentum_teacher: float = Field(0.996, ge=0.0, le=1.0)
    """Teacher EMA momentum at step 0; it follows a cosine to 1.0 at the last step."""


class MonitorConfig(_Strict):
    """The collapse monitor (see dino_scale.train.monitor): the teacher's mean entropy H(P_t) and KL(P_t || P_s) are
    judged at each log step; a collapse held for `patience_steps` optimizer steps warns or stops the run."""

    collapse: Literal["off", "warn", "stop"] = "warn"
    patience_steps: int = Field(200, gt=0, le=MAX_STEPS)
    """Optimizer steps a collapse sign must hold (at every log step in between) before the monitor acts."""
    low_entropy: float = Field(0.02, ge=0.0, le=1.0)
    """H(P_t) below this fraction of log K: one dimension dominates (what sharpening without centering gives)."""
    high_entropy: float = Field(0.98, ge=0.0, le=1.0)
    """H(P_t) above this fraction of log K: P_t is uniform (what centering without sharpening gives)."""
    low_kl: float = Field(1e-3, ge=0.0, le=100.0)
    """KL(P_t || P_s) in nats below this: the student matches the teacher trivially (both collapses end there)."""

    @model_validator(mode="after")
    def _check_order(self) -> MonitorConfig:
        if self.low_entropy >= self.high_entropy:
            raise ValueError(f"low_entropy ({self.low_entropy}) must be below high_entropy ({self.high_entropy})")
        return self


class EvalConfig(_Strict):
    knn_train_shards: str | None = None
    """Labelled shards used as the k-NN memory bank at the end of training (None: no k-NN evaluation)."""
    knn_val_shards: str | None = None
    knn_k: int = Field(20, gt=0, le=10_000)
    knn_temperature: float = Field(0.07, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    image_size: int = Field(224, gt=0, le=MAX_IMAGE_SIZE)
    batch_size: int = Field(128, gt=0, le=65536)


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
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """0 .. 2**32 - 1: what every random number generator (torch, numpy, random) accepts."""
    epochs: int = Field(100, gt=0, le=MAX_EPOCHS)
    max_steps: int | None = Field(None, gt=0, le=MAX_STEPS)
    """Stop after this many optimizer steps (smoke runs); schedules still span `epochs`."""
    backend: Literal["auto", "local", "ddp", "deepspeed", "fsdp"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, le=4096)
    """Intra-op threads of each training process (torch.set_num_threads). By default the cores this process may use,
    divided among the training processes on the machine, less one per DataLoader worker (each worker runs one
    thread): on a small machine more threads than cores made training 5-10x slower."""
    log_every: int = Field(10, gt=0, le=MAX_STEPS)
    checkpoint_every: int = Field(1000, gt=0, le=MAX_STEPS)
    """Optimizer steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: int = Field(3, gt=0, le=10_000)
    skip_nonfinite_steps: int = Field(0, ge=0, le=10**6)
    """Optimizer steps with a non-finite loss or gradient norm that may be skipped (no update, counted in the
    metrics as `skipped_steps`) before the run stops; 0 stops at the first, as official DINO does."""
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    dino: DinoConfig = Field(default_factory=DinoConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    """DeepSpeed's own config schema; see the `micro_batch_size` etc. properties for the keys we read. Every number in
    it must be finite (NaN clipping would turn clipping off) and fit in 64 bits."""

    @model_validator(mode="after")
    def _check_deepspeed_block(self) -> TrainConfig:
        ds = self.deepspeed
        _check_numbers(ds, "deepspeed")
        for key, most in (
            ("train_micro_batch_size_per_gpu", MAX_DEEPSPEED_BATCH),
            ("gradient_accumulation_steps", MAX_DEEPSPEED_BATCH),
            ("train_batch_size", 2**30),
        ):
            value = ds.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ValueError(f"deepspeed.{key} must be a positive integer, at most {most}, got {_short(value)}")
        if "train_micro_batch_size_per_gpu" not in ds:
            raise ValueError("deepspeed.train_micro_batch_size_per_gpu is required (the per-device batch)")
        clip = ds.get("gradient_clipping", 0.0)
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0:
            raise ValueError(f"deepspeed.gradient_clipping must be a finite number >= 0 (0: off), got {_short(clip)}")
        for key in ("bf16", "fp16", "torch_autocast"):
            block = ds.get(key, {})
            if not isinstance(block, dict) or not isinstance(block.get("enabled", False), bool):
                raise ValueError(f'deepspeed.{key} must be an object like {{"enabled": true}}, got {_short(block)}')
        autocast_dtype = ds.get("torch_autocast", {}).get("dtype", "bfloat16")
        if not isinstance(autocast_dtype, str) or autocast_dtype not in _AUTOCAST_DTYPES:
            raise ValueError(
                f"deepspeed.torch_autocast.dtype must be one of {sorted(_AUTOCAST_DTYPES)}, "
                f"got {_short(autocast_dtype)}"
            )
        zero = ds.get("zero_optimization", {})
        stage = zero.get("stage", 0) if isinstance(zero, dict) else None
        if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
            raise ValueError(
                f'deepspeed.zero_optimization must be an object like {{"stage": 2}} with stage 0 .. 3, '
                f"got {_short(zero)}"
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


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system, say
        return False


def resolve_config_path(name: str | Path) -> Path:
    """A path that exists as given wins; a bare recipe name (`vitb8.json`, `vitb8`) falls back to the shipped one."""
    path = Path(name)
    if _is_file(path):
        return path
    if len(path.parts) == 1:
        for candidate in (path.name, f"{path.name}.json"):
            shipped = shipped_recipes_dir() / candidate
            if _is_file(shipped):
                return shipped
    available = sorted(p.name for p in shipped_recipes_dir().glob("*.json"))
    raise ConfigError(
        f"config file not found: {_one_line(str(name))} (shipped recipes: {', '.join(available) or 'none'})"
    )


def _text_key(parts: list[str]) -> tuple[bool, bool]:
    """(whether the recipe key at `parts` holds text, whether it may also be null). Keys of free-form blocks
    (deepspeed, model.timm_kwargs) and unknown keys are not text: their values are JSON."""
    model: type[BaseModel] = TrainConfig
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False, False
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        if depth != len(parts) - 1:
            return False, False
        if annotation is str:
            return True, False
        members = set(get_args(annotation))
        if str in members and members <= {str, type(None)}:
            return True, True
        return False, False
    return False, False


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-3` -> (["optim", "lr"], 0.001).

    A key that holds text (`name`, `data.train_shards`, ...) takes the value as it is written: `--set name=2024` is
    the name "2024", not a number. (A JSON string literal, `name="2024"`, is unquoted; a key that may be null takes
    `null`.) Every other value is JSON when it parses as JSON (numbers, true/false, objects), else a string, which
    validation then refuses where the key wants something else."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {_short(item)}")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set has an empty key segment in {_short(key)}")
    text, nullable = _text_key(parts)
    if text:
        if nullable and raw == "null":
            return parts, None
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            try:
                unquoted = json.loads(raw)
            except ValueError:
                unquoted = None
            if isinstance(unquoted, str):
                return parts, unquoted
        return parts, raw
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {_one_line(key)}: objects and lists nest deeper than {MAX_NESTING} levels") from None
    except ValueError as error:  # an integer of more digits than Python converts
        raise ConfigError(f"--set {_one_line(key)}: {_one_line(str(error))}") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys into nested dicts, creating intermediate objects (e.g. deepspeed.zero_optimization.stage)."""
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {_short(item)}: {_one_line('.'.join(parts[: depth + 1]))} is not an object")
            node = child
        node[parts[-1]] = value
    return raw


# --- one-line messages ------------------------------------------------------------------------------------------

_MAX_FAULTS = 10
"""A message lists this many faults at most (then `... (+N more)`)."""


def _one_line(text: str, limit: int = 200) -> str:
    """`text` with line breaks and other control characters escaped, cut to `limit` characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Repr(reprlib.Repr):
    """reprlib's bounded repr (a recipe value may be a megabyte of JSON, or nested deep), also for integers too long
    for repr()."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxstring, self.maxother = 3, 6, 6, 60, 60

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 200:
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)


_REPR = _Repr()


def _short(value: Any, limit: int = 80) -> str:
    """repr(value) on one line, cut to `limit` characters."""
    return _one_line(_REPR.repr(value), limit)


def _key_part(part: str | int) -> str:
    if isinstance(part, int):
        return str(part)
    return part if part.isidentifier() and len(part) <= 60 else _short(part, 60)


def _join_faults(faults: list[str]) -> str:
    shown = faults[:_MAX_FAULTS]
    if len(faults) > _MAX_FAULTS:
        shown.append(f"... (+{len(faults) - _MAX_FAULTS} more)")
    return "; ".join(shown)


def _format_validation_error(source: str, error: ValidationError) -> str:
    """`invalid config SOURCE: key: problem; key: problem`, one line."""
    faults = []
    for item in error.errors():
        key = ".".join(_key_part(part) for part in item["loc"])
        message = _one_line(item["msg"].removeprefix("Value error, "), 300)
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif "input" in item and item["type"] != "value_error":
            message = f"{message} (got {_short(item['input'])})"
        faults.append(f"{key}: {message}" if key else message)
    return f"invalid config {source}: {_join_faults(faults)}"


# --- structure checks -------------------------------------------------------------------------------------------


def _too_deep(value: Any, path: str) -> str | None:
    """The dotted key of the first container nested deeper than MAX_NESTING, or None. No recursion."""
    stack = [(value, path, 1)]
    while stack:
        node, where, depth = stack.pop()
        if isinstance(node, dict):
            children = ((f"{where}.{_key_part(k)}" if where else _key_part(k), v) for k, v in node.items())
        elif isinstance(node, list):
            children = ((f"{where}[{i}]", v) for i, v in enumerate(node))
        else:
            continue
        if depth > MAX_NESTING:
            return _one_line(where, 100) or "the top level"
        stack.extend((child, child_where, depth + 1) for child_where, child in children)
    return None


def _check_numbers(block: Any, path: str) -> None:
    """Every number in a free-form block (the `deepspeed` one) finite and within 64 bits; no recursion."""
    stack = [(block, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            stack.extend((v, f"{where}.{_key_part(k)}") for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(node))))
        elif isinstance(node, float) and not math.isfinite(node):
            raise ValueError(f"{where} must be a finite number, got {node}")
        elif isinstance(node, int) and not isinstance(node, bool) and not -_INT64 <= node < _INT64:
            raise ValueError(f"{where} must fit in 64 bits, got {_short(node)}")


PATH_KEYS = (
    ("data", "train_shards"),
    ("data", "train_images"),
    ("eval", "knn_train_shards"),
    ("eval", "knn_val_shards"),
    ("model", "init_backbone"),
)
"""Recipe keys that name inputs on disk (output_dir names an output: it is relative to the working directory)."""


def _is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def _pattern_exists(path: Path) -> bool:
    """Whether a shard path, glob or brace pattern points at something: the path itself, or the folder of its first
    wildcard segment."""
    text = str(path)
    cut = min((text.index(ch) for ch in "{*?[" if ch in text), default=None)
    if cut is None:
        return path.exists()
    return Path(text[:cut]).parent.is_dir()


def _resolve_recipe_paths(raw: dict[str, Any], recipe_dir: Path) -> None:
    """Make the recipe file's relative input paths absolute: a path is looked up in the working directory first,
    then beside the recipe file (so a recipe and its data can travel together, and the shipped recipes find the
    checkout's sample shards from any working directory). A path found in neither place is left as it is: the run
    checks every input before its first step and names the key. `--set` values are relative to the working
    directory only."""
    for section, key in PATH_KEYS:
        block = raw.get(section)
        value = block.get(key) if isinstance(block, dict) else None
        if not isinstance(value, str) or not value or _is_remote(value):
            continue
        path = Path(value).expanduser()
        if path.is_absolute():
            continue
        for base in (Path.cwd(), recipe_dir.resolve()):
            if _pattern_exists(base / path):
                block[key] = os.path.normpath(base / path)
                break


_DATA_SOURCES = ("train_shards", "train_images")


def _drop_replaced_data_source(raw: dict[str, Any], overrides: list[str]) -> None:
    """`--set data.train_images=DIR` on a recipe that names shards trains on DIR (and `--set data.train_shards=...`
    on one that names an image folder trains on the shards): the recipe's other data source is dropped. Both named in
    one recipe file, or both with --set, stay an error."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    given = {item.split("=", 1)[0].strip().removeprefix("data.") for item in overrides if "=" in item}
    for key, other in (_DATA_SOURCES, _DATA_SOURCES[::-1]):
        if key in given and other not in given:
            data.pop(other, None)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> TrainConfig:
    deep = _too_deep(raw, "")
    if deep is not None:
        raise ConfigError(f"invalid config {source}: {deep}: objects and lists nest deeper than {MAX_NESTING} levels")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(source, error)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a recipe, apply `--set` overrides, validate. Errors are one line naming the file and the key."""
    resolved = resolve_config_path(path)
    overrides = list(overrides or [])
    try:
        data = resolved.read_bytes()
    except OSError as error:
        raise ConfigError(f"config {resolved} cannot be read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config {resolved} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "save it as UTF-8 JSON"
        ) from None
    try:
        raw = json.loads(text)
    except RecursionError:
        raise ConfigError(
            f"config {resolved} is not valid JSON: objects and lists nest deeper than {MAX_NESTING} levels"
        ) from None
    except ValueError as error:  # JSONDecodeError, or an integer of more digits than Python converts
        raise ConfigError(f"config {resolved} is not valid JSON: {_one_line(str(error))}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config {resolved} must hold a JSON object at the top level, got {type(raw).__name__} {_short(raw, 40)}"
        )
    _resolve_recipe_paths(raw, resolved.parent)
    _drop_replaced_data_source(raw, overrides)
    try:
        raw = apply_overrides(raw, overrides)
    except ConfigError as error:
        raise ConfigError(f"config {resolved}: {error}") from None
    source = str(resolved) + (f" (with --set {' '.join(_one_line(o, 80) for o in overrides)})" if overrides else "")
    return config_from_dict(raw, source)


# --- what a resumed run may change ------------------------------------------------------------------------------

SHAPE_KEYS = (
    "model.arch",
    "model.timm_kwargs",
    "model.out_dim",
    "model.hidden_dim",
    "model.bottleneck_dim",
    "model.head_layers",
    "model.use_bn_in_head",
    "model.norm_last_layer",
    "optim.name",
)
"""Keys (and everything under them) that change the shape of the networks or of the optimizer state: a checkpoint
cannot continue under another value."""
RUN_CONTROL_KEYS = (
    "name",
    "output_dir",
    "max_steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "threads",
    "device",
    "backend",
    "skip_nonfinite_steps",
    "monitor",
    "eval",
    "data.num_workers",
    "data.max_skipped_fraction",
    "data.view_kernel",
    "model.compile",
    "model.compile_backend",
    "optim.implementation",
    "data.train_shards",
    "data.train_images",
    "deepspeed.zero_optimization",
    "deepspeed.activation_checkpointing",
    "deepspeed.wall_clock_breakdown",
    "deepspeed.steps_per_print",
    "model.grad_checkpointing",
)
"""Keys that change how the run is carried out, logged or evaluated, not what it computes (the data may move to
another place; the checkpoint's data position still counts samples of the same data set)."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class ConfigChanges:
    """How a resumed run's recipe differs from the one its run directory was started with: "key: old -> new" lines,
    in three kinds (see SHAPE_KEYS and RUN_CONTROL_KEYS; everything else is a hyperparameter)."""

    shape: list[str]
    hyperparameters: list[str]
    run_control: list[str]


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> ConfigChanges:
    """Compare two resolved recipes (TrainConfig.to_dict()) key by key."""
    old, new = _flatten(before), _flatten(after)
    # A key the earlier recipe predates counts as its default there: resuming an older run is no change.
    defaults = _flatten(TrainConfig.model_construct().model_dump(mode="json"))
    old = {**{key: value for key, value in defaults.items() if key not in old and key in new}, **old}
    kinds: dict[str, list[str]] = {"shape": [], "hyperparameters": [], "run_control": []}
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        line = f"{key}: {_short(old.get(key, '<unset>'), 60)} -> {_short(new.get(key, '<unset>'), 60)}"
        kind = "shape" if _under(key, SHAPE_KEYS) else "run_control" if _under(key, RUN_CONTROL_KEYS) else None
        kinds[kind or "hyperparameters"].append(line)
    return ConfigChanges(**kinds)
