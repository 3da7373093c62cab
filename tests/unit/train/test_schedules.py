import numpy as np
import pytest

from dino_scale.config import config_from_dict
from dino_scale.train.schedules import build_schedules, cosine_schedule, linear_warmup_then_constant


def test_cosine_endpoints_shape_and_monotonicity() -> None:
    values = cosine_schedule(1.0, 0.1, total_steps=50, warmup_steps=10, warmup_start=0.0)
    assert values.shape == (50,)
    assert values[0] == 0.0
    assert values[10] == pytest.approx(1.0)  # first step after warmup is the peak
    assert values[-1] == pytest.approx(0.1)
    assert np.all(np.diff(values[:11]) > 0)  # warmup rises
    assert np.all(np.diff(values[10:]) < 0)  # cosine decays
    midpoint = cosine_schedule(1.0, 0.0, total_steps=101)[50]
    assert midpoint == pytest.approx(0.5)


def test_cosine_can_rise_for_weight_decay_and_momentum() -> None:
    wd = cosine_schedule(0.04, 0.4, 20)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4)
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
    assert int(schedules.lr.argmax()) == 10  # one warmup epoch
    assert schedules.lr[-1] == pytest.approx(1e-6)
    assert schedules.weight_decay[0] == pytest.approx(0.04) and schedules.weight_decay[-1] == pytest.approx(0.4)
    assert schedules.momentum[0] == pytest.approx(0.996) and schedules.momentum[-1] == pytest.approx(1.0)
    assert schedules.teacher_temp[0] == pytest.approx(0.04)
    assert schedules.teacher_temp[19] == pytest.approx(0.07) and schedules.teacher_temp[-1] == pytest.approx(0.07)


def test_empty_schedule_is_an_error() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(1.0, 0.0, 0)
