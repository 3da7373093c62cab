"""`dino-scale attention`: one figure per image (input, a coloured map per head, the heads' mask outlines) and
attention.json, for an image file or a folder of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import SIZE, noise_image, photo

from dino_scale.errors import InputError, NotFound
from dino_scale.eval.attention import attention_figure, attention_maps, head_colours, mass_mask
from dino_scale.io import save_safetensors

HEADS = 3  # tiny-test.json: num_heads 3
PATCH = 8
PANEL = 250  # pixels per panel side: 2.5 inches at 100 dpi
HEIGHT = 290  # the panel plus room for the titles


def test_mass_mask_keeps_the_fewest_patches_holding_the_mass() -> None:
    attention = torch.tensor([[[0.5, 0.05], [0.25, 0.2]]])  # sorted: 0.5, 0.25, 0.2, 0.05
    assert mass_mask(attention, 0.6).tolist() == [[[True, False], [True, False]]]  # 0.5 + 0.25 >= 0.6
    assert mass_mask(attention, 0.45).tolist() == [[[True, False], [False, False]]]  # 0.5 alone is enough
    assert mass_mask(attention, 1.0).all()
    random = torch.rand(3, 5, 5).softmax(0)
    mask = mass_mask(random, 0.6)
    for head in range(3):  # minimal: dropping the smallest kept patch falls below the mass
        values = random[head][mask[head]]
        assert values.sum() >= 0.6 * random[head].sum() - 1e-9
        assert values.sum() - values.min() < 0.6 * random[head].sum()


def pixels_of(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def colour_pixels(region: np.ndarray, colour: tuple[float, float, float], tolerance: int = 40) -> int:
    """How many pixels of ``region`` [h, w, 3] are within ``tolerance`` (summed over RGB) of ``colour``."""
    target = np.round(np.asarray(colour) * 255).astype(int)
    return int((np.abs(region - target).sum(axis=2) < tolerance).sum())


def panel(pixels: np.ndarray, index: int, panels: int) -> np.ndarray:
    width = pixels.shape[1] // panels
    return pixels[:, index * width : (index + 1) * width]


def test_the_figure_shows_the_input_each_heads_map_and_the_mask_outlines(tmp_path: Path) -> None:
    grid = 4
    attention = torch.zeros(HEADS, grid, grid)
    for head in range(HEADS):  # each head looks at another corner: its mask is a proper, different subset
        attention[head, head % 2 * 2 : head % 2 * 2 + 2, head // 2 * 2 : head // 2 * 2 + 2] = 1.0
    attention += 0.01
    # A grey image: the heads' saturated colours can only come from the outlines.
    grey = np.repeat(np.linspace(40, 220, grid * PATCH, dtype=np.uint8)[None, :, None], grid * PATCH, axis=0)
    grey = np.repeat(grey, 3, axis=2)
    figure = attention_figure(grey, attention, PATCH, keep=0.6, title="grey.png")
    assert len(figure.axes) == HEADS + 2
    assert [ax.get_title() for ax in figure.axes[1:-1]] == [f"head {h}" for h in range(HEADS)]
    assert len(figure.axes[-1].collections) == HEADS  # one contour set per head
    out = tmp_path / "figure.png"
    figure.savefig(out, format="png", dpi=100)
    pixels = pixels_of(out)
    panels = HEADS + 2
    assert pixels.shape == (HEIGHT, PANEL * panels, 3)
    outlines = panel(pixels, panels - 1, panels)
    for colour in head_colours(HEADS):
        assert colour_pixels(outlines, colour) > 50, colour
        assert colour_pixels(panel(pixels, 0, panels), colour) == 0  # the input panel has no outline
    for head in range(HEADS):  # each map is drawn: many colours, not one flat panel
        assert panel(pixels, 1 + head, panels).std(axis=(0, 1)).max() > 20


def write_images(folder: Path) -> None:
    (folder / "cats").mkdir(parents=True)
    (folder / "dogs" / "small").mkdir(parents=True)
    photo(70, 50, seed=1).save(folder / "cats" / "a.png")
    photo(50, 70, seed=2).save(folder / "dogs" / "small" / "a.png")  # same name, other folder
    photo(40, 40, seed=3).convert("RGB").save(folder / "dogs" / "a.jpg")  # same stem, other extension
    (folder / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")


def test_a_folder_gives_one_figure_per_readable_image_and_skips_the_rest(vit_run: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_images(images)
    out = images / "attention"  # inside the input: a second run must not draw its own figures
    lines: list[str] = []
    summary = attention_maps(vit_run, images, out, echo=lines.append)  # default size: trained at 32 px
    names = ["cats/a.png", "dogs/a.jpg", "dogs/small/a.png"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [f"{n}.png" for n in names]
    assert summary["written"] == 3 and summary["skipped"] == 1 and summary["heads"] == HEADS
    assert summary["image_size"] == SIZE and summary["grid"] == [SIZE // PATCH] * 2
    assert lines[0].startswith(f"image size {SIZE} (the size the model was trained at")  # never a silent default
    assert lines[1:] == [
        f"wrote 3 attention figure(s) ({HEADS} heads, {SIZE}x{SIZE} px input) to {out}; skipped 1 unreadable image(s)"
    ]
    recorded = json.loads((out / "attention.json").read_text())
    assert [f["file"] for f in recorded["figures"]] == names
    assert [s["file"] for s in recorded["skipped_files"]] == ["dogs/broken.jpg"]
    for entry in recorded["figures"]:
        assert entry["heads"] == HEADS and len(entry["mask_fraction"]) == HEADS
        # a whole number of the 16 patches, at least one
        assert all(0 < f <= 1 and (f * 16) == pytest.approx(round(f * 16)) for f in entry["mask_fraction"])
        assert all(0.6 <= kept <= 1.0 + 1e-9 for kept in entry["mass_kept"])
        pixels = pixels_of(out / entry["figure"])
        assert pixels.shape == (HEIGHT, PANEL * (HEADS + 2), 3)
        assert pixels.std() > 20  # not blank
    # The two same-named images got different figures.
    assert not np.array_equal(pixels_of(out / "cats/a.png.png"), pixels_of(out / "dogs/small/a.png.png"))
    again = attention_maps(vit_run, images, out)
    assert again["written"] == 3 and again["skipped"] == 1


def test_an_image_file_at_another_size(vit_run: Path, tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    noise_image(70, 50).save(image)
    summary = attention_maps(vit_run, image, tmp_path / "out", image_size=48, keep=0.9)
    assert summary["written"] == 1 and summary["grid"] == [6, 6] and summary["keep"] == 0.9
    assert Image.open(tmp_path / "out" / "photo.png.png").size == (PANEL * (HEADS + 2), HEIGHT)
    fractions = summary["figures"][0]["mask_fraction"]
    assert all(f * 36 == pytest.approx(round(f * 36)) for f in fractions)


def test_attention_refuses_bad_input(vit_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(InputError, match="broken.jpg is not a readable image"):
        attention_maps(vit_run, broken, out, image_size=SIZE)
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40)).save(good)
    with pytest.raises(InputError, match="not divisible by the patch size 8"):
        attention_maps(vit_run, good, out, image_size=30)
    with pytest.raises(InputError, match=r"keep must be in \(0, 1\]"):
        attention_maps(vit_run, good, out, keep=0.0)
    with pytest.raises(NotFound, match="missing.png does not exist"):
        attention_maps(vit_run, tmp_path / "missing.png", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no image files"):
        attention_maps(vit_run, empty, out)
    assert not out.exists()


def test_a_cnn_is_refused_in_one_line(tmp_path: Path) -> None:
    from dino_scale.models.backbones import create_backbone

    weights = tmp_path / "cnn.safetensors"
    save_safetensors(create_backbone("test_resnet").state_dict(), weights, metadata={"arch": "test_resnet"})
    image = tmp_path / "photo.png"
    photo(40, 40).save(image)
    with pytest.raises(InputError, match="need a vision transformer") as caught:
        attention_maps(weights, image, tmp_path / "out", image_size=32)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()
