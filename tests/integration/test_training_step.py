"""The training step feeds the device without waiting on it: no host synchronisation between log steps (counted with
the CUDA-free HostReadCounter), fused optimizer kernels, torch.compile with one graph per crop resolution and no
recompiles, and timm's fused SDPA attention on."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import sample_config, step_records

from dino_scale.config import load_config
from dino_scale.devices import HostReadCounter
from dino_scale.models.backbones import fused_attention_layers
from dino_scale.models.dino import build_student_teacher
from dino_scale.train import loop
from dino_scale.train.metrics import StepMetrics

pytestmark = pytest.mark.slow

LOG_EVERY = 4


def tiny(run_dir: Path, *overrides: str):
    # 8 steps per epoch: no epoch boundary (and no worker restart) in the count
    return sample_config(run_dir, "data.samples_per_epoch=64", "max_steps=8", f"log_every={LOG_EVERY}", *overrides)


def reads_per_step(monkeypatch: pytest.MonkeyPatch, cfg) -> dict[int, list[tuple[str, str]]]:
    """Train under a HostReadCounter; the host reads that happened in each optimizer step, keyed by its 1-based
    number: from the end of the previous step's logging to the end of this step's. On CUDA, torch's own sync
    debug mode reports too (each synchronising call it warns about counts, as ("cuda sync", message))."""
    counter = HostReadCounter()
    marks: list[tuple[int, int]] = []
    real = StepMetrics.step_done
    cuda = cfg.device.startswith("cuda")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def step_done(self, step, *args, **kwargs):  # type: ignore[no-untyped-def]
            record = real(self, step, *args, **kwargs)
            counter.reads.extend(("cuda sync", str(w.message)) for w in caught if "synchroniz" in str(w.message))
            caught.clear()
            marks.append((step, len(counter.reads)))
            return record

        monkeypatch.setattr(StepMetrics, "step_done", step_done)
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with counter:
                loop.train(cfg)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    steps, previous = {}, None
    for step, end in marks:
        if previous is not None:
            steps[step] = counter.reads[previous:end]
        previous = end
    return steps


def test_the_counter_sees_every_kind_of_host_read() -> None:
    x = torch.arange(4.0)
    with HostReadCounter() as counter:
        x.sum().item()
        bool(x.any())
        float(x[0])
        x.tolist()
        x.nonzero()
        if x.max() > 2:
            pass
    assert len(counter.reads) == 6, counter.reads
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0]  # the patches are gone


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch's sync debug mode)")


@pytest.mark.parametrize(
    ("device", "augment_on"),
    [
        ("cpu", "workers"),
        ("cpu", "device"),
        pytest.param("cuda", "workers", marks=CUDA),
        pytest.param("cuda", "device", marks=CUDA),
    ],
)
def test_no_host_sync_between_log_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str, augment_on: str
) -> None:
    # One DataLoader worker: the loader's own work runs in another process, as on a GPU machine.
    cfg = tiny(tmp_path / "run", "data.num_workers=1", f"data.augment_on={augment_on}", f"device={device}")
    steps = reads_per_step(monkeypatch, cfg)
    steady = {step: reads for step, reads in steps.items() if step % LOG_EVERY and (step - 1) % LOG_EVERY}
    assert sorted(steady) == [2, 3, 6, 7]
    assert all(not reads for reads in steady.values()), steady
    # A log step reads its verdicts and metrics: the counter does see what the loop reads.
    assert any("settle" in where for _, where in steps[LOG_EVERY]), steps[LOG_EVERY]


def test_an_optimizer_without_a_device_skip_reads_each_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's for-loop AdamW reads each parameter's step count, and the non-finite verdict must come to the host
    before it runs: what the fused default saves."""
    cfg = tiny(tmp_path / "run", "data.num_workers=1", "optim.implementation=for_loop")
    steps = reads_per_step(monkeypatch, cfg)
    assert steps[2] and any("apply_if_finite" in where for _, where in steps[2]), steps[2]


def test_compiled_backbones_build_one_graph_per_resolution_and_never_recompile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    real = StepMetrics.step_done

    recompiles: list[int] = []

    def step_done(self, step, *args, **kwargs):  # type: ignore[no-untyped-def]
        graphs.append(counters["stats"]["unique_graphs"])
        recompiles.append(len([r for r in caplog.records if "Recompiling function" in r.getMessage()]))
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(StepMetrics, "step_done", step_done)
    # aot_eager traces and builds the forward and backward graphs as inductor does, without generating code.
    compiled = tmp_path / "compiled"
    torch._logging.set_logs(recompiles=True)
    try:
        with caplog.at_level(logging.DEBUG):
            loop.train(tiny(compiled, "max_steps=5", "model.compile=true", "model.compile_backend=aot_eager"))
    finally:
        torch._logging.set_logs()
        torch._dynamo.reset()
    # Student globals, student locals, teacher globals: three graphs, all made in step 1, none after it.
    assert graphs == [3] * 5, graphs
    assert counters["frames"]["total"] == 3, dict(counters["frames"])
    # torch's recompile log names each new resolution's graph a recompile of the backbone's forward: two, in step 1.
    assert recompiles == [2] * 5, recompiles
    # The same training as the eager run, and the same parameter names in the checkpoint.
    monkeypatch.setattr(StepMetrics, "step_done", real)
    eager = tmp_path / "eager"
    loop.train(tiny(eager, "max_steps=5"))
    losses = [[record["loss"] for record in step_records(run)] for run in (compiled, eager)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    names = [
        sorted(torch.load(next((run / "checkpoints").glob("*.pt")), weights_only=True)["student"])
        for run in (compiled, eager)
    ]
    assert names[0] == names[1]


def test_the_backbone_runs_fused_scaled_dot_product_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("tiny-test.json")
    student, _ = build_student_teacher(cfg.model)
    fused, layers = fused_attention_layers(student.backbone)
    assert layers == cfg.model.timm_kwargs["depth"] and fused == layers
    calls = {"n": 0}
    real = F.scaled_dot_product_attention

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    views = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 2
    student(views)
    assert calls["n"] == 2 * layers  # one backbone pass per crop resolution, one SDPA call per layer
