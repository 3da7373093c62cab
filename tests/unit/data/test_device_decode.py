"""data.decode_on="device": the workers read JPEG headers, draw the views from the upright size and ship the bytes;
``to_model_input`` decodes them batched on the training device (torchvision's decode_jpeg, here on CPU) and renders.
Checked against the workers' PIL decode: the same parameters, the same pixels, exact resume, mixed batches, and the
fallbacks when the device decoder refuses a file."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
import torchvision.io
import webdataset as wds
from PIL import Image
from support import striped_photo

from dino_scale.data.augment import MultiCropAugmentation
from dino_scale.data.decode import EncodedJpeg, decode_image, decodes_on_device, read_jpeg_header
from dino_scale.data.device_augment import decode_jpegs
from dino_scale.data.loaders import TrainBatch, decode_pixels, make_train_loader
from dino_scale.data.shards import sample_image_bytes
from dino_scale.errors import InputError

AUG = MultiCropAugmentation(global_size=64, local_size=32, n_local=2)
BATCH, STEPS = 4, 2
FINE = (3.0, 30.0)  # stripe periods fine enough for IDCT differences to show


def jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


# What each sample of the shard is, and where it must be decoded with decode_on_device.
SHIPPED = {"big", "small", "rot6", "grey"}  # YCbCr / grey JPEGs that end with their EOI marker
IN_WORKERS = {"png", "cmyk", "trailing"}  # another format, CMYK, bytes after the EOI
SKIPPED = {"cut"}  # truncated: found and counted by the worker, as without the option


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    small = jpeg(striped_photo(400, 300, 1, periods=FINE))
    files = {
        "big": ("jpg", jpeg(striped_photo(1600, 1200, 0, periods=FINE))),
        "small": ("jpg", small),
        "rot6": ("jpg", jpeg(striped_photo(640, 480, 2, periods=FINE), orientation=6)),
        "grey": ("jpg", jpeg(striped_photo(300, 200, 3, periods=FINE).convert("L"))),
        "png": ("png", png(striped_photo(320, 240, 4, periods=FINE))),
        "cmyk": ("jpg", jpeg(striped_photo(240, 180, 5, periods=FINE).convert("CMYK"))),
        "trailing": ("jpg", small + b"camera data after the image"),
        "cut": ("jpg", small[: len(small) // 2]),
    }
    path = tmp_path_factory.mktemp("device-decode") / "shard-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for name, (ext, data) in files.items():
            sink.write({"__key__": name, ext: data})
    return str(path)


def batches(shard: str, start_batch: int = 0, num_workers: int = 0, **options: bool) -> list[TrainBatch]:
    loader = make_train_loader(
        [shard], AUG, BATCH, STEPS, epoch=0, seed=7, start_batch=start_batch, num_workers=num_workers,
        shuffle_buffer=8, render_on_device=True, **options,
    )  # fmt: skip
    return list(loader)


def test_the_workers_ship_exactly_the_plain_terminated_jpegs(shard: str) -> None:
    plain, shipped = batches(shard), batches(shard, decode_on_device=True)
    assert [b.keys for b in shipped] == [b.keys for b in plain]
    assert {k for b in plain for k in b.skipped} == {k for b in shipped for k in b.skipped} == SKIPPED
    seen = set()
    for p, s in zip(plain, shipped, strict=True):
        assert p.encoded is None and s.encoded is not None
        assert s.params == p.params  # drawn from the header's upright size: the draws of the decoded image
        for key, image, enc, decoded in zip(s.keys, s.images, s.encoded, p.images, strict=True):
            seen.add(key)
            if key in SHIPPED:
                assert image is None and enc is not None and enc.data.dtype == torch.uint8 and enc.data.ndim == 1
                assert (enc.height, enc.width) == tuple(decoded.shape[1:])  # the upright size
            else:
                assert key in IN_WORKERS and enc is None and torch.equal(image, decoded)
    assert seen == SHIPPED | IN_WORKERS  # the batches hold every kind (the slot of "cut" holds a refill)


def test_device_decode_gives_the_workers_pixels_and_views_in_a_mixed_batch(shard: str) -> None:
    plain, shipped = batches(shard), batches(shard, decode_on_device=True)
    pixel_diffs, input_diffs = [], []
    for p, s in zip(plain, shipped, strict=True):
        decoded = decode_jpegs(s.images, s.encoded, s.keys, "cpu")
        for a, b in zip(p.images, decoded, strict=True):
            assert a.shape == b.shape and b.dtype == torch.uint8
            pixel_diffs.append((a.int() - b.int()).abs().flatten())
        for a, b in zip(AUG.to_model_input(p), AUG.to_model_input(s), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
            input_diffs.append((a - b).abs().flatten())
    pixels, inputs = torch.cat(pixel_diffs), torch.cat(input_diffs)
    # Measured on CPU: bit-identical (torchvision's and PIL's libjpeg-turbo use the same integer IDCT and chroma
    # upsampling). Allowed: 1 grey level on 1% of the pixels, as another IDCT setting would give; in the model input
    # 1 level is 1 / (255 * std) <= 0.0175, and the colour ops may stretch it to a few levels on rare pixels.
    assert pixels.max() <= 1 and (pixels > 0).float().mean() < 0.01, (pixels.max(), (pixels > 0).float().mean())
    assert inputs.mean() < 0.01 and inputs.max() < 0.2, (inputs.mean(), inputs.max())


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_gives_the_uninterrupted_batches(shard: str, num_workers: int) -> None:
    # With a worker process the encoded JPEGs also cross a process boundary (the DataLoader's queue).
    whole = batches(shard, decode_on_device=True)
    (resumed,) = batches(shard, start_batch=1, num_workers=num_workers, decode_on_device=True)
    assert resumed.keys == whole[1].keys and resumed.params == whole[1].params
    for a, b in zip(resumed.encoded, whole[1].encoded, strict=True):
        assert (a is None) == (b is None)
        assert a is None or (
            torch.equal(a.data, b.data) and (a.orientation, a.height, a.width) == (b.orientation, b.height, b.width)
        )
    for a, b in zip(AUG.to_model_input(resumed), AUG.to_model_input(whole[1]), strict=True):
        assert torch.equal(a, b)


def test_the_workers_decode_jpegs_with_torchvision_to_pils_pixels(shard: str) -> None:
    # loaders.decode_pixels, what the workers decode every sample with (both render paths, no decode option).
    samples = {s["__key__"]: s for s in wds.WebDataset(shard, shardshuffle=False)}
    for key, sample in samples.items():
        data = sample_image_bytes(sample)
        if key in SKIPPED:
            with pytest.raises(InputError):
                decode_pixels(data)
            continue
        pixels, reference = decode_pixels(data), decode_image(data)
        if key in SHIPPED:  # torchvision's decode, EXIF orientation applied
            assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8
            assert torch.equal(pixels, torch.from_numpy(np.array(reference)).permute(2, 0, 1)), key  # measured: equal
        else:
            assert key in IN_WORKERS and isinstance(pixels, Image.Image) and pixels.tobytes() == reference.tobytes()
    assert set(samples) == SHIPPED | IN_WORKERS | SKIPPED
    # The views are those of PIL's image: the augmentation takes either.
    data = sample_image_bytes(samples["rot6"])
    params = AUG.sample_params(640, 480, torch.Generator().manual_seed(0))
    from_tensor, from_pil = AUG.apply(decode_pixels(data), params), AUG.apply(decode_image(data), params)
    assert all(torch.equal(a, b) for a, b in zip(from_tensor, from_pil, strict=True))


def test_a_jpeg_torchvision_refuses_is_decoded_by_pil_in_the_workers(monkeypatch, caplog) -> None:
    data = jpeg(striped_photo(64, 48, 0, periods=FINE))

    def refuse(*args: object, **kwargs: object) -> list[torch.Tensor]:
        raise RuntimeError("no")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuse)
    with caplog.at_level(logging.WARNING):
        pixels = decode_pixels(data)
    assert isinstance(pixels, Image.Image) and pixels.tobytes() == decode_image(data).tobytes()
    assert caplog.records == []  # PIL decides, as it did for every file before; a file it refuses is skipped


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_as_pil_shows_it(orientation: int) -> None:
    data = jpeg(striped_photo(48, 32, orientation, periods=FINE), orientation=orientation)
    header = read_jpeg_header(data)
    assert header is not None and header.orientation == orientation and decodes_on_device(data, header)
    (image,) = decode_jpegs([None], [EncodedJpeg.from_bytes(data, header)], ["k"], "cpu")
    reference = torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1)
    assert image.shape == reference.shape == ((3, 48, 32) if orientation >= 5 else (3, 32, 48))
    assert (image.int() - reference.int()).abs().max() <= 1  # measured: 0


def test_a_jpeg_the_device_refuses_is_decoded_by_pil_and_one_pil_refuses_is_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    good, refused = (
        jpeg(striped_photo(64, 48, 0, periods=FINE)),
        jpeg(striped_photo(60, 40, 1, periods=FINE)),
    )
    real = torchvision.io.decode_jpeg

    def picky_decode_jpeg(inputs: list[torch.Tensor], **kwargs: object) -> list[torch.Tensor]:
        if any(len(t) == len(refused) for t in inputs):
            raise RuntimeError("nvjpeg says no")
        return real(inputs, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky_decode_jpeg)
    encoded = [EncodedJpeg.from_bytes(d, read_jpeg_header(d)) for d in (good, refused)]
    with caplog.at_level(logging.WARNING):
        out = decode_jpegs([None, None], encoded, ["good", "refused"], "cpu")
    for image, data in zip(out, (good, refused), strict=True):
        assert torch.equal(image, torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1))
    warned = [r.getMessage() for r in caplog.records]
    assert any("refused" in m and "PIL" in m for m in warned) and not any("good" in m for m in warned), warned

    garbage = b"\xff\xd8\xff" + bytes(range(256)) * 4 + b"\xff\xd9"  # a JPEG's first and last bytes, nothing between
    bad = EncodedJpeg(torch.frombuffer(bytearray(garbage), dtype=torch.uint8), 1, 48, 64)
    with pytest.raises(InputError, match="sample shards/x/bad.*neither"):
        decode_jpegs([None, None], [encoded[0], bad], ["good", "shards/x/bad"], "cpu")
    liar = EncodedJpeg(encoded[0].data, 1, 10, 10)  # decodes, but not to the size its views were drawn for
    with pytest.raises(InputError, match="sample liar.*10x10"):
        decode_jpegs([None], [liar], ["liar"], "cpu")


def test_decode_on_device_needs_the_device_render_path(shard: str) -> None:
    with pytest.raises(InputError, match="render_on_device"):
        make_train_loader([shard], AUG, BATCH, STEPS, epoch=0, seed=7, decode_on_device=True)


def test_pin_memory_pins_the_encoded_jpegs_and_keeps_the_gaps() -> None:
    class Pinnable:
        def pin_memory(self) -> str:
            return "pinned"

    batch = TrainBatch([], ["a", "b"], images=[None, Pinnable()], params=[[], []], encoded=[Pinnable(), None])  # type: ignore[list-item]
    pinned = batch.pin_memory()
    assert (pinned.images, pinned.encoded, pinned.params, pinned.keys) == (
        [None, "pinned"],
        ["pinned", None],
        [[], []],
        ["a", "b"],
    )
