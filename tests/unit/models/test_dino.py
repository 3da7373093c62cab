import torch

from dino_scale.config import ModelConfig, config_from_dict
from dino_scale.models.dino import DINOHead, build_student_teacher
from dino_scale.train.backends import LocalBackend
from dino_scale.train.ema import update_teacher
from dino_scale.train.optim import parameter_groups

TINY_VIT = ModelConfig(
    arch="vit_tiny_patch16_224",
    timm_kwargs={"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3},
    out_dim=64,
    hidden_dim=32,
    bottleneck_dim=16,
    drop_path_rate=0.2,
)


def effective_last_layer_weight(head: DINOHead) -> torch.Tensor:
    return head.last_layer.weight  # the parametrization recomputes g * V / ||V||


def test_head_last_layer_rows_have_unit_norm_and_fixed_gain() -> None:
    head = DINOHead(24, 50, hidden_dim=32, bottleneck_dim=8, norm_last_layer=True)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original1.mul_(torch.rand(50, 1) * 5 + 0.1)
    row_norms = effective_last_layer_weight(head).norm(dim=1)
    assert torch.allclose(row_norms, torch.ones(50), atol=1e-5)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    trainable_gain = DINOHead(24, 50, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    assert trainable_gain.last_layer.parametrizations.weight.original0.requires_grad


def test_head_shapes_and_bottleneck_normalisation() -> None:
    head = DINOHead(24, 50, hidden_dim=32, bottleneck_dim=8, nlayers=3, use_bn=True)
    out = head(torch.randn(5, 24))
    assert out.shape == (5, 50)
    # With unit-norm prototypes and an L2-normalised bottleneck, every logit is a cosine: |logit| <= 1.
    assert out.abs().max() <= 1.0 + 1e-5
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules()) == 2


def test_multicrop_forward_runs_one_backbone_pass_per_resolution() -> None:
    student, _ = build_student_teacher(TINY_VIT)
    calls = []
    student.backbone.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    views = [torch.randn(3, 3, 32, 32)] * 2 + [torch.randn(3, 3, 16, 16)] * 4
    out = student(views)
    assert out.shape == (6 * 3, 64)
    assert calls == [torch.Size([6, 3, 32, 32]), torch.Size([12, 3, 16, 16])]


def test_teacher_is_exact_copy_without_grads_or_drop_path() -> None:
    student, teacher = build_student_teacher(TINY_VIT)
    for (name, s), (_, t) in zip(student.state_dict().items(), teacher.state_dict().items(), strict=True):
        assert torch.equal(s, t), name
    assert not any(p.requires_grad for p in teacher.parameters())
    student_drop = [m.drop_prob for m in student.modules() if hasattr(m, "drop_prob")]
    teacher_drop = [m.drop_prob for m in teacher.modules() if hasattr(m, "drop_prob")]
    assert max(student_drop) > 0 and max(teacher_drop) == 0
    # Train mode with drop-path: the student is stochastic, the teacher deterministic.
    x = [torch.randn(2, 3, 32, 32)]
    torch.manual_seed(0)
    assert torch.equal(teacher(x), teacher(x))
    assert not torch.equal(student(x), student(x))


def test_ema_update_formula() -> None:
    student, teacher = build_student_teacher(TINY_VIT)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = {name: p.clone() for name, p in teacher.named_parameters()}
    update_teacher(teacher, [list(student.named_parameters())], momentum=0.9)
    for name, p in teacher.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(student.named_parameters())[name]
        assert torch.allclose(p, expected, atol=1e-6), name


def test_no_weight_decay_on_biases_and_norms() -> None:
    student, _ = build_student_teacher(TINY_VIT)
    groups = parameter_groups(student)
    names = {id(p): n for n, p in student.named_parameters()}
    decayed = [p for g in groups if g["apply_weight_decay"] for p in g["params"]]
    not_decayed = [p for g in groups if not g["apply_weight_decay"] for p in g["params"]]
    assert all(p.ndim > 1 for p in decayed)
    assert any(names[id(p)].endswith("norm1.weight") for p in not_decayed)
    assert all(names[id(p)].endswith(".bias") or p.ndim <= 1 for p in not_decayed)
    last_layer = [names[id(p)] for g in groups if g["last_layer"] for p in g["params"]]
    assert last_layer == ["head.last_layer.parametrizations.weight.original1"]  # the gain is frozen (norm_last_layer)


def test_frozen_last_layer_gets_no_update_but_the_rest_does() -> None:
    cfg = config_from_dict(
        {"model": TINY_VIT.model_dump(), "deepspeed": {"train_micro_batch_size_per_gpu": 2}, "device": "cpu"}
    )
    student, _ = build_student_teacher(cfg.model)
    backend = LocalBackend(cfg, cfg.batch_plan(1))
    backend.prepare(student)
    last_layer = student.head.last_layer.parametrizations.weight.original1
    first_mlp = student.head.mlp[0].weight

    def step(freeze: bool) -> tuple[torch.Tensor, torch.Tensor]:
        before = last_layer.detach().clone(), first_mlp.detach().clone()
        backend.backward(student([torch.randn(4, 3, 32, 32)]).pow(2).sum(), sync_gradients=True)
        backend.optimizer_step(lr=1e-2, weight_decay=0.04, freeze_last_layer=freeze, flags={})
        return before

    last_before, mlp_before = step(freeze=True)
    assert torch.equal(last_layer, last_before)
    assert not torch.equal(first_mlp, mlp_before)
    last_before, _ = step(freeze=False)
    assert not torch.equal(last_layer, last_before)
