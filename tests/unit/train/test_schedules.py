import math

import numpy as np
import pytest

from dino_scale.config import config_from_dict
from dino_scale.train.schedules import build_schedules, cosine_schedule, linear_warmup_then_constant


def test_cosine_endpoints_shape_and_monotonicity() -> None:
    values = cosine_schedule(1.0, 0.1, total_steps=50, warmup_steps=10, warmup_start=0.0)
    assert values.shape == (50,)
    assert values[0] == 0.0
    assert values[9] == 1.0 and values[10] == 1.0  # the warmup ends on the peak, where the cosine starts
    assert values[-1] > 0.1  # one step short of the final value, as the official scheduler
    assert np.all(np.diff(values[:10]) > 0)  # warmup rises
    assert np.all(np.diff(values[10:]) < 0)  # cosine decays
    midpoint = cosine_schedule(1.0, 0.0, total_steps=100)[50]  # t / T = 1/2
    assert midpoint == pytest.approx(0.5)


def test_cosine_matches_the_official_formula_on_a_small_case() -> None:
    # Written out from utils.cosine_scheduler's definition: linspace(start, base, W) with its endpoint, then
    # final + (base - final) (1 + cos(pi t / T)) / 2 for t = 0..T-1, T = total - W.
    values = cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=4, warmup_start=0.0)
    warmup = [0.0, 1 / 3, 2 / 3, 1.0]
    decay = [0.1 + 0.45 * (1 + math.cos(math.pi * t / 6)) for t in range(6)]
    assert values.tolist() == pytest.approx(warmup + decay, abs=1e-15)
    assert values[3] == 1.0  # the peak is the last warmup step
    assert values[-1] == pytest.approx(0.1 + 0.45 * (1 - math.sqrt(3) / 2), abs=1e-15)  # 0.16029, not 0.1


def test_teacher_temperature_moves_per_epoch_by_default() -> None:
    def temps(per: str, warmup_epochs: float) -> np.ndarray:
        cfg = config_from_dict(
            {
                "epochs": 4,
                "dino": {
                    "warmup_teacher_temp": 0.04,
                    "teacher_temp": 0.07,
                    "warmup_teacher_temp_epochs": warmup_epochs,
                    "teacher_temp_per": per,
                },
                "deepspeed": {"train_micro_batch_size_per_gpu": 8},
            }
        )
        return build_schedules(cfg, steps_per_epoch=5, global_batch_size=8).teacher_temp

    # Official: np.linspace(0.04, 0.07, 3) per epoch for epochs 0..2, then 0.07; every step of an epoch alike.
    assert temps("epoch", 3).tolist() == pytest.approx([0.04] * 5 + [0.055] * 5 + [0.07] * 10, abs=1e-15)
    per_step = temps("step", 3)
    assert per_step[0] == 0.04 and per_step[14] == pytest.approx(0.07) and np.all(np.diff(per_step[:15]) > 0)
    assert temps("epoch", 0).tolist() == [0.07] * 20


def test_cosine_can_rise_for_weight_decay_and_momentum() -> None:
    wd = cosine_schedule(0.04, 0.4, 20)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4 - 0.18 * (1 + math.cos(math.pi * 19 / 20)))
    assert np.all(np.diff(wd) > 0)


def test_linear_warmup_then_constant() -> None:
    temps = linear_warmup_then_constant(0.04, 0.07, warmup_steps=4, total_steps=10)
    assert temps.shape == (10,)
    assert temps[0] == pytest.approx(0.04)
    assert temps[3] == pytest.approx(0.07)
    assert np.all(temps[3:] == 0.07)
    assert np.all(np.diff(temps[:4]) > 0)


def test_build_schedules_from_recipe() -> None:
    cfg = config_from_dict(
        {
            "epochs": 4,
            "optim": {
                "lr": 5e-4,
                "min_lr": 1e-6,
                "warmup_epochs": 1,
                "weight_decay": 0.04,
                "weight_decay_end": 0.4,
            },
            "dino": {
                "momentum_teacher": 0.996,
                "warmup_teacher_temp": 0.04,
                "teacher_temp": 0.07,
                "warmup_teacher_temp_epochs": 2,
            },
            "deepspeed": {"train_micro_batch_size_per_gpu": 64},
        }
    )
    schedules = build_schedules(cfg, steps_per_epoch=10, global_batch_size=512)
    assert schedules.total_steps == 40
    for array in (schedules.lr, schedules.weight_decay, schedules.momentum, schedules.teacher_temp):
        assert array.shape == (40,)
    assert schedules.lr.max() == pytest.approx(5e-4 * 512 / 256)  # linear scaling rule
    assert int(schedules.lr.argmax()) == 9  # the last step of the one warmup epoch is the peak
    assert schedules.lr[-1] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 29 / 30)))
    assert schedules.weight_decay[0] == pytest.approx(0.04) and schedules.weight_decay[-1] < 0.4
    assert schedules.weight_decay[-1] == pytest.approx(0.4 - 0.18 * (1 + math.cos(math.pi * 39 / 40)))
    assert schedules.momentum[0] == pytest.approx(0.996) and 0.99999 < schedules.momentum[-1] < 1.0
    assert schedules.teacher_temp[0] == pytest.approx(0.04) and schedules.teacher_temp[9] == pytest.approx(0.04)
    assert schedules.teacher_temp[10] == pytest.approx(0.07) and schedules.teacher_temp[-1] == pytest.approx(0.07)


def test_empty_schedule_is_an_error() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(1.0, 0.0, 0)
