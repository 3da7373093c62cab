"""Tests for dino_scale.data.device_augment (batched renderer) and the statistics of the shared view parameters.

Pixel tests compare ``render_batch`` with the per-sample ``MultiCropAugmentation.apply`` on CPU tensors, at small
crop sizes (a 160 px global still takes the >128 px shifted-add blur path). Statistical tests draw ~2000 samples of
``sample_params`` (no rendering) with fixed seeds and use bounds at ~5 standard errors (or a KS critical value
at a similar level, ~1e-6), so they are deterministic, not flaky, and fail on any real change in distribution.
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import permutations

import numpy as np
import pytest
import torch
from support import photo
from torchvision.transforms import v2

from dino_scale.data.augment import MultiCropAugmentation, ViewParams, pil_to_channels_last
from dino_scale.data.device_augment import render_batch

G, L, N_LOCAL = 160, 32, 4
SIZES = [(160, 120), (200, 150), (123, 177), (300, 200), (97, 130), (256, 256)]  # (width, height)
ROUNDS = 7  # batches of len(SIZES) samples: enough for every op, and every jitter order, to occur


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batches(aug: MultiCropAugmentation) -> list[tuple[list, list[list[ViewParams]]]]:
    out = []
    for rnd in range(ROUNDS):
        pics = [photo(w, h, seed=rnd * 10 + j) for j, (w, h) in enumerate(SIZES)]
        params = [aug.sample_params(p.height, p.width, _gen(1000 * rnd + j)) for j, p in enumerate(pics)]
        out.append((pics, params))
    return out


@pytest.fixture(scope="module")
def pixel_case() -> tuple[MultiCropAugmentation, list[tuple[list, list[list[ViewParams]]]]]:
    aug = MultiCropAugmentation(global_size=G, local_size=L, n_local=N_LOCAL, view_kernel="torch")
    return aug, _batches(aug)


def _diffs(aug: MultiCropAugmentation, batches: list, uint8_resize: bool | None) -> np.ndarray:
    """|render_batch - apply| over every pixel of every view of every batch."""
    diffs = []
    for pics, params in batches:
        out = render_batch([pil_to_channels_last(p)[0] for p in pics], params, uint8_resize=uint8_resize)
        assert len(out) == aug.n_views
        for k, view in enumerate(out):
            size = G if k < 2 else L
            assert view.dtype == torch.uint8 and view.shape == (len(pics), 3, size, size)
        for j, pic in enumerate(pics):
            for k, ref in enumerate(aug.apply(pic, params[j])):
                diffs.append((out[k][j].int() - ref.int()).abs().flatten().numpy())
    return np.concatenate(diffs)


def test_tested_params_exercise_every_op(pixel_case) -> None:
    # Guards the pixel tests below: they can only catch a wrong or skipped op if the params use it.
    _, batches = pixel_case
    views = [(k, v) for _, params in batches for p in params for k, v in enumerate(p)]
    seen = Counter()
    for k, v in views:
        size = "global" if k < 2 else "local"
        seen["flip"] += v.flip
        seen["no flip"] += not v.flip
        seen["grayscale"] += v.grayscale
        seen["solarize"] += v.solarize
        seen[f"blur {size}"] += v.blur_sigma is not None
        seen[f"no colour op or blur {size}"] += v.jitter is None and not v.grayscale and v.blur_sigma is None
        if v.jitter is not None:
            seen[tuple(op for op, _ in v.jitter)] += 1
    names = ("flip", "no flip", "grayscale", "solarize", "blur global", "blur local")
    names += ("no colour op or blur global", "no colour op or blur local")  # rows that skip the float stage
    missing: list = [name for name in names if not seen[name]]
    missing += [order for order in permutations(range(4)) if not seen[order]]  # all 24 jitter op orders
    assert not missing, missing


def test_batched_render_matches_per_sample_apply(pixel_case) -> None:
    aug, batches = pixel_case
    d = _diffs(aug, batches, uint8_resize=None)  # CPU: the uint8 resize kernel, as apply
    assert d.max() <= 1, d.max()
    assert d.mean() < 0.05, d.mean()
    assert (d > 0).mean() < 1e-3  # measured: 0 (bit-identical); rare 1-ulp FMA differences would stay far below


def test_float_resize_path_close_to_per_sample_apply(pixel_case) -> None:
    # The path non-CPU devices take (no uint8 antialiased kernel there), run on CPU.
    aug, batches = pixel_case
    d = _diffs(aug, batches[:3], uint8_resize=False)
    # Measured: mean ~0.003, 0.3% of pixels off by 1, ~1e-4 by 2..4 (colour ops stretch 1-level resize differences).
    assert d.mean() < 0.01, d.mean()
    assert (d > 0).mean() < 0.01
    assert (d > 1).mean() < 1e-3
    assert d.max() <= 8, d.max()


def test_input_strides_and_model_input(pixel_case) -> None:
    aug, batches = pixel_case
    pics, params = batches[0]
    hwc_backed = render_batch([pil_to_channels_last(p)[0] for p in pics], params)
    contiguous = render_batch([pil_to_channels_last(p)[0].contiguous() for p in pics], params, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(hwc_backed, contiguous, strict=True))
    per_sample = [aug.apply(p, ps) for p, ps in zip(pics, params, strict=True)]
    stacked = [torch.stack([s[k] for s in per_sample]) for k in range(aug.n_views)]  # as loaders._TrainStream._batch
    model_in = aug.to_model_input(hwc_backed)
    for a, b in zip(model_in, aug.to_model_input(stacked), strict=True):
        assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1.5 / (255 * 0.224))


def test_rejects_inconsistent_batches(pixel_case) -> None:
    _, batches = pixel_case
    pics, params = batches[0]
    images = [pil_to_channels_last(p)[0] for p in pics]
    with pytest.raises(ValueError, match="one params list per image"):
        render_batch(images[:2], params[:3])
    with pytest.raises(ValueError, match="same number of views"):
        render_batch(images[:2], [params[0], params[1][:-1]])
    with pytest.raises(ValueError, match="uint8"):
        render_batch([images[0].float()], params[:1])


# --- statistics of the drawn parameters (shared by both render paths) ----------------------------------------------

N_DRAWS = 2000
H, W = 375, 500  # a typical ImageNet size (aspect 4:3, so the full-image fallback stays in the ratio range)
KS_C = math.sqrt(-0.5 * math.log(1e-6 / 2))  # KS critical value at p ~ 1e-6: c / sqrt(n_eff), ~5 sigma territory


@pytest.fixture(scope="module")
def draws() -> tuple[MultiCropAugmentation, list[list[ViewParams]]]:
    aug = MultiCropAugmentation()  # DINO's recipe: 2 x 224 + 8 x 96
    return aug, [aug.sample_params(H, W, _gen(seed)) for seed in range(N_DRAWS)]


def _rate_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


def _ks2(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, x, "right") / len(a) - np.searchsorted(b, x, "right") / len(b)).max())


def _ks_uniform(x: np.ndarray, lo: float, hi: float) -> float:
    u = np.sort((x - lo) / (hi - lo))
    n = len(u)
    return float(max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max()))


def _crop_stats(boxes: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    hw = np.array([(h, w) for _, _, h, w in boxes], dtype=np.float64)
    return hw[:, 0] * hw[:, 1] / (H * W), np.log(hw[:, 1] / hw[:, 0])


def _torchvision_boxes(n: int, scale: tuple[float, float], seed: int) -> list[tuple[int, int, int, int]]:
    img = torch.empty(3, H, W, dtype=torch.uint8)
    with torch.random.fork_rng(devices=[]):  # get_params draws from the global RNG: leave it as it was
        torch.manual_seed(seed)
        return [v2.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]


@pytest.mark.parametrize(("views", "scale"), [((0, 1), (0.4, 1.0)), (tuple(range(2, 10)), (0.05, 0.4))])
def test_crop_boxes_follow_random_resized_crop(draws, views, scale) -> None:
    _, params = draws
    boxes = [p[k].box for p in params for k in views]
    for top, left, h, w in boxes:
        assert 0 <= top <= H - h and 0 <= left <= W - w
        # w = round(sqrt(A r)), h = round(sqrt(A / r)): the target area and ratio are known up to that rounding.
        assert (h - 0.5) * (w - 0.5) <= scale[1] * H * W + 1e-9
        assert (h + 0.5) * (w + 0.5) >= scale[0] * H * W - 1e-9
        assert math.log((w - 0.5) / (h + 0.5)) <= math.log(4 / 3) and math.log((w + 0.5) / (h - 0.5)) >= math.log(3 / 4)
    area, log_ratio = _crop_stats(boxes)
    ref_area, ref_log_ratio = _crop_stats(_torchvision_boxes(len(boxes), scale, seed=0))
    bound = KS_C * math.sqrt(2 / len(boxes))  # two samples of equal size n: c * sqrt((n + n) / (n * n))
    assert _ks2(area, ref_area) < bound
    assert _ks2(log_ratio, ref_log_ratio) < bound
    # Power check: the same statistic does see a wrong scale range (the test can fail).
    wrong = (scale[0] + 0.1, scale[1]) if scale[1] == 1.0 else (scale[0], scale[1] - 0.1)
    assert _ks2(area, _crop_stats(_torchvision_boxes(len(boxes), wrong, seed=1))[0]) > bound
    # Crop positions: top is uniform on {0 .. H - h}, so its normalised position has mean 1/2.
    pos = np.array([t / (H - h) for t, _, h, _ in boxes if h < H])
    assert abs(pos.mean() - 0.5) <= 5 * math.sqrt(1 / 12 / len(pos))


def test_flip_jitter_grayscale_rates(draws) -> None:
    aug, params = draws
    views = [v for p in params for v in p]
    n = len(views)
    assert n == N_DRAWS * aug.n_views
    assert _rate_ok(sum(v.flip for v in views), n, 0.5)
    assert _rate_ok(sum(v.jitter is not None for v in views), n, 0.8)
    assert _rate_ok(sum(v.grayscale for v in views), n, 0.2)


def test_blur_and_solarize_rates_per_view(draws) -> None:
    _, params = draws
    assert all(p[0].blur_sigma is not None for p in params)  # global 1: always
    assert _rate_ok(sum(p[1].blur_sigma is not None for p in params), N_DRAWS, 0.1)
    local = [v for p in params for v in p[2:]]
    assert _rate_ok(sum(v.blur_sigma is not None for v in local), len(local), 0.5)
    assert _rate_ok(sum(p[1].solarize for p in params), N_DRAWS, 0.2)
    assert not any(p[0].solarize or any(v.solarize for v in p[2:]) for p in params)  # global 2 only
    sigmas = np.array([v.blur_sigma for p in params for v in p if v.blur_sigma is not None])
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0
    assert _ks_uniform(sigmas, 0.1, 2.0) < KS_C / math.sqrt(len(sigmas))


def test_jitter_order_and_factors(draws) -> None:
    _, params = draws
    jitters = [v.jitter for p in params for v in p if v.jitter is not None]
    n = len(jitters)
    assert all(sorted(op for op, _ in j) == [0, 1, 2, 3] for j in jitters)  # each op exactly once
    # Uniform random order: each op at each position with p = 1/4, each of the 24 orders with p = 1/24.
    for op in range(4):
        for pos in range(4):
            assert _rate_ok(sum(j[pos][0] == op for j in jitters), n, 0.25), (op, pos)
    orders = Counter(tuple(op for op, _ in j) for j in jitters)
    assert len(orders) == 24 and all(_rate_ok(c, n, 1 / 24) for c in orders.values())
    # Factors: brightness / contrast in [0.6, 1.4], saturation in [0.8, 1.2], hue in [-0.1, 0.1], uniform.
    for op, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        f = np.array([dict(j)[op] for j in jitters])
        assert f.min() >= lo and f.max() <= hi, op
        assert _ks_uniform(f, lo, hi) < KS_C / math.sqrt(n), op
