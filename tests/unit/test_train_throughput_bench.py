"""benchmarks/train_throughput.py: the official-style loop's pieces, the figures' summary and table, the commands,
and one tiny end-to-end run of all three variants and both kinds of figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import load_benchmark, photo
from torch import nn

bench = load_benchmark("train_throughput")


class _Params(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Parameter(torch.zeros(2))
        self.small = nn.Parameter(torch.zeros(2))
        self.no_grad = nn.Parameter(torch.zeros(2))


# ----------------------------------------------------------------------------------------------------------------
# The official-style pieces
# ----------------------------------------------------------------------------------------------------------------


def test_clipping_is_per_parameter_with_the_official_coefficient() -> None:
    model = _Params()
    model.big.grad = torch.tensor([3.0, 4.0])  # norm 5: clip_coef = 1 / (5 + 1e-6) < 1, scaled
    model.small.grad = torch.tensor([0.3, 0.4])  # norm 0.5: clip_coef ~ 2 >= 1, untouched (a global clip would not)
    norms = bench.clip_gradients_official(model, 1.0)
    assert norms == pytest.approx([5.0, 0.5])  # in parameter order; the parameter without a gradient skipped
    coef = 1.0 / (5.0 + 1e-6)
    assert torch.allclose(model.big.grad, torch.tensor([3.0 * coef, 4.0 * coef]), rtol=0, atol=1e-7)
    assert torch.equal(model.small.grad, torch.tensor([0.3, 0.4]))
    assert model.no_grad.grad is None


def test_last_layer_gradients_are_dropped_and_nothing_else() -> None:
    model = nn.ModuleDict({"head": nn.ModuleDict({"last_layer": nn.Linear(2, 2), "mlp": nn.Linear(2, 2)})})
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert bench.cancel_last_layer_gradients(model) == 2
    assert model["head"]["last_layer"].weight.grad is None and model["head"]["last_layer"].bias.grad is None
    assert model["head"]["mlp"].weight.grad is not None


def test_ema_update_is_the_parameter_pair_loop() -> None:
    student, teacher = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.fill_(1.0), student.bias.fill_(2.0), teacher.weight.fill_(0.0), teacher.bias.fill_(4.0)
    bench.ema_update_official(student, teacher, 0.75)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 0.25))
    assert torch.allclose(teacher.bias, torch.tensor([0.75 * 4.0 + 0.25 * 2.0]))


def test_baseline_augmentation_takes_the_setup_sizes() -> None:
    aug = bench.baseline_augmentation(40, 24, 3, (0.5, 1.0), (0.1, 0.3))
    views = aug(photo(160, 120))
    assert [tuple(v.shape) for v in views] == [(3, 40, 40)] * 2 + [(3, 24, 24)] * 3
    assert views[0].dtype == torch.float32 and views[0].min() < 0  # ToTensor + Normalize per crop
    assert aug.local.transforms[0].scale == (0.1, 0.3)


# ----------------------------------------------------------------------------------------------------------------
# Figures, table, commands
# ----------------------------------------------------------------------------------------------------------------


def test_summary_leaves_out_windows_that_hold_warmup_steps_and_takes_the_median() -> None:
    windows = [
        {"step": 3, "steps": 3, "images_per_s": 1.0},  # holds warm-up steps 1-3
        {"step": 6, "steps": 3, "images_per_s": 2.0},  # holds warm-up step 4: left out too
        {"step": 9, "steps": 3, "images_per_s": 30.0},
        {"step": 12, "steps": 3, "images_per_s": 50.0},
        {"step": 13, "steps": 1, "images_per_s": 32.0},
    ]
    summary = bench.summarize_windows(windows, warmup=4)
    assert summary["img_per_s"] == 32.0  # the mean would be 37.3
    assert (summary["windows_measured"], summary["steps_measured"]) == (3, 7)
    assert bench.summarize_windows(windows, warmup=3)["windows_measured"] == 4
    with pytest.raises(ValueError, match="none starting after"):
        bench.summarize_windows(windows, warmup=13)


def test_step_times_are_cut_into_the_trainers_log_windows() -> None:
    windows = bench.step_windows([2.0, 1.0, 1.0, 0.5, 0.5], batch=8, log_every=2)
    assert [(w["step"], w["steps"]) for w in windows] == [(2, 2), (4, 2), (5, 1)]  # the last step always ends one
    assert [w["images_per_s"] for w in windows] == pytest.approx([16 / 3.0, 16 / 1.5, 8 / 0.5])


def test_metrics_windows_count_steps_since_the_previous_record_and_skip_events(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 5, "images_per_s": 5.0}, {"step": 10, "images_per_s": 7.5}, {"step": 12, "images_per_s": 9.0}]
    records.append({"step": 12, "event": "final"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    windows = bench.metrics_windows(path)
    assert [(w["step"], w["steps"], w["images_per_s"]) for w in windows] == [(5, 5, 5.0), (10, 5, 7.5), (12, 2, 9.0)]


def test_table_has_ratios_against_the_official_loop_and_dashes_for_failures() -> None:
    data = bench.add_ratios(
        {"a_workers": {"img_per_s": 90.0}, "b_device": {"img_per_s": 45.0}, "c_official": {"img_per_s": 30.0}}
    )
    train = bench.add_ratios(
        {"a_workers": {"img_per_s": 20.0}, "b_device": {"img_per_s": None}, "c_official": {"img_per_s": 10.0}}
    )
    assert (data["ratio_a_c"], data["ratio_b_c"]) == (3.0, 1.5)
    assert train["ratio_b_c"] is None
    precision = {"ours": "bf16 autocast", "official": "fp32"}
    table = bench.markdown_table({"demo": {"shape": "64/32 px", "precision": precision, "data": data, "train": train}})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| setup |")
    assert lines[2] == "| demo | data path, 1 core | 64/32 px | - | 90.0 | 45.0 | 30.0 | 3.00x | 1.50x |"
    assert lines[3] == "| demo | training, end to end | 64/32 px | bf16 autocast / fp32 | 20.0 | - | 10.0 | 2.00x | - |"


def test_our_command_sets_threads_data_path_and_lets_user_overrides_win(tmp_path: Path) -> None:
    settings = bench.Settings(steps=7, threads=3, workers=4, extra=("data.num_workers=9", "model.compile=true"))
    command = bench.ours_command(bench.SETUPS["vits-tiny"], settings, tmp_path / "img", tmp_path / "run", "device")
    assert command[command.index("--threads") + 1] == "3"
    sets = [command[i + 1] for i, part in enumerate(command) if part == "--set"]
    assert "data.augment_on=device" in sets and "data.global_crop_size=96" in sets
    assert "max_steps=7" in sets and "data.samples_per_epoch=112" in sets  # batch 16 x 7 steps: one epoch
    assert "log_every=5" in sets and "data.train_images=" + str(tmp_path / "img") in sets
    assert sets.index("data.num_workers=4") < sets.index("data.num_workers=9")  # the user's item comes last
    assert sets[-1] == "model.compile=true"
    assert not any("autocast" in item or "bf16" in item for item in sets)  # own precision: the recipe's


@pytest.mark.parametrize(
    ("setup", "device", "precision", "ours"),
    [
        ("vits-tiny", "cpu", "own", "bf16 autocast"),  # the recipe's torch_autocast block
        ("demo", "cpu", "own", "fp32"),
        ("vits-tiny", "cpu", "matched", "fp32"),  # official DINO's autocast is CUDA-only
        ("vits-tiny", "cuda", "matched", "fp16 autocast"),
    ],
)
def test_ours_train_in_the_recipes_precision_or_in_the_official_loops(
    tmp_path: Path, setup: str, device: str, precision: str, ours: str
) -> None:
    settings = bench.Settings(device=device, precision=precision)
    assert bench.ours_precision(bench.SETUPS[setup], settings, tmp_path) == ours
    assert bench.official_precision(device) == ("fp16 autocast" if device == "cuda" else "fp32")
    if precision == "matched":  # the same words as the official loop's
        assert ours == bench.official_precision(device)


def test_gpu_commands_use_the_full_size_vits16_setup() -> None:
    gpu = bench.example_commands()["gpu"]
    assert all("--device cuda" in c for c in gpu)
    assert any("--setups vits16" in c for c in gpu)
    assert bench.SETUPS["vits16"].overrides == ()  # the recipe's own 224 / 96 px crops


# ----------------------------------------------------------------------------------------------------------------
# End to end, tiny
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_run_gives_positive_figures_for_every_variant_and_kind(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["--setups", "tiny", "--steps", "3", "--warmup", "1", "--log-every", "1", "--workers", "1", "--threads", "1"]
    argv += ["--images", "12", "--data-seconds", "0.2", "--data-rounds", "1", "--quiet", "--json", str(out)]
    bench.main(argv)
    report = json.loads(out.read_text())
    entry = report["setups"]["tiny"]
    failures = "\n".join(bench.failure_lines(report))
    for kind in ("data", "train"):
        for variant in bench.VARIANTS:
            figure = entry[kind][variant]
            assert figure["status"] == "ok", (kind, variant, failures)
            assert figure["img_per_s"] > 0, (kind, variant)
        assert entry[kind]["ratio_a_c"] > 0 and entry[kind]["ratio_b_c"] > 0
    for variant in bench.VARIANTS:  # 3 steps logged one by one, the first left out
        assert entry["train"][variant]["rounds"][0]["steps_measured"] == 2, variant
    assert "| tiny | training, end to end | 32/16 px, 2+2, batch 8 | fp32 / fp32 |" in report["table"]
    assert report["machine"]["cpu"]
