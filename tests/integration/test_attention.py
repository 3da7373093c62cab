"""`dino-scale attention`: one PNG per head of the last-layer CLS attention, and the 60%-mass masks."""

import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image
from support import SIZE, noise_image

from dino_scale.cli import main as cli
from dino_scale.eval.attention import mass_mask


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


def test_attention_pngs_have_the_right_count_and_size(vit_run: Path, tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    noise_image(70, 50).save(image)
    out = tmp_path / "attention"
    args = ["attention", "--model", str(vit_run), "--image", str(image), "--out", str(out), "--image-size", str(SIZE)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    heads = 3  # tiny-test.json: num_heads 3
    assert sorted(p.name for p in out.glob("head_*.png")) == [f"head_{h}.png" for h in range(heads)]
    for name in [f"head_{h}.png" for h in range(heads)] + ["masks.png", "image.png"]:
        assert Image.open(out / name).size == (SIZE, SIZE), name
    summary = json.loads((out / "attention.json").read_text())
    assert summary["grid"] == [SIZE // 8, SIZE // 8] and len(summary["mass_kept"]) == heads
    assert all(0.6 <= kept <= 1.0 + 1e-9 for kept in summary["mass_kept"])
    assert not np.array_equal(np.asarray(Image.open(out / "masks.png")), np.asarray(Image.open(out / "image.png")))


def test_attention_refuses_bad_input(vit_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    common = ["attention", "--model", str(vit_run), "--out", str(out)]
    result = CliRunner().invoke(cli, [*common, "--image", str(broken), "--image-size", str(SIZE)])
    assert result.exit_code != 0 and "not a readable image" in result.output
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40)).save(good)
    result = CliRunner().invoke(cli, [*common, "--image", str(good), "--image-size", "30"])
    assert result.exit_code != 0 and "not divisible by the patch size 8" in result.output
    assert not out.exists()
