"""The parity gate: an artifact runs in its own runtime and must reproduce the fp32 PyTorch model.

Per output and per row (image) ``a`` of the artifact against the reference ``r``:

* relative error ``‖a − r‖_∞ / ‖r‖_∞`` (fp32 artifacts: max over rows ≤ 1e-4),
* cosine similarity ``a·r / (‖a‖‖r‖)`` (fp16 / bf16 artifacts: min over rows ≥ 0.999).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dino_scale.data.augment import normalize
from dino_scale.data.items import ImageItem, list_image_files, list_shard_items
from dino_scale.data.loaders import iterate_crops
from dino_scale.data.shards import expand_shards
from dino_scale.errors import InputError, NotFound, ParityError
from dino_scale.export.graph import InferenceModel, example_input
from dino_scale.export.runtimes import Runner

MAX_RELATIVE_ERROR_FP32 = 1e-4
MIN_COSINE_REDUCED = 0.999
PARITY_IMAGES = 8  # real images in the gate (at most the largest batch)


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


def parity_inputs(
    model: InferenceModel, image_size: int, batches: Iterable[int], real: tuple[str, torch.Tensor] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """Random inputs at each batch size, plus the ``real`` images (label, batch; see :func:`real_images`)."""
    inputs = [(f"random b{b}", example_input(model.uint8_input, image_size, batch=b, seed=b)) for b in batches]
    if real is not None:
        inputs.append(real)
    return inputs


def _listed_items(source: Path, count: int) -> list[ImageItem]:
    """Up to ``count`` items of a folder of images, or of shards (a folder of .tar files, a pattern)."""
    if source.is_dir() and not any(source.glob("*.tar")):
        return list_image_files(source)[0][:count]
    items: list[ImageItem] = []
    for url in expand_shards(str(source)):  # one shard at a time: a long pattern is not listed in full for 8 images
        try:
            items += list_shard_items(url)[: count - len(items)]
        except InputError:  # nothing readable in this shard (already warned, naming it): try the next one
            continue
        if len(items) == count:
            break
    return items


def real_images(
    source: str | Path, image_size: int, count: int, as_uint8: bool, missing_ok: bool = False
) -> torch.Tensor | None:
    """The first readable ``count`` images of ``source`` (shards, or a folder of images), centre-cropped to
    ``image_size``: uint8 NHWC or normalised NCHW; None when none is readable. A source that does not exist is a
    NotFound, or None with ``missing_ok``."""
    try:
        items = _listed_items(Path(str(source)), count)
    except NotFound:
        if missing_ok:
            return None
        raise
    for batch in iterate_crops(items, image_size, batch_size=max(count, 1), workers=0, progress=False):
        if batch.crops is not None:
            return batch.crops.permute(0, 2, 3, 1).contiguous() if as_uint8 else normalize(batch.crops)
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
