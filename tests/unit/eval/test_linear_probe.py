from __future__ import annotations

import pytest
import timm
import torch

from dino_scale.eval.linear import _fit_linear, _stratified_holdout, train_linear_probe
from dino_scale.models.features import extract_features, probe_features
from dino_scale.train.schedules import cosine_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(**kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4, num_classes=0, **kwargs
    ).eval()


def manual_cls_features(vit: torch.nn.Module, images: torch.Tensor, n_last: int) -> torch.Tensor:
    """The paper's get_intermediate_layers by hand: run the blocks, norm each of the last n outputs, take token 0."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    outputs = []
    for block in vit.blocks:
        x = block(x)
        outputs.append(x)
    return torch.cat([vit.norm(out)[:, 0] for out in outputs[-n_last:]], dim=-1)


@pytest.mark.parametrize("reg_tokens", [0, 2])
@pytest.mark.parametrize("n_last", [1, 3])
def test_vit_features_match_manual_computation(reg_tokens: int, n_last: int) -> None:
    vit = tiny_vit(reg_tokens=reg_tokens)
    assert vit.num_prefix_tokens == 1 + reg_tokens
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = probe_features(vit, images, n_last_blocks=n_last)
        expected = manual_cls_features(vit, images, n_last)
        # The last block's CLS alone is what the backbone pools: the probe with n=1 is that feature.
        pooled = vit(images)
    assert features.shape == (3, n_last * vit.embed_dim)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(features[:, -vit.embed_dim :], pooled)


def test_vit_avgpool_appends_mean_of_normed_patch_tokens_without_registers() -> None:
    vit = tiny_vit(reg_tokens=2)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = probe_features(vit, images, n_last_blocks=2, avgpool_patchtokens=True)
        tokens = vit.forward_features(images)  # final norm applied to the last block's tokens
    dim = vit.embed_dim
    assert features.shape == (2, 3 * dim)
    # 32 / 8 = 4x4 = 16 patches; tokens 0..2 are CLS and the two registers.
    assert tokens.shape[1] == 3 + 16
    torch.testing.assert_close(features[:, 2 * dim :], tokens[:, 3:].mean(dim=1))
    torch.testing.assert_close(features[:, dim : 2 * dim], tokens[:, 0])


def test_resnet_uses_pooled_features_and_rejects_vit_options() -> None:
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = probe_features(resnet, images, n_last_blocks=1)
        expected = resnet.forward_features(images).mean(dim=(2, 3))
    assert features.shape == (2, 512)
    torch.testing.assert_close(features, expected)
    with pytest.raises(ValueError, match="n_last_blocks=1"):
        probe_features(resnet, images, n_last_blocks=4)
    with pytest.raises(ValueError, match="avgpool_patchtokens=False"):
        probe_features(resnet, images, n_last_blocks=1, avgpool_patchtokens=True)


def test_vit_rejects_too_many_blocks_and_no_cls_token() -> None:
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="exceeds"):
        probe_features(tiny_vit(), images, n_last_blocks=5)
    with pytest.raises(ValueError, match="CLS"):
        probe_features(tiny_vit(class_token=False, global_pool="avg"), images, n_last_blocks=1)


def test_extract_probe_features_eval_mode_restored_and_batches_concatenated() -> None:
    vit = tiny_vit(drop_path_rate=0.5).train()
    images = torch.randn(5, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 1, 0])
    batches = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    features, out_labels = extract_features(vit, batches, n_last_blocks=2, avgpool_patchtokens=False)
    assert vit.training  # mode restored
    assert features.dtype == torch.float32 and features.shape == (5, 2 * vit.embed_dim)
    assert torch.equal(out_labels, labels)
    # Eval mode means drop-path is off: the result is deterministic and matches the eval-mode forward.
    with torch.no_grad():
        expected = manual_cls_features(vit.eval(), images, 2)
    torch.testing.assert_close(features, expected)
    with pytest.raises(ValueError, match="no images"):
        extract_features(vit, [], 1, False)


def blobs(num_classes: int, per_class: int, dim: int, seed: int, spread: float = 0.5) -> tuple[torch.Tensor, ...]:
    """Gaussian blobs around fixed, well-separated class means (same means for every seed)."""
    means = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * 3.0
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = means[labels] + spread * torch.randn(labels.numel(), dim, generator=generator)
    # A large offset and scale, as raw backbone features can have: standardisation must cope with it.
    return features * 20.0 + 100.0, labels


FAST = {"epochs": 20, "learning_rates": (0.01, 0.1, 1.0), "batch_size": 64}


def test_separable_blobs_reach_full_accuracy() -> None:
    train_x, train_y = blobs(6, 60, 16, seed=0)
    test_x, test_y = blobs(6, 30, 16, seed=1)
    result = train_linear_probe(train_x, train_y, test_x, test_y, **FAST)
    assert result["top1"] >= 99.0
    assert result["top5"] == 100.0
    assert result["val_top1"] >= 99.0
    assert result["best_lr"] in FAST["learning_rates"]
    assert result["num_train"] == 360 and result["num_test"] == 180
    assert result["num_classes"] == 6 and result["feature_dim"] == 16
    assert result["epochs"] == 20 and result["learning_rates"] == [0.01, 0.1, 1.0]


def test_random_labels_are_near_chance_on_test() -> None:
    """Labels unrelated to the features: in 256 dimensions the probe can memorise the 120 training samples, but it
    must stay near chance (1/6 = 16.7%, 5 sigma below 35%) on the test set. This also catches test samples leaking
    into training, which would be memorised as well."""
    generator = torch.Generator().manual_seed(7)
    train_x, test_x = torch.randn(120, 256, generator=generator), torch.randn(120, 256, generator=generator)
    train_y, test_y = torch.randint(0, 6, (120,), generator=generator), torch.randint(0, 6, (120,), generator=generator)
    result = train_linear_probe(train_x, train_y, test_x, test_y, **FAST)
    assert result["top1"] < 35.0


def test_deterministic_for_a_seed() -> None:
    train_x, train_y = blobs(4, 40, 8, seed=0, spread=3.0)  # overlapping: accuracies are not all 100
    test_x, test_y = blobs(4, 40, 8, seed=1, spread=3.0)
    runs = [train_linear_probe(train_x, train_y, test_x, test_y, seed=3, **FAST) for _ in range(2)]
    assert runs[0] == runs[1]
    assert 30.0 < runs[0]["top1"] < 100.0


def test_raw_features_without_standardisation_and_single_rate_without_search() -> None:
    train_x, train_y = blobs(3, 40, 8, seed=0)
    test_x, test_y = blobs(3, 20, 8, seed=1)
    result = train_linear_probe(
        train_x / 20.0,
        train_y,
        test_x / 20.0,
        test_y,
        epochs=20,
        learning_rates=(0.01,),
        val_fraction=0.0,
        standardize=False,
    )
    assert result["val_top1"] is None and result["best_lr"] == 0.01
    assert result["top1"] >= 99.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_x": torch.zeros(0, 4), "train_y": torch.zeros(0, dtype=torch.long)}, "train set is empty"),
        ({"test_x": torch.zeros(0, 4), "test_y": torch.zeros(0, dtype=torch.long)}, "test set is empty"),
        ({"train_y": torch.tensor([0, 1, 0])}, "labels"),
        ({"test_x": torch.zeros(4, 5)}, "dimensions"),
        ({"train_y": torch.tensor([0, 1, 2, 3]), "num_classes": 3}, "out of range"),
        ({"train_y": torch.tensor([0, -1, 0, 1])}, "non-negative"),
        ({"train_y": torch.zeros(4, dtype=torch.long), "test_y": torch.zeros(4, dtype=torch.long)}, "at least 2"),
        ({"train_y": torch.zeros(4, dtype=torch.long)}, "single class"),
        ({"train_y": torch.tensor([0.0, 1.0, 0.0, 1.0])}, "integer"),
        ({"val_fraction": 0.0}, "val_fraction=0"),
        ({"learning_rates": ()}, "learning_rates"),
    ],
)
def test_input_validation(change: dict, message: str) -> None:
    args = {
        "train_x": torch.randn(4, 4),
        "train_y": torch.tensor([0, 1, 0, 1]),
        "test_x": torch.randn(4, 4),
        "test_y": torch.tensor([1, 0, 1, 0]),
    }
    args.update(change)
    keywords = {key: args.pop(key) for key in list(args) if key not in ("train_x", "train_y", "test_x", "test_y")}
    with pytest.raises(ValueError, match=message):
        train_linear_probe(args["train_x"], args["train_y"], args["test_x"], args["test_y"], epochs=1, **keywords)


def test_grid_search_picks_a_learning_rate_that_learns() -> None:
    """A rate of 1e-7 cannot move the N(0, 0.01) init in 20 epochs; the search must see that on the held-out part
    and pick 0.1, whatever the rates' order in the grid."""
    train_x, train_y = blobs(6, 60, 16, seed=0)
    test_x, test_y = blobs(6, 30, 16, seed=1)
    result = train_linear_probe(train_x, train_y, test_x, test_y, epochs=20, learning_rates=(0.1, 1e-7))
    assert result["best_lr"] == 0.1 and result["top1"] >= 99.0


def test_stratified_holdout_keeps_class_proportions() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    mask = _stratified_holdout(labels, 0.1, torch.Generator().manual_seed(0))
    assert mask.sum() == 10
    assert labels[mask].bincount(minlength=3).tolist() == [5, 3, 2]
    other = _stratified_holdout(labels, 0.1, torch.Generator().manual_seed(1))
    assert not torch.equal(mask, other)  # seeded: a different seed holds out different samples


def test_vectorised_sgd_matches_torch_sgd_with_cosine_lr() -> None:
    """The grid trainer equals nn.Linear + torch.optim.SGD(momentum=0.9) + per-step cosine lr on the same batches."""
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(1))
    epochs, batch_size, lr = 3, 16, 0.5
    weight, bias = _fit_linear(features, labels, 3, [lr], epochs, batch_size, torch.Generator().manual_seed(5))

    generator = torch.Generator().manual_seed(5)  # replay the same draws: init, then one permutation per epoch
    linear = torch.nn.Linear(6, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(6, 3, generator=generator).T * 0.01)
        linear.bias.zero_()
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    scale = cosine_schedule(1.0, 0.0, epochs * 4)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(50, generator=generator)
        for start in range(0, 50, batch_size):
            index = order[start : start + batch_size]
            optimizer.param_groups[0]["lr"] = lr * float(scale[step])
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(linear(features[index]), labels[index]).backward()
            optimizer.step()
            step += 1
    torch.testing.assert_close(weight[0], linear.weight.detach().T)
    torch.testing.assert_close(bias[0], linear.bias.detach())
    assert not torch.allclose(weight[0], torch.zeros_like(weight[0]), atol=1e-2)  # it did train
