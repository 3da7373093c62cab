"""Decoding image bytes into upright 8-bit RGB, and why bytes were refused when they cannot be."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps

from dino_scale.errors import InputError

logger = logging.getLogger(__name__)

# Member extensions recognised as the sample's image, in order of preference when a sample has several.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    "jpg",
    "jpeg",
    "png",
    "webp",
    "bmp",
    "gif",
    "tif",
    "tiff",
    "ppm",
    "pgm",
    "pbm",
)
# MPO is what many cameras write: JPEG with extra frames; PIL reads the first, so store it as a jpg.
PIL_FORMAT_TO_EXT = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tiff",
}


# PIL's format names of the files libjpeg decodes (MPO: JPEG with extra frames, read on its first).
JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# libjpeg's DCT scaling decodes a JPEG at 1/2^k of its size for k up to this (1/8).
MAX_DCT_REDUCTION = 3
# Every JPEG starts with SOI and a marker; PIL's JPEG (and MPO) plugin accepts exactly these first bytes.
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
# Source modes whose JPEGs the device decoder turns into the RGB that PIL's decode gives (YCbCr / RGB and grey);
# CMYK and YCCK (Adobe's inverted ones too) stay with PIL in the workers.
_DEVICE_DECODE_MODES = frozenset({"RGB", "L"})


def dct_reduced_size(size: int, reduction: int) -> int:
    """Pixels on a side of ``size`` pixels decoded at libjpeg scale 1/2^``reduction``: ceil(size / 2^reduction)
    (libjpeg's ``jdiv_round_up``, the size PIL's ``draft`` reports)."""
    return -(-size // (1 << reduction))


def image_extension(extensions: Iterable[str]) -> str | None:
    """Which of a sample's member extensions is its image: the first of IMAGE_EXTENSIONS present, else None."""
    present = set(extensions)
    return next((ext for ext in IMAGE_EXTENSIONS if ext in present), None)


# Values of ``ImageDecodeError.kind``: why ``decode_image`` refused some bytes, for callers that count skips.
DECODE_FAILURE_KINDS: tuple[str, ...] = ("empty", "truncated", "not_an_image", "too_large", "corrupt", "unsupported")
# Source modes whose ICC profile (if any) still describes the RGB result; any other profile (CMYK, grey) would
# mislabel it, and PNG re-encoding in ``write_shards`` copies ``info["icc_profile"]`` into the new file.
_RGB_PROFILE_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA"})
# Background that transparent pixels are composited onto (see ``_to_rgb``).
_ALPHA_BACKGROUND = (255, 255, 255)
_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class ImageDecodeError(InputError):
    """Encoded bytes that ``decode_image`` cannot turn into an image; ``kind`` is in ``DECODE_FAILURE_KINDS``.

    An ``InputError`` (so also a ``ValueError``): ``except ValueError`` / ``except Exception`` skip logic keeps working.
    """

    # ``kind`` has a default so that ``cls(message)`` works: unpickling (``kind`` comes back from ``__dict__``)
    # and the DataLoader re-raising a worker's exception both rebuild it from the message alone.
    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind


class ImageTooLargeError(ImageDecodeError, Image.DecompressionBombError):
    """More pixels than PIL agrees to decode (``2 * Image.MAX_IMAGE_PIXELS``); still a ``DecompressionBombError``."""

    def __init__(self, message: str, kind: str = "too_large") -> None:
        super().__init__(message, kind)


def _scaled_to_uint8(image: Image.Image) -> Image.Image:
    """Map a high-bit-depth greyscale image (``I;16*``, ``I``, ``F``) to 8-bit ``L``, scaling instead of clipping.

    PIL's own ``convert`` clips these to 0..255, which turns most 16-bit images white. ``I;16*`` is known to be
    16-bit; ``I`` and ``F`` carry no bit depth, so their range is guessed from the values: 0..1 (float only),
    0..255, 0..65535, else a min-max stretch (signed or 32-bit data has no natural white point).
    """
    arr = np.asarray(image).astype(np.float32)
    if image.mode.startswith("I;16"):
        arr = arr / 257.0
    else:
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)  # NaN would cast to an arbitrary byte
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if lo < 0.0 or hi > 65535.0:
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        elif image.mode == "F" and hi <= 1.0:
            arr = arr * 255.0
        elif hi > 255.0:
            arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    High-bit-depth greyscale is scaled (not clipped), and transparency is composited onto white. Dropping the
    alpha channel instead would expose whatever colour the encoder left under fully transparent pixels:
    usually black, sometimes leftovers of an edit, never what a viewer shows (on a white page). White is also
    what document-style images (logos, icons, screenshots) are designed against.
    """
    mode = image.mode
    icc_profile = image.info.get("icc_profile") if mode in _RGB_PROFILE_MODES else None
    if mode.startswith("I;16") or mode in ("I", "F"):
        rgb = _scaled_to_uint8(image).convert("RGB")
    elif image.has_transparency_data:  # RGBA, LA, PA, RGBa, La, or a "transparency" key (P, L, RGB)
        if mode == "La":
            image = image.convert("LA")  # PIL converts premultiplied grey+alpha (TIFF) to LA only
        rgba = image.convert("RGBA")  # also avoids PIL's "palette images with transparency" warning
        rgb = Image.new("RGB", rgba.size, _ALPHA_BACKGROUND)
        rgb.paste(rgba, mask=rgba.getchannel("A"))
    else:
        try:
            rgb = image.convert("RGB")
        except ValueError as exn:  # a mode PIL reads but cannot convert (rare TIFF variants)
            raise ImageDecodeError(f"unsupported image mode {mode!r}: {exn}", kind="unsupported") from exn
    # convert() copies ``info``; keep the ICC profile only where it still describes the RGB pixels.
    rgb.info.pop("icc_profile", None)
    if icc_profile is not None:
        rgb.info["icc_profile"] = icc_profile
    return rgb


def _exif_orientation(image: Image.Image) -> int:
    """EXIF (or XMP) orientation 1..8 of ``image``; 1 (as stored) when absent or unreadable."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed metadata must not make otherwise decodable pixels unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, so phone photos are indexed the way viewers show them."""
    if _exif_orientation(image) == 1:
        return image  # exif_transpose would return a full copy even when there is nothing to do
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exn:  # it also rewrites the EXIF block, which can fail on odd tags: keep the pixels
        logger.debug("cannot apply EXIF orientation (%r); decoding the image as stored", exn)
        return image


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's header tells without decoding its pixels: the size as viewers show it (``height`` x ``width``,
    the EXIF orientation applied: 5-8 swap the stored sides), the ``orientation`` itself (1-8, as ``_upright``
    reads it), PIL's ``format`` ("JPEG" or "MPO") and source ``mode`` ("RGB" for YCbCr, "L", "CMYK")."""

    format: str
    mode: str
    height: int
    width: int
    orientation: int


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """The header of JPEG (or MPO) bytes, read by PIL's lazy ``Image.open`` (no pixels decoded); None for bytes of
    any other format, which are not opened at all. Raises ``ImageDecodeError`` (as ``decode_image``) when PIL cannot
    open them; a file whose header reads may still fail to decode (truncated data, say)."""
    if not data.startswith(_JPEG_MAGIC):
        return None
    with _opened(data) as image:
        if image.format not in JPEG_FORMATS:  # not reached with PIL's plugins; keeps the contract if that changes
            return None
        width, height = image.size
        orientation = _exif_orientation(image)  # EXIF / XMP of a JPEG are in its header: nothing is decoded
        if orientation >= 5:  # transposed (5, 7) or rotated by 90 degrees (6, 8)
            width, height = height, width
        return JpegHeader(image.format, image.mode, height, width, orientation)


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG shipped undecoded from the loader's workers to the training device (``data.decode_on="device"``).

    ``data``: the file's bytes as a 1-D uint8 CPU tensor. ``orientation``: the EXIF orientation PIL read from its
    header, applied after decoding (nvJPEG ignores EXIF). ``height`` x ``width``: the upright size the views'
    parameters were drawn for, which the decoded image must have.
    """

    data: torch.Tensor
    orientation: int
    height: int
    width: int

    @classmethod
    def from_bytes(cls, data: bytes, header: JpegHeader) -> EncodedJpeg:
        # bytearray: a writable copy the tensor owns (torch.frombuffer over immutable bytes warns).
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return cls(tensor, header.orientation, header.height, header.width)

    def pin_memory(self) -> EncodedJpeg:
        """Page-locked copy of the bytes (the device decoder reads them from host memory)."""
        return replace(self, data=self.data.pin_memory())


def decodes_on_device(data: bytes, header: JpegHeader) -> bool:
    """Whether these JPEG bytes may be shipped to the device decoder instead of being decoded by PIL in a worker.

    Only YCbCr / RGB and grey JPEGs (the device decoder's RGB of CMYK / YCCK, Adobe's inverted ones especially, is
    not PIL's), and only bytes that end with the EOI marker: a file cut short is then still found, skipped and
    counted in the worker, as on the worker path, instead of failing in the training process. Files with bytes
    after their EOI (some cameras append data) are decoded in the worker: correct, only not offloaded.
    """
    return header.mode in _DEVICE_DECODE_MODES and data.endswith(_JPEG_EOI)


def _decode_failure(exn: Exception, fmt: str | None, size: int) -> ImageDecodeError:
    """Turn whatever PIL raised into an ``ImageDecodeError`` whose message and ``kind`` say what went wrong."""
    what = f"{fmt} image" if fmt else "image"
    if isinstance(exn, Image.DecompressionBombError):
        found = _PIL_BOMB_PIXELS.search(str(exn))
        pixels = f"{int(found.group(1)):,} pixels" if found else "its pixel count"
        limit = Image.MAX_IMAGE_PIXELS
        limit_text = f"{2 * limit:,} pixels (2 x PIL.Image.MAX_IMAGE_PIXELS)" if limit else "PIL's limit"
        return ImageTooLargeError(f"{what} too large: {pixels} exceeds the decode limit of {limit_text}")
    if isinstance(exn, Image.UnidentifiedImageError):
        return ImageDecodeError(
            f"not an image: no format PIL reads recognises these {size} bytes (or their header is damaged)",
            kind="not_an_image",
        )
    # PIL reports a short file as OSError("image file is truncated ...") or "Truncated File Read", or EOFError.
    if isinstance(exn, EOFError) or "truncat" in str(exn).lower():
        return ImageDecodeError(f"truncated {what} ({size} bytes): {exn}", kind="truncated")
    return ImageDecodeError(f"corrupt {what} ({size} bytes): {type(exn).__name__}: {exn}", kind="corrupt")


@contextlib.contextmanager
def _opened(data: bytes) -> Iterator[Image.Image]:
    """PIL's lazy ``Image.open`` of ``data`` (header read, no pixels decoded; multi-frame files open on frame 0).

    Whatever PIL raises, at the open or in the ``with`` body (``load``, conversions), comes out as an
    ``ImageDecodeError`` (see ``decode_image``); truncated data is always an error, whatever some other module set
    in ``ImageFile.LOAD_TRUNCATED_IMAGES``.
    """
    if not data:
        raise ImageDecodeError("empty image data (zero bytes)", kind="empty")
    fmt: str | None = None
    # Truncated images must be errors (so they are skipped), whatever some other module set globally.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # Huge images only warn (we decode them); above 2x MAX_IMAGE_PIXELS PIL raises and the sample is
            # skipped. Neither may crash a job that runs with warnings turned into errors.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format
                yield image
    except ImageDecodeError:
        raise
    except MemoryError:
        raise  # the machine, not the data: do not disguise it as a bad image
    except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for bad data
        raise _decode_failure(exn, fmt, len(data)) from exn
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _open_image(
    data: bytes, *, draft_size: int | None = None, dct_reduction: int = 0
) -> tuple[Image.Image, str | None]:
    """Fully decode ``data``; return the upright RGB image and PIL's format name. See ``decode_image``."""
    if draft_size is not None and draft_size < 1:
        raise InputError(f"draft_size must be a positive number of pixels, got {draft_size}")
    if not 0 <= dct_reduction <= MAX_DCT_REDUCTION:
        raise InputError(f"dct_reduction must be in 0..{MAX_DCT_REDUCTION}, got {dct_reduction}")
    if draft_size is not None and dct_reduction:
        raise InputError("give draft_size or dct_reduction, not both")
    with _opened(data) as image:
        fmt = image.format
        if fmt in JPEG_FORMATS and (draft_size is not None or dct_reduction):
            # libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 size for a fraction of the time and memory. PIL's
            # draft picks the largest scale 1/a (a in 8, 4, 2, 1) with a <= min(W // w, H // h) for a requested
            # (w, h): draft_size asks for both sides >= draft_size; a reduction k asks for (W >> k, H >> k), for
            # which min(W // (W >> k), H // (H >> k)) lies in [2^k, 2^(k+1)), so a == 2^k exactly.
            width, height = image.size
            if draft_size is not None:
                image.draft("RGB", (draft_size, draft_size))
            else:
                image.draft("RGB", (max(1, width >> dct_reduction), max(1, height >> dct_reduction)))
        image.load()
        # Both return new images, which stay valid after the context manager closes the file.
        return _to_rgb(_upright(image)), fmt


def decode_image(data: bytes, *, draft_size: int | None = None, dct_reduction: int = 0) -> Image.Image:
    """Decode encoded image bytes into an upright 8-bit RGB PIL image.

    Any PIL mode is accepted: L, P, CMYK (Adobe inverted too), 16-bit and float greyscale (scaled to 8 bits,
    not clipped), and anything with transparency, which is composited onto white. The EXIF orientation is
    applied, and multi-frame files (GIF, TIFF, APNG) give their first frame.

    ``draft_size``: for JPEG only, decode at a reduced scale (1/2, 1/4 or 1/8) whose sides stay
    ``>= draft_size``, which makes indexing big photos cheap; other formats decode at full size.
    ``dct_reduction`` (k in 0..3, not with ``draft_size``): for JPEG (and MPO) only, decode at exactly 1/2^k of the
    stored size, ``dct_reduced_size`` pixels per side, when both sides have at least 2^k pixels (else at the largest
    reduction they allow); other formats decode at full size. The training stream's ``data.decode_reduced`` picks
    k per sample.

    Raises ``ImageDecodeError`` (a ``ValueError``) whose ``kind`` is ``"empty"``, ``"truncated"``,
    ``"not_an_image"``, ``"corrupt"`` or ``"unsupported"``, or ``ImageTooLargeError`` (``kind == "too_large"``,
    also a ``PIL.Image.DecompressionBombError``) for more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels;
    images between one and two times that limit decode, PIL's warning silenced. The caller skips and counts.
    """
    return _open_image(data, draft_size=draft_size, dct_reduction=dct_reduction)[0]
