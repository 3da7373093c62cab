"""DINO multi-crop augmentation (Caron et al., 2021), fast single-core CPU implementation.

Per image the pipeline produces 2 global crops and ``n_local`` local crops, each with

* bicubic (antialiased) random resized crop, aspect ratio in [3/4, 4/3],
* horizontal flip with p=0.5,
* colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p=0.8, the four ops in a random
  order as in torchvision's ``ColorJitter``,
* grayscale with p=0.2,
* Gaussian blur, sigma ~ U(0.1, 2.0), with p=1.0 (global 1), p=0.1 (global 2), p=0.5 (locals),
* solarize (threshold 128) with p=0.2 on global 2 only,
* ImageNet normalisation (done batched in :meth:`MultiCropAugmentation.to_model_input`).

The work is split in two stages: ``__call__`` (per sample, in DataLoader workers) returns uint8 crops, and
``to_model_input`` (per batch, on the training device) converts to normalised float32. Alternatively the workers
only draw the parameters (``sample_params``) and ``to_model_input`` renders the whole batch on the training device
(dino_scale.data.device_augment, the recipe's ``data.augment_on``).

How this differs from the reference PIL implementation (official ``DataAugmentationDINO``), and why it is
~2.5x faster on one core with torch ops alone, and ~4.5x with the fused C kernel (numbers in
``benchmarks/RESULTS.md``):

* Crop + resize runs in ``torch.nn.functional.interpolate`` on a channels-last uint8 view of the image,
  which hits PyTorch's vectorised uint8 antialiased-bicubic kernel (written to match PIL's resampling,
  outputs agree with ``PIL.Image.resize(BICUBIC)`` to within 1 grey level) and is ~5x faster than PIL.
* The colour ops run once in float32 on the small crop, with a single rounding to uint8 at the end; PIL
  truncates to uint8 after every op. Brightness/contrast/saturation/grayscale use torchvision's tensor
  kernels. Hue is exact HSV hue rotation (PIL's version quantises hue to 8 bits), hand-written because
  torchvision's tensor ``adjust_hue`` is ~10x slower (it goes through ``torch.max`` with indices and a
  full HSV round trip).
* Gaussian blur is a true separable Gaussian (radius ceil(3 sigma), reflect padding); the official code
  uses PIL's ``GaussianBlur(radius=sigma)``, a 3-pass box-blur approximation of the same Gaussian.
* After its crop and resize, a view's per-pixel stage (colour jitter, grayscale, blur, rounding, solarize) runs by
  default in one call of a fused C kernel (dino_scale.data.fused_view, ``view_kernel``) that computes the torch
  ops' formulas in a few passes over the crop instead of ~40 tensor ops (within 1 grey level of them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as tnf
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf

from dino_scale.data.decode import MAX_DCT_REDUCTION, EncodedJpeg, dct_reduced_size
from dino_scale.data.fused_view import FusedViewKernel, resolve_kernel

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Colour-jitter strengths and the sampling ranges they imply (torchvision's ColorJitter convention).
_BRIGHTNESS = 0.4
_CONTRAST = 0.4
_SATURATION = 0.2
_HUE = 0.1
_JITTER_P = 0.8
_GRAYSCALE_P = 0.2
_FLIP_P = 0.5
_BLUR_SIGMA = (0.1, 2.0)
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop

# Every view consumes exactly _DRAWS_PER_VIEW uniforms, whatever happens, so the random stream of view k
# never depends on the image size or on the outcome of view k-1's rejection sampling. Slot layout:
_U_CROP = 0  # 2 * _CROP_ATTEMPTS (area, log-ratio) pairs, then (top, left)
_U_FLIP = _U_CROP + 2 * _CROP_ATTEMPTS + 2
_U_JITTER = _U_FLIP + 1  # apply?, then 4 sort keys for the op order, then 4 factors
_U_GRAY = _U_JITTER + 9
_U_BLUR = _U_GRAY + 1  # apply?, sigma
_U_SOLARIZE = _U_BLUR + 2
_DRAWS_PER_VIEW = _U_SOLARIZE + 1

# Colour-op ids, in ColorJitter's order, and their factor ranges. The op ids, HUE_CHANNEL_OFFSETS, blur_weights,
# reflect_shift_matrices, blur_radius and MATMUL_BLUR_MAX_SIZE are public for device_augment.py's batched renderer,
# which must compute exactly what this module computes.
BRIGHT, CONTR, SAT, HUE_OP = 0, 1, 2, 3
_JITTER_RANGES = (
    (1 - _BRIGHTNESS, 1 + _BRIGHTNESS),
    (1 - _CONTRAST, 1 + _CONTRAST),
    (1 - _SATURATION, 1 + _SATURATION),
    (-_HUE, _HUE),
)


@dataclass(frozen=True)
class ViewParams:
    """All random decisions for one view; applying them is deterministic.

    ``box`` is (top, left, height, width) in input pixels. ``jitter`` is None when colour jitter is not
    applied, else a tuple of (op_id, factor) in application order, op ids 0..3 = brightness, contrast,
    saturation, hue. ``blur_sigma`` is None when no blur is applied.
    """

    size: int
    box: tuple[int, int, int, int]
    flip: bool
    jitter: tuple[tuple[int, float], ...] | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


@dataclass(frozen=True)
class _ViewSpec:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


def _crop_box(u: Sequence[float], height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` (same algorithm and distribution), driven by the
    pre-drawn uniforms ``u`` (2 * _CROP_ATTEMPTS + 2 of them). Returns (top, left, height, width).

    Re-implemented because torchvision's version draws from the global RNG and takes no generator.
    """
    area = height * width
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    for k in range(_CROP_ATTEMPTS):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[2 * k])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[2 * k + 1])
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            # floor(u * n) is uniform on {0..n-1} like torch.randint(0, n); min() guards u*n rounding up to n.
            top = min(int(u[2 * _CROP_ATTEMPTS] * (height - h + 1)), height - h)
            left = min(int(u[2 * _CROP_ATTEMPTS + 1] * (width - w + 1)), width - w)
            return top, left, h, w
    # Fallback: central crop with the aspect ratio clamped to the allowed range.
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, round(width / _RATIO[0])
    elif in_ratio > _RATIO[1]:
        h, w = height, round(height * _RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _sample_view(u: Sequence[float], height: int, width: int, spec: _ViewSpec) -> ViewParams:
    """Turn ``_DRAWS_PER_VIEW`` uniforms in [0, 1) into the parameters of one view."""
    box = _crop_box(u[_U_CROP:_U_FLIP], height, width, spec.scale)
    jitter = None
    if u[_U_JITTER] < _JITTER_P:
        keys = u[_U_JITTER + 1 : _U_JITTER + 5]
        order = sorted(range(4), key=lambda i: keys[i])  # argsort of iid uniforms: a uniform permutation
        factors = [
            lo + (hi - lo) * v for (lo, hi), v in zip(_JITTER_RANGES, u[_U_JITTER + 5 : _U_JITTER + 9], strict=True)
        ]
        jitter = tuple((op, factors[op]) for op in order)
    sigma = None
    if u[_U_BLUR] < spec.blur_p:
        sigma = _BLUR_SIGMA[0] + (_BLUR_SIGMA[1] - _BLUR_SIGMA[0]) * u[_U_BLUR + 1]
    return ViewParams(
        size=spec.size,
        box=box,
        flip=u[_U_FLIP] < _FLIP_P,
        jitter=jitter,
        grayscale=u[_U_GRAY] < _GRAYSCALE_P,
        blur_sigma=sigma,
        solarize=u[_U_SOLARIZE] < spec.solarize_p,
    )


def _scaled_edge(x: int, full: int, reduced: int) -> int:
    """round(x * reduced / full), halves rounded up, in exact integer arithmetic (no float rounding at .5)."""
    return (2 * x * reduced + full) // (2 * full)


def reduced_view_params(
    params: Sequence[ViewParams], full: tuple[int, int], reduced: tuple[int, int]
) -> list[ViewParams]:
    """The views drawn for an image of ``full`` = (height, width) pixels, with their crop boxes moved into the same
    image decoded at ``reduced`` = (height, width) pixels (a JPEG decoded at a DCT reduction); all else unchanged.

    Each axis is scaled by reduced / full (e.g. 600 / 1200, or 150 / 1199 for ceil(1199 / 8)); a box's two edges
    on each axis, ``top`` and ``top + height`` (``left`` and ``left + width``), are scaled and rounded to the nearest
    integer (halves up), and the new box spans the rounded edges. Edges in [0, full] land in [0, reduced], so the box
    stays inside the image; equal ``full`` and ``reduced`` give the boxes unchanged.
    """
    (full_h, full_w), (red_h, red_w) = full, reduced
    out = []
    for p in params:
        top, left, h, w = p.box
        y0, y1 = _scaled_edge(top, full_h, red_h), _scaled_edge(top + h, full_h, red_h)
        x0, x1 = _scaled_edge(left, full_w, red_w), _scaled_edge(left + w, full_w, red_w)
        out.append(replace(p, box=(y0, x0, y1 - y0, x1 - x0)))
    return out


def choose_dct_reduction(params: Sequence[ViewParams], height: int, width: int) -> int:
    """The largest k in 0..3 such that decoding the ``height`` x ``width`` image at DCT scale 1/2^k leaves every
    view's crop box, moved there by :func:`reduced_view_params`, at least the view's output size in height and width:
    no view is upsampled because of the reduction (a view whose full-size box is already smaller than its output
    gets k = 0). Both sides must hold at least 2^k pixels, where libjpeg reduces by exactly 2^k."""
    for k in range(MAX_DCT_REDUCTION, 0, -1):
        if min(height, width) < (1 << k):
            continue
        reduced = (dct_reduced_size(height, k), dct_reduced_size(width, k))
        moved = reduced_view_params(params, (height, width), reduced)
        if all(p.box[2] >= p.size and p.box[3] >= p.size for p in moved):
            return k
    return 0


# n_c / 6 for c = r, g, b: where each channel sits on the colour hexagon relative to the hue.
HUE_CHANNEL_OFFSETS = torch.tensor([5.0 / 6.0, 3.0 / 6.0, 1.0 / 6.0]).view(3, 1, 1)


def _adjust_hue(img: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """Rotate the HSV hue of a float [3, H, W] image in [0, 1] by ``hue_factor`` turns (exact, float32).

    Same maths as torchvision's ``adjust_hue`` (RGB -> HSV, shift H, HSV -> RGB; agrees to ~2e-6) but in
    ~24 cheap elementwise ops instead of torchvision's ~10x slower version (``torch.max`` with indices, a
    full HSV round trip). A hue rotation keeps max and min of (r, g, b), so HSV -> RGB only needs each
    channel's position on the colour hexagon, t_c = frac(h + n_c / 6 + hue_factor) in turns with
    n = (5, 3, 1), and is out_c = min + chroma * clamp(6 |t_c - 1/3| - 1, 0, 1).
    """
    r, g, b = img.unbind(0)
    maxc = img.amax(0)
    minc = img.amin(0)
    chroma = maxc - minc
    chroma6 = chroma.mul(6.0)
    inv6 = chroma6.clamp_min(1e-12).reciprocal_()  # grey pixels: chroma 0 zeroes the numerator anyway
    # Hue in turns (times 6C) by max channel, torchvision/colorsys priority r > g > b:
    # r: (g-b)/C, g: 2 + (b-r)/C, b: 4 + (r-g)/C.
    h = torch.where(
        r == maxc,
        g - b,
        torch.where(g == maxc, (b - r).add_(chroma, alpha=2.0), (r - g).add_(chroma, alpha=4.0)),
    ).mul_(inv6)
    # h >= -1/6 and |hue_factor| <= 0.5, so the +1 keeps frac()'s argument positive: frac() == mod 1.
    h.add_(1.0 + hue_factor)
    t = h.unsqueeze(0) + HUE_CHANNEL_OFFSETS
    t.frac_().sub_(1.0 / 3.0).abs_().clamp_(1.0 / 6.0, 1.0 / 3.0)
    # min + C * (6 * clamp(|t - 1/3|, 1/6, 1/3) - 1) == (min - C) + 6C * clamp(...)
    return torch.addcmul((minc - chroma).unsqueeze(0), chroma6.unsqueeze(0), t)


def gaussian_taps(sigma: float, radius: int) -> list[float]:
    """One side of a 1-D Gaussian kernel, centre first: exp(-t^2 / (2 sigma^2)) for t = 0 .. min(ceil(3 sigma), radius),
    divided by the sum over both sides (the kernel is truncated at ceil(3 sigma), and at ``radius``, and renormalised).
    """
    cut = min(max(1, math.ceil(3.0 * sigma)), radius)
    side = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(cut + 1)]
    total = math.fsum([*side, *side[1:]])
    return [v / total for v in side]


def blur_weights(sigmas: Sequence[float], radius: int) -> torch.Tensor:
    """[N, 2 * radius + 1] float32 1-D Gaussian kernels, kernel i truncated at ceil(3 sigma_i), sum 1."""
    rows = []
    for sigma in sigmas:  # a few dozen exp() calls: cheaper in Python than a dozen tiny tensor ops
        side = gaussian_taps(sigma, radius)
        zeros = [0.0] * (radius + 1 - len(side))
        rows.append([*zeros, *side[:0:-1], *side, *zeros])
    return torch.tensor(rows, dtype=torch.float32)


_SHIFT_CACHE: dict[tuple[int, int], torch.Tensor] = {}


def reflect_shift_matrices(size: int, radius: int) -> torch.Tensor:
    """[2r+1, size*size] stack of 0/1 matrices; row block t maps a signal to its reflect-padded shift by
    t - r, so a 1-D blur with taps w is the matrix ``w @ stack`` (reflect borders folded in)."""
    key = (size, radius)
    if key not in _SHIFT_CACHE:
        idx = torch.arange(size)
        mats = torch.zeros(2 * radius + 1, size, size)
        for t in range(-radius, radius + 1):
            src = (idx + t).abs()  # reflect at 0 ...
            src = torch.where(src >= size, 2 * (size - 1) - src, src)  # ... and at size - 1
            mats[t + radius].index_put_((idx, src), torch.ones(size), accumulate=True)
        _SHIFT_CACHE[key] = mats.reshape(2 * radius + 1, size * size)
    return _SHIFT_CACHE[key]


# Largest kernel radius: ceil(3 * max sigma).
MAX_BLUR_RADIUS = math.ceil(3 * _BLUR_SIGMA[1])


def blur_radius(size: int) -> int:
    """The kernel radius that covers every sigma for crops of ``size`` px: reflect padding needs radius < size."""
    return min(MAX_BLUR_RADIUS, size - 1)


# Up to this side length the blur is done as two dense matrix products (few large ops, ~2x faster than
# shifted adds for 96 px crops); above it the O(size^3) matmul loses to O(size^2 * taps) shifted adds.
MATMUL_BLUR_MAX_SIZE = 128


def _gaussian_blur(img: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of a float [N, C, H, W] batch (H == W), sample i with ``sigmas[i]``.

    Kernel i is the sampled Gaussian truncated at radius ceil(3 sigma_i) and renormalised, borders are
    reflect-padded (as torchvision's ``gaussian_blur``). Hand-written because torchvision convolves with
    the full 2-D kernel (~7 ms for a 224 px crop and 13 taps on one core) and takes one sigma per call;
    this is ~0.2 ms per 96 px and ~0.5 ms per 224 px crop. Both code paths compute the same sums.
    """
    n, _, size, width = img.shape
    if size != width:
        raise ValueError(f"square crops expected, got {size}x{width}")
    if any(not 0 < s <= _BLUR_SIGMA[1] for s in sigmas):
        raise ValueError(f"sigma must be in (0, {_BLUR_SIGMA[1]}], got {sigmas}")
    radius = blur_radius(size)
    weights = blur_weights(sigmas, radius)
    if size <= MATMUL_BLUR_MAX_SIZE:
        mat = (weights @ reflect_shift_matrices(size, radius)).view(n, 1, size, size)
        return torch.matmul(torch.matmul(mat, img), mat.transpose(-1, -2))
    out = []
    for i in range(n):
        w = weights[i].tolist()
        r = max(t for t in range(radius + 1) if w[radius + t] > 0)  # this sample's own radius
        x = img[i : i + 1]
        for dim in (3, 2):  # width, then height
            xp = tnf.pad(x, (r, r, 0, 0) if dim == 3 else (0, 0, r, r), mode="reflect")
            acc = xp.narrow(dim, r, size) * w[radius]
            for t in range(1, r + 1):  # symmetric kernel: add tap pairs
                acc.add_(xp.narrow(dim, r - t, size) + xp.narrow(dim, r + t, size), alpha=w[radius + t])
            x = acc
        out.append(x)
    return torch.cat(out) if n > 1 else out[0]


def _apply_color(img: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Colour jitter then grayscale on a float [3, H, W] image in [0, 1], in DINO's order."""
    if params.jitter is not None:
        for op, factor in params.jitter:
            if op == BRIGHT:
                img = tvf.adjust_brightness_image(img, factor)
            elif op == CONTR:
                img = tvf.adjust_contrast_image(img, factor)
            elif op == SAT:
                img = tvf.adjust_saturation_image(img, factor)
            else:
                img = _adjust_hue(img, factor)
    if params.grayscale:
        img = tvf.rgb_to_grayscale_image(img, num_output_channels=1)  # caller broadcasts to 3 channels
    return img


def blur_where(
    x: torch.Tensor,
    sigmas: Sequence[float | None],
    blur: Callable[[torch.Tensor, Sequence[float]], torch.Tensor],
) -> torch.Tensor:
    """Blur the rows of ``x`` ([N, 3, S, S] float) whose sigma is not None, each with its own sigma, in one call of
    ``blur`` (the per-sample path's and the batched path's Gaussian share this)."""
    rows = [k for k, sigma in enumerate(sigmas) if sigma is not None]
    if not rows:
        return x
    chosen = [sigma for sigma in sigmas if sigma is not None]
    if len(rows) == len(sigmas):
        return blur(x, chosen)
    index = torch.tensor(rows).to(x.device, non_blocking=True)  # a blocking copy would wait for the whole GPU
    x.index_copy_(0, index, blur(x.index_select(0, index), chosen))
    return x


def round_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """The one rounding of the colour ops' float result in [0, 1] to uint8 (round half up, in place on ``x``).
    float -> int32 -> uint8 is ~5x faster than a direct float -> uint8 conversion on CPU."""
    return x.mul_(255.0).add_(0.5).clamp_(0.0, 255.0).to(torch.int32).to(torch.uint8)


def _render_views(
    src: torch.Tensor, params: Sequence[ViewParams], kernel: FusedViewKernel | None = None
) -> list[torch.Tensor]:
    """Render views that share one output size from a uint8 [1, 3, H, W] channels-last image.

    Returns uint8 [3, size, size] tensors (views of one [N, 3, size, size] batch). After the crops and resizes, the
    per-pixel stage (colour jitter, grayscale, blur, rounding, solarize) runs in ``kernel``, the fused C kernel, one
    call per view; without it in torch ops: colour ops per crop (each crop has its own op order); float conversion,
    blur (batched matmuls for small crops) and rounding once over the crops, which saves many small-tensor op
    dispatches for the local crops.
    """
    size = params[0].size
    crops = []
    for p in params:
        top, left, h, w = p.box
        # A packed channels-last uint8 input selects PyTorch's vectorised antialiased bicubic kernel
        # (written to match PIL's resampling); packing the crop first is cheaper than a strided view.
        crop = src[:, :, top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
        out = tnf.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
        crops.append(out.flip(-1) if p.flip else out)
    batch = torch.cat(crops).contiguous() if len(crops) > 1 else crops[0].contiguous()
    if kernel is not None:
        radius = blur_radius(size)
        views = list(batch.unbind(0))
        for v, p in zip(views, params, strict=True):
            taps = gaussian_taps(p.blur_sigma, radius) if p.blur_sigma is not None else ()
            kernel.render(v, p.jitter or (), p.grayscale, taps, p.solarize)
        return views

    rows = [i for i, p in enumerate(params) if p.jitter is not None or p.grayscale or p.blur_sigma is not None]
    if rows:
        dense = len(rows) == len(params)
        row_idx = None if dense else torch.tensor(rows)
        x = (batch if dense else batch.index_select(0, row_idx)).to(torch.float32).mul_(1.0 / 255.0)
        for k, i in enumerate(rows):
            if params[i].jitter is not None or params[i].grayscale:
                x[k] = _apply_color(x[k], params[i])
        x = blur_where(x, [params[i].blur_sigma for i in rows], _gaussian_blur)
        q = round_to_uint8(x)
        if dense:
            batch = q
        else:
            batch.index_copy_(0, row_idx, q)
    views = list(batch.unbind(0))
    for v, p in zip(views, params, strict=True):
        if p.solarize:
            # PIL's ImageOps.solarize(128) on uint8: v >= 128 -> 255 - v, i.e. v XOR 255 when the top bit
            # is set; in place and ~20x faster than torch.where on uint8 tensors.
            v.bitwise_xor_(v.bitwise_right_shift(7).neg_())
    return views


class RenderableBatch(Protocol):
    """A training batch as ``to_model_input`` takes it (dino_scale.data.loaders.TrainBatch): rendered ``views``
    (uint8 ``[B, 3, S, S]`` per view index), or, rendered on the device, ``images`` (uint8 ``[3, H, W]`` per sample)
    and their ``params`` (``sample_params`` per sample) with ``views`` empty. With device decoding, ``encoded[i]``
    holds sample i's JPEG (``images[i]`` is then None) and ``keys[i]`` names it in errors."""

    views: list[torch.Tensor]
    keys: list[str]
    images: list[torch.Tensor | None] | None
    params: list[list[ViewParams]] | None
    encoded: list[EncodedJpeg | None] | None


def pil_to_channels_last(image: PIL.Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [1, 3, H, W] tensor viewing HWC memory (i.e. channels-last)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    hwc = torch.from_numpy(np.array(image))  # np.array copies, so the tensor owns writable memory
    return hwc.permute(2, 0, 1).unsqueeze(0)


def image_source(image: PIL.Image.Image | torch.Tensor) -> torch.Tensor:
    """What the views are cut from: uint8 ``[1, 3, H, W]``, from an RGB PIL image (channels-last memory,
    :func:`pil_to_channels_last`) or a uint8 ``[3, H, W]`` or ``[1, 3, H, W]`` tensor as it is (each crop is packed
    channels-last before its resize, from either layout at the same cost)."""
    if isinstance(image, PIL.Image.Image):
        return pil_to_channels_last(image)
    src = image if image.ndim == 4 else image.unsqueeze(0)
    if src.dtype != torch.uint8 or src.shape[:2] != (1, 3) or src.device.type != "cpu":
        got = f"{image.dtype} {tuple(image.shape)} on {image.device}"
        raise ValueError(f"expected uint8 [3, H, W] CPU pixels, got {got}")
    return src


class MultiCropAugmentation:
    """DINO multi-crop augmentation: 2 global + ``n_local`` local views per image.

    Output format: ``__call__`` returns ``2 + n_local`` **uint8** CHW tensors (globals first, then locals),
    values 0..255, un-normalised. ``to_model_input`` turns the per-view batches into float32 normalised
    tensors on the training device. Keeping the per-sample stage in uint8 makes it cheaper and sends 4x
    fewer bytes from DataLoader workers (and to the GPU); the float conversion runs batched on the device.

    Randomness: every random decision is drawn from the ``generator`` passed to ``__call__`` (a fixed
    number of draws per view), so the same image with a generator in the same state gives bit-identical
    crops. The global torch / numpy / python RNGs are never touched.

    ``view_kernel`` (recipe key ``data.view_kernel``): what renders each view's per-pixel stage after its crop and
    resize, dino_scale.data.fused_view's C kernel ("c"), torch ops ("torch"), or the C kernel where it builds ("auto",
    else torch with a warning). Resolved here, in the constructing process: ``view_kernel`` then says which it is.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        view_kernel: str = "auto",
    ) -> None:
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 entries each and std > 0, got {mean}, {std}")
        self.global_size = global_size
        self.local_size = local_size
        self.n_local = n_local
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._specs = (
            _ViewSpec(global_size, tuple(global_scale), blur_p=1.0, solarize_p=0.0),
            _ViewSpec(global_size, tuple(global_scale), blur_p=0.1, solarize_p=0.2),
            *[_ViewSpec(local_size, tuple(local_scale), blur_p=0.5, solarize_p=0.0)] * n_local,
        )
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # normalisation, per device
        self._kernel = resolve_kernel(view_kernel)
        self.view_kernel = "torch" if self._kernel is None else "c"

    def __getstate__(self) -> dict:
        # Drop the per-device constants (may hold CUDA tensors) and the loaded C library (not picklable) when sent to
        # DataLoader worker processes; the library is loaded again from its cache there.
        state = self.__dict__.copy()
        state["_affine"] = {}
        state["_kernel"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._kernel = resolve_kernel(self.view_kernel)

    @property
    def n_views(self) -> int:
        """Number of views per image: 2 global + ``n_local`` local."""
        return len(self._specs)

    def sample_params(self, height: int, width: int, generator: torch.Generator) -> list[ViewParams]:
        """Draw the parameters of all views for an image of the given size (globals first).

        Consumes exactly ``n_views * _DRAWS_PER_VIEW`` float64 uniforms from ``generator`` in one call.
        """
        u = torch.rand(len(self._specs) * _DRAWS_PER_VIEW, generator=generator, dtype=torch.float64).tolist()
        return [
            _sample_view(u[k * _DRAWS_PER_VIEW : (k + 1) * _DRAWS_PER_VIEW], height, width, spec)
            for k, spec in enumerate(self._specs)
        ]

    def apply(self, image: PIL.Image.Image | torch.Tensor, params: Sequence[ViewParams]) -> list[torch.Tensor]:
        """Render the views described by ``params`` from ``image`` (an RGB PIL image, or its pixels as a uint8
        ``[3, H, W]`` CPU tensor); deterministic. Returns uint8 CHW."""
        src = image_source(image)
        by_size: dict[int, list[int]] = {}
        for k, p in enumerate(params):
            by_size.setdefault(p.size, []).append(k)
        out: list[torch.Tensor] = [torch.empty(0)] * len(params)
        for idx in by_size.values():
            for k, view in zip(idx, _render_views(src, [params[k] for k in idx], self._kernel), strict=True):
                out[k] = view
        return out

    def __call__(self, image: PIL.Image.Image | torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """Per-sample CPU stage: ``2 + n_local`` uint8 [3, S, S] tensors (globals first), from an RGB PIL image or
        its pixels as a uint8 ``[3, H, W]`` tensor (the same pixels give the same views).

        All randomness comes from ``generator``; same image + same generator state -> identical crops.
        """
        src = image_source(image)
        return self.apply(src, self.sample_params(src.shape[-2], src.shape[-1], generator))

    def to_model_input(
        self, views: Sequence[torch.Tensor] | RenderableBatch, device: torch.device | str = "cpu"
    ) -> list[torch.Tensor]:
        """Batched stage: uint8 [B, 3, H, W] per view -> float32 ``(x / 255 - mean) / std`` on ``device``.

        ``views``: the per-view batches, or a training batch (:class:`RenderableBatch`): its ``views``, or, when it
        carries ``images`` and ``params`` instead, the views rendered from them on ``device``
        (dino_scale.data.device_augment.render_batch; bit-identical to ``apply`` on CPU), its ``encoded`` JPEGs first
        decoded on ``device`` (dino_scale.data.device_augment.decode_jpegs).
        The uint8 batch is moved first (4x fewer bytes over PCIe), then converted on the device.
        Deterministic. Float inputs are accepted too and are assumed to be in [0, 255].
        """
        device = torch.device(device)
        if not isinstance(views, (Sequence, torch.Tensor)):  # a training batch
            if views.images is not None:
                if views.params is None:
                    raise ValueError("a batch with images needs their view parameters")
                # Imported here: device_augment builds on this module's kernels (imports it at load time).
                from dino_scale.data.device_augment import decode_jpegs, render_batch

                images = views.images
                if views.encoded is not None:
                    images = decode_jpegs(images, views.encoded, views.keys, device)
                views = render_batch(images, views.params, device)
            else:
                views = views.views
        if device not in self._affine:
            self._affine[device] = normalization_constants(self.mean, self.std, device)
        out = []
        for v in views:
            if v.ndim != 4 or v.shape[1] != 3:
                raise ValueError(f"expected a [B, 3, H, W] batch per view, got shape {tuple(v.shape)}")
            out.append(normalize(v.to(device, non_blocking=True), constants=self._affine[device]))
        return out


def normalization_constants(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each [1, 3, 1, 1] float32, with (x / 255 - mean) / std == x * scale + shift."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1)
    return scale.to(device), shift.to(device)


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    constants: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """uint8 (or float in [0, 255]) images [B, 3, H, W] -> float32 ``(x / 255 - mean) / std``, as one multiply-add.

    ``constants``: precomputed :func:`normalization_constants` on the images' device (the training step reuses
    them). The input is never modified in place.
    """
    scale, shift = constants if constants is not None else normalization_constants(mean, std, images.device)
    return images.to(torch.float32, copy=True).mul_(scale).add_(shift)


def eval_crop(image_size: int) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """Deterministic eval resize and crop: shorter side -> ``int(image_size * 256 / 224)`` (bicubic, antialiased),
    center crop ``image_size``, as a uint8 [3, S, S] tensor (what a ``--uint8`` exported model takes, as HWC); then
    :func:`normalize` for a float model."""
    return v2.Compose(
        [
            v2.Resize(int(image_size * 256 / 224), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
        ]
    )
