"""Training images/s side by side, in one run on one machine: our trainer (data path in the workers, or on the
device) against an official-DINO-style training loop, with the same model, batch, images, threads and workers.

Variants, each measured two ways (see below):

(a) ``ours, workers``: ``python -m dino_scale.train`` with ``data.augment_on=workers`` (per-sample
    ``MultiCropAugmentation`` in the DataLoader workers, ``to_model_input`` in the training process);
(b) ``ours, device``: the same with ``data.augment_on=device`` (the workers decode and draw each sample's
    ``ViewParams``; ``render_batch`` renders the whole batch on the training device);
(c) ``official-style``: a loop written here from the DINO paper's description (not copied from
    facebookresearch/dino): a torch ``DataLoader`` over ``torchvision.datasets.ImageFolder`` of the same files with
    per-image PIL augmentation in the workers (``BaselineDINOAugmentation`` from augment_throughput.py: 2 global + N
    local crops, ToTensor + Normalize per crop), then per step, eagerly: teacher on the 2 global crops, student on all
    crops (the same ``build_student_teacher`` networks from the same config and seed), ``DINOLoss``, ``loss.item()``
    checked with ``math.isfinite``, backward, per-parameter gradient clipping the official way (a norm and a host
    read per parameter), the head's last-layer gradients dropped during the freeze epoch, ``torch.optim.AdamW`` with
    torch's default implementation over the same parameter groups and the same lr / wd schedule values, the teacher
    EMA as a Python loop over parameter pairs, the center update. fp32 on a CPU; fp16 autocast + GradScaler on CUDA.

Two kinds of figures per setup:

* ``data``: the data path alone, per CPU core (this process, ``torch.set_num_threads(1)``, JPEG bytes in memory,
  decode included): (a) decode as the loader's workers do (``loaders.decode_pixels``) + ``MultiCropAugmentation``
  (its ``view_kernel``: the recipe's ``data.view_kernel``, by default the fused C kernel) + stacking +
  ``to_model_input``; (b) that decode +
  ``sample_params`` (what the workers do), then ``render_batch`` and ``to_model_input``'s normalisation for the
  batch, on the CPU (what ``to_model_input`` does with a device-path batch); (c) PIL decode +
  ``BaselineDINOAugmentation`` + stacking. Rounds alternate (a, b, c, a, b, c, ...), each pipeline's figure is the
  median over rounds, as in augment_throughput.py.
* ``train``: end-to-end training images/s with the same threads (``--threads``, OMP_NUM_THREADS), DataLoader workers
  (``--workers``), batch and steps. Every variant runs in a subprocess of its own. (a) and (b) log every
  ``--log-every`` steps (default 5: between log steps our loop reads nothing back from the device, as in a real run;
  ``--log-every 1`` gives per-step figures), and the figure is the median of ``metrics.jsonl``'s ``images_per_s``
  over the log windows that start after the first ``--warmup`` steps. (c) times every step (wall time from the end
  of one step to the end of the next, data wait included, the first step including the workers' start-up; it reads
  the loss every step, as official DINO does), is cut into the same windows and summarised the same way.

Setups (``--setups``): ``demo`` (configs/demo.json: tiny ViT, 64 / 32 px, 2 + 6 crops, batch 32), ``vits-tiny``
(configs/vits16.json, i.e. ``vit_small_patch16_224`` with its 65536-prototype head, at 96 / 48 px crops, 2 + 8 crops,
batch 16: a step takes seconds on 2 CPU cores), ``vits16`` (the recipe's real 224 / 96 px crops, batch 64: for a GPU)
and ``tiny`` (configs/tiny-test.json, 32 / 16 px, for smoke tests). Every setup trains on ``--images`` synthetic
photo-like 500x375 JPEGs (augment_throughput.make_test_jpegs) written to a temporary folder: ours through
``data.train_images``, the official-style loop through ``ImageFolder``, so all three read the same files. One epoch
is made as long as the run (``data.samples_per_epoch`` = batch x steps; the images repeat as needed), so no epoch
boundary restarts a DataLoader mid-measurement; the head's last layer is therefore frozen (its gradients dropped)
in every measured step of every variant unless ``--set optim.freeze_last_layer=0``.

Precision (``--precision``): ``own`` (the default) runs each program as it trains by default on the device: (a) and (b)
in the recipe's precision (configs/vits16.json: bf16 autocast; demo.json and tiny-test.json: fp32), (c) as official
DINO does, fp16 autocast with loss scaling on CUDA and fp32 on a CPU (its autocast and scaler are CUDA-only).
``matched`` runs (a) and (b) in (c)'s precision, so that only the data path and the step's code differ. The table
names each figure's precision. ``--set deepspeed.torch_autocast=...`` changes (a) / (b) only.

``--set KEY=VALUE`` (repeatable) is passed to (a) and (b) last, so it wins (e.g. ``model.compile=true``,
``optim.implementation=fused``). The official-style loop builds its config from the same recipe and overrides, so
model shape and hyperparameters follow them; it always runs eager with torch's default AdamW.

Usage, CPU (this machine: 2 cores)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_throughput.py --setups demo,vits-tiny --threads 1 \\
        --workers 2 --steps 30 --warmup 5 --json train-throughput-cpu.json

Usage, one GPU (``--threads`` / ``--workers`` to the host's cores)::

    python benchmarks/train_throughput.py --device cuda --setups vits16 --batch 64 --steps 60 --warmup 20 \\
        --threads 4 --workers 10 --images 2048 --json train-throughput-vits16-gpu.json

``--print-commands`` prints the full list of CPU and GPU command lines (also written to the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_scale.io import atomic_write_json

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(HERE) not in sys.path:  # augment_throughput.py sits beside this file (also when loaded by a test)
    sys.path.insert(0, str(HERE))

from augment_throughput import (  # noqa: E402
    BaselineDINOAugmentation,
    _cpu_description,
    _stack_views,
    decode,
    make_test_jpegs,
)

VARIANTS = ("a_workers", "b_device", "c_official")
LABELS = {"a_workers": "(a) ours, workers", "b_device": "(b) ours, device path", "c_official": "(c) official-style"}
AUGMENT_ON = {"a_workers": "workers", "b_device": "device"}
PRECISIONS = ("own", "matched")
TAIL_LINES = 30
IMAGE_SUBDIR = Path("images") / "synthetic"  # ImageFolder wants a class folder; data.train_images searches down


# ----------------------------------------------------------------------------------------------------------------
# Setups and settings
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """A model + crop configuration: a recipe, the overrides that make the setup, and its default micro batch."""

    name: str
    recipe: str
    overrides: tuple[str, ...] = ()
    batch: int = 32
    description: str = ""


SETUPS: dict[str, Setup] = {
    "demo": Setup("demo", "demo.json", (), 32, "configs/demo.json: ViT 4 x 96 (patch 8), 64 / 32 px, 2 + 6 crops"),
    "vits-tiny": Setup(
        "vits-tiny",
        "vits16.json",
        ("data.global_crop_size=96", "data.local_crop_size=48", "data.local_crops_number=8"),
        16,
        "configs/vits16.json (vit_small_patch16_224, head 65536) at 96 / 48 px, 2 + 8 crops",
    ),
    "vits16": Setup(
        "vits16", "vits16.json", (), 64, "configs/vits16.json (vit_small_patch16_224, head 65536), 224 / 96 px, 2 + 8"
    ),
    "tiny": Setup("tiny", "tiny-test.json", (), 8, "configs/tiny-test.json: ViT 2 x 48, 32 / 16 px, 2 + 2 crops"),
}


@dataclass(frozen=True)
class Settings:
    steps: int = 30
    warmup: int = 5
    workers: int = 2
    threads: int = 1
    batch: int | None = None  # None: the setup's
    images: int = 256
    device: str = "cpu"
    precision: str = "own"  # one of PRECISIONS
    extra: tuple[str, ...] = ()
    log_every: int = 5
    data_seconds: float = 3.0
    data_rounds: int = 3
    train_rounds: int = 1
    only: str | None = None  # None, "data" or "train"
    timeout_s: float = 1800.0
    work_dir: Path | None = None
    quiet: bool = False

    def batch_for(self, setup: Setup) -> int:
        return self.batch if self.batch is not None else setup.batch


def resolve_recipe(recipe: str) -> str:
    """An existing path as it is (absolute), else the checkout's configs/<name> (what load_config also finds)."""
    path = Path(recipe)
    if path.is_file():
        return str(path.resolve())
    shipped = REPO_ROOT / "configs" / recipe
    return str(shipped) if shipped.is_file() else recipe


def official_precision(device: str) -> str:
    """How official DINO trains on ``device`` by default: fp16 autocast with loss scaling on CUDA; fp32 on a CPU, where
    its ``torch.cuda.amp`` autocast and scaler do nothing."""
    return "fp16 autocast" if device == "cuda" else "fp32"


def precision_overrides(device: str, precision: str) -> list[str]:
    """(a) / (b)'s precision items: none for ``own`` (the recipe's), ``matched``: :func:`official_precision`."""
    if precision == "own":
        return []
    off = '{"enabled": false}'
    autocast = '{"enabled": true, "dtype": "float16"}' if device == "cuda" else off
    return [f"deepspeed.bf16={off}", f"deepspeed.fp16={off}", f"deepspeed.torch_autocast={autocast}"]


def precision_label(cfg: Any) -> str:
    """A TrainConfig's forward precision in words: "fp32", "bf16 autocast", ..."""
    dtype = cfg.autocast_dtype
    return "fp32" if dtype is None else {"bfloat16": "bf16", "float16": "fp16"}[dtype] + " autocast"


def common_overrides(setup: Setup, settings: Settings, images_dir: Path) -> list[str]:
    """Overrides shared by all three variants: the setup's, data, batch (one process, no accumulation), epoch length
    = the run, logging every step, no checkpoint but the last, no k-NN, device."""
    batch = settings.batch_for(setup)
    return [
        *setup.overrides,
        f"data.train_images={images_dir}",
        f"data.samples_per_epoch={batch * settings.steps}",
        f"data.num_workers={settings.workers}",
        f"deepspeed.train_micro_batch_size_per_gpu={batch}",
        f"deepspeed.train_batch_size={batch}",
        "deepspeed.gradient_accumulation_steps=1",
        "backend=local",
        f"device={settings.device}",
        f"max_steps={settings.steps}",
        f"log_every={settings.log_every}",
        "checkpoint_every=1000000000",
        "eval.knn_train_shards=null",
        "eval.knn_val_shards=null",
    ]


def ours_overrides(setup: Setup, settings: Settings, images_dir: Path, augment_on: str) -> list[str]:
    """(a) / (b): the common overrides, the precision's, data.augment_on, then the user's --set items (last: they
    win)."""
    return [
        *common_overrides(setup, settings, images_dir),
        *precision_overrides(settings.device, settings.precision),
        f"data.augment_on={augment_on}",
        *settings.extra,
    ]


def ours_precision(setup: Setup, settings: Settings, images_dir: Path) -> str:
    """The precision (a) and (b) train in: the recipe's, after the overrides."""
    from dino_scale.config import load_config

    overrides = ours_overrides(setup, settings, images_dir, "workers")
    return precision_label(load_config(resolve_recipe(setup.recipe), overrides))


def setup_config(setup: Setup, settings: Settings, images_dir: Path) -> Any:
    """The TrainConfig all three variants share: recipe + setup + common overrides + the user's --set items (the
    official-style loop and the data-only figures read the model, crops and hyperparameters from it)."""
    from dino_scale.config import load_config

    return load_config(resolve_recipe(setup.recipe), [*common_overrides(setup, settings, images_dir), *settings.extra])


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}


def ours_command(
    setup: Setup, settings: Settings, images_dir: Path, run_dir: Path, augment_on: str, python: str = sys.executable
) -> list[str]:
    command = [python, "-m", "dino_scale.train", "--config", resolve_recipe(setup.recipe)]
    command += ["--output-dir", str(run_dir), "--threads", str(settings.threads)]
    for item in ours_overrides(setup, settings, images_dir, augment_on):
        command += ["--set", item]
    return command


def shell_line(command: Sequence[str], env: dict[str, str] | None = None) -> str:
    prefix = [f"{k}={shlex.quote(v)}" for k, v in sorted((env or {}).items()) if k != "PYTHONPATH"]
    return " ".join(prefix + [shlex.quote(str(part)) for part in command])


# ----------------------------------------------------------------------------------------------------------------
# The official-style pieces (written from the paper's / official code's described behaviour)
# ----------------------------------------------------------------------------------------------------------------


def baseline_augmentation(
    global_size: int,
    local_size: int,
    n_local: int,
    global_scale: Sequence[float] = (0.4, 1.0),
    local_scale: Sequence[float] = (0.05, 0.4),
) -> BaselineDINOAugmentation:
    """augment_throughput's official ``DataAugmentationDINO`` at other crop sizes / scales: its three pipelines'
    ``RandomResizedCrop`` (the first transform of each) set to the setup's sizes and scales."""
    from torchvision import transforms

    aug = BaselineDINOAugmentation(n_local=n_local)
    for pipeline, size, scale in (
        (aug.global1, global_size, global_scale),
        (aug.global2, global_size, global_scale),
        (aug.local, local_size, local_scale),
    ):
        crop = pipeline.transforms[0]
        if not isinstance(crop, transforms.RandomResizedCrop):
            raise TypeError(f"expected RandomResizedCrop first in BaselineDINOAugmentation, got {type(crop)}")
        crop.size = (int(size), int(size))
        crop.scale = (float(scale[0]), float(scale[1]))
    return aug


def clip_gradients_official(model: nn.Module, clip: float) -> list[float]:
    """Per-parameter clipping the official way: for each parameter with a gradient, its L2 norm (read to the host),
    ``clip_coef = clip / (norm + 1e-6)`` and, if ``clip_coef < 1`` (another host read), ``grad *= clip_coef``.
    Returns the norms before clipping, in parameter order."""
    norms: list[float] = []
    with torch.no_grad():
        for _name, parameter in model.named_parameters():
            if parameter.grad is None:
                continue
            norm = parameter.grad.norm(2)
            norms.append(norm.item())
            clip_coef = clip / (norm + 1e-6)
            if clip_coef < 1:
                parameter.grad.mul_(clip_coef)
    return norms


def cancel_last_layer_gradients(model: nn.Module) -> int:
    """During the freeze epoch the official code drops the head's last layer's gradients (``grad = None``), so the
    optimizer skips those parameters. Returns how many were dropped."""
    dropped = 0
    for name, parameter in model.named_parameters():
        if "last_layer" in name and parameter.grad is not None:
            parameter.grad = None
            dropped += 1
    return dropped


def ema_update_official(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """Teacher EMA as a Python loop over parameter pairs: ``t = m t + (1 - m) s``."""
    with torch.no_grad():
        for s, t in zip(student.parameters(), teacher.parameters(), strict=True):
            t.mul_(momentum).add_((1 - momentum) * s.detach())


@dataclass
class OfficialSpec:
    """Everything the official-style loop needs (also its subprocess's input, as JSON)."""

    recipe: str
    overrides: list[str]
    images_dir: str
    batch: int
    steps: int
    workers: int
    threads: int
    device: str = "cpu"


def run_official(spec: OfficialSpec) -> dict[str, Any]:
    """Train ``spec.steps`` steps with the official-style loop; returns per-step images/s and losses."""
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision.datasets import ImageFolder

    from dino_scale.config import load_config
    from dino_scale.models.dino import build_student_teacher
    from dino_scale.train.loss import DINOLoss
    from dino_scale.train.optim import parameter_groups
    from dino_scale.train.schedules import build_schedules

    torch.set_num_threads(spec.threads)
    cfg = load_config(spec.recipe, spec.overrides)
    device = torch.device(spec.device)
    cuda = device.type == "cuda"
    steps_per_epoch = (cfg.data.samples_per_epoch or spec.batch * spec.steps) // spec.batch
    schedules = build_schedules(cfg, steps_per_epoch, spec.batch)

    torch.manual_seed(cfg.seed)  # as our trainer: the same initial weights
    student, teacher = build_student_teacher(cfg.model)
    student, teacher = student.to(device), teacher.to(device)
    loss_fn = DINOLoss(cfg.model.out_dim, 2, cfg.dino.student_temp, cfg.dino.center_momentum).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(student), lr=0.0)  # torch's default implementation
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    clip = cfg.clip_grad

    aug = baseline_augmentation(
        cfg.data.global_crop_size,
        cfg.data.local_crop_size,
        cfg.data.local_crops_number,
        cfg.data.global_crops_scale,
        cfg.data.local_crops_scale,
    )
    dataset = ImageFolder(spec.images_dir, transform=aug)
    sampler = RandomSampler(dataset, num_samples=spec.batch * spec.steps, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(
        dataset, sampler=sampler, batch_size=spec.batch, num_workers=spec.workers, pin_memory=cuda, drop_last=True
    )

    step_seconds: list[float] = []
    losses: list[float] = []
    window_start = time.monotonic()  # as our metrics: the first step includes the workers' start-up
    for it, (views, _labels) in enumerate(loader):
        if it >= spec.steps:
            break
        epoch = it / steps_per_epoch
        for group in optimizer.param_groups:
            group["lr"] = float(schedules.lr[it])
            group["weight_decay"] = float(schedules.weight_decay[it]) if group.get("apply_weight_decay", True) else 0.0
        views = [v.to(device, non_blocking=True) for v in views]
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            teacher_output = teacher(views[:2])  # the teacher sees the two global crops only
            student_output = student(views)
            loss, _stats = loss_fn(student_output, teacher_output, float(schedules.teacher_temp[it]))
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"official-style loop: loss is {loss_value} at step {it}, stopping training")

        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            if clip:
                clip_gradients_official(student, clip)
            if epoch < cfg.optim.freeze_last_layer:
                cancel_last_layer_gradients(student)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(optimizer)  # clip the true gradients
                clip_gradients_official(student, clip)
            if epoch < cfg.optim.freeze_last_layer:
                cancel_last_layer_gradients(student)
            scaler.step(optimizer)
            scaler.update()

        ema_update_official(student, teacher, float(schedules.momentum[it]))
        loss_fn.update_center()
        if cuda:
            torch.cuda.synchronize()
        now = time.monotonic()
        step_seconds.append(now - window_start)
        losses.append(loss_value)
        window_start = now
    if len(step_seconds) < spec.steps:
        raise RuntimeError(f"official-style loop: the loader gave {len(step_seconds)} batches, {spec.steps} wanted")
    return {"step_seconds": step_seconds, "loss": losses, "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------------------
# Running the variants
# ----------------------------------------------------------------------------------------------------------------


def metrics_windows(metrics_path: Path) -> list[dict[str, Any]]:
    """The step records of a metrics.jsonl as log windows: ``step`` (the window's last step), ``steps`` (since the
    previous record) and ``images_per_s`` (over the window, as the trainer logged it). Events are skipped."""
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} does not exist (the run logged no step)")
    windows, previous = [], 0
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if isinstance(record, dict) and "event" not in record and "images_per_s" in record:
            step = int(record["step"])
            windows.append({"step": step, "steps": step - previous, "images_per_s": float(record["images_per_s"])})
            previous = step
    return windows


def step_windows(step_seconds: Sequence[float], batch: int, log_every: int) -> list[dict[str, Any]]:
    """Per-step wall times cut into the windows our trainer logs (ending at multiples of ``log_every`` and at the
    last step), each with its images/s, so that (c) is summarised exactly as (a) and (b)."""
    windows, start = [], 0
    for end in range(1, len(step_seconds) + 1):
        if end % log_every == 0 or end == len(step_seconds):
            seconds = sum(step_seconds[start:end])
            windows.append(
                {"step": end, "steps": end - start, "images_per_s": (end - start) * batch / max(seconds, 1e-9)}
            )
            start = end
    return windows


def summarize_windows(windows: Sequence[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """The median images/s of the log windows that start after the first ``warmup`` steps (a window that holds any
    warm-up step is left out)."""
    kept = [w for w in windows if w["step"] - w["steps"] >= warmup]
    if not kept:
        raise ValueError(
            f"{len(windows)} log window(s) up to step {windows[-1]['step'] if windows else 0}, none starting after "
            f"the {warmup} warm-up step(s); run more --steps or lower --warmup / --log-every"
        )
    rates = [w["images_per_s"] for w in kept]
    return {
        "img_per_s": statistics.median(rates),
        "windows_measured": len(kept),
        "steps_measured": sum(w["steps"] for w in kept),
        "min": min(rates),
        "max": max(rates),
    }


def _run_process(command: Sequence[str], env: dict[str, str], cwd: Path, timeout_s: float) -> tuple[int, list[str]]:
    full_env = {**os.environ, **env}
    try:
        done = subprocess.run(
            list(command), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"") + (error.stderr or b"")
        text = output.decode(errors="replace") if isinstance(output, bytes) else output
        return -1, [f"timed out after {timeout_s:.0f} s", *text.splitlines()[-TAIL_LINES:]]
    return done.returncode, (done.stdout + done.stderr).splitlines()[-TAIL_LINES:]


def run_ours(setup: Setup, settings: Settings, images_dir: Path, work_dir: Path, variant: str) -> dict[str, Any]:
    """(a) or (b) in a subprocess; images/s of its metrics.jsonl's log windows after the warm-up steps."""
    run_dir = work_dir / f"run-{setup.name}-{variant}-{time.monotonic_ns()}"
    command = ours_command(setup, settings, images_dir, run_dir, AUGMENT_ON[variant])
    env = thread_env(settings.threads)
    result: dict[str, Any] = {"command": shell_line(command, env)}
    started = time.monotonic()
    code, tail = _run_process(command, env, work_dir, settings.timeout_s)
    result["wall_s"] = time.monotonic() - started
    if code != 0:
        return {**result, "status": "failed", "error": f"exit status {code}", "output_tail": tail}
    try:
        windows = metrics_windows(run_dir / "metrics.jsonl")
        summary = summarize_windows(windows, settings.warmup)
    except (OSError, ValueError) as error:
        return {**result, "status": "failed", "error": str(error), "output_tail": tail}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {**result, "status": "ok", "windows": windows, **summary}


def official_spec(setup: Setup, settings: Settings, images_dir: Path) -> OfficialSpec:
    return OfficialSpec(
        recipe=resolve_recipe(setup.recipe),
        overrides=[*common_overrides(setup, settings, images_dir), *settings.extra],
        images_dir=str(images_dir),
        batch=settings.batch_for(setup),
        steps=settings.steps,
        workers=settings.workers,
        threads=settings.threads,
        device=settings.device,
    )


def run_official_subprocess(setup: Setup, settings: Settings, images_dir: Path, work_dir: Path) -> dict[str, Any]:
    """(c) in a subprocess of its own (this script with ``--official-worker SPEC``)."""
    tag = time.monotonic_ns()
    spec_path, out_path = work_dir / f"official-{tag}.json", work_dir / f"official-{tag}-out.json"
    spec = asdict(official_spec(setup, settings, images_dir))
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    command = [sys.executable, str(Path(__file__).resolve()), "--official-worker", str(spec_path), str(out_path)]
    env = thread_env(settings.threads)
    result: dict[str, Any] = {"command": shell_line(command, env), "spec": spec}
    started = time.monotonic()
    code, tail = _run_process(command, env, work_dir, settings.timeout_s)
    result["wall_s"] = time.monotonic() - started
    if code != 0:
        return {**result, "status": "failed", "error": f"exit status {code}", "output_tail": tail}
    try:
        out = json.loads(out_path.read_text(encoding="utf-8"))
        windows = step_windows(out["step_seconds"], settings.batch_for(setup), settings.log_every)
        summary = summarize_windows(windows, settings.warmup)
    except (OSError, ValueError, KeyError) as error:
        return {**result, "status": "failed", "error": str(error), "output_tail": tail}
    result.update(status="ok", windows=windows, step_seconds=out["step_seconds"], loss=out["loss"])
    return {**result, **summary}


def combine_rounds(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several rounds of one variant: the median of the rounds' medians (failed rounds reported, not counted)."""
    good = [r for r in rounds if r.get("status") == "ok"]
    out: dict[str, Any] = {"status": "ok" if good else "failed", "rounds": list(rounds)}
    if good:
        out["img_per_s"] = statistics.median(r["img_per_s"] for r in good)
    else:
        out["img_per_s"] = None
        out["error"] = rounds[-1].get("error") if rounds else "not run"
    return out


def measure_train(setup: Setup, settings: Settings, images_dir: Path, work_dir: Path) -> dict[str, Any]:
    """End-to-end images/s of the three variants, ``settings.train_rounds`` rounds of a, b, c in turn."""
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "a_workers": lambda: run_ours(setup, settings, images_dir, work_dir, "a_workers"),
        "b_device": lambda: run_ours(setup, settings, images_dir, work_dir, "b_device"),
        "c_official": lambda: run_official_subprocess(setup, settings, images_dir, work_dir),
    }
    rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for r in range(settings.train_rounds):
        for variant in VARIANTS:
            result = runners[variant]()
            rounds[variant].append(result)
            _say(
                settings,
                f"  train {setup.name} round {r + 1} {LABELS[variant]}: "
                + (
                    f"{result['img_per_s']:.1f} img/s (median of {result['windows_measured']} window(s), "
                    f"{result['steps_measured']} steps)"
                    if result.get("status") == "ok"
                    else f"FAILED: {result.get('error')}"
                ),
            )
    return {v: combine_rounds(rounds[v]) for v in VARIANTS}


# ----------------------------------------------------------------------------------------------------------------
# Data path only, per CPU core
# ----------------------------------------------------------------------------------------------------------------


def data_pipelines(cfg: Any) -> dict[str, Callable[[Sequence[bytes]], None]]:
    """One function per variant that turns a batch of JPEG byte strings into the model's normalised float input."""
    from dino_scale.data.augment import image_source
    from dino_scale.data.device_augment import render_batch
    from dino_scale.data.loaders import decode_pixels
    from dino_scale.train.loop import make_augmentation

    ours = make_augmentation(cfg)
    official = baseline_augmentation(
        cfg.data.global_crop_size,
        cfg.data.local_crop_size,
        cfg.data.local_crops_number,
        cfg.data.global_crops_scale,
        cfg.data.local_crops_scale,
    )
    counter = [0]

    def generator() -> torch.Generator:
        counter[0] += 1
        return torch.Generator().manual_seed(counter[0])  # the loader seeds one generator per sample too

    def workers_path(jpegs: Sequence[bytes]) -> None:
        samples = [ours(decode_pixels(data), generator()) for data in jpegs]  # as the loader's workers
        ours.to_model_input(_stack_views(samples), "cpu")

    def device_path(jpegs: Sequence[bytes]) -> None:
        images, params = [], []
        for data in jpegs:  # what the workers do with data.augment_on=device
            src = image_source(decode_pixels(data))
            params.append(ours.sample_params(*src.shape[-2:], generator()))
            images.append(src[0].contiguous())
        # What to_model_input does with such a batch: render_batch on the device (here the CPU), then normalise.
        ours.to_model_input(render_batch(images, params, "cpu"), "cpu")

    def official_path(jpegs: Sequence[bytes]) -> None:
        _stack_views([official(decode(data)) for data in jpegs])

    return {"a_workers": workers_path, "b_device": device_path, "c_official": official_path}


def time_batches(
    process: Callable[[Sequence[bytes]], None], jpegs: Sequence[bytes], batch: int, seconds: float
) -> float:
    """Process whole batches (cycling through ``jpegs``) until ``seconds`` have passed; returns images/s."""
    done, i, start = 0, 0, time.perf_counter()
    while True:
        process([jpegs[(i + k) % len(jpegs)] for k in range(batch)])
        i += batch
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def measure_data(setup: Setup, settings: Settings, jpegs: Sequence[bytes], images_dir: Path) -> dict[str, Any]:
    """Data-path images/s per CPU core of the three variants: alternating rounds, medians."""
    cfg = setup_config(setup, settings, images_dir)
    batch = settings.batch_for(setup)
    pipelines = data_pipelines(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for process in pipelines.values():  # warm-up outside the timed rounds
            time_batches(process, jpegs, batch, 0.0)
        rounds: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(settings.data_rounds):
            for variant in VARIANTS:
                rounds[variant].append(time_batches(pipelines[variant], jpegs, batch, settings.data_seconds))
            _say(
                settings,
                f"  data {setup.name} round {r + 1}: "
                + "   ".join(f"{LABELS[v]} {rounds[v][-1]:.1f}" for v in VARIANTS)
                + " img/s",
            )
    finally:
        torch.set_num_threads(threads)
    return {v: {"status": "ok", "img_per_s": statistics.median(rounds[v]), "rounds": rounds[v]} for v in VARIANTS}


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def add_ratios(figures: dict[str, Any]) -> dict[str, Any]:
    """(a)/(c) and (b)/(c) of one kind's figures."""
    c = figures["c_official"].get("img_per_s")
    figures["ratio_a_c"] = ratio(figures["a_workers"].get("img_per_s"), c)
    figures["ratio_b_c"] = ratio(figures["b_device"].get("img_per_s"), c)
    return figures


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(setups: dict[str, dict[str, Any]]) -> str:
    """| setup | kind | crops | precision | (a) | (b) | (c) | (a)/(c) | (b)/(c) | from the report's per-setup figures
    (the precision of the training rows: (a) and (b)'s / (c)'s)."""
    header = [
        "setup",
        "what",
        "crops / batch",
        "precision: ours / official",
        "(a) ours, workers img/s",
        "(b) ours, device img/s",
        "(c) official-style img/s",
        "(a)/(c)",
        "(b)/(c)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    kinds = (("data", "data path, 1 core"), ("train", "training, end to end"))
    for name, entry in setups.items():
        for kind, label in kinds:
            figures = entry.get(kind)
            if not figures:
                continue
            precision = entry.get("precision") if kind == "train" else None
            row = [
                name,
                label,
                entry.get("shape", ""),
                f"{precision['ours']} / {precision['official']}" if precision else "-",
                *(_cell(figures[v].get("img_per_s"), ".1f") for v in VARIANTS),
                _cell(figures.get("ratio_a_c"), ".2f") + ("x" if figures.get("ratio_a_c") is not None else ""),
                _cell(figures.get("ratio_b_c"), ".2f") + ("x" if figures.get("ratio_b_c") is not None else ""),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def machine_info(device: str) -> dict[str, Any]:
    import PIL
    import torchvision

    info: dict[str, Any] = {
        "cpu": _cpu_description(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe_machine(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU used"
    return (
        f"{info['cpu']} ({info['cores_usable']} usable){gpu}; Python {info['python']}, torch {info['torch']}, "
        f"torchvision {info['torchvision']}, Pillow {info['pillow']}"
    )


def example_commands() -> dict[str, list[str]]:
    """The command lines to run: CPU (2 cores) and one GPU."""
    script = "benchmarks/train_throughput.py"
    cpu_base = f"OMP_NUM_THREADS=1 .venv/bin/python {script} --setups demo,vits-tiny --threads 1 --workers 2 "
    cpu_base += "--steps 30 --warmup 5"
    cpu = [
        f"{cpu_base} --json train-throughput-cpu.json",
        f"{cpu_base} --only train --precision matched --json train-throughput-cpu-matched.json",
    ]
    gpu_base = f"python {script} --device cuda --setups vits16 --batch 64 --steps 60 --warmup 20 --threads 4 "
    gpu_base += "--workers 10 --images 2048"
    gpu = [
        f"{gpu_base} --json train-throughput-vits16-gpu.json",
        f"{gpu_base} --only train --set model.compile=true --set optim.implementation=fused "
        "--json train-throughput-vits16-gpu-compiled.json",
        f"python {script} --device cuda --setups demo,vits-tiny --steps 60 --warmup 20 --threads 4 --workers 10 "
        "--only train --json train-throughput-small-gpu.json",
    ]
    return {"cpu": cpu, "gpu": gpu}


def setup_shape(setup: Setup, settings: Settings, images_dir: Path) -> str:
    d = setup_config(setup, settings, images_dir).data
    return f"{d.global_crop_size}/{d.local_crop_size} px, 2+{d.local_crops_number}, batch {settings.batch_for(setup)}"


def _say(settings: Settings, text: str) -> None:
    if not settings.quiet:
        print(text, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------


def write_images(jpegs: Iterable[bytes], root: Path) -> Path:
    """The JPEGs as files under ``root/images/synthetic``; returns ``root/images`` (the folder all variants read)."""
    folder = root / IMAGE_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(jpegs):
        (folder / f"{index:06d}.jpg").write_bytes(data)
    return root / IMAGE_SUBDIR.parts[0]


def run_benchmark(setups: Sequence[Setup], settings: Settings) -> dict[str, Any]:
    """Both kinds of figures for every setup (``settings.only`` limits to one kind); returns the report."""
    temporary = settings.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="dino-train-throughput-")) if temporary else Path(settings.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(settings.device)
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info,
        "machine_description": describe_machine(info),
        "load_average_1min_before": os.getloadavg()[0],
        "settings": {**asdict(settings), "work_dir": str(settings.work_dir) if settings.work_dir else None},
        "commands": example_commands(),
        "setups": {},
    }
    try:
        jpegs = make_test_jpegs(settings.images)
        images_dir = write_images(jpegs, work_dir)
        _say(settings, f"{len(jpegs)} synthetic 500x375 JPEGs in {images_dir}; {report['machine_description']}")
        for setup in setups:
            entry: dict[str, Any] = {
                "recipe": setup.recipe,
                "setup_overrides": list(setup.overrides),
                "description": setup.description,
                "batch": settings.batch_for(setup),
                "shape": setup_shape(setup, settings, images_dir),
            }
            _say(settings, f"setup {setup.name}: {setup.description}; {entry['shape']}")
            if settings.only in (None, "data"):
                entry["data"] = add_ratios(measure_data(setup, settings, jpegs, images_dir))
            if settings.only in (None, "train"):
                entry["precision"] = {
                    "ours": ours_precision(setup, settings, images_dir),
                    "official": official_precision(settings.device),
                }
                entry["train"] = add_ratios(measure_train(setup, settings, images_dir, work_dir))
                entry["train_commands"] = {v: [r["command"] for r in entry["train"][v]["rounds"]][:1] for v in VARIANTS}
            report["setups"][setup.name] = entry
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    report["load_average_1min_after"] = os.getloadavg()[0]
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["table"] = markdown_table(report["setups"])
    return report


def failure_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for name, entry in report["setups"].items():
        for variant in VARIANTS:
            for r in entry.get("train", {}).get(variant, {}).get("rounds", []):
                if r.get("status") != "ok":
                    lines.append(f"--- {name} {LABELS[variant]}: {r.get('error')}\n    $ {r.get('command')}")
                    lines += ["    " + line for line in r.get("output_tail", [])]
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/train_throughput.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setups", default="demo,vits-tiny", help=f"comma-separated: {', '.join(SETUPS)}")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per training run (30)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the training figures (5)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, every variant (2)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every training process (1)")
    parser.add_argument("--batch", type=int, help="micro batch for every setup (default: the setup's)")
    parser.add_argument("--images", type=int, default=256, help="synthetic JPEGs written and read (256)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="training device (cpu)")
    parser.add_argument("--only", choices=["data", "train"], help="measure one kind of figure only")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="own",
        help="own: (a) / (b) in the recipe's precision, (c) in official DINO's on the device; matched: (a) / (b) in "
        "(c)'s (default own)",
    )
    parser.add_argument("--log-every", type=int, default=5, help="log window of (a) / (b), and of (c)'s timing (5)")
    parser.add_argument("--data-seconds", type=float, default=3.0, help="seconds per data-only round (3)")
    parser.add_argument("--data-rounds", type=int, default=3, help="alternating data-only rounds (3)")
    parser.add_argument("--train-rounds", type=int, default=1, help="rounds of (a), (b), (c) training runs (1)")
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="override for (a) / (b) (wins)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before one training run is stopped")
    parser.add_argument("--work-dir", type=Path, help="where images and runs go (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="write the report to this file")
    parser.add_argument("--print-commands", action="store_true", help="print the CPU and GPU command lines and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--official-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return parser


def print_commands() -> None:
    commands = example_commands()
    print("CPU:")
    print("\n".join("    " + c for c in commands["cpu"]))
    print("GPU (one device; --threads / --workers to the host's cores):")
    print("\n".join("    " + c for c in commands["gpu"]))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.official_worker:
        spec = OfficialSpec(**json.loads(Path(args.official_worker[0]).read_text(encoding="utf-8")))
        result = run_official(spec)
        Path(args.official_worker[1]).write_text(json.dumps(result), encoding="utf-8")
        return result
    if args.print_commands:
        print_commands()
        return example_commands()
    names = [n.strip() for n in args.setups.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETUPS]
    if unknown or not names:
        parser.error(f"unknown setup(s) {unknown}: choose from {', '.join(SETUPS)}")
    if args.steps < 1 or args.warmup < 0 or args.warmup >= args.steps:
        parser.error(f"need --steps >= 1 and 0 <= --warmup < --steps, got {args.steps} and {args.warmup}")
    if args.log_every < 1 or ((args.steps - 1) // args.log_every) * args.log_every < args.warmup:
        parser.error(
            f"no log window of --log-every {args.log_every} starts after --warmup {args.warmup} within --steps "
            f"{args.steps}: run more steps, or lower --warmup or --log-every"
        )
    if args.workers < 0 or args.threads < 1 or args.images < 1 or (args.batch is not None and args.batch < 1):
        parser.error("need --workers >= 0, --threads >= 1, --images >= 1, --batch >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here")
    settings = Settings(
        steps=args.steps,
        warmup=args.warmup,
        workers=args.workers,
        threads=args.threads,
        batch=args.batch,
        images=args.images,
        device=args.device,
        precision=args.precision,
        extra=tuple(args.extra),
        log_every=args.log_every,
        data_seconds=args.data_seconds,
        data_rounds=args.data_rounds,
        train_rounds=args.train_rounds,
        only=args.only,
        timeout_s=args.timeout,
        work_dir=args.work_dir,
        quiet=args.quiet,
    )
    report = run_benchmark([SETUPS[n] for n in names], settings)
    print()
    print(f"Machine: {report['machine_description']}")
    print(
        f"Training: {settings.threads} intra-op thread(s), {settings.workers} DataLoader worker(s), {settings.steps} "
        f"steps (windows of {settings.log_every}, the first {settings.warmup} steps left out), device "
        f"{settings.device}; data path: 1 thread, "
        f"{settings.data_rounds} alternating round(s) of {settings.data_seconds:g} s, medians"
    )
    print()
    print(report["table"])
    failures = failure_lines(report)
    if failures:
        print("\nFailed runs (last lines of output):\n" + "\n".join(failures))
    print()
    print_commands()
    if args.json:
        atomic_write_json(args.json, report)  # its folder made, indented, a final newline
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
