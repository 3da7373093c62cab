"""Tests for dino_scale.augment (tiny crop sizes so the whole file runs in a few seconds)."""

from __future__ import annotations

import dataclasses
import math
import pickle
import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as tnf
from PIL import Image, ImageOps
from support import gradient_photo
from torchvision.transforms.v2 import functional as tvf

from dino_scale.data import augment
from dino_scale.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    ViewParams,
    eval_crop,
    normalize,
)

G, L, N_LOCAL = 32, 16, 3


def _aug(**kw) -> MultiCropAugmentation:
    return MultiCropAugmentation(global_size=G, local_size=L, n_local=N_LOCAL, **kw)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plain(p: ViewParams, **changes) -> ViewParams:
    """The same crop with every photometric op switched off (then ``changes`` applied)."""
    base = dict(flip=False, jitter=None, grayscale=False, blur_sigma=None, solarize=False)
    return dataclasses.replace(p, **{**base, **changes})


def _sample_many(aug: MultiCropAugmentation, n: int, seed: int = 0) -> list[list[ViewParams]]:
    gen = _gen(seed)
    return [aug.sample_params(375, 500, gen) for _ in range(n)]


# --------------------------------------------------------------------------------------- per-sample stage


def test_call_count_shapes_dtype() -> None:
    views = _aug()(gradient_photo(), _gen(0))
    assert len(views) == 2 + N_LOCAL
    assert [tuple(v.shape) for v in views] == [(3, G, G)] * 2 + [(3, L, L)] * N_LOCAL
    assert all(v.dtype == torch.uint8 and v.is_contiguous() for v in views)
    assert all(int(v.max()) > int(v.min()) for v in views)  # real content, not a blank tensor


@pytest.mark.parametrize("n_local", [0, 1, 8])
def test_count_is_two_plus_n_local(n_local: int) -> None:
    aug = MultiCropAugmentation(global_size=G, local_size=L, n_local=n_local)
    assert aug.n_views == 2 + n_local
    assert len(aug(gradient_photo(), _gen(1))) == 2 + n_local


def test_same_seed_identical_different_seed_differs() -> None:
    aug, img = _aug(), gradient_photo()
    a, b = aug(img, _gen(123)), aug(img, _gen(123))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = aug(img, _gen(124))
    assert sum(not torch.equal(x, y) for x, y in zip(a, c, strict=True)) >= 3
    # The generator advances: a second call with the same generator object gives new crops.
    gen = _gen(5)
    first, second = aug(img, gen), aug(img, gen)
    assert not all(torch.equal(x, y) for x, y in zip(first, second, strict=True))


def test_global_rngs_untouched() -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    states = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    _aug()(gradient_photo(), _gen(0))
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        _aug()(gradient_photo().convert("L"), _gen(0))


def test_plain_crop_matches_pil_bicubic() -> None:
    """With photometric ops off, a view is PIL's crop + bicubic resize (to within 1 grey level)."""
    img = gradient_photo(80, 60)
    aug = _aug()
    for p in aug.sample_params(img.height, img.width, _gen(3)):
        top, left, h, w = p.box
        assert min(top, left) >= 0 and top + h <= img.height and left + w <= img.width
        ours = aug.apply(img, [_plain(p)])[0]
        ref = img.crop((left, top, left + w, top + h)).resize((p.size, p.size), Image.Resampling.BICUBIC)
        ref_t = torch.from_numpy(np.array(ref)).permute(2, 0, 1)
        assert (ours.int() - ref_t.int()).abs().max() <= 1
        flipped = aug.apply(img, [_plain(p, flip=True)])[0]
        assert torch.equal(flipped, ours.flip(-1))


def test_solarize_matches_pil() -> None:
    img, aug = gradient_photo(), _aug()
    p = _plain(aug.sample_params(img.height, img.width, _gen(0))[1])
    plain = aug.apply(img, [p])[0]
    ours = aug.apply(img, [dataclasses.replace(p, solarize=True)])[0]
    ref = ImageOps.solarize(Image.fromarray(plain.permute(1, 2, 0).numpy()), 128)
    assert torch.equal(ours, torch.from_numpy(np.array(ref)).permute(2, 0, 1))
    assert not torch.equal(ours, plain)


def test_colour_pipeline_matches_torchvision_reference() -> None:
    """Jitter (given order) + grayscale + blur equal torchvision's float kernels applied in DINO order."""
    img, aug = gradient_photo(), _aug()
    p = aug.sample_params(img.height, img.width, _gen(7))[0]
    jitter = ((3, 0.08), (1, 1.3), (0, 0.7), (2, 1.15))  # hue, contrast, brightness, saturation
    ours = aug.apply(img, [_plain(p, jitter=jitter, grayscale=True, blur_sigma=1.3)])[0]

    x = aug.apply(img, [_plain(p)])[0].float() / 255
    for op, f in jitter:
        fn = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, tvf.adjust_hue)[op]
        x = fn(x, f)
    x = tvf.rgb_to_grayscale(x, num_output_channels=3)
    r = math.ceil(3 * 1.3)
    x = tvf.gaussian_blur(x, [2 * r + 1, 2 * r + 1], [1.3, 1.3])  # same truncation + reflect padding
    ref = (x * 255 + 0.5).floor().clamp(0, 255)
    assert (ours.float() - ref).abs().max() <= 1
    assert torch.equal(ours[0], ours[1]) and torch.equal(ours[1], ours[2])  # grayscale


def test_grouped_rendering_equals_one_view_at_a_time() -> None:
    img, aug = gradient_photo(), _aug()
    params = aug.sample_params(img.height, img.width, _gen(11))
    together = aug.apply(img, params)
    alone = [aug.apply(img, [p])[0] for p in params]
    for a, b in zip(together, alone, strict=True):
        assert (a.int() - b.int()).abs().max() <= 1  # batched vs single matmul may round differently


# --------------------------------------------------------------------------------------- hand-written kernels


@pytest.mark.parametrize("hue", [-0.5, -0.1, 0.0, 0.04, 0.1, 0.5])
def test_hue_matches_torchvision(hue: float) -> None:
    x = torch.rand(3, 24, 24, generator=_gen(0))
    x[:, :4] = x[:, :4].round()  # saturated colours and exact ties between channels
    x[:, 4:8] = x[0:1, 4:8]  # greys
    assert torch.allclose(augment._adjust_hue(x, hue), tvf.adjust_hue(x, hue), atol=1e-5)


@pytest.mark.parametrize("size", [24, 136])  # matmul path and shifted-add path
def test_blur_matches_conv_reference(size: int) -> None:
    x = torch.rand(3, 3, size, size, generator=_gen(1))
    sigmas = [0.1, 0.9, 2.0]
    out = augment._gaussian_blur(x, sigmas)
    for i, s in enumerate(sigmas):
        r = max(1, math.ceil(3 * s))
        taps = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (taps / s) ** 2)
        k = (k / k.sum()).float()
        ref = tnf.conv2d(
            tnf.pad(x[i : i + 1], (r, r, r, r), mode="reflect"),
            (k[:, None] * k[None]).expand(3, 1, -1, -1),
            groups=3,
        )
        assert torch.allclose(out[i : i + 1], ref, atol=1e-5)
    assert torch.allclose(augment._gaussian_blur(torch.full((1, 3, size, size), 0.3), [1.7]), torch.tensor(0.3))


# ------------------------------------------------------------------------------- parameter distribution


def test_solarize_only_on_global_two_with_p_0_2() -> None:
    draws = _sample_many(_aug(), 2000)
    counts = Counter(k for views in draws for k, p in enumerate(views) if p.solarize)
    assert set(counts) == {1}
    assert abs(counts[1] / len(draws) - 0.2) < 0.04


def test_blur_probabilities_and_sigma_range() -> None:
    draws = _sample_many(_aug(), 2000)
    rate = [sum(v[k].blur_sigma is not None for v in draws) / len(draws) for k in range(2 + N_LOCAL)]
    assert rate[0] == 1.0
    assert abs(rate[1] - 0.1) < 0.03
    assert all(abs(r - 0.5) < 0.05 for r in rate[2:])
    sigmas = [p.blur_sigma for v in draws for p in v if p.blur_sigma is not None]
    assert 0.1 <= min(sigmas) < 0.2 and 1.9 < max(sigmas) <= 2.0


def test_flip_jitter_grayscale_probabilities_and_ranges() -> None:
    views = [p for v in _sample_many(_aug(), 1000) for p in v]
    n = len(views)
    assert abs(sum(p.flip for p in views) / n - 0.5) < 0.03
    assert abs(sum(p.jitter is not None for p in views) / n - 0.8) < 0.03
    assert abs(sum(p.grayscale for p in views) / n - 0.2) < 0.03
    jittered = [p.jitter for p in views if p.jitter is not None]
    orders = Counter(tuple(op for op, _ in j) for j in jittered)
    assert len(orders) == 24 and min(orders.values()) > len(jittered) / 24 * 0.6  # all orders, ~uniform
    limits = {0: (0.6, 1.4), 1: (0.6, 1.4), 2: (0.8, 1.2), 3: (-0.1, 0.1)}
    for j in jittered:
        assert sorted(op for op, _ in j) == [0, 1, 2, 3]
        assert all(limits[op][0] <= f <= limits[op][1] for op, f in j)


def test_crop_scale_and_aspect_ratio() -> None:
    h, w = 375, 500
    for views in _sample_many(_aug(), 300):
        for k, p in enumerate(views):
            top, left, ch, cw = p.box
            assert 0 <= top <= h - ch and 0 <= left <= w - cw
            lo, hi = (0.4, 1.0) if k < 2 else (0.05, 0.4)
            assert lo * 0.97 <= ch * cw / (h * w) <= hi * 1.03  # rounding of h and w to integers
            assert 3 / 4 * 0.97 <= cw / ch <= 4 / 3 * 1.03
            assert p.size == (G if k < 2 else L)


# --------------------------------------------------------------------------------------- batched stage


def _batch(aug: MultiCropAugmentation, n: int = 4) -> list[torch.Tensor]:
    samples = [aug(gradient_photo(seed=i), _gen(i)) for i in range(n)]
    return [torch.stack(v) for v in zip(*samples, strict=True)]


def test_to_model_input_matches_formula_and_keeps_input() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    aug = _aug(mean=mean, std=std)
    views = _batch(aug)
    before = [v.clone() for v in views]
    out = aug.to_model_input(views, device="cpu")
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    assert len(out) == len(views)
    for o, v, b in zip(out, views, before, strict=True):
        assert o.dtype == torch.float32 and o.shape == v.shape and o.device.type == "cpu"
        assert torch.allclose(o, (v.float() / 255 - m) / s, atol=1e-5)
        assert torch.equal(v, b)
    again = aug.to_model_input(views, device=torch.device("cpu"))
    assert all(torch.equal(a, o) for a, o in zip(again, out, strict=True))


def test_constant_image_normalises_to_imagenet_values() -> None:
    """Constant colour, photometric ops off (blur on: keeps constants) -> exactly (c/255 - mean)/std."""
    colour = (200, 100, 30)
    img = Image.new("RGB", (50, 40), colour)
    aug = _aug()
    params = [_plain(p, blur_sigma=1.5) for p in aug.sample_params(img.height, img.width, _gen(0))]
    views = aug.apply(img, params)
    assert all(torch.equal(v, torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand_as(v)) for v in views)
    out = aug.to_model_input([v.unsqueeze(0) for v in views])
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    for o in out:
        assert torch.allclose(o[0].mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
        assert float(o.std()) > 0  # three different channel values
        assert torch.allclose(o[0].amax(dim=(1, 2)), o[0].amin(dim=(1, 2)))


def test_to_model_input_value_range() -> None:
    aug = _aug()
    out = aug.to_model_input(_batch(aug))
    lo = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    hi = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    for o in out:
        assert (o.amin(dim=(0, 2, 3)) >= lo - 1e-5).all() and (o.amax(dim=(0, 2, 3)) <= hi + 1e-5).all()
    with pytest.raises(ValueError):
        aug.to_model_input([torch.zeros(3, G, G, dtype=torch.uint8)])


# --------------------------------------------------------------------------------------- eval transform


def eval_transform(image_size: int):  # noqa: ANN201 - the eval preprocessing of one image: crop, then normalise
    return lambda image: normalize(eval_crop(image_size)(image)[None])[0]


def test_eval_transform_shape_determinism_and_values() -> None:
    tf = eval_transform(32)
    img = gradient_photo(90, 50)
    a, b = tf(img), tf(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # Resize shorter side to int(32 * 256 / 224) = 36 (bicubic; long side int(90 * 36 / 50) = 64 as in
    # torchvision), then centre-crop 32: check by hand.
    resized = img.resize((64, 36), Image.Resampling.BICUBIC)
    left, top = (resized.width - 32) // 2, (resized.height - 32) // 2
    crop = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255
    ref = (torch.from_numpy(crop).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    assert torch.allclose(a, ref, atol=1e-5)
    flat = eval_transform(16)(Image.new("RGB", (40, 20), (255, 0, 128)))
    expected = torch.tensor(
        [(c / 255 - m) / s for c, m, s in zip((255, 0, 128), IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    )
    assert flat.shape == (3, 16, 16)
    assert torch.allclose(flat, expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-5)


def test_pickles_for_worker_processes() -> None:
    aug = _aug()
    aug.to_model_input(_batch(aug, 1))  # fills the per-device cache
    clone = pickle.loads(pickle.dumps(aug))
    assert clone._affine == {}
    img = gradient_photo()
    assert all(torch.equal(a, b) for a, b in zip(aug(img, _gen(3)), clone(img, _gen(3)), strict=True))


def test_pixels_as_a_tensor_give_the_views_of_the_pil_image() -> None:
    aug, image = _aug(), gradient_photo(seed=4)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # CHW, as torchvision decodes a JPEG
    from_pil = aug(image, torch.Generator().manual_seed(9))
    from_tensor = aug(pixels, torch.Generator().manual_seed(9))
    assert all(torch.equal(a, b) for a, b in zip(from_pil, from_tensor, strict=True))
    for bad in (pixels.float(), pixels[:1], pixels.unsqueeze(0).expand(2, -1, -1, -1)):
        with pytest.raises(ValueError, match=r"uint8 \[3, H, W\] CPU pixels"):
            aug(bad, torch.Generator())
