"""decode_image on the files an image indexer meets: broken, odd modes, high bit depth, alpha, rotated, huge."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from support import noise_image

from dino_scale.data.decode import ImageDecodeError, ImageTooLargeError, decode_image


@pytest.fixture(autouse=True)
def _warnings_are_errors() -> Iterator[None]:
    # Indexer workers may run with -W error: no warning may escape decoding.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit-per-sample PNG (grey, grey+alpha, RGB or RGBA by channel count), which PIL cannot write."""
    height, width = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def tiff_rgb16(arr: np.ndarray) -> bytes:
    """An uncompressed little-endian 48-bit RGB TIFF (PIL cannot write one)."""
    height, width, _ = arr.shape
    pixels = arr.astype("<u2").tobytes()
    n_entries = 10
    ifd_size = 2 + 12 * n_entries + 4
    bits_at = 8 + ifd_size  # the three BitsPerSample values do not fit in their IFD entry
    data_at = bits_at + 6
    entries = [  # (tag, type: 3 SHORT / 4 LONG, count, value or offset)
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, bits_at),
        (259, 3, 1, 1),  # no compression
        (262, 3, 1, 2),  # RGB
        (273, 4, 1, data_at),
        (277, 3, 1, 3),
        (278, 4, 1, height),
        (279, 4, 1, len(pixels)),
        (284, 3, 1, 1),  # interleaved
    ]
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", n_entries)
    for tag, kind, count, value in entries:
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 and count == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    return out + struct.pack("<I", 0) + struct.pack("<3H", 16, 16, 16) + pixels


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# ----------------------------------------------------------------------------------------------------------
# failures: raised with a kind, never anything else
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind", "text"),
    [
        (b"", "empty", "empty"),
        (np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not_an_image", "not an image"),
        (b"just some text, certainly not a picture\n" * 20, "not_an_image", "not an image"),
        (encode(noise_image(), "JPEG")[:3000], "truncated", "truncated"),
        (encode(noise_image(), "PNG")[:20000], "truncated", "truncated"),
        (encode(noise_image(), "PNG")[:20], "truncated", "truncated"),  # cut inside the header chunk
    ],
    ids=["zero-bytes", "random-garbage", "text", "truncated-jpeg", "truncated-png", "truncated-png-header"],
)
def test_unreadable_data_raises_a_decode_error_with_its_kind(data: bytes, kind: str, text: str) -> None:
    with pytest.raises(ImageDecodeError, match=text) as info:
        decode_image(data)
    assert info.value.kind == kind
    assert isinstance(info.value, ValueError)  # existing `except ValueError` skip logic still applies


def test_corrupt_stream_is_reported_as_corrupt() -> None:
    data = bytearray(encode(noise_image(), "PNG"))
    data[len(data) // 2 : len(data) // 2 + 200] = bytes(200)  # damage the compressed pixel data, keep the length
    with pytest.raises(ImageDecodeError, match="corrupt PNG image") as info:
        decode_image(bytes(data))
    assert info.value.kind == "corrupt"


def test_decode_error_survives_pickling() -> None:
    # DataLoader workers send exceptions to the main process pickled; the kind must not get lost.
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"")
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is ImageDecodeError and clone.kind == "empty" and str(clone) == str(info.value)


def test_over_the_bomb_limit_raises_too_large_with_the_pixel_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert decode_image(encode(Image.new("RGB", (40, 40)), "PNG")).size == (40, 40)  # 1x..2x the limit: decoded
    with pytest.raises(ImageTooLargeError, match=r"too large: 2,500 pixels exceeds .* 2,000 pixels") as info:
        decode_image(encode(Image.new("RGB", (50, 50)), "PNG"))
    assert info.value.kind == "too_large"
    assert isinstance(info.value, Image.DecompressionBombError)  # what callers caught before
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is ImageTooLargeError and clone.kind == "too_large"


def test_bad_draft_size_is_a_usage_error_not_a_decode_error() -> None:
    with pytest.raises(ValueError, match="draft_size") as info:
        decode_image(encode(Image.new("RGB", (8, 8)), "JPEG"), draft_size=0)
    assert not isinstance(info.value, ImageDecodeError)


# ----------------------------------------------------------------------------------------------------------
# modes
# ----------------------------------------------------------------------------------------------------------


def test_cmyk_jpeg_decodes_to_the_expected_colours() -> None:
    # Quadrants: cyan, magenta, yellow, black ink. PIL writes CMYK JPEGs Adobe-style (inverted), as Photoshop does.
    colours = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]
    expected = [(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)]
    image = Image.new("CMYK", (64, 64))
    for i, colour in enumerate(colours):
        image.paste(colour, ((i % 2) * 32, (i // 2) * 32, (i % 2) * 32 + 32, (i // 2) * 32 + 32))
    data = encode(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).info.get("adobe") is not None  # the inverted-CMYK path is exercised
    rgb = pixels(decode_image(data))
    for i, want in enumerate(expected):
        x, y = (i % 2) * 32 + 16, (i // 2) * 32 + 16
        assert np.abs(rgb[y, x] - np.array(want)).max() <= 12, (i, rgb[y, x], want)


def test_cmyk_icc_profile_is_not_carried_onto_the_rgb_result() -> None:
    # write_shards re-encodes decoded images and PNG copies info["icc_profile"]: a CMYK profile on RGB is wrong.
    profile = b"not really a CMYK profile, but PIL stores any bytes"
    cmyk = decode_image(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", icc_profile=profile))
    rgb = decode_image(encode(Image.new("RGB", (8, 8)), "JPEG", icc_profile=profile))
    assert "icc_profile" not in cmyk.info
    assert rgb.info.get("icc_profile") == profile


def test_16bit_greyscale_png_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    for data in (encode(Image.fromarray(ramp), "PNG"), png16(ramp)):
        out = pixels(decode_image(data))
        assert out.shape == (4, 256, 3) and (out[..., 0] == out[..., 2]).all()
        np.testing.assert_allclose(out[0, :, 0], ramp[0] / 257, atol=0.51)
        assert len(np.unique(out[0, :, 0])) > 200  # clipping would leave almost everything at 255


@pytest.mark.parametrize("byteorder", ["<u2", ">u2"], ids=["I;16", "I;16B"])
def test_16bit_tiff_is_scaled(byteorder: str) -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).round(), (4, 1)).astype(byteorder)
    source = Image.fromarray(ramp)
    assert source.mode == ("I;16" if byteorder == "<u2" else "I;16B")
    out = pixels(decode_image(encode(source, "TIFF")))
    np.testing.assert_allclose(out[0, :, 1], ramp[0].astype(float) / 257, atol=0.51)


def test_48bit_rgb_png_and_tiff_keep_their_colours() -> None:
    # PIL reads 16-bit-per-channel RGB as 8-bit "RGB" (high byte), which equals value/257 to within one step.
    arr = np.zeros((4, 6, 3), np.uint16)
    arr[..., 0], arr[..., 1], arr[..., 2] = 65535, 32896, 257 * 3
    for data in (png16(arr), tiff_rgb16(arr)):
        assert Image.open(io.BytesIO(data)).size == (6, 4)
        out = pixels(decode_image(data))
        assert tuple(out[2, 3]) == (255, 128, 3)
    rgba = np.zeros((4, 6, 4), np.uint16)
    rgba[..., 0], rgba[..., 3] = 65535, 0  # 64-bit RGBA, fully transparent red -> white
    assert tuple(pixels(decode_image(png16(rgba)))[0, 0]) == (255, 255, 255)


def test_32bit_int_and_float_greyscale() -> None:
    ints = np.array([[0, 1000, 65535]], dtype=np.int32)
    assert pixels(decode_image(encode(Image.fromarray(ints, mode="I"), "TIFF")))[0, :, 0].tolist() == [0, 4, 255]
    floats = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)  # NaN must not warn or crash
    out = pixels(decode_image(encode(Image.fromarray(floats, mode="F"), "TIFF")))[0, :, 0]
    assert out.tolist() == [0, 128, 255, 0]
    signed = np.array([[-100, 0, 100]], dtype=np.int32)  # no natural range: stretched
    assert pixels(decode_image(encode(Image.fromarray(signed, mode="I"), "TIFF")))[0, :, 0].tolist() == [0, 128, 255]


# ----------------------------------------------------------------------------------------------------------
# transparency: composited onto white
# ----------------------------------------------------------------------------------------------------------


def test_rgba_transparent_region_becomes_white() -> None:
    arr = np.zeros((8, 12, 4), np.uint8)  # left: fully transparent with black (garbage) colour underneath
    arr[:, 4:8] = (200, 40, 10, 255)  # middle: opaque
    arr[:, 8:] = (0, 0, 255, 128)  # right: half-transparent blue
    out = pixels(decode_image(encode(Image.fromarray(arr, mode="RGBA"), "PNG")))
    assert (out[:, :4] == 255).all()
    assert (out[:, 4:8] == (200, 40, 10)).all()
    assert np.abs(out[0, 10] - np.array([127, 127, 255])).max() <= 1


def test_la_transparency_becomes_white() -> None:
    arr = np.array([[[30, 0], [30, 255]]], dtype=np.uint8)
    out = pixels(decode_image(encode(Image.fromarray(arr, mode="LA"), "PNG")))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (30, 30, 30)


def test_palette_transparency_becomes_white() -> None:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 0, 250, 20, 20] + [0] * (254 * 3))
    image.paste(1, (2, 0, 4, 2))
    image.info["transparency"] = 0  # index 0 (black) is transparent
    for fmt in ("PNG", "GIF"):
        out = pixels(decode_image(encode(image, fmt)))
        assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 3]) == (250, 20, 20), fmt


def test_rgb_colour_key_transparency_becomes_white() -> None:
    image = Image.new("RGB", (2, 1), (9, 9, 9))
    image.putpixel((1, 0), (100, 0, 0))
    out = pixels(decode_image(encode(image, "PNG", transparency=(9, 9, 9))))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (100, 0, 0)


# ----------------------------------------------------------------------------------------------------------
# orientation, frames, size
# ----------------------------------------------------------------------------------------------------------


def marked_image() -> Image.Image:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 10))  # blue marker top-left
    return image


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate 90 degrees clockwise
    out = decode_image(encode(marked_image(), "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    assert pixels(out)[5, 15, 2] > 200 and pixels(out)[35, 5, 0] > 200  # the marker moved to the top right
    assert out.getexif().get(0x0112) is None  # re-encoding the result cannot rotate it a second time


def test_exif_orientation_in_tiff_tag_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    assert decode_image(encode(marked_image(), "TIFF", exif=exif)).size == (20, 40)


def test_images_without_or_with_broken_exif_decode_as_stored() -> None:
    assert decode_image(encode(marked_image(), "JPEG")).size == (40, 20)
    assert decode_image(encode(marked_image(), "PNG")).size == (40, 20)
    broken = decode_image(encode(marked_image(), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f garbage"))
    assert broken.size == (40, 20)


def test_multi_frame_files_give_the_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(0, 200, 0), (255, 0, 0), (0, 0, 255)]]
    for fmt in ("GIF", "TIFF", "PNG", "WEBP"):
        extra = {"lossless": True} if fmt == "WEBP" else {}  # lossy WebP would blur the colour test
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **extra)
        assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3, fmt
        assert np.abs(pixels(decode_image(data))[4, 4] - np.array([0, 200, 0])).max() <= 4, fmt


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    image = Image.new("RGB", (6000, 4000), (90, 140, 200))
    image.paste((250, 250, 250), (0, 0, 3000, 2000))
    return encode(image, "JPEG", quality=80)


@pytest.mark.parametrize("draft_size", [256, 1000, 1100, 4000])
def test_draft_size_decodes_big_jpegs_at_reduced_scale(big_jpeg: bytes, draft_size: int) -> None:
    out = decode_image(big_jpeg, draft_size=draft_size)
    assert min(out.size) >= draft_size  # never below the requested size ...
    scale = 6000 // out.width
    assert out.size == (6000 // scale, 4000 // scale) and scale in (1, 2, 4, 8)
    assert scale == 8 or min(out.size) // 2 < draft_size  # ... and the largest reduction that keeps it
    if draft_size == 256:
        assert out.size == (750, 500)
    assert tuple(pixels(out)[out.height // 4, out.width // 4]) == pytest.approx((250, 250, 250), abs=3)


def test_draft_size_is_ignored_for_other_formats_and_respects_exif() -> None:
    assert decode_image(encode(Image.new("RGB", (600, 400)), "PNG"), draft_size=64).size == (600, 400)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decode_image(encode(Image.new("RGB", (1600, 800)), "JPEG", exif=exif), draft_size=100)
    assert rotated.size == (100, 200)  # 1/8 scale, then stood upright
