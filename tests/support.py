"""Helpers shared by the tests (fixtures live in conftest.py): paths to the sample data, test pictures, a free port,
briefly trained tiny runs and an official-style checkpoint."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from click.testing import CliRunner, Result
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLE_TRAIN = str(REPO / "shards/sample/train")
SAMPLE_VAL = str(REPO / "shards/sample/val")
SIZE = 32  # tiny models are trained and exported at 32 px
# A ViT small enough for CPU tests with the key layout of the real ones.
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
ARCH = "vit_tiny_patch16_224"
STUDENT_SHIFT = 0.01  # official_checkpoint's student = teacher + this, so the two are told apart


# --- pictures ---------------------------------------------------------------------------------------------------


def as_pil(image: Image.Image | torch.Tensor) -> Image.Image:
    """A training sample's pixels as the loader hands them to an augmentation (loaders.decode_pixels: a JPEG's as a
    uint8 [3, H, W] tensor, other formats' as a PIL image), as a PIL image, for the tests' stand-in augmentations."""
    if isinstance(image, torch.Tensor):
        return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    return image


def photo(width: int = 160, height: int = 120, seed: int = 0) -> Image.Image:
    """A smooth, asymmetric, colourful test picture: a random 4x4 colour grid blown up bicubically + a ramp."""
    rng = np.random.default_rng(seed)
    grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    arr = np.asarray(grid).astype(np.int32)
    arr[..., 0] = (arr[..., 0] + np.linspace(0, 60, width)[None, :]).clip(0, 255)  # no mirror symmetry
    return Image.fromarray(arr.astype(np.uint8))


def gradient_photo(width: int = 60, height: int = 45, seed: int = 0) -> Image.Image:
    """Small colourful RGB test image: gradients plus noise (so crops differ from each other)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([xx / width * 255, yy / height * 255, (xx + yy) / (width + height) * 255], axis=-1)
    img += rng.normal(0, 20, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def noise_image(width: int = 128, height: int = 96, seed: int = 0) -> Image.Image:
    """Uniform RGB noise: incompressible, so every byte of its encoding matters."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def striped_photo(width: int, height: int, seed: int, periods: tuple[float, float] = (10.0, 60.0)) -> Image.Image:
    """Stripes (sine periods drawn from `periods`, in units of 2 pi px), a ramp and pixel noise: detail that a
    reduced JPEG decode does not keep exactly and IDCT differences show in."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    p = rng.uniform(*periods, 3)
    img = np.stack(
        [
            128 + 100 * np.sin(xx / p[0]) * np.cos(yy / p[1]),
            128 + 90 * np.sin((xx + yy) / p[2]),
            40 + 150 * xx / width,
        ],
        axis=-1,
    )
    img += rng.normal(0.0, 8.0, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# --- tensors, processes ---------------------------------------------------------------------------------------


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def set_key(obj: Any, path: tuple[Any, ...], value: Any = None, delete: bool = False) -> None:
    """Set the nested key `path` of a JSON-like `obj` to `value` in place, or delete it (tampering tests)."""
    for key in path[:-1]:
        obj = obj[key]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def _ephemeral_ports() -> range:
    """The ports the kernel hands out to outgoing connections (Linux's ip_local_port_range; its default elsewhere)."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A TCP port nobody listens on now (for a rendezvous of test processes), below the ephemeral range where one can
    be: a port handed out by bind(0) is an ephemeral one, and gloo's connections between ranks take ephemeral ports
    too, so a port chosen ahead (launch_plan picks one per run of a plan) was once taken before its run listened on it
    (EADDRINUSE in CI)."""
    ephemeral = _ephemeral_ports()
    candidates = list(range(max(ephemeral.start - 8000, 10000), ephemeral.start))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no room below the range: any free port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    args: list[str], world: int, logs: list[Path], env: dict[str, str], timeout: float, cwd: Path | None = None
) -> None:
    """Run `args` as ranks 0..world-1 of one job (the rendezvous variables torchrun would set; `env` may carry
    MASTER_PORT) and wait for all of them. A rank that fails, or a job past `timeout`, stops the others (they would
    wait in a collective forever); then fail with every rank's log tail."""
    procs = []
    for rank in range(world):
        ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        rank_env = {**env, "MASTER_ADDR": "127.0.0.1", **ranks}
        with logs[rank].open("w") as log:
            procs.append(subprocess.Popen(args, cwd=cwd, env=rank_env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    report = "\n".join(
        f"--- rank {r} (exit {p.returncode}) ---\n{logs[r].read_text()[-5000:]}" for r, p in enumerate(procs)
    )
    assert all(p.returncode == 0 for p in procs), report


# --- runs, checkpoints, exports ---------------------------------------------------------------------------------


def sample_config(run_dir: Path, *overrides: str, recipe: str = "tiny-test.json") -> Any:
    """A recipe (TrainConfig) training on the sample shards into `run_dir`, with `--set`-style overrides."""
    from dino_scale.config import load_config

    sets = [f"data.train_shards={json.dumps(SAMPLE_TRAIN)}", f"output_dir={json.dumps(str(run_dir))}", *overrides]
    return load_config(recipe, sets)


def step_records(run_dir: Path) -> list[dict]:
    """A run's per-step metrics records (the final ones carry an "event" key instead)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "event" not in r]


def brief_run(root: Path, recipe: str, *overrides: str) -> Path:
    """Train a recipe for a few steps on the sample shards; returns the run directory."""
    from dino_scale.train.loop import train

    run_dir = root / Path(recipe).stem
    train(sample_config(run_dir, "data.samples_per_epoch=16", "epochs=2", *overrides, recipe=recipe))
    return run_dir


def export(*args: str) -> Result:
    """`dino-scale export` with the sample images as the parity gate's real images."""
    from dino_scale.cli import main as cli

    return CliRunner().invoke(cli, ["export", "--parity-shards", SAMPLE_VAL, *args])


def export_vit(vit_run: Path, *args: str) -> Result:
    """Export the briefly trained tiny ViT at its training size."""
    return export("--checkpoint", str(vit_run), "--image-size", str(SIZE), *args)


def official_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A file laid out like facebookresearch/dino's checkpoint.pth (DDP student, plain teacher, argparse args)."""
    from dino_scale.models.backbones import create_backbone

    torch.manual_seed(123)
    backbone = create_backbone(ARCH, **TINY).state_dict()
    head = {"head.mlp.0.weight": torch.randn(8, 48), "head.last_layer.weight_v": torch.randn(16, 8)}
    torch.save(
        {
            "student": {f"module.backbone.{k}": v + STUDENT_SHIFT for k, v in backbone.items()}
            | {f"module.{k}": v for k, v in head.items()},
            "teacher": {f"backbone.{k}": v for k, v in backbone.items()} | head,
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_tiny", patch_size=8),
        },
        path,
    )
    return backbone


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ (not a package) imported as a module, e.g. load_benchmark("backends")."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module
