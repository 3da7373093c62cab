import math

import pytest
import torch

from dino_scale.train.loss import DINOLoss


def softmax(values: list[float]) -> list[float]:
    peak = max(values)
    exps = [math.exp(v - peak) for v in values]
    return [e / sum(exps) for e in exps]


def hand_loss(student: list[list[float]], teacher: list[list[float]], center: list[float], s_temp, t_temp) -> float:
    """The paper's formula written out with Python floats: one sample, views as rows."""
    p_t = [softmax([(t - c) / t_temp for t, c in zip(row, center, strict=True)]) for row in teacher]
    log_p_s = [[math.log(p) for p in softmax([s / s_temp for s in row])] for row in student]
    terms = [
        -sum(pt * lps for pt, lps in zip(p_t[i], log_p_s[j], strict=True))
        for i in range(len(teacher))
        for j in range(len(student))
        if i != j
    ]
    return sum(terms) / len(terms)


def test_uniform_outputs_give_log_k_and_zero_kl() -> None:
    k = 5
    loss_fn = DINOLoss(k)
    loss, stats = loss_fn(torch.zeros(4, k), torch.zeros(2, k), teacher_temp=0.04)
    assert loss.item() == pytest.approx(math.log(k), abs=1e-6)
    assert stats.teacher_entropy.item() == pytest.approx(math.log(k), abs=1e-6)
    assert stats.kl.item() == pytest.approx(0.0, abs=1e-6)


def test_loss_matches_hand_computation_with_center() -> None:
    student = [
        [0.2, -0.1, 0.05],
        [0.0, 0.3, -0.2],
        [0.1, 0.1, -0.4],
        [-0.3, 0.2, 0.0],
    ]  # 2 global + 2 local views
    teacher = [[0.5, -0.2, 0.1], [-0.1, 0.4, 0.0]]
    center = [0.1, 0.0, -0.05]
    loss_fn = DINOLoss(3, student_temp=0.1)
    loss_fn.center.copy_(torch.tensor([center]))
    loss, stats = loss_fn(torch.tensor(student), torch.tensor(teacher), teacher_temp=0.07)
    expected = hand_loss(student, teacher, center, 0.1, 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Pairs (0,0) and (1,1) are excluded: 2 teacher views x 3 other student views each.
    entropy = (
        -sum(
            sum(p * math.log(p) for p in softmax([(t - c) / 0.07 for t, c in zip(row, center, strict=True)]))
            for row in teacher
        )
        / 2
    )
    assert stats.teacher_entropy.item() == pytest.approx(entropy, rel=1e-5)
    assert stats.kl.item() == pytest.approx(expected - entropy, rel=1e-4, abs=1e-6)


def test_batched_rows_are_averaged_per_sample() -> None:
    torch.manual_seed(0)
    batch, k = 3, 4
    student = torch.randn(4 * batch, k)
    teacher = torch.randn(2 * batch, k)
    loss, _ = DINOLoss(k)(student, teacher, teacher_temp=0.05)
    per_sample = [
        hand_loss(
            [student[v * batch + b].tolist() for v in range(4)],
            [teacher[v * batch + b].tolist() for v in range(2)],
            [0.0] * k,
            0.1,
            0.05,
        )
        for b in range(batch)
    ]
    assert loss.item() == pytest.approx(sum(per_sample) / batch, rel=1e-5)


def test_only_student_gets_gradients() -> None:
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(2, 3, requires_grad=True)
    loss, _ = DINOLoss(3)(student, teacher, teacher_temp=0.04)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_center_update_is_ema_of_teacher_batch_mean() -> None:
    loss_fn = DINOLoss(2, center_momentum=0.9)
    first = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    loss_fn(torch.zeros(4, 2), first, teacher_temp=0.04)
    assert loss_fn.center.abs().sum() == 0  # nothing moves before the optimizer step
    loss_fn.update_center()
    assert loss_fn.center[0].tolist() == pytest.approx([0.2, 0.4])  # 0.1 * mean([1,3],[3,5]) = 0.1 * [2, 4]
    second = torch.tensor([[-2.0, 0.0], [0.0, 2.0]])
    loss_fn(torch.zeros(4, 2), second, teacher_temp=0.04)
    loss_fn.update_center()
    assert loss_fn.center[0].tolist() == pytest.approx([0.9 * 0.2 + 0.1 * -1.0, 0.9 * 0.4 + 0.1 * 1.0])


def test_center_of_accumulated_micro_batches_is_that_of_the_whole_batch() -> None:
    teacher = torch.randn(8, 5)
    whole, split = DINOLoss(5, center_momentum=0.9), DINOLoss(5, center_momentum=0.9)
    whole(torch.zeros(16, 5), teacher, teacher_temp=0.04)
    whole.update_center()
    # Two micro-batches of 2 samples x 2 views each: rows are ordered view by view within each micro-batch.
    for half in (teacher[[0, 1, 4, 5]], teacher[[2, 3, 6, 7]]):
        split(torch.zeros(8, 5), half, teacher_temp=0.04)
    split.update_center()
    assert torch.allclose(whole.center, split.center, atol=1e-6)


def test_center_is_applied_before_sharpening() -> None:
    # A teacher output equal to the center is uniform after centering, whatever the temperature.
    loss_fn = DINOLoss(3)
    loss_fn.center.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    _, stats = loss_fn(torch.zeros(4, 3), torch.tensor([[1.0, 2.0, 3.0]] * 2), teacher_temp=0.01)
    assert stats.teacher_entropy.item() == pytest.approx(math.log(3), abs=1e-5)
