"""Batched multi-crop rendering on any torch device (the renderer of a "device multi-crop path").

:func:`render_batch` renders the views of a whole batch from the :class:`~dino_scale.data.augment.ViewParams`
that :meth:`MultiCropAugmentation.sample_params` draws per sample. The parameters are the same objects the
per-sample path (:meth:`MultiCropAugmentation.apply`) consumes, so per-sample seeding and exact resume are
unchanged; only where the pixels are computed moves. The output, one uint8 ``[B, 3, S, S]`` batch per view index,
is what the loader's ``torch.stack`` of per-sample views gives and goes to ``to_model_input`` unchanged.
In training (recipe key ``data.augment_on``: "device", or "auto" on CUDA) the loader's workers only decode and
draw the parameters (``make_train_loader(render_on_device=True)``), and ``MultiCropAugmentation.to_model_input``
calls :func:`render_batch` on the batch's images and parameters on the training device.

What is computed, op by op, and how it relates to ``augment.py`` (whose module docstring defines the semantics):

* Crop + antialiased bicubic resize: one ``interpolate`` per crop (crop boxes differ, so this is the one loop
  over samples). On CPU it is the same uint8 channels-last call as ``_render_views``, hence bit-identical. Other
  devices have no uint8 antialiased kernel, so there the crop is resized in float32 in the uint8 kernel's two
  passes (horizontal, round to uint8, vertical, round), which is what that kernel (fixed-point, Pillow's
  algorithm) computes up to its fixed-point precision: 1 grey level apart on ~0.4% of resized pixels.
* Everything after the resize runs over all crops of one size at once (views of every sample and every view
  index of that size), with per-crop parameters as device tensors and index sets, no loop over samples: flip,
  colour jitter (per-crop factors and per-crop op order: for each of the 4 order positions and each of the 4 ops,
  the crops that apply that op at that position are processed together), grayscale, Gaussian blur (per-crop
  sigma), one rounding to uint8, solarize. The formulas mirror augment.py / torchvision's kernels op by op
  (same expressions, same float32 constants, same blur weights from ``augment.blur_weights`` and reflect
  matrices from ``augment.reflect_shift_matrices``), so the float results agree to the last bit or ulp.
* Measured on CPU (tests/unit/data/test_device_augment.py): bit-identical to ``apply``. torchvision's blend and
  the per-sample blur use ``add_(x, alpha=scalar)``, which PyTorch's CPU kernel evaluates as a fused multiply-add;
  the per-crop factor here goes through ``addcmul_`` with a tensor, which the CPU kernel fuses the same way
  (checked with AVX512 kernels). A build that fused only one of them would give +-1 level on rare pixels (values
  within 1 ulp of a half grey level), which the test's tolerance (max 1, mean < 0.05) allows.
  The float-resize path (non-CPU devices, tested on CPU with ``uint8_resize=False``): mean |difference| ~0.003
  levels, 0.3% of pixels off by 1; the colour ops can stretch a 1-level resize difference to a few levels on
  very rare pixels (measured: max 4, ~1e-4 of pixels off by more than 1).

Speed: meant for the training GPU, where each op is a few kernel launches per batch instead of per crop. On one
CPU core it is ~2x slower than per-sample ``apply`` (32 images, 2 x 224 + 8 x 96: ~0.25-0.3 s vs ~0.14 s),
because the 224 px blur runs every row to the batch's largest kernel radius and the per-op gathers/scatters copy
rows; on CPU the per-sample path in DataLoader workers stays the right choice.

Decoding (recipe key ``data.decode_on="device"``, with the device render path): the workers ship JPEGs undecoded
(:class:`~dino_scale.data.decode.EncodedJpeg`, the views' parameters drawn from the header's upright size) and
:func:`decode_jpegs` decodes them batched on the training device with ``torchvision.io.decode_jpeg`` (nvJPEG on
CUDA, libjpeg-turbo on CPU), then applies the EXIF orientation the workers read (``decode_jpeg``'s own
``apply_exif_orientation`` is CPU-only: torchvision 0.29 ignores it on CUDA). Other formats (and CMYK JPEGs) arrive
decoded. On CPU the decode is bit-identical to PIL's (the same libjpeg-turbo IDCT, measured on the tests' images);
nvJPEG's IDCT and chroma upsampling may differ from libjpeg by a grey level (unmeasured here).

Why hand-written instead of library ops: torchvision's v2 functional colour ops take one Python factor per call
(``adjust_brightness(img, 1.2)``), so per-crop factors would need one call per crop; its ``gaussian_blur`` takes
one sigma per call; ``v2.ColorJitter`` draws its own parameters and one op order per call. Here each op is one
tensor expression over a batch with a ``[N, 1, 1, 1]`` factor tensor.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as tnf
from torchvision.transforms.v2 import functional as tvf

from dino_scale.data.augment import (
    BRIGHT,
    CONTR,
    HUE_CHANNEL_OFFSETS,
    MATMUL_BLUR_MAX_SIZE,
    SAT,
    ViewParams,
    blur_radius,
    blur_weights,
    blur_where,
    pil_to_channels_last,
    reflect_shift_matrices,
    round_to_uint8,
)
from dino_scale.data.decode import EncodedJpeg, decode_image
from dino_scale.errors import InputError

logger = logging.getLogger(__name__)

_N_JITTER_OPS = 4

# Reflect matrices moved to a device, keyed by (device, size, radius): built once on CPU by augment.py.
_DEVICE_SHIFT_CACHE: dict[tuple[torch.device, int, int], torch.Tensor] = {}


def decode_jpegs(
    images: Sequence[torch.Tensor | None],
    encoded: Sequence[EncodedJpeg | None],
    keys: Sequence[str],
    device: torch.device | str,
) -> list[torch.Tensor]:
    """A batch's upright uint8 ``[3, H, W]`` images: ``images[i]`` where the workers decoded sample i, else its
    ``encoded[i]`` JPEG decoded on ``device``, all of them in one batched ``torchvision.io.decode_jpeg`` call.

    The EXIF orientation read in the worker is applied here (as ``decode.py``'s ``_upright`` does with PIL), and the
    result must have the upright size the views were drawn for. A JPEG the device decoder refuses (or decodes to
    another size) is decoded by PIL on the host instead, with a warning naming it; if PIL fails too, InputError names
    the sample's key (the workers' checks, a header PIL opens and an EOI marker at the end, make that unlikely).
    """
    device = torch.device(device)
    shipped = [(i, enc) for i, enc in enumerate(encoded) if enc is not None]
    out = list(images)
    for (i, enc), image in zip(shipped, decode_upright([enc for _, enc in shipped], device), strict=True):
        if image is not None:
            out[i] = image
            continue
        logger.warning(
            "sample %s: decoding the JPEG on %s failed or gave another size than %dx%d, which its views were drawn "
            "for; decoding it with PIL", keys[i], device, enc.height, enc.width,
        )  # fmt: skip
        out[i] = _host_decode(enc, keys[i], device)
    missing = [key for key, image in zip(keys, out, strict=True) if image is None]
    if missing:
        raise ValueError(f"samples with neither a decoded image nor encoded bytes: {missing}")
    return [image for image in out if image is not None]  # all of them


def decode_upright(encoded: Sequence[EncodedJpeg], device: torch.device) -> list[torch.Tensor | None]:
    """The JPEGs decoded on ``device`` (one batched ``decode_jpeg`` call), each with its EXIF orientation applied:
    uint8 ``[3, H, W]``, or None where the decoder refused it or it came out at another size than its ``height`` x
    ``width`` (the upright size its views were drawn for)."""
    out: list[torch.Tensor | None] = []
    for enc, image in zip(encoded, _device_decode(encoded, device), strict=True):
        upright = None if image is None else _orient(image, enc.orientation)
        out.append(upright if upright is not None and tuple(upright.shape) == (3, enc.height, enc.width) else None)
    return out


def _device_decode(encoded: Sequence[EncodedJpeg], device: torch.device) -> list[torch.Tensor | None]:
    """``decode_jpeg`` of every JPEG at once (the batched call is what makes nvJPEG fast); if the batch fails, each
    JPEG again on its own, so one bad file costs only itself: None where a JPEG fails alone."""
    if not encoded:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg  # imported here: only the device decode path needs it

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image codecs (for TorchCodec) with a warning on every call.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.")
            # No apply_exif_orientation: CPU-only in torchvision (ignored on CUDA); _orient applies it everywhere.
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)

    try:
        return list(decode([e.data for e in encoded]))
    except Exception as exn:  # the batched call returns nothing when any JPEG fails
        logger.debug("batched JPEG decode on %s failed (%r); decoding one by one", device, exn)
    out: list[torch.Tensor | None] = []
    for e in encoded:
        try:
            out.append(decode([e.data])[0])
        except Exception as exn:
            logger.debug("JPEG decode on %s failed: %r", device, exn)
            out.append(None)
    return out


def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """PIL's ``ImageOps.exif_transpose`` for EXIF ``orientation`` 1-8 on a ``[C, H, W]`` tensor: 2 mirror,
    3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise."""
    if orientation >= 5:
        image = image.transpose(-2, -1)  # 5 is the transpose; 6, 7, 8 a transpose and flips
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation)
    return image.flip(flips) if flips else image


def _host_decode(enc: EncodedJpeg, key: str, device: torch.device) -> torch.Tensor:
    """PIL's decode of a JPEG the device decoder refused or mis-sized (as the workers decode), on ``device``."""
    try:
        image = decode_image(enc.data.numpy().tobytes())
    except Exception as exn:
        raise InputError(f"sample {key}: JPEG decodable neither on {device} nor by PIL: {exn}") from exn
    if (image.height, image.width) != (enc.height, enc.width):
        raise InputError(
            f"sample {key}: PIL decodes this JPEG to {image.height}x{image.width} (upright), but its header read "
            f"{enc.height}x{enc.width}, which its views were drawn for"
        )
    return pil_to_channels_last(image)[0].to(device)  # the CHW view of the workers' pixels


def render_batch(
    images: Sequence[torch.Tensor],
    params: Sequence[Sequence[ViewParams]],
    device: torch.device | str | None = None,
    uint8_resize: bool | None = None,
) -> list[torch.Tensor]:
    """Render every view of a batch: per view index k, a uint8 ``[B, 3, S_k, S_k]`` tensor on ``device``.

    ``images[i]``: sample i's image as a uint8 CHW ``[3, H_i, W_i]`` tensor (sizes may differ; any strides, e.g.
    ``torch.from_numpy(np.asarray(pil)).permute(2, 0, 1)`` viewing HWC memory, or a decoder's contiguous CHW
    output), moved to ``device`` if elsewhere. ``params[i]``: what ``sample_params`` returned for sample i; every
    sample has the same number of views and view k has the same output size in every sample.
    ``device``: defaults to the first image's device. ``uint8_resize``: use PyTorch's uint8 antialiased bicubic
    kernel (bit-identical to the per-sample path; CPU only); default: True on CPU, False elsewhere (float32
    resize + rounding, see the module docstring). The returned batches of one output size are contiguous slices
    of one tensor (no copy per view).
    """
    if not images or len(images) != len(params):
        raise ValueError(f"need one params list per image and at least one image, got {len(images)} and {len(params)}")
    n_views = len(params[0])
    if any(len(p) != n_views for p in params):
        raise ValueError(f"every sample needs the same number of views, got {[len(p) for p in params]}")
    device = torch.device(device) if device is not None else images[0].device
    if uint8_resize is None:
        uint8_resize = device.type == "cpu"
    srcs = []
    for img in images:
        if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected uint8 [3, H, W] images, got {img.dtype} {tuple(img.shape)}")
        srcs.append(img.to(device, non_blocking=True).unsqueeze(0))  # asynchronous from pinned memory

    by_size: dict[int, list[int]] = {}
    for k in range(n_views):
        size = params[0][k].size
        if any(p[k].size != size for p in params):
            raise ValueError(f"view {k} has different output sizes across samples")
        by_size.setdefault(size, []).append(k)

    out: list[torch.Tensor] = [torch.empty(0)] * n_views
    n = len(images)
    for size, views in by_size.items():
        # View-major order: the crops of view k are rows [j * n, (j + 1) * n) for its position j in ``views``,
        # so each view's batch is a contiguous slice of the group's batch.
        flat = [(i, params[i][k]) for k in views for i in range(n)]
        batch = _render_group(srcs, flat, size, device, uint8_resize)
        for j, k in enumerate(views):
            out[k] = batch[j * n : (j + 1) * n]
    return out


def _index(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-crop factors as a float32 ``[N, 1, 1, 1]`` tensor (Python floats rounded to float32, as the scalar
    arguments of the per-sample kernels are)."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).to(device, non_blocking=True)


def _resize_crops(
    srcs: Sequence[torch.Tensor], flat: Sequence[tuple[int, ViewParams]], size: int, uint8_resize: bool
) -> torch.Tensor:
    """Crop + antialiased bicubic resize of every crop: uint8 ``[N, 3, size, size]``, contiguous."""
    crops = []
    for i, p in flat:  # one kernel per crop: boxes (and so the resampling weights) differ per crop
        top, left, h, w = p.box
        crop = srcs[i][:, :, top : top + h, left : left + w]
        if uint8_resize:
            # As augment._render_views: a packed channels-last uint8 crop selects the vectorised uint8 kernel.
            crop = crop.contiguous(memory_format=torch.channels_last)
            crops.append(tnf.interpolate(crop, size=(size, size), mode="bicubic", antialias=True))
        else:
            # Emulates the uint8 kernel (Pillow's algorithm): a horizontal pass, rounded half up and clamped to
            # uint8 (bicubic overshoots), then a vertical pass, rounded again. Resizing in one float pass instead
            # differs from the uint8 kernel by 1 level on ~14% of pixels; this on ~0.4% (fixed-point weights).
            mid = tnf.interpolate(crop.float(), size=(h, size), mode="bicubic", antialias=True)
            mid = mid.add_(0.5).clamp_(0.0, 255.0).floor_()
            crops.append(tnf.interpolate(mid, size=(size, size), mode="bicubic", antialias=True))
    batch = torch.cat(crops).contiguous()
    if not uint8_resize:
        # int32 first as in augment.py (float -> uint8 directly is slower on CPU).
        batch = batch.add_(0.5).clamp_(0.0, 255.0).to(torch.int32).to(torch.uint8)
    return batch


def _render_group(
    srcs: Sequence[torch.Tensor],
    flat: Sequence[tuple[int, ViewParams]],
    size: int,
    device: torch.device,
    uint8_resize: bool,
) -> torch.Tensor:
    """Render crops that share one output size; ``flat[r] = (sample index, params)`` of row r."""
    batch = _resize_crops(srcs, flat, size, uint8_resize)
    ps = [p for _, p in flat]

    flips = [r for r, p in enumerate(ps) if p.flip]
    if flips:
        idx = _index(flips, device)
        batch.index_copy_(0, idx, batch.index_select(0, idx).flip(-1))

    # Float stage only for rows with a colour op or blur, as in augment._render_views (the others stay uint8).
    rows = [r for r, p in enumerate(ps) if p.jitter is not None or p.grayscale or p.blur_sigma is not None]
    if rows:
        dense = len(rows) == len(ps)
        row_idx = None if dense else _index(rows, device)
        x = (batch if dense else batch.index_select(0, row_idx)).to(torch.float32).mul_(1.0 / 255.0)
        sub = [ps[r] for r in rows]
        _jitter(x, sub, device)
        gray = [k for k, p in enumerate(sub) if p.grayscale]
        if gray:
            idx = _index(gray, device)
            g = tvf.rgb_to_grayscale_image(x.index_select(0, idx), num_output_channels=1)
            x.index_copy_(0, idx, g.expand(-1, 3, -1, -1))
        x = blur_where(x, [p.blur_sigma for p in sub], _blur)
        q = round_to_uint8(x)  # the same single rounding as the per-sample path
        if dense:
            batch = q
        else:
            batch.index_copy_(0, row_idx, q)

    solar = [r for r, p in enumerate(ps) if p.solarize]
    if solar:
        idx = _index(solar, device)
        v = batch.index_select(0, idx)
        # augment.py's in-place solarize: v >= 128 -> 255 - v == v XOR 255 when the top bit is set.
        batch.index_copy_(0, idx, v.bitwise_xor_(v.bitwise_right_shift(7).neg_()))
    return batch


def _jitter(x: torch.Tensor, ps: Sequence[ViewParams], device: torch.device) -> None:
    """Colour jitter in place on float ``[N, 3, H, W]`` in [0, 1]; row r applies ``ps[r].jitter`` in its order.

    Position by position: at order position j, the rows whose j-th op is ``op`` are gathered, transformed with
    their own factors, and scattered back, so each row sees exactly its own op sequence (16 small batched ops
    per group at most, never one per row).
    """
    for pos in range(_N_JITTER_OPS):
        groups: dict[int, tuple[list[int], list[float]]] = {}
        for r, p in enumerate(ps):
            if p.jitter is not None:
                op, factor = p.jitter[pos]
                rows, factors = groups.setdefault(op, ([], []))
                rows.append(r)
                factors.append(factor)
        for op, (rows, factors) in sorted(groups.items()):
            idx = _index(rows, device)
            x.index_copy_(0, idx, _color_op(x.index_select(0, idx), op, factors, device))


def _color_op(x: torch.Tensor, op: int, factors: Sequence[float], device: torch.device) -> torch.Tensor:
    """One colour op with a per-row factor, the same expressions as torchvision's ``adjust_*_image`` kernels
    (brightness: ``x * f`` clamped; contrast / saturation: ``_blend(x, grey, f) = x * f + grey * (1 - f)``
    clamped, grey = the image mean / the per-pixel luma) and augment's ``_adjust_hue``."""
    if op == BRIGHT:
        return x.mul(_column(factors, device)).clamp_(0.0, 1.0)
    if op in (CONTR, SAT):
        grey = tvf.rgb_to_grayscale_image(x, num_output_channels=1)
        if op == CONTR:
            grey = torch.mean(grey, dim=(-3, -2, -1), keepdim=True)
        # 1 - f in double then float32, as torchvision's alpha=(1.0 - ratio).
        alpha = _column([1.0 - f for f in factors], device)
        return x.mul(_column(factors, device)).addcmul_(grey, alpha).clamp_(0.0, 1.0)
    # Hue: augment._adjust_hue (see there for the maths) over dim 1 instead of dim 0; 1 + f in double then float32.
    return _adjust_hue(x, _column([1.0 + f for f in factors], device).view(-1, 1, 1))


def _adjust_hue(img: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """augment._adjust_hue on a batch ``[N, 3, H, W]``; ``shift[N, 1, 1]`` = 1 + hue factor (float32)."""
    r, g, b = img.unbind(1)
    maxc = img.amax(1)
    minc = img.amin(1)
    chroma = maxc - minc
    chroma6 = chroma.mul(6.0)
    inv6 = chroma6.clamp_min(1e-12).reciprocal_()
    h = torch.where(
        r == maxc,
        g - b,
        torch.where(g == maxc, (b - r).add_(chroma, alpha=2.0), (r - g).add_(chroma, alpha=4.0)),
    ).mul_(inv6)
    h.add_(shift)
    t = h.unsqueeze(1) + HUE_CHANNEL_OFFSETS.to(img.device, non_blocking=True).view(1, 3, 1, 1)
    t.frac_().sub_(1.0 / 3.0).abs_().clamp_(1.0 / 6.0, 1.0 / 3.0)
    return torch.addcmul((minc - chroma).unsqueeze(1), chroma6.unsqueeze(1), t)


def _shift_matrices(device: torch.device, size: int, radius: int) -> torch.Tensor:
    key = (device, size, radius)
    if key not in _DEVICE_SHIFT_CACHE:
        _DEVICE_SHIFT_CACHE[key] = reflect_shift_matrices(size, radius).to(device)
    return _DEVICE_SHIFT_CACHE[key]


def _blur(img: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """augment._gaussian_blur with every code path batched and on ``img``'s device.

    Same kernels (``blur_weights``), same reflect borders and the same two regimes: dense matmuls up to
    ``MATMUL_BLUR_MAX_SIZE`` (the identical computation), shifted tap-pair adds above it, here with a per-row
    weight column instead of a loop over rows. Rows whose kernel is shorter than the batch's longest get zero
    taps at the end, which add exact zeros.
    """
    n, _, size, width = img.shape
    if size != width:
        raise ValueError(f"square crops expected, got {size}x{width}")
    radius = blur_radius(size)
    weights_cpu = blur_weights(sigmas, radius)
    weights = weights_cpu.to(img.device, non_blocking=True)
    if size <= MATMUL_BLUR_MAX_SIZE:
        mat = (weights @ _shift_matrices(img.device, size, radius)).view(n, 1, size, size)
        return torch.matmul(torch.matmul(mat, img), mat.transpose(-1, -2))
    nonzero = (weights_cpu[:, radius:] > 0).any(0).nonzero()  # on the CPU copy: no device sync
    r = int(nonzero.max())
    taps = weights.view(n, 2 * radius + 1, 1, 1, 1)
    x = img
    for dim in (3, 2):  # width, then height, as augment.py
        xp = tnf.pad(x, (r, r, 0, 0) if dim == 3 else (0, 0, r, r), mode="reflect")
        acc = xp.narrow(dim, r, size) * taps[:, radius]
        for t in range(1, r + 1):  # symmetric kernel: add tap pairs
            acc.addcmul_(xp.narrow(dim, r - t, size) + xp.narrow(dim, r + t, size), taps[:, radius + t])
        x = acc
    return x
