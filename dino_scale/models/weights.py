"""Where backbone weights come from: one resolver for every source, and a strict loader into timm models.

Sources (auto-detected, see :func:`load_source`): a run directory (its latest checkpoint, else
``teacher_backbone.safetensors``), one of our checkpoint files or folders, a safetensors file of backbone weights
(detected by content, not suffix), an official facebookresearch/dino full checkpoint (``module.`` / ``backbone.`` /
``head.`` prefixes, ``args`` stored as argparse.Namespace), or an official backbone-only ``.pth`` (optionally under
``state_dict`` / ``model``, optionally prefixed). Nothing is unpickled beyond tensors and containers (dino_scale.io).

The size a source runs at by default is the size it was trained at (:func:`choose_image_size`, the one rule of every
command that takes a model), and :func:`load_backbone` is the Python API (``from dino_scale import load_backbone``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from timm.models import get_pretrained_cfg
from torch import nn

from dino_scale import run_dir as layout
from dino_scale.errors import CheckpointError, ConfigError, InputError, NotFound
from dino_scale.io import file_sha256, is_safetensors_file, load_safetensors, load_torch, safetensors_metadata
from dino_scale.models.backbones import (
    POS_EMBED_INTERPOLATION_ATTR,
    POS_EMBED_INTERPOLATIONS,
    create_backbone,
    is_vit_arch,
    official_layout_problem,
    official_pos_embed,
    patch_size_of,
)

log = logging.getLogger(__name__)

WHICH = ("teacher", "student")
# The safetensors metadata key under which a backbone records the size it was trained at (decimal string).
IMAGE_SIZE_METADATA_KEY = "image_size"
# facebookresearch/dino trains every released model on 224 px global crops.
OFFICIAL_DINO_IMAGE_SIZE = 224
# What timm builds a ViT for when nothing says otherwise; the last resort of trained_image_size.
DEFAULT_IMAGE_SIZE = 224
# Key prefixes added by wrappers rather than by the backbone itself: DistributedDataParallel ("module.") and
# torch.compile ("_orig_mod."). They can appear in either order, so they are stripped repeatedly.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys that belong to a DINOHead (projection MLP + weight-normed last layer), never to a backbone.
_DINO_HEAD_PREFIXES = ("head.mlp.", "head.last_layer.")
# Container keys under which state dicts are commonly nested in released checkpoints.
_NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict", "module")


# ----------------------------------------------------------------------------------------------------------
# Finding the backbone inside a checkpoint
# ----------------------------------------------------------------------------------------------------------


def _strip_wrapper_prefixes(key: str) -> str:
    while True:
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        else:
            return key


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_backbone(obj: Any, which: str, source: str) -> dict[str, torch.Tensor]:
    """Find the backbone state dict inside a loaded checkpoint object and normalise its keys to timm names."""
    if not isinstance(obj, Mapping):
        raise InputError(f"{source} holds a {type(obj).__qualname__}, not a checkpoint dict or state dict")
    state: Any = obj
    # (a)/(d): full training checkpoints (ours or official DINO) hold both networks.
    if not _is_state_dict(state) and ("teacher" in state or "student" in state):
        if which not in state or not isinstance(state[which], Mapping):
            present = [k for k in ("teacher", "student") if isinstance(state.get(k), Mapping)]
            raise InputError(f"{source} has no {which!r} state dict (it has: {present})")
        state = state[which]
    # (e): released weights are sometimes nested one or two levels deep.
    for _ in range(3):
        if _is_state_dict(state):
            break
        nested = next((k for k in _NESTED_STATE_KEYS if isinstance(state.get(k), Mapping)), None)
        if nested is None:
            break
        state = state[nested]

    tensors = {_strip_wrapper_prefixes(str(k)): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"No tensors found in {source}; top-level keys: {list(obj)[:10]}")

    if any(k.startswith("backbone.") for k in tensors):
        # Wrapper module (ours or DINO's MultiCropWrapper): keep backbone params only, drop "head.*" etc.
        tensors = {
            _strip_wrapper_prefixes(k[len("backbone.") :]): v for k, v in tensors.items() if k.startswith("backbone.")
        }
    else:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(_DINO_HEAD_PREFIXES)}
    if not tensors:
        raise InputError(f"No backbone weights found in {source}")
    return tensors


# ----------------------------------------------------------------------------------------------------------
# Resolving a source
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
    pos_embed_interpolation: str | None = None
    """The position-embedding interpolation the weights were trained with, where the source records it (our runs'
    ``model.pos_embed_interpolation``); None otherwise (official DINO releases, older runs)."""
    image_size: int | None = None
    """The input size (square, pixels) the weights were trained at, where the source records it: a run's or a
    checkpoint's ``data.global_crop_size``, the ``image_size`` metadata of a safetensors backbone, 224 for an official
    DINO checkpoint. None otherwise; :func:`trained_image_size` then falls back to the timm model's input size."""
    image_size_origin: str | None = None
    """Where ``image_size`` was read, for the line commands print (``data.global_crop_size in runs/x/config.json``)."""

    def sha256(self) -> str:
        return file_sha256(self.path)


@dataclass(frozen=True)
class ImageSize:
    """An input size (square, pixels) and where it came from; :meth:`describe` is the line every command that takes
    a model prints, so that the size a model runs at is never a silent default."""

    value: int
    origin: str

    def describe(self) -> str:
        return f"image size {self.value} ({self.origin})"


def _arch_from_config(config: Any) -> tuple[str | None, dict[str, Any]]:
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return None, {}
    return model.get("arch"), dict(model.get("timm_kwargs") or {})


def _interpolation_from_config(config: Any) -> str | None:
    model = config.get("model") if isinstance(config, dict) else None
    method = model.get("pos_embed_interpolation") if isinstance(model, dict) else None
    return method if method in POS_EMBED_INTERPOLATIONS else None


def _size_from_config(config: Any) -> int | None:
    """``data.global_crop_size`` of a run's config: the size of the global crops, the one the teacher saw."""
    data = config.get("data") if isinstance(config, dict) else None
    size = data.get("global_crop_size") if isinstance(data, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _size_from_run_config(run: Path) -> tuple[int | None, str | None]:
    """The trained size a run directory's config.json records, with where (None, None: it records none)."""
    config_file = run / layout.CONFIG_FILE
    try:
        size = _size_from_config(json.loads(config_file.read_text(encoding="utf-8")))
    except (OSError, ValueError):  # unreadable: the size falls back, the weights are still usable
        return None, None
    return (size, f"data.global_crop_size in {config_file}") if size else (None, None)


def _run_dir_of(path: Path) -> Path | None:
    """The run directory a file of a run belongs to (runs/x/teacher_backbone.safetensors,
    runs/x/checkpoints/step_N[.pt][/FILE]), or None."""
    if layout.is_run_dir(path.parent):
        return path.parent
    for parent in path.parents:
        if parent.name == layout.CHECKPOINT_SUBDIR:
            return parent.parent if layout.is_run_dir(parent.parent) else None
    return None


def _arch_from_official_args(args: Any) -> str | None:
    """An official DINO checkpoint stores argparse args: arch 'vit_small' + patch_size 16 -> timm's name."""
    arch, patch = getattr(args, "arch", None), getattr(args, "patch_size", None)
    if not isinstance(arch, str):
        return None
    if arch.startswith("vit_") and isinstance(patch, int):
        return f"{arch}_patch{patch}_224"
    return arch  # the official CNNs use torchvision names that timm shares (resnet50)


def _is_folder_checkpoint(path: Path) -> bool:
    return any((path / name).is_file() for name in (layout.TRAINER_STATE_FILE, layout.PORTABLE_STUDENT_FILE))


def _file_of_run(run: Path, which: str) -> Path:
    """The checkpoint (file or folder) of a run directory that holds the wanted backbone."""
    latest = layout.find_latest_checkpoint(run)
    if latest is not None:
        return latest
    if (run / layout.TEACHER_BACKBONE_FILE).is_file():
        if which != "teacher":
            raise InputError(
                f"Run directory {run} has no training checkpoint, only {layout.TEACHER_BACKBONE_FILE}; "
                f"the {which} backbone is not available"
            )
        return run / layout.TEACHER_BACKBONE_FILE
    raise NotFound(
        f"No checkpoint in run directory {run}: looked for {layout.CHECKPOINT_SUBDIR}/{layout.LATEST_FILE}, "
        f"{layout.CHECKPOINT_SUBDIR}/step_*.pt and {layout.TEACHER_BACKBONE_FILE}"
    )


def _check_against_manifest(path: Path) -> None:
    """A file of one of our checkpoints is checked against the checkpoint's manifest (size and sha256) before it is
    read, so damaged weights are never exported or evaluated. Checkpoints written before manifests pass."""
    if layout.STEP_NAME_RE.match(path.name):
        checkpoint, name = path, path.name
    elif layout.STEP_NAME_RE.match(path.parent.name):
        checkpoint, name = path.parent, path.name
    else:
        return
    entries, problem = layout.read_manifest(checkpoint)
    if entries is None and problem is None:
        return
    if problem is None and entries is not None:
        if name not in entries:
            problem = f"{layout.manifest_path(checkpoint)} does not list {name}"
        else:
            problem = layout.check_files(checkpoint, {name: entries[name]}) if checkpoint is path else None
            problem = problem or layout.check_hashes(checkpoint, entries, [name])
    if problem is not None:
        raise CheckpointError(f"{path} cannot be trusted: {problem}; use another checkpoint of the run")


def load_source(source: str | Path, which: str = "teacher") -> BackboneSource:
    """Read backbone weights (timm key names, head dropped) from any supported source, with the architecture where
    the source records it (a run's config.json, our checkpoint's config, safetensors metadata, official args).

    ``which`` ("teacher" or "student") selects the network in checkpoints that hold both.
    """
    if which not in WHICH:
        raise InputError(f"which must be 'teacher' or 'student', got {which!r}")
    path = Path(source)
    if not path.exists():
        raise NotFound(f"{path} does not exist")
    run_name = None
    arch: str | None = None
    timm_kwargs: dict[str, Any] = {}
    interpolation: str | None = None
    size: int | None = None
    size_origin: str | None = None
    if path.is_dir() and not _is_folder_checkpoint(path):  # a run directory
        if layout.is_run_dir(path):
            run_name = path.name
            config_file = path / layout.CONFIG_FILE
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
                arch, timm_kwargs = _arch_from_config(config)
                interpolation = _interpolation_from_config(config)
            except ValueError as error:
                raise InputError(f"{config_file} is not valid JSON: {error}") from None
            size, size_origin = _size_from_run_config(path)
        path = _file_of_run(path, which)
    if path.is_dir():  # a folder checkpoint of the sharded backends
        path = layout.folder_checkpoint_file(path, which)
    if run_name is None:
        run_name = layout.run_name_of_checkpoint(path)
    _check_against_manifest(path)

    if is_safetensors_file(path):
        metadata = safetensors_metadata(path)
        if which != "teacher":
            raise InputError(f"{path} holds a single backbone; the {which} is not available from it")
        arch = metadata.get("arch") or arch
        if metadata.get("timm_kwargs"):
            timm_kwargs = json.loads(metadata["timm_kwargs"])
        if metadata.get("pos_embed_interpolation") in POS_EMBED_INTERPOLATIONS:
            interpolation = metadata["pos_embed_interpolation"]
        recorded = metadata.get(IMAGE_SIZE_METADATA_KEY, "")
        if recorded.isdigit() and int(recorded) > 0:  # the file's own record wins over its run's config
            size, size_origin = int(recorded), f"{IMAGE_SIZE_METADATA_KEY} in the metadata of {path}"
        step = int(metadata["step"]) if metadata.get("step", "").isdigit() else None
        weights = select_backbone(load_safetensors(path), which, str(path))
        source = BackboneSource(path, weights, arch, timm_kwargs, which, run_name, step, interpolation)
        return _with_image_size(source, size, size_origin)

    obj = load_torch(path)
    step = None
    if isinstance(obj, Mapping):
        if "config" in obj:  # ours
            arch, timm_kwargs = _arch_from_config(obj["config"])
            interpolation = _interpolation_from_config(obj["config"]) or interpolation
            stored = _size_from_config(obj["config"])
            if size is None and stored is not None:
                size, size_origin = stored, f"data.global_crop_size in the config stored in {path}"
        elif "args" in obj:  # official DINO
            arch = _arch_from_official_args(obj["args"]) or arch
            # facebookresearch/dino trains every released model on 224 px global crops (its args do not say so).
            size = OFFICIAL_DINO_IMAGE_SIZE
            size_origin = f"every official DINO model is trained at {size}; {path} holds DINO's args"
        teacher_only = "teacher" not in obj and "student" not in obj and path.name == layout.TRAINER_STATE_FILE
        if teacher_only and which == "student":
            raise InputError(
                f"{path} holds the teacher only; the student is in {layout.PORTABLE_STUDENT_FILE} beside it"
            )
        step = obj.get("step") if isinstance(obj.get("step"), int) else None
    weights = select_backbone(obj, which, str(path))
    source = BackboneSource(path, weights, arch, timm_kwargs, which, run_name, step, interpolation)
    return _with_image_size(source, size, size_origin)


def _with_image_size(source: BackboneSource, size: int | None, origin: str | None) -> BackboneSource:
    """The source with its trained size: the one read so far, else the config.json of the run the file lies in."""
    if size is None:
        run = _run_dir_of(source.path)
        size, origin = _size_from_run_config(run) if run is not None else (None, None)
    source.image_size, source.image_size_origin = size, origin
    return source


# ----------------------------------------------------------------------------------------------------------
# The image size a model runs at
# ----------------------------------------------------------------------------------------------------------


def source_architecture(
    source: BackboneSource, arch: str | None = None, timm_kwargs: dict[str, Any] | None = None
) -> tuple[str | None, dict[str, Any]]:
    """The architecture a source is built as: ``arch`` / ``timm_kwargs`` override what the source records; the
    recorded timm_kwargs are dropped when ``arch`` names another architecture, since they belong to the recorded
    one."""
    if timm_kwargs is None:
        timm_kwargs = source.timm_kwargs if arch in (None, source.arch) else {}
    return arch or source.arch, dict(timm_kwargs)


def _timm_input_size(arch: str | None, timm_kwargs: Mapping[str, Any]) -> ImageSize:
    """The input size the timm model itself is built for: ``img_size`` in its kwargs, else timm's pretrained_cfg
    ``input_size`` of the arch, else 224 (what timm builds a ViT for when nothing says otherwise)."""
    nothing = "nothing records the size the model was trained at"
    img_size = timm_kwargs.get("img_size")
    if isinstance(img_size, (list, tuple)) and len(img_size) == 2 and img_size[0] == img_size[1]:
        img_size = img_size[0]
    if isinstance(img_size, int) and not isinstance(img_size, bool) and img_size > 0:
        return ImageSize(img_size, f"{nothing}; the timm model's input size: img_size in the timm_kwargs of {arch}")
    cfg = None
    if arch:
        try:
            cfg = get_pretrained_cfg(arch)
        except Exception:  # an arch timm does not know: building it names that
            cfg = None
    input_size = getattr(cfg, "input_size", None)
    if input_size:
        return ImageSize(int(input_size[-1]), f"{nothing}; the timm model's input size: timm's input_size of {arch}")
    return ImageSize(DEFAULT_IMAGE_SIZE, f"{nothing}, nor the timm model's input size; the default")


def trained_image_size(
    source: BackboneSource, arch: str | None = None, timm_kwargs: dict[str, Any] | None = None
) -> ImageSize:
    """The size the source's weights were trained at (see :attr:`BackboneSource.image_size`), else -- when the source
    records none -- the timm model's own input size (``img_size`` in the timm kwargs, as the recipes set it, else
    timm's ``input_size`` of the arch). ``arch`` / ``timm_kwargs`` as for :func:`build_backbone`."""
    if source.image_size is not None:
        return ImageSize(source.image_size, f"the size the model was trained at: {source.image_size_origin}")
    return _timm_input_size(*source_architecture(source, arch, timm_kwargs))


def choose_image_size(
    source: BackboneSource,
    requested: int | None = None,
    arch: str | None = None,
    timm_kwargs: dict[str, Any] | None = None,
    given_as: str = "--image-size",
) -> ImageSize:
    """The size a command runs a source at: ``requested`` where given (``given_as`` says how, for the printed
    line), else :func:`trained_image_size`. The one rule of every command that takes a model."""
    if requested is not None:
        return ImageSize(int(requested), f"as given: {given_as}")
    return trained_image_size(source, arch, timm_kwargs)


def extract_backbone_state_dict(source: str | Path, which: str = "teacher") -> dict[str, torch.Tensor]:
    """The backbone weights of any supported source (see :func:`load_source`): timm key names, head dropped."""
    return load_source(source, which).weights


# ----------------------------------------------------------------------------------------------------------
# Loading into a timm model
# ----------------------------------------------------------------------------------------------------------


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the model's classifier per timm's pretrained_cfg ("head" for ViT, "fc" for ResNet)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names or ())


def _maybe_resample_pos_embed(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    source: str,
    method: str,
) -> None:
    """Resample an absolute ``pos_embed`` trained at another resolution to the model's grid (in place), with
    ``method``: "official" (:func:`~dino_scale.models.backbones.official_pos_embed`, for the layouts the official
    ViT has; others fall back to timm with a warning) or "timm" (timm's resample_abs_pos_embed)."""
    if "pos_embed" not in state or "pos_embed" not in expected:
        return
    old, new = state["pos_embed"], expected["pos_embed"]
    if old.shape == new.shape or old.ndim != 3 or new.ndim != 3 or old.shape[-1] != new.shape[-1]:
        return  # same size, or a different architecture: leave it to the mismatch report
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        return
    num_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    old_side = math.isqrt(old.shape[1] - num_prefix) if old.shape[1] > num_prefix else 0
    if old_side * old_side != old.shape[1] - num_prefix or old_side == 0:
        return  # not a square grid with the same prefix tokens: cannot infer the old grid safely
    if method == "official":
        problem = official_layout_problem(model)
        if problem is not None:
            log.warning("%s: official pos_embed interpolation does not apply (%s); using timm's", source, problem)
            method = "timm"
    if method == "official":
        with torch.no_grad():
            state["pos_embed"] = official_pos_embed(old, int(grid[0]), int(grid[1]))
    else:
        state["pos_embed"] = resample_abs_pos_embed(
            old, new_size=list(grid), old_size=[old_side, old_side], num_prefix_tokens=num_prefix
        )
    log.info("Resampled pos_embed from %s (%s): grid %dx%d -> %dx%d", source, method, old_side, old_side, *grid)


def _format_keys(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_backbone_weights(
    backbone: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "<memory>",
    pos_embed_interpolation: str | None = None,
) -> None:
    """Strictly load backbone weights into a timm model, with a readable error on architecture mismatch.

    Tolerated differences: ``pos_embed`` of another image size is resampled to the model's grid with
    ``pos_embed_interpolation`` ("official" or "timm"); by default with the method the model itself runs (what
    create_backbone recorded on it, so that a model built at a fixed size gives what the dynamic model gives at that
    size; "timm" for models that create_backbone did not build);
    classifier weights (``head.*`` / ``fc.*``) in the source are ignored when the model has no classifier
    (num_classes=0); BatchNorm ``num_batches_tracked`` buffers may be absent (old torchvision weights).
    Anything else raises a ValueError naming ``source`` with up to 5 missing keys, 5 unexpected keys and
    the shape mismatches; the model is left untouched in that case.
    """
    method = pos_embed_interpolation or getattr(backbone, POS_EMBED_INTERPOLATION_ATTR, "timm")
    if method not in POS_EMBED_INTERPOLATIONS:
        raise ValueError(f"pos_embed_interpolation must be one of {POS_EMBED_INTERPOLATIONS}, got {method!r}")
    expected = backbone.state_dict()
    state = dict(state_dict)

    # A classifier in the file (torchvision resnet "fc", a timm "head") is not part of a headless backbone.
    for prefix in _classifier_prefixes(backbone):
        if not any(k.startswith(prefix) for k in expected):
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}

    _maybe_resample_pos_embed(backbone, state, expected, source, method)

    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [
            f"Checkpoint {source} does not match the model ({type(backbone).__name__}, "
            f"{len(expected)} tensors; checkpoint has {len(state)}). "
            "Is it a checkpoint of another architecture?"
        ]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:5]))
            if len(mismatched) > 5:
                lines[-1] += f"; ... (+{len(mismatched) - 5} more)"
        raise InputError("\n".join(lines))

    backbone.load_state_dict(state, strict=True)


def build_backbone(
    source: BackboneSource,
    image_size: int,
    arch: str | None = None,
    timm_kwargs: dict[str, Any] | None = None,
    pos_embed_interpolation: str | None = None,
) -> tuple[nn.Module, str, dict[str, Any]]:
    """The timm backbone at a fixed ``image_size`` (pos_embed resampled once), in eval mode, with the source's weights.

    ``arch`` / ``timm_kwargs`` override what the source records; the recorded timm_kwargs are dropped when
    ``arch`` names another architecture, since they belong to the recorded one. Returns (backbone, arch, kwargs).

    A ViT's stored position embeddings are resampled to the ``image_size`` grid once, here, with
    ``pos_embed_interpolation``: by default what the source records it was trained with, else "official", so that
    an official checkpoint gives at any image size the features the official code gives at that size. The resampled
    table is then a fixed part of the model (no interpolation runs in its forward or in an exported graph).
    """
    if image_size <= 0:
        raise InputError(f"image size must be positive, got {image_size}", argument="image_size")
    arch, kwargs = source_architecture(source, arch, timm_kwargs)
    if not arch:
        raise InputError(
            f"{source.path} does not record its architecture; name it (a timm name, e.g. vit_small_patch16_224)",
            argument="arch",
        )
    if is_vit_arch(arch):
        # A fixed grid: pos_embed is resampled once at load time, so the graph holds no interpolation.
        kwargs.update(img_size=image_size, dynamic_img_size=False)
    method = pos_embed_interpolation or source.pos_embed_interpolation or "official"
    if method not in POS_EMBED_INTERPOLATIONS:
        raise InputError(
            f"pos_embed_interpolation must be one of {', '.join(POS_EMBED_INTERPOLATIONS)}, got {method!r}",
            argument="pos_embed_interpolation",
        )
    try:
        backbone = create_backbone(arch, pos_embed_interpolation=method, **kwargs)
    except ConfigError as error:  # the kwargs at fault, already named
        error.argument = "timm_kwargs"
        raise
    except (TypeError, ValueError) as error:
        raise InputError(f"{arch} with timm kwargs {json.dumps(kwargs)}: {error}", argument="arch") from None
    patch = patch_size_of(backbone)
    if patch is not None and image_size % patch:
        raise InputError(
            f"{image_size} is not divisible by the patch size {patch} of {arch}; "
            f"use e.g. {max(patch, image_size // patch * patch)}",
            argument="image_size",
        )
    try:
        load_backbone_weights(backbone, source.weights, source=str(source.path))
    except ValueError as error:
        raise InputError(f"{error}\n  (architecture used: {arch} {json.dumps(kwargs)})") from None
    kwargs.pop("dynamic_img_size", None)
    return backbone.eval(), arch, kwargs


# ----------------------------------------------------------------------------------------------------------
# The Python API
# ----------------------------------------------------------------------------------------------------------

IMAGE_SIZE_ATTR = "dino_image_size"
"""The attribute on which :func:`load_backbone` records the input size the model runs at (and was built for)."""


def load_backbone(
    source: str | Path,
    which: str = "teacher",
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    *,
    arch: str | None = None,
    timm_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A trained backbone as a timm model, ready for inference: ``model(images)`` gives the pooled feature (a ViT's
    final-norm CLS token, a CNN's global average pool), ``[B, model.num_features]``.

    ``source``: a run directory, one of our checkpoints (a ``.pt`` file or a folder checkpoint), a safetensors
    backbone, or a facebookresearch/dino ``.pth`` (official backbone-only files record no architecture: pass
    ``arch``, e.g. ``"vit_small_patch16_224"``). ``which``: the teacher (default) or the student, where the source
    holds both. ``image_size``: the square input size; by default the size the model was trained at (see
    :func:`trained_image_size`). ``arch`` / ``timm_kwargs`` override what the source records.

    The weights are loaded strictly (every tensor must match, else an InputError names the source and the keys);
    a ViT is built for ``image_size`` with its position embeddings resampled once, as export and evaluation do.
    The model is in eval mode, on ``device``, never downloads anything, and carries its size: ``dino_image_size``
    (int), ``dino_image_size_origin`` (where it came from) and timm's ``pretrained_cfg``: ``input_size``
    ``(3, size, size)`` and DINO's evaluation preprocessing (ImageNet mean / std, bicubic, crop_pct 224/256), which
    timm's ``resolve_data_config`` reads.
    """
    loaded = load_source(source, which)
    size = choose_image_size(loaded, image_size, arch, timm_kwargs, given_as="image_size")
    backbone, _, _ = build_backbone(loaded, size.value, arch, timm_kwargs)
    setattr(backbone, IMAGE_SIZE_ATTR, size.value)
    backbone.dino_image_size_origin = size.origin
    config = dict(getattr(backbone, "pretrained_cfg", None) or {})
    # DINO's evaluation preprocessing, so that timm's resolve_data_config + create_transform reproduce it: resize the
    # shorter side to size * 256 / 224 (bicubic), centre crop, ImageNet mean / std (timm's ViT defaults are 0.5).
    config.update(
        input_size=(3, size.value, size.value),
        crop_pct=224 / 256,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    config.pop("test_input_size", None)  # a size the model was not built for
    backbone.pretrained_cfg = config
    return backbone.to(device)
