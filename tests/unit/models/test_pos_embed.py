"""Position embeddings at other grids: ViTs from create_backbone interpolate them as facebookresearch/dino does
(bicubic, scale factor (n + 0.1) / sqrt(N), no antialias), not as timm does, unless asked for timm's method; weights
loaded at a fixed image size bake in the same table.

The reference below is written from the official equations as plain tensor code, with the official code's naming
(``B, nc, w, h = x.shape``: its "w" is dimension 2 of the image, the rows), independently of the package's code.
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from support import ARCH, TINY
from torch import nn

from dino_scale.config import ModelConfig
from dino_scale.errors import ConfigError
from dino_scale.models.backbones import create_backbone
from dino_scale.models.dino import build_student_teacher
from dino_scale.models.weights import BackboneSource, build_backbone, load_backbone_weights

pytestmark = pytest.mark.usefixtures("one_thread")

PATCH = TINY["patch_size"]
# The smallest relative CLS difference between the official and timm's interpolation that the tests below ask for
# wherever the grid differs from the stored one: three orders of magnitude above the float32 noise the official
# match is held to (1e-6 absolute on features of norm ~7), so a test that passes proves which method ran. The
# differences measured on these inputs are 5.6e-4 (ViT-S/16 grid at 160 px) to 6.5e-3 (16 px).
MARGIN = 2e-4


# --- the reference, from the equations ---------------------------------------------------------------------------


def reference_pos_embed(table: torch.Tensor, w: int, h: int, patch: int) -> torch.Tensor:
    """Official DINO: the embeddings for an image whose dimension 2 has `w` pixels and dimension 3 `h` pixels."""
    n = table.shape[1] - 1
    dim = table.shape[2]
    npatch = (w // patch) * (h // patch)
    if npatch == n and w == h:
        return table
    class_embed = table[:, :1]
    side = math.sqrt(n)
    grid = table[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    grid = F.interpolate(grid, scale_factor=(w0 / side, h0 / side), mode="bicubic")
    assert grid.shape[-2:] == (int(w0), int(h0))
    grid = grid.permute(0, 2, 3, 1).reshape(1, int(w0) * int(h0), dim)
    return torch.cat([class_embed, grid], dim=1)


def reference_cls(
    vit: nn.Module, images: torch.Tensor, table: torch.Tensor | None = None, patch: int = PATCH
) -> torch.Tensor:
    """The CLS feature assembled by hand: patch projection, class token in front, + embeddings, blocks, norm.
    `table` replaces the reference interpolation when given (the embeddings added as they are)."""
    _, _, w, h = images.shape
    tokens = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)  # row-major patches
    tokens = torch.cat([vit.cls_token.expand(len(images), -1, -1), tokens], dim=1)
    tokens = tokens + (reference_pos_embed(vit.pos_embed, w, h, patch) if table is None else table)
    for block in vit.blocks:
        tokens = block(tokens)
    return vit.norm(tokens)[:, 0]


# --- helpers -----------------------------------------------------------------------------------------------------


def tiny(seed: int = 0, method: str = "official", **overrides: Any) -> nn.Module:
    """create_backbone's tiny ViT with non-trivial weights (position embeddings of unit scale, so that the
    interpolation weighs in the features)."""
    torch.manual_seed(seed)
    model = create_backbone(ARCH, pos_embed_interpolation=method, **{**TINY, **overrides})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
        model.pos_embed.normal_()
    return model.eval()


def timm_twin(model: nn.Module, **overrides: Any) -> nn.Module:
    """The same weights in a plain timm model (timm's resampling, dynamic_img_size)."""
    twin = timm.create_model(ARCH, pretrained=False, num_classes=0, dynamic_img_size=True, **{**TINY, **overrides})
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def images(height: int, width: int | None = None, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, height, width or height, generator=torch.Generator().manual_seed(seed))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- (a) the official interpolation runs at every input size --------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [(16, 16), (24, 24), (40, 40), (24, 40), (40, 16), (16, 64)],
    ids=["16", "24", "40", "24x40", "40x16", "16x64-same-count"],
)
def test_cls_feature_is_the_official_interpolation_not_timms(size: tuple[int, int]) -> None:
    model = tiny()
    x = images(*size)
    with torch.no_grad():
        ours, expected, timms = model(x), reference_cls(model, x), timm_twin(model)(x)
    assert torch.allclose(ours, expected, rtol=0, atol=1e-6), (ours - expected).abs().max()
    assert relative(timms, expected) > MARGIN  # so the match above tells the two methods apart


def test_non_square_inputs_follow_the_official_orientation() -> None:
    """The official first scale factor goes with dimension 2 (rows): reading it as the width gives other features."""
    model = tiny()
    x = images(24, 40)  # 3 x 5 patches
    swapped = reference_pos_embed(model.pos_embed, 40, 24, PATCH)  # a 5 x 3 grid read into 3 x 5 tokens
    with torch.no_grad():
        ours, transposed = model(x), reference_cls(model, x, table=swapped)
        assert relative(ours, transposed) > MARGIN
        assert torch.allclose(ours, reference_cls(model, x), rtol=0, atol=1e-6)


def test_a_vit_s16_geometry_at_the_local_and_an_eval_size() -> None:
    """ViT-S/16's grid (224 px, 16 px patches: a 14 x 14 table) at 96 px (6 x 6) and 160 px (10 x 10)."""
    model = tiny(img_size=224, patch_size=16, depth=1)
    twin = timm_twin(model, img_size=224, patch_size=16, depth=1)
    for size in (96, 160):
        x = images(size)
        with torch.no_grad():
            ours, expected = model(x), reference_cls(model, x, patch=16)
            assert torch.allclose(ours, expected, rtol=0, atol=1e-6), (size, (ours - expected).abs().max())
            assert relative(twin(x), expected) > MARGIN, size


# --- (b) the stored grid --------------------------------------------------------------------------------------------


def test_at_the_stored_grid_the_table_is_used_unchanged() -> None:
    model = tiny()
    x = images(32)
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(x))
        stem = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed.proj(x).flatten(2).transpose(1, 2)], 1)
        assert torch.equal(tokens, stem + model.pos_embed)
        assert torch.equal(model(x), reference_cls(model, x, table=model.pos_embed))
        assert torch.equal(model(x), timm_twin(model)(x))  # both methods leave the stored grid alone


# --- (c) weights loaded at a fixed size ----------------------------------------------------------------------------


def source_of(model: nn.Module, recorded: str | None = None) -> BackboneSource:
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    return BackboneSource(Path("tiny.safetensors"), weights, ARCH, dict(TINY), pos_embed_interpolation=recorded)


@pytest.mark.parametrize("size", [24, 48])
def test_a_fixed_size_backbone_bakes_in_the_official_table(size: int) -> None:
    dynamic = tiny(seed=3)
    fixed, _, _ = build_backbone(source_of(dynamic), size)
    assert not fixed.dynamic_img_size
    expected_table = reference_pos_embed(dynamic.pos_embed.detach(), size, size, PATCH)
    assert fixed.pos_embed.shape == expected_table.shape
    assert torch.allclose(fixed.pos_embed.detach(), expected_table, rtol=0, atol=1e-7)
    assert fixed.dino_pos_embed_interpolation == "official"
    x = images(size)
    with torch.no_grad():
        assert torch.allclose(fixed(x), dynamic(x), rtol=0, atol=1e-6)
        assert relative(timm_twin(dynamic)(x), fixed(x)) > MARGIN

    # The exported graph holds no interpolation: the table is a constant of the model.
    program = torch.export.export(fixed, (x,))
    assert not any("upsample" in str(node.target) for node in program.graph.nodes)
    assert torch.allclose(program.module()(x), dynamic(x).detach(), rtol=0, atol=1e-6)


def test_a_fixed_size_backbone_follows_the_recorded_or_asked_method() -> None:
    dynamic = tiny(seed=4)
    x = images(48)
    with torch.no_grad():
        timm_feature = timm_twin(dynamic)(x)
        for recorded, asked in (("timm", None), (None, "timm"), ("official", "timm")):
            fixed, _, _ = build_backbone(source_of(dynamic, recorded), 48, pos_embed_interpolation=asked)
            assert fixed.dino_pos_embed_interpolation == "timm"
            assert torch.allclose(fixed(x), timm_feature, rtol=0, atol=1e-6)
        fixed, _, _ = build_backbone(source_of(dynamic, "timm"), 48, pos_embed_interpolation="official")
        assert torch.allclose(fixed(x), dynamic(x), rtol=0, atol=1e-6)


def test_load_backbone_weights_resamples_with_the_models_method() -> None:
    source = tiny(seed=5).state_dict()
    table = source["pos_embed"]
    official, by_timm = tiny(seed=6, img_size=48), tiny(seed=6, method="timm", img_size=48)
    load_backbone_weights(official, source)
    load_backbone_weights(by_timm, source)
    assert torch.allclose(official.pos_embed.detach(), reference_pos_embed(table, 48, 48, PATCH), rtol=0, atol=1e-7)
    assert relative(by_timm.pos_embed.detach(), official.pos_embed.detach()) > MARGIN
    asked = tiny(seed=6, img_size=48)
    load_backbone_weights(asked, source, pos_embed_interpolation="timm")
    assert torch.equal(asked.pos_embed, by_timm.pos_embed)


# --- (d) timm's method on request ----------------------------------------------------------------------------------


def test_timm_method_keeps_timms_result() -> None:
    model = tiny(seed=7, method="timm")
    assert "_pos_embed" not in model.__dict__ and model.dino_pos_embed_interpolation == "timm"
    twin = timm_twin(model)
    for size in [(16, 16), (40, 40), (24, 40)]:
        x = images(*size)
        with torch.no_grad():
            assert torch.equal(model(x), twin(x))
            assert relative(model(x), reference_cls(model, x)) > MARGIN


def test_unsupported_layouts_fall_back_to_timm_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dino_scale.models.backbones"):
        model = create_backbone(ARCH, **TINY, reg_tokens=2)
    assert model.dino_pos_embed_interpolation == "timm" and "_pos_embed" not in model.__dict__
    assert f"{ARCH}: the official DINO position-embedding interpolation does not apply" in caplog.text
    assert "register tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dino_scale.models.backbones"):
        cnn = create_backbone("resnet18")
    assert not hasattr(cnn, "dino_pos_embed_interpolation") and not caplog.text
    with pytest.raises(ConfigError, match="pos_embed_interpolation must be one of official, timm"):
        create_backbone(ARCH, pos_embed_interpolation="bilinear", **TINY)


# --- (e) copies ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_run_the_official_method_on_their_own_weights(how: str) -> None:
    model = tiny(seed=8)
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    x = images(24)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
        twin.pos_embed.mul_(2.0)  # the copy's own table, not the original's, must be the one it reads
        changed = twin(x)
        assert not torch.equal(changed, model(x))
        assert torch.allclose(changed, reference_cls(twin, x), rtol=0, atol=1e-6)
        assert torch.allclose(model(x), reference_cls(model, x), rtol=0, atol=1e-6)


def test_the_teacher_copy_of_the_student_reads_its_own_table() -> None:
    cfg = ModelConfig(arch=ARCH, timm_kwargs=dict(TINY), out_dim=16, hidden_dim=16, bottleneck_dim=8)
    student, teacher = build_student_teacher(cfg)
    assert teacher.backbone._pos_embed.args[0] is teacher.backbone
    assert student.backbone._pos_embed.args[0] is student.backbone
