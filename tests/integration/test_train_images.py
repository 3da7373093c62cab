"""Training straight from a folder of images (data.train_images): a tiny ViT, an interrupted and resumed run that ends
bit for bit where an uninterrupted one does, and a corrupt file skipped and counted in the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import ARCH, REPO, SIZE, TINY, gradient_photo, photo

from dino_scale import run_dir as layout
from dino_scale.config import TrainConfig, config_from_dict
from dino_scale.data import folders
from dino_scale.io import load_checkpoint
from dino_scale.train.loop import train

pytestmark = pytest.mark.slow

BROKEN = "dog/broken.jpg"
# 47 pictures + 1 corrupt file = 48 files: 6 steps of 8 per epoch read every file exactly once.
FILES = 48
STEPS_PER_EPOCH = FILES // 8
# 8 steps cross into epoch 1; the interruption at step 3 lands in the middle of epoch 0.
MAX_STEPS, INTERRUPT = 8, 3


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of 47 small pictures (some in class subfolders, JPEG and PNG), one corrupt .jpg and a
    non-image file."""
    root = tmp_path_factory.mktemp("images")
    for name in ("cat", "dog"):
        (root / name).mkdir()
    for i in range(FILES - 1):
        folder = root / ("cat", "dog", ".")[i % 3]
        if i % 2:
            photo(48, 40, seed=i).save(folder / f"photo-{i}.jpg", quality=90)
        else:
            gradient_photo(40, 48, seed=i).save(folder / f"gradient-{i}.png")
    (root / BROKEN).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    (root / "README.txt").write_text("not an image")
    return root


def recipe(images: Path, run_dir: Path, *, num_workers: int = 0, max_steps: int = MAX_STEPS) -> TrainConfig:
    """The tiny-test recipe (a 2-block ViT at 32 px, micro batch 8, on the CPU) on the image folder."""
    raw = json.loads((REPO / "configs/tiny-test.json").read_text())
    del raw["data"]["train_shards"]
    raw["data"].update({"train_images": str(images), "num_workers": num_workers, "shuffle_buffer": 16})
    raw["model"].update({"arch": ARCH, "timm_kwargs": TINY})
    raw["data"]["global_crop_size"] = SIZE
    raw.update(
        output_dir=str(run_dir),
        epochs=2,
        max_steps=max_steps,
        checkpoint_every=INTERRUPT,
        backend="local",
        device="cpu",
    )
    return config_from_dict(raw)


def records(run_dir: Path) -> dict[int, dict]:
    """The per-step records of metrics.jsonl, by step."""
    lines = (run_dir / layout.METRICS_FILE).read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "event" not in r}


def final_teacher(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(layout.find_latest_checkpoint(run_dir))
    assert state["step"] == MAX_STEPS
    return state["teacher"]


# One group of 48 files read by the main process; or 4 groups of 12, two for each of 2 forked DataLoader workers.
@pytest.mark.parametrize(("num_workers", "group"), [(0, folders.FILES_PER_GROUP), (2, 12)])
def test_interrupted_run_on_an_image_folder_resumes_bit_for_bit(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_workers: int, group: int
) -> None:
    monkeypatch.setattr(folders, "FILES_PER_GROUP", group)
    straight = tmp_path / "straight"
    train(recipe(images, straight, num_workers=num_workers))
    interrupted = tmp_path / "interrupted"
    train(recipe(images, interrupted, num_workers=num_workers, max_steps=INTERRUPT))
    assert layout.find_latest_checkpoint(interrupted).name == f"step_{INTERRUPT:08d}.pt"
    train(recipe(images, interrupted, num_workers=num_workers), resume=True)

    a, b = final_teacher(straight), final_teacher(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    done, resumed = records(straight), records(interrupted)
    assert sorted(resumed) == sorted(done) == list(range(1, MAX_STEPS + 1))
    for step in range(INTERRUPT + 1, MAX_STEPS + 1):
        assert resumed[step]["loss"] == done[step]["loss"], step
    # Epoch 0 reads each of the 48 files once: the corrupt one is skipped exactly once, in both runs alike.
    end_of_epoch = done[STEPS_PER_EPOCH]
    assert end_of_epoch["epoch"] == 0 and end_of_epoch["skipped_samples"] == 1
    assert done[1]["skipped_samples"] <= 1
    assert all(resumed[s]["skipped_samples"] == done[s]["skipped_samples"] for s in done)
