"""The device multi-crop path (recipe key data.augment_on): the loader's workers only decode and draw the views'
parameters, `to_model_input` renders the batch; on CPU that must give exactly the worker path's model input, for any
number of workers and after a resume, and the same trained teacher."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from support import SAMPLE_TRAIN

from dino_scale.config import DataConfig, load_config
from dino_scale.data import device_augment
from dino_scale.data.augment import MultiCropAugmentation, ViewParams
from dino_scale.data.device_augment import render_batch
from dino_scale.data.loaders import TrainBatch, make_train_loader, renders_on_device
from dino_scale.train.loop import train

URLS = sorted(glob.glob(f"{SAMPLE_TRAIN}/*.tar"))
AUG = MultiCropAugmentation(global_size=32, local_size=16, n_local=2, view_kernel="torch")  # the device path's twin
STEPS = 4


def model_inputs(num_workers: int, render_on_device: bool, start_batch: int = 0) -> list[list[torch.Tensor]]:
    loader = make_train_loader(
        URLS, AUG, 4, STEPS, epoch=1, seed=3, start_batch=start_batch, num_workers=num_workers, shuffle_buffer=16,
        render_on_device=render_on_device,
    )  # fmt: skip
    out = []
    for batch in loader:
        assert len(batch.keys) == 4
        if render_on_device:
            assert batch.views == [] and batch.images is not None and batch.params is not None
            assert len(batch.images) == len(batch.params) == 4
            assert all(i.dtype == torch.uint8 and i.shape[0] == 3 and i.is_contiguous() for i in batch.images)
            assert all(len(p) == AUG.n_views and isinstance(p[0], ViewParams) for p in batch.params)
        else:
            assert batch.images is None and batch.params is None
        out.append(AUG.to_model_input(batch, "cpu"))
    return out


def assert_identical(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert [tuple(v.shape) for v in x] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_device_path_gives_the_worker_paths_model_input_bit_for_bit(num_workers: int) -> None:
    workers = model_inputs(num_workers, render_on_device=False)
    device = model_inputs(num_workers, render_on_device=True)
    assert len(device) == STEPS
    assert_identical(device, workers)
    # Resume at batch 2: the remaining batches are those of the uninterrupted run.
    assert_identical(model_inputs(num_workers, render_on_device=True, start_batch=2), workers[2:])


def test_the_view_list_still_goes_through_to_model_input() -> None:
    views = [torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)]
    batch = TrainBatch(views=views, keys=["a", "b"])
    assert torch.equal(AUG.to_model_input(views)[0], AUG.to_model_input(batch)[0])


def test_pin_memory_keeps_images_and_params() -> None:
    class Pinnable:
        def pin_memory(self) -> str:
            return "pinned"

    params = [[AUG.sample_params(8, 8, torch.Generator().manual_seed(0))[0]]]
    batch = TrainBatch([], ["a"], images=[Pinnable()], params=params).pin_memory()  # type: ignore[list-item]
    assert (batch.views, batch.keys, batch.images, batch.params) == ([], ["a"], ["pinned"], params)


def test_augment_on_validates_and_auto_renders_on_the_device_only_on_cuda() -> None:
    assert DataConfig().augment_on == "workers"  # until the device path is measured on a GPU
    assert DataConfig(augment_on="device").augment_on == "device"
    with pytest.raises(ValidationError, match="augment_on"):
        DataConfig(augment_on="gpu")
    assert load_config("tiny-test.json", ["data.augment_on=workers"]).data.augment_on == "workers"
    assert not renders_on_device("auto", torch.device("cpu"))
    assert renders_on_device("auto", torch.device("cuda"))
    assert renders_on_device("device", "cpu")
    assert not renders_on_device("workers", "cuda")


def test_training_on_the_device_path_ends_with_the_same_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered: list[int] = []

    def counting_render_batch(images, params, device=None, uint8_resize=None):  # noqa: ANN001, ANN202
        rendered.append(len(images))
        return render_batch(images, params, device, uint8_resize)

    monkeypatch.setattr(device_augment, "render_batch", counting_render_batch)

    def final_teacher(augment_on: str) -> list[str]:
        cfg = load_config(
            "tiny-test.json",
            [f"data.train_shards={SAMPLE_TRAIN}", f"output_dir={tmp_path / augment_on}", "data.samples_per_epoch=16",
             "epochs=1", "max_steps=2", f"data.augment_on={augment_on}"],
        )  # fmt: skip
        return train(cfg)["teacher_sha256_per_rank"]

    device = final_teacher("device")
    assert rendered == [8, 8]  # two steps of micro batch 8, rendered by to_model_input
    assert device == final_teacher("workers")
    assert final_teacher("auto") == device
    assert rendered == [8, 8]  # on CPU "auto" is the worker path
