"""Faults inside a training run: non-finite steps, an optimizer overflow, unreadable samples past the allowed
fraction, and the two collapse modes of the paper (no centering; no sharpening), each stopped or survived as the
README's failure behaviour says. One process, the tiny recipe, a few steps each."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from support import REPO, sample_config, step_records

from dino_scale import run_dir as layout
from dino_scale.errors import CollapseError, ConfigError, InputError, NonFiniteError
from dino_scale.io import load_checkpoint
from dino_scale.models.dino import MultiCropWrapper
from dino_scale.train import state as train_state
from dino_scale.train.loop import train

pytestmark = pytest.mark.slow


def tiny(run_dir: Path, *overrides: str):
    return sample_config(run_dir, "data.samples_per_epoch=32", "epochs=3", *overrides)


def poison_student_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """NaN in the student's output at these optimizer steps (1-based, as logged): each step runs the teacher, then
    the student, so the student's forward of step s is call 2 s."""
    real_forward = MultiCropWrapper.forward
    calls = {"n": 0}

    def forward(self, views):
        calls["n"] += 1
        output = real_forward(self, views)
        return output * float("nan") if calls["n"] % 2 == 0 and calls["n"] // 2 in steps else output

    monkeypatch.setattr(MultiCropWrapper, "forward", forward)


def finite_state(path: Path) -> bool:
    state = load_checkpoint(path)
    tensors = [*state["student"].values(), *state["teacher"].values(), state["center"]]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_skip_budget_drops_non_finite_steps_and_checkpoints_only_finite_ones(tmp_path, monkeypatch) -> None:
    poison_student_at(monkeypatch, {2, 5})
    run_dir = tmp_path / "run"
    train(tiny(run_dir, "max_steps=6", "checkpoint_every=2", "keep_checkpoints=10", "skip_nonfinite_steps=2"))
    records = step_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1, 2, 2]
    # Step 2 was dropped: its checkpoint waits for step 3, the next finite step; step 4 and 6 are on time.
    saved = [p.name for _, p in layout.step_checkpoints(run_dir / "checkpoints")]
    assert saved == ["step_00000003.pt", "step_00000004.pt", "step_00000006.pt"]
    assert all(finite_state(path) for _, path in layout.step_checkpoints(run_dir / "checkpoints"))


def test_a_dropped_step_leaves_the_weights_as_they_were(tmp_path, monkeypatch) -> None:
    clean = tmp_path / "clean"
    train(tiny(clean, "max_steps=1"))
    poison_student_at(monkeypatch, {2})
    dropped = tmp_path / "dropped"
    train(tiny(dropped, "max_steps=2", "skip_nonfinite_steps=1"))
    a = load_checkpoint(layout.find_latest_checkpoint(clean))
    b = load_checkpoint(layout.find_latest_checkpoint(dropped))
    for part in ("student", "teacher"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert torch.equal(a["center"], b["center"])
    # The fused kernel allocates a parameter's state even for a step it skips: a fresh one (zero moments and step
    # count), which is what a parameter without state starts from.
    states = a["optimizer"]["state"], b["optimizer"]["state"]
    assert set(states[0]) <= set(states[1])
    for name in states[1]:
        if name in states[0]:
            assert all(torch.equal(states[0][name][k], states[1][name][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
        else:
            assert all(not states[1][name][k].any() for k in ("exp_avg", "exp_avg_sq", "step")), name


def test_budget_used_up_stops_naming_the_step_and_the_last_checkpoint(tmp_path, monkeypatch) -> None:
    poison_student_at(monkeypatch, {2, 5})
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteError) as caught:
        train(tiny(run_dir, "max_steps=6", "checkpoint_every=2", "skip_nonfinite_steps=1"))
    message = str(caught.value)
    assert message.startswith("step 5: non-finite student_output, loss")
    assert "budget of 1 is used up" in message and "step_00000004.pt" in message and "\n" not in message
    assert layout.find_latest_checkpoint(run_dir).name == "step_00000004.pt"


def test_optimizer_overflow_is_a_non_finite_error_not_a_traceback(tmp_path, monkeypatch) -> None:
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # what AdamW raises for an lr beyond float range
            raise RuntimeError("value cannot be converted to type float without overflow")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"^step 3: non-finite optimizer update \(value cannot.*step_00000002"):
        train(tiny(run_dir, "max_steps=6", "checkpoint_every=2", "skip_nonfinite_steps=5"))


def write_shard_with_broken_samples(path: Path, good: int, broken: int) -> None:
    with tarfile.open(REPO / "shards/sample/val/val-000000.tar") as source, tarfile.open(path, "w") as target:
        members = [m for m in source.getmembers() if m.isfile()][: 2 * good]  # .cls + .jpg each
        for member in members:
            target.addfile(member, source.extractfile(member))
        for index in range(broken):
            for suffix, payload in (("jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("cls", b"0")):
                info = tarfile.TarInfo(f"broken{index:03d}.{suffix}")
                info.size = len(payload)
                target.addfile(info, io.BytesIO(payload))


def test_too_many_unreadable_samples_stop_the_run_with_count_and_examples(tmp_path, monkeypatch) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard_with_broken_samples(shards / "mixed-000000.tar", good=28, broken=4)
    monkeypatch.setattr(train_state, "MIN_SAMPLES_FOR_SKIP_VERDICT", 16)
    overrides = (f"data.train_shards={json.dumps(str(shards))}", "epochs=2", "data.samples_per_epoch=32")
    expected = r"of \d+ samples read .* more than data.max_skipped_fraction=0.05; e.g. broken"
    with pytest.raises(InputError, match=expected):
        train(tiny(tmp_path / "strict", *overrides, "data.max_skipped_fraction=0.05"))
    train(tiny(tmp_path / "lenient", *overrides, "data.max_skipped_fraction=0.2"))  # 4 of 32: within 20%
    assert step_records(tmp_path / "lenient")[-1]["skipped_samples"] == 8  # two epochs


# The paper's two failure modes (section 5.3, figure 7), as recipe settings, against a base that trains healthily
# for these 120 steps (a sharp teacher, 0.02, as in the demo recipe, and a learning rate that gets there quickly).
HEALTHY = ("dino.teacher_temp=0.02", "dino.warmup_teacher_temp=0.02", "optim.lr=0.05", "max_steps=120", "epochs=40")
ABLATIONS = {
    # No centering: the center stays at its initial zero (c <- 1 * c); sharpening alone -> one dimension.
    "one dimension": ("dino.center_momentum=1.0",),
    # No sharpening: the teacher's temperature equals the student's; centering alone -> uniform.
    "uniform": ("dino.teacher_temp=0.1", "dino.warmup_teacher_temp=0.1"),
}
WATCH = ("log_every=5", "monitor.patience_steps=10", "monitor.low_kl=0.0")  # the entropy signs tell the modes apart


@pytest.mark.parametrize("mode", ABLATIONS)
def test_collapse_ablations_trigger_the_monitor(tmp_path, mode: str) -> None:
    with pytest.raises(CollapseError, match=rf"the teacher looks collapsed \({mode}\)") as caught:
        train(tiny(tmp_path / "stop", *HEALTHY, *ABLATIONS[mode], *WATCH, "monitor.collapse=stop"))
    assert "H(P_t) = " in str(caught.value) and "stopping" in str(caught.value)
    stopped_at = step_records(tmp_path / "stop")[-1]["step"]
    assert stopped_at < 120


def test_collapse_warning_lets_the_run_go_on(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="dino_scale"):
        train(tiny(tmp_path / "warn", *HEALTHY, *ABLATIONS["uniform"], *WATCH))  # monitor.collapse defaults to warn
    assert len([r for r in caplog.records if "looks collapsed (uniform)" in r.getMessage()]) == 1
    assert step_records(tmp_path / "warn")[-1]["step"] == 120


def test_healthy_run_raises_no_collapse_warning(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="dino_scale"):
        train(tiny(tmp_path / "healthy", *HEALTHY, "log_every=5", "monitor.patience_steps=10"))
    assert not [r for r in caplog.records if "collapsed" in r.getMessage()]
    assert step_records(tmp_path / "healthy")[-1]["step"] == 120


def test_a_plan_of_absurdly_many_steps_is_refused_before_allocating(tmp_path) -> None:
    # Each value is within its own bound; the product is 10^10 samples x 10^4 epochs / 8 per step.
    cfg = tiny(tmp_path / "huge", "data.samples_per_epoch=10000000000", "epochs=10000")
    with pytest.raises(ConfigError, match=r"^epochs=10000 x 1250000000 steps per epoch .*data\.samples_per_epoch"):
        train(cfg)
    assert not (tmp_path / "huge" / "metrics.jsonl").exists()
