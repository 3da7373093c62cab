"""Gradient clipping and the last layer's freeze, as official DINO (main_dino.py / utils.py) does them, on one process.

Official order after backward: unscale (fp16), clip each parameter's gradient on its own (`clip_gradients`: for every
gradient of norm n, coef = clip / (n + 1e-6), applied where coef < 1), then drop the last layer's gradients while it
is frozen (`cancel_gradients_last_layer`: p.grad = None), then the optimizer steps. The expected values below are
computed from those equations by hand, never through the code under test. The gradients that reach AdamW are
recorded by wrapping its `step`.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from dino_scale.config import load_config
from dino_scale.train.backends.base import clip_coefficients, clip_each_, squared_norms
from dino_scale.train.backends.local import LocalBackend

CLIP = 1.0
LR, WD = 1e-2, 0.04
LAST = "head.last_layer.weight"


class Tiny(nn.Module):
    """Parameter names as the student's: the optimizer groups and the freeze go by them."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(4, 2, bias=False)})
        self.head = nn.ModuleDict({"mlp": nn.Linear(2, 5), "last_layer": nn.Linear(5, 6, bias=False)})


def hand_made_gradients(last_layer_scale: float = 1e6) -> dict[str, torch.Tensor]:
    """Some above the clip, some below, one zero, and a huge one on the last layer."""
    g = torch.Generator().manual_seed(0)
    return {
        "backbone.a.weight": torch.randn(4, 3, generator=g) * 5,  # norm ~17: clipped
        "backbone.a.bias": torch.full((4,), 0.1),  # norm 0.2: kept
        "backbone.b.weight": torch.zeros(2, 4),  # zero: stays zero
        "head.mlp.weight": torch.tensor([[3.0, 4.0]] + [[0.0, 0.0]] * 4),  # norm exactly 5: clipped to 1 / 5.000001
        "head.mlp.bias": torch.tensor([0.6, 0.0, 0.0, 0.0, 0.8]),  # norm exactly 1: coef 1 / 1.000001 < 1, clipped
        LAST: torch.randn(6, 5, generator=g) * last_layer_scale,
    }


def expected_clipped(grad: torch.Tensor, clip: float = CLIP) -> torch.Tensor:
    norm = math.sqrt(sum(float(x) ** 2 for x in grad.double().flatten()))
    coef = clip / (norm + 1e-6)
    return grad * coef if coef < 1 else grad


@pytest.fixture(autouse=True)
def _single_process(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


def make_backend(*overrides: str) -> tuple[LocalBackend, Tiny]:
    cfg = load_config("tiny-test.json", ["backend=local", f"deepspeed.gradient_clipping={CLIP}", *overrides])
    torch.manual_seed(0)
    model = Tiny()
    backend = LocalBackend(cfg, cfg.batch_plan(1))
    backend.prepare(model)
    return backend, model


def step(backend: LocalBackend, model: nn.Module, grads: dict[str, torch.Tensor], freeze: bool) -> dict[str, Any]:
    """One optimizer step on these gradients; returns what reached AdamW's step (None: no gradient) and the result."""
    assert backend.optimizer is not None
    seen: dict[str, Any] = {}
    real_step = backend.optimizer.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        seen.update({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
        return real_step(*args, **kwargs)

    backend.optimizer.step = recording_step  # type: ignore[method-assign]
    try:
        for name, parameter in model.named_parameters():
            parameter.grad = grads[name].clone()
        result = backend.optimizer_step(LR, WD, freeze_last_layer=freeze, flags={})
    finally:
        del backend.optimizer.step
    return {"grads": seen, "result": result}


def test_each_gradient_is_clipped_on_its_own_and_the_frozen_last_layer_is_dropped() -> None:
    backend, model = make_backend()
    grads = hand_made_gradients()
    seen = step(backend, model, grads, freeze=True)["grads"]
    assert seen[LAST] is None  # cancelled after clipping: AdamW never sees it
    for name, grad in grads.items():
        if name != LAST:
            torch.testing.assert_close(seen[name], expected_clipped(grad), rtol=1e-6, atol=0)
    assert torch.equal(seen["backbone.a.bias"], grads["backbone.a.bias"])  # below the clip: untouched, bit for bit
    assert torch.equal(seen["backbone.b.weight"], torch.zeros(2, 4))
    assert float(seen["head.mlp.weight"].norm()) == pytest.approx(5 / 5.000001, rel=1e-6)
    assert float(seen["head.mlp.bias"].norm()) == pytest.approx(1 / 1.000001, rel=1e-6)

    # The huge last-layer gradient changes nothing for the others (a global norm would shrink them all ~1e6-fold).
    backend_small, model_small = make_backend()
    small = step(backend_small, model_small, hand_made_gradients(last_layer_scale=1e-3), freeze=True)["grads"]
    for name in grads:
        if name != LAST:
            assert torch.equal(small[name], seen[name]), name


def test_frozen_last_layer_has_no_optimizer_state_and_its_first_update_is_a_fresh_adamws() -> None:
    backend, model = make_backend()
    assert backend.optimizer is not None
    last = dict(model.named_parameters())[LAST]
    initial = last.detach().clone()
    for _ in range(2):  # two frozen steps
        step(backend, model, hand_made_gradients(), freeze=True)
        assert last not in backend.optimizer.state  # no exp_avg, no step: AdamW skipped it entirely
        assert torch.equal(last, initial)  # no update, no weight decay
    assert all(backend.optimizer.state[p]["step"] == 2 for n, p in model.named_parameters() if n != LAST)

    grads = hand_made_gradients()
    step(backend, model, grads, freeze=False)
    assert backend.optimizer.state[last]["step"] == 1
    # A fresh AdamW on the same weights and the same (clipped) gradient, by hand: m = (1 - b1) g, v = (1 - b2) g^2,
    # bias-corrected, decoupled decay p * (1 - lr * wd), update lr * m_hat / (sqrt(v_hat) + eps).
    g = expected_clipped(grads[LAST]).double()
    b1, b2, eps = 0.9, 0.999, 1e-8
    m_hat, v_hat = (1 - b1) * g / (1 - b1), (1 - b2) * g * g / (1 - b2)
    expected = initial.double() * (1 - LR * WD) - LR * m_hat / (v_hat.sqrt() + eps)
    torch.testing.assert_close(last.detach().double(), expected, rtol=0, atol=1e-7)


def test_global_mode_clips_as_torch_clip_grad_norm() -> None:
    backend, model = make_backend("optim.clip_mode=global")
    grads = hand_made_gradients(last_layer_scale=1.0)
    seen = step(backend, model, grads, freeze=False)["grads"]
    copies = [nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for copy, grad in zip(copies, grads.values(), strict=True):
        copy.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_(copies, CLIP)
    for name, copy in zip(grads, copies, strict=True):
        assert torch.equal(seen[name], copy.grad), name
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    factor = CLIP / (total + 1e-6)
    torch.testing.assert_close(seen["backbone.a.bias"], grads["backbone.a.bias"] * factor, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["per_param", "global"])
def test_logged_grad_norm_is_the_global_norm_before_clipping(mode: str) -> None:
    backend, model = make_backend(f"optim.clip_mode={mode}")
    grads = hand_made_gradients(last_layer_scale=10.0)
    result = step(backend, model, grads, freeze=True)["result"]
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))  # last layer included
    assert result.applied and float(result.grad_norm) == pytest.approx(total, rel=1e-6)
    assert total > 10 * CLIP  # so that a norm taken after clipping could not pass


def test_clip_zero_means_no_clipping() -> None:
    backend, model = make_backend("deepspeed.gradient_clipping=0")
    grads = hand_made_gradients()
    seen = step(backend, model, grads, freeze=False)["grads"]
    assert all(torch.equal(seen[name], grad) for name, grad in grads.items())


def test_non_finite_gradient_skips_the_step_and_leaves_everything() -> None:
    backend, model = make_backend()
    grads = hand_made_gradients()
    grads["backbone.a.bias"][0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = step(backend, model, grads, freeze=False)["result"]
    assert not result.applied and result.verdict()[0] == ["gradient_norm"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The fused kernel (the default) skips on the device: the state it allocates is a fresh one (zero moments and
    # step count); the for-loop kernel is not even called.
    assert backend.optimizer is not None
    for state in backend.optimizer.state.values():
        assert all(not torch.is_tensor(value) or not value.any() for value in state.values()), state


@pytest.mark.parametrize("implementation", ["fused", "for_loop"])
def test_a_dropped_step_is_the_same_with_either_optimizer_kernel(implementation: str) -> None:
    backend, model = make_backend(f"optim.implementation={implementation}")
    grads = hand_made_gradients()
    first = step(backend, model, grads, freeze=False)["result"]
    after_first = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {id(p): s["exp_avg"].clone() for p, s in backend.optimizer.state.items()}
    grads["backbone.a.bias"][0] = float("inf")
    dropped = step(backend, model, grads, freeze=False)["result"]
    assert bool(first.applied) and not bool(dropped.applied)
    assert all(torch.equal(p, after_first[n]) for n, p in model.named_parameters())
    for parameter, state in backend.optimizer.state.items():
        assert torch.equal(state["exp_avg"], moments[id(parameter)])
        assert float(state["step"]) == 1.0  # the dropped step is not counted in Adam's bias correction


def test_pieces_of_each_gradient_clip_as_the_whole() -> None:
    """What FSDP2 and ZeRO do: each rank holds a piece of every gradient (some empty); the squared norms of the
    pieces, summed over ranks in one vector, give each parameter's coefficient; each rank scales its own pieces."""
    grads = list(hand_made_gradients(last_layer_scale=3.0).values())
    whole = [g.clone() for g in grads]
    norm = clip_each_(whole, CLIP, torch.device("cpu"))
    halves = [g.flatten().clone() for g in grads]
    cuts = [0 if i == 1 else g.numel() // 2 for i, g in enumerate(halves)]  # parameter 1 wholly on rank 1
    pieces = [[h[:c] for h, c in zip(halves, cuts, strict=True)], [h[c:] for h, c in zip(halves, cuts, strict=True)]]
    other = [squared_norms(pieces[1], torch.device("cpu")), squared_norms(pieces[0], torch.device("cpu"))]
    norms = [
        clip_each_(pieces[rank], CLIP, torch.device("cpu"), reduce=lambda v, r=rank: v.add_(other[r]))
        for rank in (0, 1)
    ]
    for rank in (0, 1):
        assert float(norms[rank]) == pytest.approx(float(norm), rel=1e-6)
    for index, grad in enumerate(whole):
        torch.testing.assert_close(grad, expected_clipped(grads[index]), rtol=1e-6, atol=0)
        torch.testing.assert_close(halves[index].view_as(grad), grad, rtol=1e-6, atol=0)


def test_clip_coefficients_follow_the_official_formula() -> None:
    squared = torch.tensor([0.0, 0.25, 1.0, 4.0, 1e12, float("inf")])
    coefficients = clip_coefficients(squared, 1.0).tolist()
    assert coefficients[:2] == [1.0, 1.0]  # zero and below: exactly 1
    assert coefficients[2] == pytest.approx(1 / 1.000001, rel=1e-7)
    assert coefficients[3] == pytest.approx(1 / 2.000001, rel=1e-7)
    assert coefficients[4] == pytest.approx(1e-6, rel=1e-6)
    assert coefficients[5] == 0.0
    # fp16: gradients still carrying a loss scale of 1024 are clipped as their true values are.
    assert clip_coefficients(squared * 1024**2, 1.0, scale=1024.0).tolist()[3] == pytest.approx(1 / 2.000001, rel=1e-6)
