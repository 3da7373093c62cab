"""The embedding pipeline behind `dino-scale index`, `search` and `eval`: images in, L2-normalised descriptors out.

* **Inputs** are listed up front as :class:`ImageItem` s (an image file, or one sample of a local tar shard found by
  its byte offset), so that a map-style DataLoader can decode them in parallel workers while the batches still
  come out in listing order. A fixed order is what makes an interrupted `index` run resumable to exactly the
  result of an uninterrupted one.
* **Preprocessing** follows the model: the artifact's sidecar says the image size, whether the graph takes uint8
  NHWC (normalised inside) or float NCHW, and the mean/std for the latter. A run directory or checkpoint is run
  through PyTorch as an :class:`~dino_scale.inference.InferenceModel` with uint8 input, so the only copy of the
  normalisation constants is the one the model carries.
* **Descriptors**: ``cls``, or ``cls+gem``, the paper's copy-detection descriptor ``[cls ‖ GeM_4(patch tokens)]``.
  Optionally PCA-whitened, ``x ↦ Λ^{-1/2} Uᵀ (x − μ)`` (faiss ``PCAMatrix`` with eigen power −1/2), learned on a
  set the user names; always L2-normalised last, so that inner product is cosine similarity.
* **Unreadable images** (empty, truncated, not an image, too large) are skipped and reported with the reason,
  never a crash.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from dino_scale import checkpoint as ckpt
from dino_scale.augment import eval_crop
from dino_scale.data import CLASSES_FILE, IMAGE_EXTENSIONS, decode_image, expand_shards, is_remote
from dino_scale.inference import ExportInputError, InferenceModel, build_backbone, load_source
from dino_scale.runtimes import Runner, TorchRunner

log = logging.getLogger(__name__)

DESCRIPTORS = {"cls": ("cls",), "cls+gem": ("cls", "patch_gem")}
ARTIFACT_SUFFIXES = (".onnx", ".engine", ".pt2")
EXPORT_ROOT = Path("export")
DEFAULT_IMAGE_SIZE = 224


# ----------------------------------------------------------------------------------------------------------
# What to embed
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageItem:
    """One image to embed: a file, or ``size`` bytes at ``offset`` inside the tar shard ``path``.

    ``key`` identifies it across runs (the file path, or ``shard#sample key``); ``label`` is its class index
    where the source is labelled; ``copy_seed`` asks for a strong synthetic copy of the image instead of the image
    itself (copy-detection queries).
    """

    key: str
    path: str
    offset: int | None = None
    size: int | None = None
    label: int | None = None
    copy_seed: int | None = None

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset is None:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def list_image_files(root: str | Path) -> tuple[list[ImageItem], int]:
    """Every image file under ``root`` (recursive, hidden entries left out, sorted by relative path), as items
    keyed by absolute path; and the number of other files ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--images: {root} is not a directory")
    found: list[Path] = []
    ignored = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if _is_image_file(path):
                found.append(path)
            else:
                ignored += 1
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return [ImageItem(key=str(p.resolve()), path=str(p.resolve())) for p in found], ignored


def list_class_folder(root: str | Path) -> tuple[list[ImageItem], list[str]]:
    """An ImageFolder-style tree: each first-level subfolder is a class (sorted names, index = label)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class subfolders (expected ROOT/CLASS/IMAGE files)")
    items: list[ImageItem] = []
    for label, name in enumerate(classes):
        files, _ = list_image_files(root / name)
        items.extend(ImageItem(key=i.key, path=i.path, label=label) for i in files)
    return items, classes


def list_shard_items(pattern: str | Sequence[str]) -> list[ImageItem]:
    """The samples of local WebDataset shards, in shard order, each located by its image member's byte offset.

    Reading tar headers seeks over the data, so listing is cheap; the byte offsets then let DataLoader workers
    read any sample directly. Remote shards (``s3://``, ``pipe:``) cannot be read at an offset and are refused.
    """
    items: list[ImageItem] = []
    for url in expand_shards(pattern):
        if is_remote(url):
            raise ValueError(f"--shards: {url} is remote; indexing reads local shards only (copy them first)")
        path = os.path.abspath(url.removeprefix("file://"))  # keys must not depend on the working directory
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    prefix, ext = base_plus_ext(member.name)
                    if member.isreg() and prefix is not None:
                        members.setdefault(prefix, {})[ext.lower()] = member
                labels = {k: tar.extractfile(m["cls"]).read() for k, m in members.items() if "cls" in m}
        except (tarfile.TarError, OSError) as error:
            raise ValueError(f"--shards: cannot read the tar file {path}: {error}") from None
        for key, by_ext in members.items():
            image = next((by_ext[e] for e in IMAGE_EXTENSIONS if e in by_ext), None)
            if image is None:
                log.warning("%s: sample %s has no image member (%s); skipped", path, key, sorted(by_ext))
                continue
            label = int(labels[key].decode("ascii").strip()) if key in labels else None
            items.append(
                ImageItem(key=f"{path}#{key}", path=path, offset=image.offset_data, size=image.size, label=label)
            )
    return items


def shard_classes(pattern: str | Sequence[str]) -> list[str]:
    """The classes.json beside the first shard ([] when absent)."""
    first = Path(expand_shards(pattern)[0].removeprefix("file://"))
    path = first.parent / CLASSES_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def _is_image_folder(source: str) -> bool:
    """A folder of images (or of class folders), as opposed to shards: a folder of .tar files or a pattern."""
    path = Path(source)
    return path.is_dir() and not any(path.glob("*.tar"))


def list_labelled(source: str) -> tuple[list[ImageItem], list[str]]:
    """Labelled images for evaluation: a class-folder tree, or shards (a folder of .tar files or a pattern)."""
    if _is_image_folder(source):
        return list_class_folder(source)
    items = list_shard_items(source)
    unlabelled = [i.key for i in items if i.label is None]
    if unlabelled:
        raise ValueError(f"{source}: {len(unlabelled)} sample(s) have no 'cls' label, e.g. {unlabelled[0]}")
    return items, shard_classes(source)


def list_image_source(source: str) -> list[ImageItem]:
    """Images named by one string: a folder of image files, or shards (a folder of .tar files or a pattern)."""
    if _is_image_folder(source):
        return list_image_files(source)[0]
    return list_shard_items(source)


def list_images(images: str | None = None, shards: str | None = None) -> tuple[list[ImageItem], int]:
    """Items from ``--images DIR`` or ``--shards PATTERN`` (exactly one); and how many non-image files were ignored."""
    if (images is None) == (shards is None):
        raise ValueError("give exactly one of --images DIR and --shards PATTERN")
    if images is not None:
        return list_image_files(images)
    return list_shard_items(shards), 0


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


@dataclass
class EmbeddingModel:
    """A runner plus what its input needs. ``sha256`` identifies the weights (artifact file or checkpoint file)."""

    runner: Runner
    path: Path
    kind: str  # onnx | tensorrt | aoti | pytorch
    sha256: str
    image_size: int
    uint8_input: bool
    outputs: tuple[str, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path.resolve()),  # searches may run from another working directory
            "kind": self.kind,
            "sha256": self.sha256,
            "image_size": self.image_size,
            "outputs": list(self.outputs),
            **self.info,
        }

    def model_input(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 crops [B, 3, S, S] -> what the graph takes (uint8 NHWC, or normalised float NCHW)."""
        if self.uint8_input:
            return crops.permute(0, 2, 3, 1).contiguous()
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (crops.float() / 255.0 - mean) / std

    def __call__(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        results = self.runner(self.model_input(crops))
        return {name: r.float().cpu() for name, r in zip(self.outputs, results, strict=True)}


def newest_artifact(root: str | Path = EXPORT_ROOT) -> Path:
    """The most recently written exported artifact (one with a sidecar) under ``root``."""
    root = Path(root)
    found = [
        p
        for p in (root.iterdir() if root.is_dir() else [])
        if p.suffix in ARTIFACT_SUFFIXES and p.with_name(p.name + ".json").is_file()
    ]
    if not found:
        raise ExportInputError(
            f"no --model given and no exported model in {root}/; run `dino-scale export --format onnx` first, or "
            "pass --model ARTIFACT, RUN_DIR or CHECKPOINT"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def _artifact_runner(path: Path, meta: dict[str, Any]) -> Runner:
    fmt = meta["format"]
    if fmt == "onnx":
        from dino_scale.runtimes import OnnxRuntimeRunner, onnxruntime_providers

        providers = onnxruntime_providers()
        provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in providers else "CPUExecutionProvider"
        return OnnxRuntimeRunner(path, provider)
    if fmt == "tensorrt":
        from dino_scale.tensorrt_engine import TensorRTRunner

        return TensorRTRunner(path, [o["name"] for o in meta["outputs"]])
    if fmt == "aoti":
        from dino_scale.runtimes import AotiRunner

        return AotiRunner(path, torch.device(meta["artifact"].get("device", "cpu")))
    raise ExportInputError(f"{path}: unknown artifact format {fmt!r} in its sidecar")


def load_embedding_model(
    model: str | Path | None,
    image_size: int | None = None,
    outputs: Sequence[str] = ("cls",),
    which: str = "teacher",
    arch: str | None = None,
    device: str = "auto",
) -> EmbeddingModel:
    """An exported artifact (its sidecar says everything), or a run directory / checkpoint run through PyTorch.

    ``outputs`` are the model outputs the caller needs; an artifact exported without one of them is refused with
    the export command that adds it. ``image_size`` applies to PyTorch sources (default 224) and must agree with
    an artifact's. ``model=None`` picks the newest artifact in ``export/``.
    """
    path = Path(model) if model is not None else newest_artifact()
    if not path.exists():
        raise FileNotFoundError(f"--model: {path} does not exist")
    if path.is_file() and path.suffix in ARTIFACT_SUFFIXES:
        from dino_scale.export import load_sidecar

        meta = load_sidecar(path)
        have = [o["name"] for o in meta["outputs"]]
        missing = [o for o in outputs if o not in have]
        if missing:
            raise ExportInputError(
                f"--model {path} has outputs {have} but this needs {list(outputs)}; re-export it with "
                f"--outputs {','.join(dict.fromkeys([*have, *outputs]))}"
            )
        size = int(meta["model"]["image_size"])
        if image_size is not None and image_size != size:
            raise ExportInputError(f"--image-size {image_size} differs from the {size} that {path} was exported at")
        runner = _artifact_runner(path, meta)
        uint8 = meta["inputs"][0]["dtype"] == "uint8"
        pre = meta["preprocessing"]
        return EmbeddingModel(
            runner=_Select(runner, have, list(outputs)),
            path=path,
            kind=meta["format"],
            sha256=meta["artifact"]["sha256"],
            image_size=size,
            uint8_input=uint8,
            outputs=tuple(outputs),
            mean=tuple(pre["mean"]),
            std=tuple(pre["std"]),
            info={"arch": meta["model"]["arch"], "precision": meta["model"]["precision"], "runtime": runner.name},
        )
    size = image_size or DEFAULT_IMAGE_SIZE
    source = load_source(path, which)
    backbone, arch, _ = build_backbone(source, size, arch)
    from dino_scale.export import resolve_device

    runner = TorchRunner(InferenceModel(backbone, outputs, uint8_input=True), resolve_device(device))
    return EmbeddingModel(
        runner=runner,
        path=path,
        kind="pytorch",
        sha256=source.sha256(),
        image_size=size,
        uint8_input=True,
        outputs=tuple(outputs),
        info={"arch": arch, "which": which, "weights_file": str(source.path), "runtime": runner.name},
    )


class _Select:
    """Picks (and orders) the outputs a caller needs from a runner that returns the artifact's outputs."""

    def __init__(self, runner: Runner, have: Sequence[str], want: Sequence[str]) -> None:
        self.runner, self.name, self.device = runner, runner.name, runner.device
        self.positions = [list(have).index(name) for name in want]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        results = self.runner(images)
        return tuple(results[i] for i in self.positions)


# ----------------------------------------------------------------------------------------------------------
# Descriptors and whitening
# ----------------------------------------------------------------------------------------------------------


def check_descriptor(descriptor: str) -> tuple[str, ...]:
    """The model outputs a descriptor name needs."""
    if descriptor not in DESCRIPTORS:
        raise ValueError(f"--descriptor must be one of {sorted(DESCRIPTORS)}, got {descriptor!r}")
    return DESCRIPTORS[descriptor]


def raw_descriptors(outputs: dict[str, torch.Tensor], descriptor: str) -> np.ndarray:
    """``cls``, or ``[cls ‖ gem]`` as in the paper's copy-detection evaluation; float32 [B, D], not normalised."""
    parts = [outputs[name] for name in check_descriptor(descriptor)]
    return torch.cat(parts, dim=1).numpy().astype(np.float32, copy=False)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class Whitening:
    """PCA whitening ``x ↦ Λ^{-1/2} Uᵀ (x − μ)`` (optionally to fewer dimensions), learned with faiss's PCAMatrix."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    @classmethod
    def learn(cls, descriptors: np.ndarray, out_dim: int | None = None) -> Whitening:
        import faiss

        n, dim = descriptors.shape
        out_dim = out_dim or dim
        if not 0 < out_dim <= dim:
            raise ValueError(f"--whiten-dim must be in 1..{dim}, got {out_dim}")
        if n < out_dim + 1:
            raise ValueError(
                f"whitening to {out_dim} dimensions needs more than {out_dim} images to learn from; got {n} "
                "(name a larger --whiten-on set or lower --whiten-dim)"
            )
        pca = faiss.PCAMatrix(dim, out_dim, -0.5, False)
        pca.train(np.ascontiguousarray(descriptors, dtype=np.float32))
        return cls(pca)

    @property
    def in_dim(self) -> int:
        return int(self.transform.d_in)

    @property
    def out_dim(self) -> int:
        return int(self.transform.d_out)

    def __call__(self, descriptors: np.ndarray) -> np.ndarray:
        return self.transform.apply(np.ascontiguousarray(descriptors, dtype=np.float32))

    def save(self, path: str | Path) -> None:
        import faiss

        ckpt.atomic_write(path, lambda tmp: faiss.write_VectorTransform(self.transform, str(tmp)))

    @classmethod
    def load(cls, path: str | Path) -> Whitening:
        import faiss

        try:
            return cls(faiss.read_VectorTransform(str(path)))
        except RuntimeError as error:
            raise ValueError(f"{path} is not a readable whitening transform: {error}") from None


def finish_descriptors(raw: np.ndarray, whitening: Whitening | None) -> np.ndarray:
    """Whiten (if given), then L2-normalise: the vectors that are stored and searched."""
    return l2_normalise(whitening(raw) if whitening is not None else raw)


def learn_whitening(
    model: EmbeddingModel, source: str, descriptor: str, out_dim: int | None = None, **loader: Any
) -> tuple[Whitening, int, int]:
    """PCA whitening learned on the raw descriptors of the images named by ``source`` (a folder or shards);
    returns it with the number of images it was learned on and the number skipped as unreadable.
    ``loader``: ``batch_size``, ``workers``, ``progress`` as for :func:`embed`."""
    raw, _, skipped = embed_all(model, list_image_source(source), descriptor, raw=True, **loader)
    return Whitening.learn(raw, out_dim), int(raw.shape[0]), len(skipped)


# ----------------------------------------------------------------------------------------------------------
# Decoding in DataLoader workers
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Decoded:
    """What a worker returns per item: the uint8 crop (None if unreadable) and the item's file facts."""

    index: int
    crop: torch.Tensor | None
    info: dict[str, Any]


class _ImageDataset(Dataset):
    def __init__(self, items: Sequence[ImageItem], image_size: int, hash_files: bool) -> None:
        self.items = items
        self.crop = eval_crop(image_size)
        self.image_size = image_size
        self.hash_files = hash_files

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Decoded:
        item = self.items[index]
        info: dict[str, Any] = {}
        try:
            data = item.read()
            info["bytes"] = len(data)
            if self.hash_files:
                info["sha256"] = hashlib.sha256(data).hexdigest()
            # Big JPEGs decode at a reduced DCT scale (1/2..1/8: most of a photo's decode time). The draft keeps at
            # least twice the resize target, so the antialiased resize still does a real reduction, and images below
            # that decode in full, exactly as the training loader's k-NN evaluation does (same features).
            image = decode_image(data, draft_size=2 * int(self.image_size * 256 / 224))
            with Image.open(io.BytesIO(data)) as header:  # the stored size, not the draft-reduced one
                info["width"], info["height"] = header.size
            if item.copy_seed is not None:
                image, info["edits"] = _copy_of(image, item.copy_seed)
            return Decoded(index, self.crop(image), info)
        except Exception as error:  # any decode failure: the item is skipped and reported, never a crash
            info["error"] = f"{type(error).__name__}: {error}"
            return Decoded(index, None, info)


def _copy_of(image: Image.Image, seed: int) -> tuple[Image.Image, list[str]]:
    import random

    from dino_scale.copy_transforms import strong_copy

    copy, edits = strong_copy(image, random.Random(seed))
    return copy, [edit.name for edit in edits]


def _collate(batch: list[Decoded]) -> list[Decoded]:
    return batch


@dataclass
class EmbeddedBatch:
    """Descriptors of the readable items of one batch, in item order, and the items skipped with their reason."""

    indices: list[int]
    vectors: np.ndarray  # float32 [n, D], whitened if asked, L2-normalised
    info: list[dict[str, Any]]
    skipped: list[tuple[int, str]]


def default_workers() -> int:
    return min(8, max(1, (os.cpu_count() or 1) - 1))


@dataclass
class CropBatch:
    """One batch from the workers: uint8 crops [n, 3, S, S] of the readable items, their item indices and file
    facts, and the unreadable items with the reason."""

    indices: list[int]
    crops: torch.Tensor | None
    info: list[dict[str, Any]]
    skipped: list[tuple[int, str]]


def iterate_crops(
    items: Sequence[ImageItem],
    image_size: int,
    batch_size: int = 64,
    workers: int | None = None,
    hash_files: bool = False,
    progress: bool = True,
) -> Iterator[CropBatch]:
    """Decode, resize and centre-crop ``items`` in ``workers`` DataLoader processes; batches come in item order.

    A progress bar with images/s is shown on a terminal, and a log line every 30 s otherwise.
    """
    workers = default_workers() if workers is None else workers
    loader = DataLoader(
        _ImageDataset(items, image_size, hash_files),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers else None,
    )
    meter = RateMeter(len(items), enabled=progress)
    try:
        for batch in loader:
            good = [d for d in batch if d.crop is not None]
            skipped = [(d.index, d.info["error"]) for d in batch if d.crop is None]
            crops = torch.stack([d.crop for d in good]) if good else None
            meter.update(len(batch), len(skipped))
            yield CropBatch([d.index for d in good], crops, [d.info for d in good], skipped)
    finally:
        meter.close()


def embed(
    model: EmbeddingModel,
    items: Sequence[ImageItem],
    descriptor: str = "cls",
    whitening: Whitening | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    hash_files: bool = False,
    progress: bool = True,
    raw: bool = False,
) -> Iterator[EmbeddedBatch]:
    """Yield the descriptors of ``items`` batch by batch, in item order (decoding in DataLoader workers, the model
    in this process). ``raw=True`` yields unnormalised descriptors (to learn a whitening from)."""
    check_descriptor(descriptor)
    for batch in iterate_crops(items, model.image_size, batch_size, workers, hash_files, progress):
        vectors = np.zeros((0, 0), np.float32)
        if batch.crops is not None:
            vectors = raw_descriptors(model(batch.crops), descriptor)
            if not raw:
                vectors = finish_descriptors(vectors, whitening)
        yield EmbeddedBatch(batch.indices, vectors, batch.info, batch.skipped)


def embed_all(
    model: EmbeddingModel, items: Sequence[ImageItem], descriptor: str = "cls", **kwargs: Any
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """All descriptors at once: (vectors [n, D], indices of the embedded items, skipped (index, reason))."""
    vectors, indices, skipped = [], [], []
    for batch in embed(model, items, descriptor, **kwargs):
        if batch.indices:
            vectors.append(batch.vectors)
        indices.extend(batch.indices)
        skipped.extend(batch.skipped)
    if not vectors:
        raise ValueError(f"none of the {len(items)} image(s) could be read ({len(skipped)} unreadable)")
    return np.concatenate(vectors), indices, skipped


class RateMeter:
    """Images/s and ETA: a tqdm bar on a terminal, a log line every ``interval`` seconds otherwise."""

    def __init__(self, total: int, enabled: bool = True, interval: float = 30.0) -> None:
        self.total, self.done, self.skipped = total, 0, 0
        self.enabled, self.interval = enabled, interval
        self.start = self.last_log = time.monotonic()
        self.bar = (
            tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr)
            if enabled and sys.stderr.isatty()
            else None
        )

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, count: int, skipped: int = 0) -> None:
        self.done += count
        self.skipped += skipped
        if self.bar is not None:
            self.bar.update(count)
            if self.skipped:
                self.bar.set_postfix(skipped=self.skipped, refresh=False)
        elif self.enabled and time.monotonic() - self.last_log >= self.interval:
            self.last_log = time.monotonic()
            eta = (self.total - self.done) / self.rate if self.rate > 0 else float("inf")
            log.info(
                "%d/%d images, %.1f img/s, %d skipped, eta %.0f s", self.done, self.total, self.rate, self.skipped, eta
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = [
    "DESCRIPTORS",
    "EmbeddedBatch",
    "EmbeddingModel",
    "ImageItem",
    "RateMeter",
    "Whitening",
    "embed",
    "embed_all",
    "finish_descriptors",
    "learn_whitening",
    "list_class_folder",
    "list_image_files",
    "list_image_source",
    "list_images",
    "list_labelled",
    "list_shard_items",
    "load_embedding_model",
    "newest_artifact",
]
