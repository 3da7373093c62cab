"""benchmarks/backends.py: metrics summary, max-batch search, commands, and one real tiny `local` run on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import load_benchmark

bench = load_benchmark("backends")


def _write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _step(step: int, step_time: float, per_device: float, per_rank: list[float]) -> dict[str, Any]:
    return {
        "step": step,
        "loss": 10.0 - step,
        "step_time_s": step_time,
        "images_per_s_per_device": per_device,
        "images_per_s": per_device * len(per_rank),
        "peak_memory_gb": max(per_rank),
        "peak_memory_gb_per_rank": per_rank,
    }


# ----------------------------------------------------------------------------------------------------------------
# metrics.jsonl summary
# ----------------------------------------------------------------------------------------------------------------


def test_summary_drops_warmup_takes_medians_and_per_rank_max(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write_metrics(
        path,
        [
            _step(1, 5.0, 1.0, [9.0, 9.0]),  # warm-up: slow and big, must not count
            _step(2, 4.0, 2.0, [8.0, 8.0]),
            _step(3, 0.3, 30.0, [1.0, 2.0]),
            _step(4, 0.1, 50.0, [3.0, 1.0]),
            _step(5, 0.15, 32.0, [2.0, 2.5]),
            {"step": 5, "event": "final", "teacher_sha256_per_rank": ["a", "a"]},
            {"step": 5, "event": "final_knn", "knn_top1_teacher": 50.0},
        ],
    )
    summary = bench.summarize_metrics(path, warmup=2)
    assert summary["steps_measured"] == 3
    assert (summary["first_step_measured"], summary["last_step_measured"]) == (3, 5)
    assert summary["step_time_s_median"] == pytest.approx(0.15)  # the mean would be 0.183
    assert summary["step_time_s_max"] == pytest.approx(0.3)
    assert summary["images_per_s_per_device_median"] == pytest.approx(32.0)
    assert summary["images_per_s_median"] == pytest.approx(64.0)
    assert summary["peak_memory_gb_per_rank"] == [3.0, 2.5]
    assert summary["peak_memory_gb_max"] == 3.0
    assert summary["loss_last"] == pytest.approx(5.0)

    no_warmup = bench.summarize_metrics(path, warmup=0)
    assert no_warmup["steps_measured"] == 5
    assert no_warmup["peak_memory_gb_per_rank"] == [9.0, 9.0]


def test_summary_without_enough_steps_or_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, [_step(1, 1.0, 1.0, [1.0]), {"step": 1, "event": "final"}])
    with pytest.raises(bench.MetricsError, match="none left"):
        bench.summarize_metrics(path, warmup=1)
    with pytest.raises(bench.MetricsError, match="does not exist"):
        bench.summarize_metrics(tmp_path / "missing.jsonl", warmup=0)


def test_summary_falls_back_to_peak_memory_when_per_rank_list_is_missing() -> None:
    record = _step(1, 1.0, 1.0, [1.5])
    del record["peak_memory_gb_per_rank"]
    assert bench.summarize_records([record], warmup=0)["peak_memory_gb_per_rank"] == [1.5]


# ----------------------------------------------------------------------------------------------------------------
# largest batch that fits
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "start", "resolution", "limit", "expected", "failing", "capped"),
    [
        (37, 4, 1, 4096, 37, 38, False),
        (37, 8, 8, 4096, 32, 40, False),
        (37, 64, 1, 4096, 37, 38, False),  # start too big: halve down, then bisect up
        (1, 8, 1, 4096, 1, 2, False),
        (0, 8, 1, 4096, None, 1, False),  # nothing fits
        (10**6, 8, 1, 100, 100, None, True),  # everything up to the limit fits
        (90, 8, 8, 100, 88, 94, False),  # the limit is no multiple of 8: midpoints still are
    ],
)
def test_find_max_fitting(
    threshold: int, start: int, resolution: int, limit: int, expected: int | None, failing: int | None, capped: bool
) -> None:
    calls: list[int] = []

    def fits(batch: int) -> bool:
        calls.append(batch)
        return batch <= threshold

    result = bench.find_max_fitting(fits, start, limit, resolution)
    assert result.largest_fitting == expected
    assert result.smallest_failing == failing
    assert result.capped is capped
    assert len(calls) == len(set(calls)), "a batch size was tried twice"
    assert len(calls) <= 16
    assert result.trials == [(b, b <= threshold) for b in calls]
    assert max(calls) <= limit


def test_find_max_fitting_doubles_first_then_bisects() -> None:
    result = bench.find_max_fitting(lambda b: b <= 100, 8, 4096)
    assert [b for b, _ in result.trials][:5] == [8, 16, 32, 64, 128]
    assert result.largest_fitting == 100


def test_find_max_fitting_lets_errors_through() -> None:
    def fits(batch: int) -> bool:
        if batch > 16:
            raise bench.SearchAborted("boom")
        return True

    with pytest.raises(bench.SearchAborted):
        bench.find_max_fitting(fits, 8, 4096)


def _fake_run(status_of: Any) -> Any:
    def runner(variant: Any, batch: int, settings: Any) -> Any:
        status = status_of(batch)
        summary = (
            {"images_per_s_per_device_median": float(batch), "peak_memory_gb_max": batch / 10}
            if status == "ok"
            else None
        )
        return bench.RunResult(
            label=variant.label,
            backend=variant.backend,
            zero_stage=variant.zero_stage,
            grad_checkpointing=variant.grad_checkpointing,
            processes=variant.processes(settings.nproc),
            micro_batch=batch,
            status=status,
            command=["fake"],
            command_line="fake",
            env={},
            run_dir="",
            wall_s=0.0,
            summary=summary,
            error=None if status == "ok" else status,
        )

    return runner


def _settings(tmp_path: Path, nproc: int = 2) -> Any:
    return bench.BenchSettings(
        recipe="tiny-test.json",
        nproc=nproc,
        steps=3,
        warmup=1,
        extra=(),
        work_dir=tmp_path,
        timeout_s=60.0,
        keep_runs=False,
        cuda_available=False,
        quiet=True,
    )


def test_search_max_batch_treats_oom_as_too_big(tmp_path: Path) -> None:
    variant = bench.parse_backends("zero3", "on")[0]
    outcome = bench.search_max_batch(
        variant, _settings(tmp_path), 4, 4096, 1, runner=_fake_run(lambda b: "ok" if b <= 20 else "oom")
    )
    assert outcome["status"] == "ok"
    assert outcome["max_micro_batch"] == 20 and outcome["smallest_failing"] == 21
    assert outcome["label"] == "zero3+ckpt" and outcome["processes"] == 2
    assert outcome["at_max"]["images_per_s_per_device_median"] == 20.0
    assert "20" in bench.max_batch_table([outcome])


def test_search_max_batch_stops_on_other_failures(tmp_path: Path) -> None:
    variant = bench.parse_backends("ddp")[0]
    outcome = bench.search_max_batch(
        variant, _settings(tmp_path), 4, 4096, 1, runner=_fake_run(lambda b: "ok" if b < 16 else "failed")
    )
    assert outcome["status"] == "failed"
    assert outcome["max_micro_batch"] is None
    assert "16" in outcome["error"]
    assert [t["micro_batch"] for t in outcome["trials"]] == [4, 8, 16]


# ----------------------------------------------------------------------------------------------------------------
# configurations, commands, output handling
# ----------------------------------------------------------------------------------------------------------------


def test_parse_backends() -> None:
    variants = bench.parse_backends("local, ddp,zero3", "both")
    assert [v.label for v in variants] == ["local", "local+ckpt", "ddp", "ddp+ckpt", "zero3", "zero3+ckpt"]
    assert variants[-1].backend == "deepspeed" and variants[-1].zero_stage == 3
    assert bench.parse_backends("fsdp")[0].grad_checkpointing is None
    with pytest.raises(ValueError, match="unknown backend"):
        bench.parse_backends("zero4")
    with pytest.raises(ValueError, match="unknown backend"):
        bench.parse_backends("horovod")


def test_build_command_local_and_deepspeed(tmp_path: Path) -> None:
    local, zero3 = bench.parse_backends("local,zero3", "on")
    command = bench.build_command(local, "tiny-test.json", tmp_path, 8, 4, 6, python="py")
    assert command[:3] == ["py", "-m", "dino_scale.train"]
    sets = [command[i + 1] for i, part in enumerate(command) if part == "--set"]
    assert "backend=local" in sets and "max_steps=6" in sets and "log_every=1" in sets
    assert "deepspeed.train_batch_size=8" in sets  # local is always one process
    assert "data.samples_per_epoch=48" in sets
    assert "model.grad_checkpointing=true" in sets

    extra = ("data.samples_per_epoch=1000000", "max_steps=9")
    command = bench.build_command(zero3, "vitb8.json", tmp_path, 32, 8, 6, extra, python="py")
    assert command[:7] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8", "-m"]
    sets = [command[i + 1] for i, part in enumerate(command) if part == "--set"]
    assert "backend=deepspeed" in sets and "deepspeed.zero_optimization.stage=3" in sets
    assert "deepspeed.train_micro_batch_size_per_gpu=32" in sets and "deepspeed.train_batch_size=256" in sets
    assert "deepspeed.gradient_accumulation_steps=1" in sets
    assert not any(s.startswith("data.samples_per_epoch=") and s != extra[0] for s in sets)
    assert sets[-2:] == list(extra)  # the user's overrides come last, so they win


def test_deepspeed_on_cpu_gets_the_cpu_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    ddp, zero2 = bench.parse_backends("ddp,zero2")
    assert bench.extra_env(zero2, (), cuda_available=False) == {"DS_ACCELERATOR": "cpu"}
    assert bench.extra_env(zero2, (), cuda_available=True) == {}
    assert bench.extra_env(zero2, ('device="cpu"',), cuda_available=True) == {"DS_ACCELERATOR": "cpu"}
    assert bench.extra_env(ddp, (), cuda_available=False) == {}
    assert bench.shell_command(["a b", "c"], {"X": "1"}) == "X=1 'a b' c"


def test_oom_detection_and_failure_tail() -> None:
    assert bench.is_oom("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert bench.is_oom("RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB")
    assert bench.is_oom("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    assert not bench.is_oom("Error: step 0: non-finite gradient_norm; stopping")
    output = "\n".join(
        ["starting", "Error: the real reason", "Traceback (most recent call last):", '  File "run.py"']
        + ["torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", "=====", "dino_scale.train FAILED"]
    )
    tail = bench.output_tail(output)
    assert tail[:2] == ["starting", "Error: the real reason"]
    assert "ChildFailedError" not in "\n".join(tail)
    assert bench.output_tail("\n".join(str(i) for i in range(100)), lines=3) == ["97", "98", "99"]


# ----------------------------------------------------------------------------------------------------------------
# the real trainer, one process on CPU
# ----------------------------------------------------------------------------------------------------------------


def test_real_local_run_reports_positive_throughput(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["--recipe", "tiny-test.json", "--micro-batch", "4", "--nproc", "2", "--steps", "3", "--warmup", "1"]
    argv += ["--backends", "local", "--set", "data.num_workers=0", "--set", 'device="cpu"', "--quiet"]
    report = bench.main(argv + ["--json", str(out), "--work-dir", str(tmp_path / "runs")])
    printed = capsys.readouterr().out

    saved = json.loads(out.read_text())
    assert saved["results"] == report["results"]
    (result,) = saved["results"]
    assert result["status"] == "ok", result["output_tail"]
    assert result["processes"] == 1 and result["micro_batch"] == 4
    assert "dino_scale.train" in result["command"] and "backend=local" in result["command"]
    summary = result["summary"]
    assert summary["steps_measured"] == 2
    assert summary["images_per_s_per_device_median"] > 0
    assert summary["step_time_s_median"] > 0
    assert summary["peak_memory_gb_max"] > 0
    row = next(line for line in printed.splitlines() if line.startswith("local "))
    assert row.split()[-1] == "ok" and float(row.split()[4]) > 0
    assert not (tmp_path / "runs" / "local-np1-mb4").exists()  # run directories are removed unless --keep-runs


def test_a_failing_configuration_is_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--recipe", "tiny-test.json", "--micro-batch", "4", "--steps", "2", "--warmup", "1", "--backends", "local"]
    argv += ["--set", "model.no_such_key=1", "--quiet", "--work-dir", str(tmp_path)]
    report = bench.main(argv)
    (result,) = report["results"]
    assert result["status"] == "failed" and result["returncode"] != 0
    assert any("no_such_key" in line for line in result["output_tail"])
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "no_such_key" in printed
