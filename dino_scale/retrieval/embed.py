"""The embedding pipeline behind `dino-scale index`, `search` and `eval`: images in, L2-normalised descriptors out.

* **Inputs** are listed items (dino_scale.data.items), decoded and centre-cropped in DataLoader workers
  (dino_scale.data.loaders.iterate_crops), batches in listing order.
* **Preprocessing** follows the model: the artifact's sidecar says the image size, whether the graph takes uint8
  NHWC (normalised inside) or float NCHW, and the mean/std for the latter. A run directory or checkpoint is run
  through PyTorch as an :class:`~dino_scale.export.graph.InferenceModel` with uint8 input, so the only copy of the
  normalisation constants is the one the model carries.
* **Descriptors**: ``cls``, or ``cls+gem``, the paper's copy-detection descriptor ``[cls ‖ GeM_4(patch tokens)]``.
  Optionally PCA-whitened, ``x ↦ Λ^{-1/2} Uᵀ (x − μ)`` (faiss ``PCAMatrix`` with eigen power −1/2), learned on a
  set the user names; always L2-normalised last, so that inner product is cosine similarity.
* **Unreadable images** (empty, truncated, not an image, too large) are skipped and reported with the reason,
  never a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from dino_scale.data.augment import normalize
from dino_scale.data.items import ImageItem, list_image_source
from dino_scale.data.loaders import iterate_crops
from dino_scale.devices import resolve_device
from dino_scale.errors import InputError, NotFound, blame
from dino_scale.export.graph import InferenceModel
from dino_scale.export.runtimes import AotiRunner, OnnxRuntimeRunner, Runner, TorchRunner, onnxruntime_providers
from dino_scale.export.sidecar import ARTIFACT_SUFFIXES, EXPORT_ROOT, artifact_image_size, load_sidecar
from dino_scale.export.tensorrt import TensorRTRunner
from dino_scale.models.weights import ImageSize, build_backbone, choose_image_size, load_source
from dino_scale.retrieval.vector_index import faiss_reason, write_faiss

log = logging.getLogger(__name__)

DESCRIPTORS = {"cls": ("cls",), "cls+gem": ("cls", "patch_gem")}


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
    image_size_origin: str = ""
    """Where ``image_size`` came from (the sidecar, the trained size, --image-size, an index's manifest)."""

    def size_line(self) -> str:
        """The line commands print: ``image size 64 (the size the model was trained at: ...)``."""
        return ImageSize(self.image_size, self.image_size_origin).describe()

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
        return normalize(crops, self.mean, self.std)

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
        raise NotFound(
            f"no exported model in {root}/; run `dino-scale export --format onnx` first, or name an artifact, a run "
            "directory or a checkpoint",
            argument="model",
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def _artifact_runner(path: Path, meta: dict[str, Any]) -> Runner:
    fmt = meta["format"]
    if fmt == "onnx":
        providers = onnxruntime_providers()
        provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in providers else "CPUExecutionProvider"
        return OnnxRuntimeRunner(path, provider)
    if fmt == "tensorrt":
        return TensorRTRunner(path, [o["name"] for o in meta["outputs"]])
    if fmt == "aoti":
        return AotiRunner(path, torch.device(meta["artifact"].get("device", "cpu")))
    raise InputError(f"{path}: unknown artifact format {fmt!r} in its sidecar")


def load_embedding_model(
    model: str | Path | None,
    image_size: int | ImageSize | None = None,
    outputs: Sequence[str] = ("cls",),
    which: str = "teacher",
    arch: str | None = None,
    device: str = "auto",
) -> EmbeddingModel:
    """An exported artifact (its sidecar says everything), or a run directory / checkpoint run through PyTorch.

    ``outputs`` are the model outputs the caller needs; an artifact exported without one of them is refused with
    the export command that adds it. ``image_size`` (a number given by the user, or an ImageSize that says where
    it came from) must agree with an artifact's; for PyTorch sources it defaults to the size the model was trained
    at (dino_scale.models.weights.choose_image_size). ``model=None`` picks the newest artifact in ``export/``.
    """
    path = Path(model) if model is not None else newest_artifact()
    if not path.exists():
        raise NotFound(f"{path} does not exist", argument="model")
    requested = image_size.value if isinstance(image_size, ImageSize) else image_size
    if path.is_file() and path.suffix in ARTIFACT_SUFFIXES:
        with blame("model"):
            meta = load_sidecar(path)
        have = [o["name"] for o in meta["outputs"]]
        missing = [o for o in outputs if o not in have]
        if missing:
            raise InputError(
                f"{path} has outputs {have} but this needs {list(outputs)}; re-export it with "
                f"`dino-scale export --outputs {','.join(dict.fromkeys([*have, *outputs]))}`",
                argument="model",
            )
        size = artifact_image_size(path, meta)
        if requested is not None and requested != size.value:
            origin = image_size.origin if isinstance(image_size, ImageSize) else "--image-size"
            raise InputError(
                f"image_size {requested} ({origin}) differs from the {size.value} that {path} was exported at",
                argument="image_size",
            )
        runner = _artifact_runner(path, meta)
        uint8 = meta["inputs"][0]["dtype"] == "uint8"
        pre = meta["preprocessing"]
        return EmbeddingModel(
            runner=_Select(runner, have, list(outputs)),
            path=path,
            kind=meta["format"],
            sha256=meta["artifact"]["sha256"],
            image_size=size.value,
            uint8_input=uint8,
            outputs=tuple(outputs),
            mean=tuple(pre["mean"]),
            std=tuple(pre["std"]),
            info={"arch": meta["model"]["arch"], "precision": meta["model"]["precision"], "runtime": runner.name},
            image_size_origin=size.origin,
        )
    with blame("model"):
        source = load_source(path, which)
    size = image_size if isinstance(image_size, ImageSize) else choose_image_size(source, image_size, arch)
    backbone, arch, _ = build_backbone(source, size.value, arch)
    runner = TorchRunner(InferenceModel(backbone, outputs, uint8_input=True), resolve_device(device))
    return EmbeddingModel(
        runner=runner,
        path=path,
        kind="pytorch",
        sha256=source.sha256(),
        image_size=size.value,
        uint8_input=True,
        outputs=tuple(outputs),
        info={"arch": arch, "which": which, "weights_file": str(source.path), "runtime": runner.name},
        image_size_origin=size.origin,
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
        raise InputError(f"descriptor must be one of {sorted(DESCRIPTORS)}, got {descriptor!r}", argument="descriptor")
    return DESCRIPTORS[descriptor]


def raw_descriptors(outputs: dict[str, torch.Tensor], descriptor: str) -> np.ndarray:
    """``cls``, or ``[cls ‖ gem]`` as in the paper's copy-detection evaluation; float32 [B, D], not normalised."""
    parts = [outputs[name] for name in check_descriptor(descriptor)]
    return torch.cat(parts, dim=1).numpy().astype(np.float32, copy=False)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class Whitening:
    """PCA whitening ``x ↦ Λ^{-1/2} Uᵀ (x − μ)`` (optionally to fewer dimensions), learned with faiss's PCAMatrix.

    ``path``: the file it was read from, if any (named in errors)."""

    def __init__(self, transform: Any, path: str | Path | None = None) -> None:
        self.transform = transform
        self.path = Path(path) if path is not None else None

    @classmethod
    def learn(cls, descriptors: np.ndarray, out_dim: int | None = None) -> Whitening:
        n, dim = descriptors.shape
        out_dim = out_dim or dim
        if not 0 < out_dim <= dim:
            raise InputError(f"whiten_dim must be in 1..{dim}, got {out_dim}", argument="whiten_dim")
        if n < out_dim + 1:
            raise InputError(
                f"whitening to {out_dim} dimensions needs more than {out_dim} images to learn from; got {n} "
                "(learn it on a larger set, or to fewer dimensions)"
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
        if descriptors.ndim != 2 or descriptors.shape[1] != self.in_dim:
            # faiss would stop on a bare `assert d == self.d_in`.
            raise InputError(
                f"{self.path or 'the whitening'} whitens {self.in_dim}-dimensional descriptors (expects shape "
                f"[n, {self.in_dim}]), but the model gives shape {list(descriptors.shape)}"
            )
        return self.transform.apply(np.ascontiguousarray(descriptors, dtype=np.float32))

    def save(self, path: str | Path) -> str:
        """Write the whitening atomically (a full disk: WriteFailed, nothing left behind); returns its sha256."""
        needed = 4 * self.in_dim * (self.out_dim + 2)  # the matrix, the mean, the bias (float32)
        return write_faiss(path, lambda writer: faiss.write_VectorTransform(self.transform, writer), needed=needed)

    @classmethod
    def load(cls, path: str | Path, in_dim: int | None = None, out_dim: int | None = None) -> Whitening:
        """Read a whitening written by :meth:`save`, checked: a trained PCA (``in_dim`` -> ``out_dim`` where given)
        with finite coefficients. Anything else is an InputError naming ``path``; nothing is unpickled (faiss reads
        its own format only)."""
        path = Path(path)
        if not path.is_file():
            raise NotFound(f"whitening file not found: {path}")
        try:
            transform = faiss.read_VectorTransform(str(path))
        except (RuntimeError, MemoryError) as error:
            raise InputError(f"{path} is not a readable whitening transform: {faiss_reason(error)}") from None
        if not isinstance(transform, faiss.PCAMatrix):
            raise InputError(f"{path} holds a faiss {type(transform).__name__}, not a PCA whitening (PCAMatrix)")
        found_in, found_out = int(transform.d_in), int(transform.d_out)
        expected = (in_dim or found_in, out_dim or found_out)
        if (found_in, found_out) != expected:
            raise InputError(
                f"{path} whitens {found_in} -> {found_out} dimensions (matrix shape [{found_out}, {found_in}]); "
                f"expected {expected[0]} -> {expected[1]} (shape [{expected[1]}, {expected[0]}])"
            )
        matrix, bias = faiss.vector_to_array(transform.A), faiss.vector_to_array(transform.b)
        if not transform.is_trained or matrix.size != found_in * found_out or bias.size not in (0, found_out):
            raise InputError(
                f"{path} is not a complete whitening: {matrix.size} matrix coefficients for "
                f"{found_out} x {found_in}, {bias.size} bias terms"
            )
        if not (np.isfinite(matrix).all() and np.isfinite(bias).all()):
            raise InputError(f"{path} has NaN or infinite coefficients")
        return cls(transform, path)


def finish_descriptors(raw: np.ndarray, whitening: Whitening | None) -> np.ndarray:
    """Whiten (if given), then L2-normalise: the vectors that are stored and searched."""
    return l2_normalise(whitening(raw) if whitening is not None else raw)


def learn_whitening(
    model: EmbeddingModel,
    source: str | Sequence[ImageItem],
    descriptor: str,
    out_dim: int | None = None,
    **loader: Any,
) -> tuple[Whitening, int, int]:
    """PCA whitening learned on the raw descriptors of the images named by ``source`` (a folder or shards, or the
    items already listed from one); returns it with the number of images it was learned on and the number skipped
    as unreadable. ``loader``: ``batch_size``, ``workers``, ``progress`` as for :func:`embed`."""
    items = list_image_source(source) if isinstance(source, str) else source
    raw, _, skipped = embed_all(model, items, descriptor, raw=True, **loader)
    return Whitening.learn(raw, out_dim), int(raw.shape[0]), len(skipped)


@dataclass
class EmbeddedBatch:
    """Descriptors of the readable items of one batch, in item order, and the items skipped with their reason."""

    indices: list[int]
    vectors: np.ndarray  # float32 [n, D], whitened if asked, L2-normalised
    info: list[dict[str, Any]]
    skipped: list[tuple[int, str]]


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
        raise InputError(f"none of the {len(items)} image(s) could be read ({len(skipped)} unreadable)")
    return np.concatenate(vectors), indices, skipped
