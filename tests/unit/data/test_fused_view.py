"""The fused C view kernel (dino_scale.data.fused_view, recipe key data.view_kernel): it renders what the torch ops
render, to within 1 grey level on a tiny fraction of the values, for every op, op order, blur code path and crop size;
it is built once and cached per source and machine; a missing or failing compiler is an error for "c" and a warning
and the torch ops for "auto"."""

from __future__ import annotations

import glob
import logging
import pickle
from collections import Counter
from itertools import permutations
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from pydantic import ValidationError
from support import SAMPLE_TRAIN, photo

from dino_scale.config import DataConfig, config_changes
from dino_scale.data import fused_view
from dino_scale.data.augment import MultiCropAugmentation, ViewParams, gaussian_taps
from dino_scale.data.loaders import make_train_loader
from dino_scale.errors import Unavailable

TORCH = MultiCropAugmentation(global_size=160, local_size=32, n_local=4, view_kernel="torch")
FUSED = MultiCropAugmentation(global_size=160, local_size=32, n_local=4, view_kernel="c")


def noisy_picture(width: int, height: int, seed: int) -> PIL.Image.Image:
    """Random colours with grey pixels and ties between the largest channels: the hue's special cases."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[: height // 4] = pixels[: height // 4, :, :1]  # grey rows: chroma 0
    pixels[height // 4 : height // 2, :, 1] = pixels[height // 4 : height // 2, :, 0]  # r == g
    return PIL.Image.fromarray(pixels)


def difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> np.ndarray:
    assert [(v.dtype, v.shape) for v in a] == [(v.dtype, v.shape) for v in b]
    return np.concatenate([(x.int() - y.int()).abs().flatten().numpy() for x, y in zip(a, b, strict=True)])


@pytest.fixture(scope="module")
def drawn_views() -> list[tuple[PIL.Image.Image, list[ViewParams]]]:
    """42 pictures of several sizes and kinds with their drawn views: enough for every op order to occur."""
    cases = []
    for k in range(42):
        width, height = [(160, 120), (200, 150), (123, 177), (300, 200), (97, 130), (256, 256)][k % 6]
        picture = photo(width, height, seed=k) if k % 2 else noisy_picture(width, height, seed=k)
        cases.append((picture, TORCH.sample_params(height, width, torch.Generator().manual_seed(k))))
    return cases


def test_the_drawn_views_use_every_op_order_and_both_blur_paths(drawn_views) -> None:
    # Guards the next test: it can only catch a wrong or skipped op if the views use it.
    seen: Counter = Counter()
    for _, params in drawn_views:
        for p in params:
            seen["grayscale"] += p.grayscale
            seen["solarize"] += p.solarize
            seen[f"blur {p.size} px"] += p.blur_sigma is not None  # 160 px: shifted adds; 32 px: matrix products
            seen[f"nothing to do {p.size} px"] += p.jitter is None and not p.grayscale and p.blur_sigma is None
            if p.jitter is not None:
                seen[tuple(op for op, _ in p.jitter)] += 1
    wanted = ["grayscale", "solarize", "blur 160 px", "blur 32 px", "nothing to do 32 px", *permutations(range(4))]
    assert [name for name in wanted if not seen[name]] == []


def test_the_c_kernel_renders_the_torch_ops_views(drawn_views) -> None:
    d = np.concatenate([difference(FUSED.apply(pic, params), TORCH.apply(pic, params)) for pic, params in drawn_views])
    # Measured: 1 grey level on ~1e-5 of the values (a float32 mean and the BLAS blur sum in another order, at
    # values that land on x.5 when scaled to 255); a missing, wrong or misordered op moves most values by several.
    assert d.max() <= 1, d.max()
    assert (d > 0).mean() < 1e-4, (d > 0).mean()


@pytest.mark.parametrize("size", [1, 2, 5, 13, 96, 224])
@pytest.mark.parametrize(
    "case",
    [
        {"jitter": ((0, 1.37),)},
        {"jitter": ((1, 0.61),)},
        {"jitter": ((2, 1.19),)},
        {"jitter": ((3, -0.093),)},
        {"jitter": ((3, 0.1), (2, 0.8), (1, 1.4), (0, 0.6))},
        {"grayscale": True},
        {"blur_sigma": 0.1},
        {"blur_sigma": 1.3},
        {"blur_sigma": 2.0},
        {"solarize": True},
        {"jitter": ((1, 1.4),), "grayscale": True, "blur_sigma": 1.7, "solarize": True},
    ],
    ids=lambda case: "+".join(case),
)
def test_each_op_alone_and_together(size: int, case: dict) -> None:
    # Crops smaller than the blur's radius (reflect borders need radius < size), both blur code paths, odd sizes; the
    # box is the crop's size, so that the noisy picture's colours reach the ops unaveraged.
    picture = noisy_picture(330, 330, seed=size)  # the box starts below its grey rows
    fields = {"jitter": None, "grayscale": False, "blur_sigma": None, "solarize": False} | case
    params = [ViewParams(size=size, box=(100, 5, size, size), flip=True, **fields)]
    fused, torch_ops = FUSED.apply(picture, params), TORCH.apply(picture, params)
    d = difference(fused, torch_ops)
    assert d.max() <= 1 and (d > 0).mean() < 1e-3, (d.max(), (d > 0).mean())
    # The op did something (on 1-2 px one may leave the crop as it is; sigma 0.1 has side taps of ~2e-22).
    if size >= 5 and case.get("blur_sigma") != 0.1:
        crop_only = TORCH.apply(picture, [ViewParams(size, (100, 5, size, size), True, None, False, None, False)])
        assert difference(fused, crop_only).max() > 1


def test_same_views_every_time_and_with_any_thread_count() -> None:
    picture, params = photo(200, 150, seed=5), TORCH.sample_params(150, 200, torch.Generator().manual_seed(5))
    first = FUSED.apply(picture, params)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = FUSED.apply(picture, params)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_gaussian_taps_are_one_side_of_the_normalised_truncated_kernel() -> None:
    taps = gaussian_taps(1.0, radius=6)
    assert len(taps) == 4  # ceil(3 sigma) = 3
    assert taps[0] + 2 * sum(taps[1:]) == pytest.approx(1.0, abs=1e-15)
    assert taps == sorted(taps, reverse=True)
    assert len(gaussian_taps(2.0, radius=4)) == 5  # truncated at the radius, then normalised over what is left
    assert gaussian_taps(2.0, radius=0) == [1.0]


def test_render_refuses_what_it_cannot_write_safely() -> None:
    kernel = fused_view.build_kernel()
    with pytest.raises(ValueError, match="contiguous"):
        kernel.render(torch.zeros(3, 8, 16, dtype=torch.uint8)[:, :, ::2], (), False, (), True)
    with pytest.raises(ValueError, match="uint8"):
        kernel.render(torch.zeros(3, 8, 8), (), False, (), True)
    with pytest.raises(ValueError, match="at most 4"):
        kernel.render(torch.zeros(3, 8, 8, dtype=torch.uint8), [(0, 1.0)] * 5, False, (), False)


def test_the_augmentation_takes_its_kernel_to_worker_processes() -> None:
    copy = pickle.loads(pickle.dumps(FUSED))
    assert copy.view_kernel == "c" and copy._kernel is not None
    picture, params = photo(seed=1), FUSED.sample_params(120, 160, torch.Generator().manual_seed(1))
    there, here = copy.apply(picture, params), FUSED.apply(picture, params)
    assert all(torch.equal(a, b) for a, b in zip(there, here, strict=True))
    assert pickle.loads(pickle.dumps(TORCH))._kernel is None


@pytest.mark.parametrize("num_workers", [0, 1])
def test_the_loader_renders_with_the_kernel_and_resumes_exactly(num_workers: int) -> None:
    # In a DataLoader worker process too; the views are those of the torch ops to within the kernel's rounding.
    urls = sorted(glob.glob(f"{SAMPLE_TRAIN}/*.tar"))

    def views(aug: MultiCropAugmentation, start_batch: int = 0) -> list[list[torch.Tensor]]:
        loader = make_train_loader(
            urls, aug, 4, 3, epoch=0, seed=5, start_batch=start_batch, num_workers=num_workers, shuffle_buffer=8
        )
        return [batch.views for batch in loader]

    small = {"global_size": 32, "local_size": 16, "n_local": 2}
    fused, torch_ops = views(MultiCropAugmentation(**small)), views(MultiCropAugmentation(**small, view_kernel="torch"))
    assert len(fused) == 3
    d = np.concatenate([difference(a, b) for a, b in zip(fused, torch_ops, strict=True)])
    assert d.max() <= 1 and (d > 0).mean() < 1e-3
    resumed = views(MultiCropAugmentation(**small), start_batch=1)
    assert all(torch.equal(a, b) for x, y in zip(resumed, fused[1:], strict=True) for a, b in zip(x, y, strict=True))


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A kernel cache of this test's own, and no kernel loaded yet in this process; afterwards the usual one."""
    monkeypatch.setenv("DINO_SCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fused_view, "_warned", False)
    fused_view._build.cache_clear()
    yield tmp_path / "cache" / "kernels"
    fused_view._build.cache_clear()


def test_built_once_then_loaded_from_the_cache(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = fused_view.build_kernel()
    assert [p.name for p in fresh_build.iterdir()] == [kernel.path.name]  # no temp file left beside it
    fused_view._build.cache_clear()

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(fused_view.subprocess, "run", no_compiler)
    assert fused_view.build_kernel().path == kernel.path


def test_an_edited_source_builds_a_library_of_its_own(fresh_build: Path, tmp_path: Path, monkeypatch) -> None:
    before = fused_view.library_path(("-march=native",))
    edited = tmp_path / "fused_view.c"
    edited.write_text(fused_view.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(fused_view, "SOURCE", edited)
    assert fused_view.library_path(("-march=native",)) != before
    assert fused_view.build_kernel().path.parent == fresh_build


@pytest.mark.parametrize(("compiler", "reason"), [("false", "failed"), ("/no/such/cc", "cannot run the C compiler")])
def test_without_a_working_compiler(fresh_build, monkeypatch, caplog, compiler: str, reason: str) -> None:
    monkeypatch.setenv("CC", compiler)
    with pytest.raises(Unavailable, match=reason) as error:
        MultiCropAugmentation(view_kernel="c")
    assert "\n" not in str(error.value) and "data.view_kernel=torch" in str(error.value)
    with caplog.at_level(logging.WARNING, logger="dino_scale"):
        auto = [MultiCropAugmentation(view_kernel="auto") for _ in range(2)]
    assert [a.view_kernel for a in auto] == ["torch", "torch"]
    assert [r.getMessage().count(reason) for r in caplog.records] == [1]  # one warning per process
    assert list(fresh_build.glob("*")) == []


def test_the_recipe_key() -> None:
    assert DataConfig(train_images="x").view_kernel == "auto"
    with pytest.raises(ValidationError, match="view_kernel"):
        DataConfig(train_images="x", view_kernel="cuda")
    with pytest.raises(ValueError, match="view kernel must be one of"):
        MultiCropAugmentation(view_kernel="cuda")
    old = {"data": {"view_kernel": "auto"}}
    changes = config_changes(old, {"data": {"view_kernel": "torch"}})
    assert changes.run_control == ["data.view_kernel: 'auto' -> 'torch'"] and changes.hyperparameters == []
