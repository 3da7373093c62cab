"""TensorBoard scalars beside metrics.jsonl: what is written, what a resume does, and nothing without tensorboard."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from support import SAMPLE_TRAIN, SAMPLE_VAL, brief_run

from dino_scale.run_dir import TENSORBOARD_SUBDIR as TENSORBOARD_DIR
from dino_scale.train.metrics import MetricsWriter

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def step_record(step: int, loss: float) -> dict[str, Any]:
    """A step record shaped like StepMetrics.step_done's (a list, ints and floats)."""
    return {
        "step": step,
        "epoch": step // 2,
        "loss": loss,
        "lr": 1e-4 * step,
        "teacher_entropy": 3.25,
        "kl": float("nan") if step == 3 else 0.5 / step,
        "peak_memory_gb_per_rank": [0.5, 0.6],
        "skipped_samples": 0,
    }


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar TensorBoard shows for ``folder``: tag -> {step: value}; a step shown twice fails the test."""
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    shown = {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }
    for tag, points in shown.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: steps {steps}"
    return {tag: dict(points) for tag, points in shown.items()}


def expected_scalars(metrics: Path) -> dict[str, dict[int, float]]:
    """What metrics.jsonl says TensorBoard should show: numeric fields, last record per step winning."""
    expected: dict[str, dict[int, float]] = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        prefix = record.get("event", "train")
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(f"{prefix}/{name}", {})[record["step"]] = value
    return expected


def assert_same(actual: dict[str, dict[int, float]], expected: dict[str, dict[int, float]]) -> None:
    assert actual.keys() == expected.keys()
    for tag, values in expected.items():
        assert actual[tag].keys() == values.keys(), tag
        # TensorBoard keeps float32
        assert actual[tag] == pytest.approx(values, rel=1e-6, nan_ok=True), tag


def test_every_number_of_each_record_becomes_a_scalar_at_its_step(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tmp_path / TENSORBOARD_DIR)
    for step in (1, 2, 3):
        writer.write(step_record(step, 5.0 - step))
    writer.write({"step": 3, "event": "final", "teacher_sha256_per_rank": ["ab"]})
    writer.write({"step": 3, "event": "final_knn", "knn_top1_teacher": 61.25, "knn_top1_random_init": 20.5})
    writer.close()
    actual = scalars(tmp_path / TENSORBOARD_DIR)
    assert "train/peak_memory_gb_per_rank" not in actual and "train/step" not in actual
    assert actual["train/loss"] == {1: 4.0, 2: 3.0, 3: 2.0}
    assert actual["final_knn/knn_top1_teacher"] == {3: 61.25}
    assert not any(tag.startswith("final/") for tag in actual)  # the digest is no number
    assert_same(actual, expected_scalars(tmp_path / "metrics.jsonl"))


def test_a_resumed_writer_hides_the_steps_logged_again(tmp_path: Path) -> None:
    first = MetricsWriter(tmp_path / "metrics.jsonl", tmp_path / TENSORBOARD_DIR)
    for step in (1, 2, 3, 4):  # the crash came after step 4; the checkpoint is at step 2
        first.write(step_record(step, 10.0 + step))
    first.close()
    resumed = MetricsWriter(tmp_path / "metrics.jsonl", tmp_path / TENSORBOARD_DIR, first_step=2)
    for step in (3, 4, 5):
        resumed.write(step_record(step, 20.0 + step))
    resumed.close()
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    assert scalars(tmp_path / TENSORBOARD_DIR)["train/loss"] == {1: 11.0, 2: 12.0, 3: 23.0, 4: 24.0, 5: 25.0}


def test_without_tensorboard_nothing_is_written_and_one_line_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it raises ImportError
    with caplog.at_level(logging.INFO, logger="dino_scale"):
        writer = MetricsWriter(tmp_path / "metrics.jsonl", tmp_path / TENSORBOARD_DIR)
    assert writer.tensorboard is not None and not writer.tensorboard.enabled
    for step in (1, 2):
        writer.write(step_record(step, 1.0))
    writer.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    lines = [r for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "pip install -e .[tensorboard]" in lines[0].getMessage()


def test_training_writes_the_jsonl_numbers_to_tensorboard_and_a_resume_appends(tmp_path: Path) -> None:
    from dino_scale.config import load_config
    from dino_scale.train.loop import train

    knn = [f"eval.knn_train_shards={json.dumps(SAMPLE_TRAIN)}", f"eval.knn_val_shards={json.dumps(SAMPLE_VAL)}"]
    run = brief_run(tmp_path, "tiny-test.json", "max_steps=2", *knn)
    assert sorted(scalars(run / TENSORBOARD_DIR)["train/loss"]) == [1, 2]
    # The rest of the schedule, resumed from the step-2 checkpoint: a second event file in the same folder.
    overrides = [
        f"data.train_shards={json.dumps(SAMPLE_TRAIN)}",
        f"output_dir={json.dumps(str(run))}",
        "data.samples_per_epoch=16",
        "epochs=2",
        *knn,
    ]
    train(load_config("tiny-test.json", overrides), resume=True)
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    actual = scalars(run / TENSORBOARD_DIR)
    assert sorted(actual["train/loss"]) == [1, 2, 3, 4]
    assert set(actual["final_knn/knn_top1_teacher"]) == {2, 4}
    assert_same(actual, expected_scalars(run / "metrics.jsonl"))
