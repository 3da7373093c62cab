"""FSDPBackend (FSDP2) on CPU: 2 gloo processes with a tiny ViT against the same global batch on one process.

The distributed parts run this file as a script (see `_worker`) in plain subprocesses that get the rendezvous
variables a launcher would set; that costs two process launches for the whole module (one run on 2 processes, one
on 1), shared by the tests through module-scoped fixtures. The one-process reference runs here, with LocalBackend.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # when run as a script by the workers
    sys.path.insert(0, str(TESTS))

from support import REPO, free_port, run_ranks  # noqa: E402

from dino_scale import run_dir as layout  # noqa: E402
from dino_scale.config import TrainConfig, load_config  # noqa: E402
from dino_scale.errors import CheckpointError, Unavailable  # noqa: E402
from dino_scale.io import atomic_torch_save  # noqa: E402

GLOBAL_BATCH = 8
WORLD_SIZE = 2
ACCUMULATION = 2  # on 2 processes: 2 samples x 2 micro-batches x 2 processes = the reference's one batch of 8
N_STEPS = 3
LR, WD, EMA_MOMENTUM, TEACHER_TEMP = 1e-3, 0.04, 0.9, 0.04
CLIP = 0.5  # below every step's gradient norm here (~4 to ~700), so the global-norm clipping is always active

# Tolerance of the 2-process run against the 1-process one, both fp32. They compute the same math in another order:
# matmuls over 2-sample micro-batches instead of 8 rows, gradients summed over micro-batches and reduce-scattered
# across ranks instead of summed by autograd, the global norm from per-shard pieces. That differs at fp32 rounding
# (~1e-7 relative). AdamW divides by sqrt(v), which can enlarge such differences for weights with tiny gradients,
# but each step moves a weight by at most ~lr = 1e-3. Observed worst case: 6e-7 (a block's fc2 weight) after 3 steps.
# ATOL 1e-5 is ~17x that, and 1% of one step's update: the bugs this guards against are far larger (checked by
# breaking the backend on purpose: never syncing gradients -> 3e-3, skipping the clip -> 2e-3). Adam is nearly blind
# to a gradient's scale, so a wrong gradient average is caught by the norms instead (RTOL_NORM; observed 2e-7).
ATOL_WEIGHTS = 1e-5
RTOL_NORM = 1e-4


def tiny_config(world_size: int, *overrides: str) -> TrainConfig:
    micro = GLOBAL_BATCH // (world_size * ACCUMULATION) if world_size > 1 else GLOBAL_BATCH
    return load_config(
        "tiny-test.json",
        [
            "model.drop_path_rate=0",  # drop-path masks come from each process's own RNG
            f"deepspeed.train_micro_batch_size_per_gpu={micro}",
            f"deepspeed.gradient_accumulation_steps={ACCUMULATION if world_size > 1 else 1}",
            f"deepspeed.gradient_clipping={CLIP}",
            *overrides,
        ],
    )


def make_views(step: int) -> list[torch.Tensor]:
    """The global batch of one step: 2 global crops (32 px) and 2 local ones (16 px) of GLOBAL_BATCH images."""
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(GLOBAL_BATCH, 3, size, size, generator=generator) for size in (32, 32, 16, 16)]


def train_steps(
    backend: Any, module: torch.nn.Module, teacher: torch.nn.Module, rank: int, world: int, steps: int = N_STEPS
) -> list[float]:
    """`steps` steps of the training loop's recipe (the head's last layer frozen in the first); this rank takes its
    contiguous share of every global batch, in `backend.batch.accumulation_steps` micro-batches. Returns the
    gradient norms."""
    from dino_scale.train.ema import update_teacher
    from dino_scale.train.loss import DINOLoss

    loss_fn = DINOLoss(256)
    share = GLOBAL_BATCH // world
    accumulation = backend.batch.accumulation_steps
    micro = share // accumulation
    norms = []
    for step in range(steps):
        views = make_views(step)
        for k in range(accumulation):
            rows = slice(rank * share + k * micro, rank * share + (k + 1) * micro)
            batch = [view[rows] for view in views]
            last = k == accumulation - 1
            with backend.forward_context(sync_gradients=last):
                teacher_output = teacher(batch[:2])
                student_output = module(batch)
            loss, _ = loss_fn(student_output, teacher_output, TEACHER_TEMP)
            backend.backward(loss / accumulation, sync_gradients=last)
        norms.append(backend.optimizer_step(LR, WD, freeze_last_layer=step == 0, flags={}).grad_norm.item())
        update_teacher(teacher, backend.student_weight_groups(), EMA_MOMENTUM)
    return norms


# --- the worker processes ----------------------------------------------------------------------------------------


def _fresh_fsdp(seed: int, *overrides: str) -> tuple[Any, torch.nn.Module, torch.nn.Module]:
    from dino_scale.models.dino import build_student_teacher
    from dino_scale.train.backends.fsdp import FSDPBackend

    world = int(os.environ["WORLD_SIZE"])
    cfg = tiny_config(world, *overrides)
    torch.manual_seed(seed)
    student, teacher = build_student_teacher(cfg.model)
    backend = FSDPBackend(cfg, cfg.batch_plan(world))
    module = backend.prepare(student)
    return backend, module, teacher


def _snapshot(backend: Any) -> dict[str, Any]:
    """Full weights (through student_weight_groups) and the full FQN-keyed optimizer state, as plain tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    groups, weights = [], {}
    for group in backend.student_weight_groups():
        groups.append([name for name, _ in group])
        weights.update({name: tensor.detach().clone() for name, tensor in group})
    optimizer = get_optimizer_state_dict(
        backend.student, backend.optimizer, options=StateDictOptions(full_state_dict=True)
    )
    return {"groups": groups, "weights": weights, "optimizer_state": optimizer["state"]}


def _reload(checkpoint: Path, result: Path) -> None:
    """Load `checkpoint` into a fresh FSDP student (other initial weights) and save its snapshot to `result`."""
    backend, _, _ = _fresh_fsdp(seed=1)
    state = backend.load(checkpoint)
    torch.save({**_snapshot(backend), "step": state["step"]}, result)


def _worker(mode: str, out: Path, extra: list[str]) -> None:
    from torch.distributed.tensor import DTensor

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if mode == "train":
        local_checkpoint = Path(extra[0])
        backend, module, teacher = _fresh_fsdp(seed=0)
        result: dict[str, Any] = {
            "sharded": all(isinstance(p, DTensor) for p in backend.student.parameters()),
            "teacher_names": [name for name, _ in teacher.named_parameters()],
            "student_names": [name for name, _ in backend.student.named_parameters()],
        }
        result["norms"] = train_steps(backend, module, teacher, rank, world)
        result["sharded_after_steps"] = all(isinstance(p, DTensor) for p in backend.student.parameters())
        result.update(_snapshot(backend))
        result["teacher"] = teacher.state_dict()
        path = backend.save(out / "run", N_STEPS, {"step": N_STEPS, "backend": "fsdp"}, keep_last=2)
        result["checkpoint"] = str(path)
        torch.save(result, out / f"train_rank{rank}.pt")

        reloaded, _, _ = _fresh_fsdp(seed=1)  # other initial weights: the load must overwrite all of them
        state = reloaded.load(path)
        torch.save({**_snapshot(reloaded), "state": state}, out / f"reload{world}_rank{rank}.pt")

        from_local, _, _ = _fresh_fsdp(seed=1)
        state = from_local.load(local_checkpoint)
        torch.save({**_snapshot(from_local), "step": state["step"]}, out / f"from_local_rank{rank}.pt")

        # Global clipping (optim.clip_mode=global), the one before per-parameter clipping became the default.
        global_clip, module, teacher = _fresh_fsdp(0, "optim.clip_mode=global")
        norms = train_steps(global_clip, module, teacher, rank, world)
        torch.save(
            {**_snapshot(global_clip), "norms": norms, "teacher": teacher.state_dict()}, out / f"global_rank{rank}.pt"
        )

        # A checkpoint written while the last layer is frozen (its optimizer has no state for it yet), reloaded.
        frozen, module, teacher = _fresh_fsdp(0)
        train_steps(frozen, module, teacher, rank, world, steps=1)
        frozen_path = frozen.save(out / "frozen", 1, {"step": 1, "backend": "fsdp"}, keep_last=1)
        torch.save({**_snapshot(frozen), "checkpoint": str(frozen_path)}, out / f"frozen_rank{rank}.pt")
        _reload(frozen_path, out / f"frozen_reload{world}_rank{rank}.pt")
        _reload(Path(extra[1]), out / f"frozen_from_local_rank{rank}.pt")

        bf16, module, teacher = _fresh_fsdp(0, 'deepspeed.bf16={"enabled": true}')
        norms = train_steps(bf16, module, teacher, rank, world)
        dtypes = {str(t.dtype) for group in bf16.student_weight_groups() for _, t in group}
        unit = module.backbone.blocks[0]
        unit.unshard()  # what a forward sees: the all-gathered parameters, cast by the mixed-precision policy
        compute_dtypes = {str(p.dtype) for p in unit.parameters()}
        unit.reshard()
        torch.save({"norms": norms, "dtypes": dtypes, "compute_dtypes": compute_dtypes}, out / f"bf16_rank{rank}.pt")
    elif mode == "load":
        checkpoint = Path(extra[0])
        _reload(Path(extra[1]), out / f"frozen_reload{world}_rank{rank}.pt")
        backend, _, _ = _fresh_fsdp(seed=1)
        state = backend.load(checkpoint)
        torch.save({**_snapshot(backend), "state": state}, out / f"reload{world}_rank{rank}.pt")
        foreign = out / "foreign" / "step_00000001"  # a sharded folder of another backend, no student_full.pt
        foreign.mkdir(parents=True)
        atomic_torch_save({"step": 1, "backend": "deepspeed"}, foreign / "trainer_state.pt")
        try:
            backend.load(foreign)
            message = None
        except CheckpointError as error:
            message = str(error)
        (out / "foreign_error.json").write_text(json.dumps({"message": message}))
    else:
        raise ValueError(mode)
    backend.close()


def launch(world: int, mode: str, out: Path, *extra: str, timeout: float = 120.0) -> None:
    """Run `_worker` on `world` processes with torchrun's rendezvous variables; fail with their output."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]),
    }
    logs = [out / f"{mode}{world}_rank{rank}.log" for rank in range(world)]
    run_ranks([sys.executable, __file__, mode, str(out), *extra], world, logs, env, timeout)


# --- fixtures: one reference run here, one 2-process and one 1-process run ------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same steps on one process with LocalBackend; its checkpoint is the single-file one FSDP must read."""
    from dino_scale.models.dino import build_student_teacher
    from dino_scale.train.backends.base import named_optimizer_state
    from dino_scale.train.backends.local import LocalBackend

    out = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(1)
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg.model)
    initial = {name: p.detach().clone() for name, p in student.named_parameters()}
    backend = LocalBackend(cfg, cfg.batch_plan(1))
    module = backend.prepare(student)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers; several threads per tiny matmul only contend for the 2 cores
    try:
        norms = train_steps(backend, module, teacher, 0, 1)
    finally:
        torch.set_num_threads(threads)
    path = backend.save(out, N_STEPS, {"step": N_STEPS, "backend": "local"}, keep_last=1)
    runs = {}
    for name, overrides, steps in (("global", ["optim.clip_mode=global"], N_STEPS), ("frozen", [], 1)):
        run_cfg = tiny_config(1, *overrides)
        torch.manual_seed(0)
        run_student, run_teacher = build_student_teacher(run_cfg.model)
        run = LocalBackend(run_cfg, run_cfg.batch_plan(1))
        run_module = run.prepare(run_student)
        torch.set_num_threads(1)
        try:
            run_norms = train_steps(run, run_module, run_teacher, 0, 1, steps=steps)
        finally:
            torch.set_num_threads(threads)
        runs[name] = {
            "weights": {n: p.detach().clone() for n, p in run_student.named_parameters()},
            "teacher": {k: v.clone() for k, v in run_teacher.state_dict().items()},
            "norms": run_norms,
            "optimizer_state": named_optimizer_state(run_student, run.optimizer)["state"],
            "checkpoint": run.save(out / name, steps, {"step": steps, "backend": "local"}, keep_last=1),
        }
    return {
        **runs,
        "initial": initial,
        "weights": {name: p.detach().clone() for name, p in student.named_parameters()},
        "optimizer_state": named_optimizer_state(student, backend.optimizer)["state"],
        "teacher": {k: v.clone() for k, v in teacher.state_dict().items()},
        "norms": norms,
        "checkpoint": path,
    }


@pytest.fixture(scope="module")
def fsdp_run(reference: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    launch(WORLD_SIZE, "train", out, str(reference["checkpoint"]), str(reference["frozen"]["checkpoint"]))
    return out


@pytest.fixture(scope="module")
def fsdp_load_one(fsdp_run: Path) -> Path:
    checkpoint = torch.load(fsdp_run / "train_rank0.pt", weights_only=True)["checkpoint"]
    frozen = torch.load(fsdp_run / "frozen_rank0.pt", weights_only=True)["checkpoint"]
    launch(1, "load", fsdp_run, checkpoint, frozen)
    return fsdp_run


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float, what: str) -> None:
    assert sorted(actual) == sorted(expected), what
    worst = max((actual[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= atol, f"{what}: max abs difference {worst:.3g} > {atol:g}"


def _assert_same_optimizer_state(actual: dict[str, Any], expected: dict[str, Any], what: str) -> None:
    assert sorted(actual) == sorted(expected), what
    for name, entry in expected.items():
        assert sorted(actual[name]) == sorted(entry), (what, name)
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(actual[name][key]), torch.as_tensor(value)), (what, name, key)


# --- tests -------------------------------------------------------------------------------------------------------


def test_two_processes_match_one_process(reference: dict[str, Any], fsdp_run: Path) -> None:
    ranks = [_load(fsdp_run / f"train_rank{rank}.pt") for rank in range(WORLD_SIZE)]
    assert ranks[0]["sharded"], "the student's parameters are not DTensor shards after prepare()"
    moved = max((reference["weights"][k] - reference["initial"][k]).abs().max().item() for k in reference["initial"])
    assert moved > 100 * ATOL_WEIGHTS  # the comparison below could not pass by weights standing still
    for rank, result in enumerate(ranks):
        _assert_close(result["weights"], reference["weights"], ATOL_WEIGHTS, f"student weights, rank {rank}")
        _assert_close(result["teacher"], reference["teacher"], ATOL_WEIGHTS, f"teacher after EMA, rank {rank}")
        assert result["sharded_after_steps"], "parameters left unsharded after backward / optimizer step"
        assert result["norms"] == pytest.approx(reference["norms"], rel=RTOL_NORM)
    assert min(reference["norms"]) > CLIP  # clipping was active in every step
    # Every rank gathered bit-identical full weights (what keeps the teacher replicas identical).
    for name, tensor in ranks[0]["weights"].items():
        assert torch.equal(tensor, ranks[1]["weights"][name]), name


def test_global_clipping_matches_one_process(reference: dict[str, Any], fsdp_run: Path) -> None:
    """optim.clip_mode=global clips as torch's clip_grad_norm_ over the DTensor shards, as before."""
    expected = reference["global"]
    assert min(expected["norms"]) > CLIP
    for rank in range(WORLD_SIZE):
        result = _load(fsdp_run / f"global_rank{rank}.pt")
        _assert_close(result["weights"], expected["weights"], ATOL_WEIGHTS, f"global clipping, rank {rank}")
        _assert_close(result["teacher"], expected["teacher"], ATOL_WEIGHTS, f"teacher, global clipping, rank {rank}")
        assert result["norms"] == pytest.approx(expected["norms"], rel=RTOL_NORM)
    # ... and per-parameter clipping does train differently (else the comparisons here could not tell them apart).
    apart = max((reference["weights"][k] - expected["weights"][k]).abs().max().item() for k in expected["weights"])
    assert apart > 10 * ATOL_WEIGHTS


LAST_LAYER = "head.last_layer.parametrizations.weight.original1"


def test_checkpoint_written_while_the_last_layer_is_frozen_reloads_without_its_optimizer_state(
    reference: dict[str, Any], fsdp_load_one: Path
) -> None:
    """After one frozen step the optimizer has never seen the last layer (official DINO: no gradient, no state). A
    reload, on 2 or 1 processes, from our DCP folder or from a local single file, must leave it so: not the
    placeholder state (a step already counted) of the template torch's loader starts from."""
    frozen = _load(fsdp_load_one / "frozen_rank0.pt")
    assert LAST_LAYER not in frozen["optimizer_state"] and "head.mlp.0.weight" in frozen["optimizer_state"]
    assert LAST_LAYER not in reference["frozen"]["optimizer_state"]
    _assert_close(frozen["weights"], reference["frozen"]["weights"], ATOL_WEIGHTS, "one frozen step")
    reloads = [f"frozen_reload{world}_rank{rank}.pt" for world in (2, 1) for rank in range(world)]
    for name in reloads:
        reloaded = _load(fsdp_load_one / name)
        _assert_close(reloaded["weights"], frozen["weights"], 0.0, name)
        _assert_same_optimizer_state(reloaded["optimizer_state"], frozen["optimizer_state"], name)
    for rank in range(WORLD_SIZE):
        loaded = _load(fsdp_load_one / f"frozen_from_local_rank{rank}.pt")
        _assert_close(loaded["weights"], reference["frozen"]["weights"], 0.0, f"frozen local checkpoint, rank {rank}")
        _assert_same_optimizer_state(loaded["optimizer_state"], reference["frozen"]["optimizer_state"], "from local")


def test_weight_groups_come_one_block_at_a_time(fsdp_run: Path) -> None:
    result = _load(fsdp_run / "train_rank0.pt")
    groups = result["groups"]
    assert result["student_names"] == result["teacher_names"]  # FSDP2 keeps the parameter names
    names = [name for group in groups for name in group]
    assert sorted(names) == sorted(result["teacher_names"]) and len(names) == len(set(names))
    assert len(groups) == 2 + 2  # depth-2 ViT: one group per block, the head, the rest of the root
    for depth in range(2):
        assert any(all(name.startswith(f"backbone.blocks.{depth}.") for name in group) for group in groups), depth
    assert any(all(name.startswith("head.") for name in group) for group in groups)
    assert max(len(group) for group in groups) < len(names) / 2


def test_checkpoint_layout_and_reload_on_two_and_one_processes(fsdp_load_one: Path) -> None:
    trained = _load(fsdp_load_one / "train_rank0.pt")
    checkpoint = Path(trained["checkpoint"])
    assert checkpoint == fsdp_load_one / "run" / "checkpoints" / "step_00000003"
    assert layout.find_latest_checkpoint(fsdp_load_one / "run") == checkpoint
    files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    assert files == ["dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "manifest.json", "trainer_state.pt"]
    assert not list(checkpoint.parent.glob(".*")), "staging folder or temp files left behind"
    for world in (2, 1):
        for rank in range(world):
            reloaded = _load(fsdp_load_one / f"reload{world}_rank{rank}.pt")
            assert reloaded["state"] == {"step": N_STEPS, "backend": "fsdp"}
            _assert_close(reloaded["weights"], trained["weights"], 0.0, f"weights reloaded on {world} process(es)")
            _assert_same_optimizer_state(
                reloaded["optimizer_state"], trained["optimizer_state"], f"optimizer reloaded on {world}"
            )
    # Frozen in step 1 (official DINO: no gradient, so AdamW never saw it), updated in steps 2 and 3.
    assert trained["optimizer_state"]["head.last_layer.parametrizations.weight.original1"]["step"] == N_STEPS - 1


def test_loading_a_local_single_file_checkpoint(reference: dict[str, Any], fsdp_run: Path) -> None:
    for rank in range(WORLD_SIZE):
        loaded = _load(fsdp_run / f"from_local_rank{rank}.pt")
        assert loaded["step"] == N_STEPS
        _assert_close(loaded["weights"], reference["weights"], 0.0, f"weights from the local checkpoint, rank {rank}")
        _assert_same_optimizer_state(loaded["optimizer_state"], reference["optimizer_state"], "optimizer from local")


def test_unreadable_checkpoint_names_its_backend(fsdp_load_one: Path) -> None:
    message = json.loads((fsdp_load_one / "foreign_error.json").read_text())["message"]
    assert message is not None and "backend=deepspeed" in message and "step_00000001" in message


def test_bf16_computes_in_bf16_and_keeps_fp32_shards(fsdp_run: Path) -> None:
    for rank in range(WORLD_SIZE):
        result = _load(fsdp_run / f"bf16_rank{rank}.pt")
        assert result["dtypes"] == {"torch.float32"}  # what the EMA reads
        assert result["compute_dtypes"] == {"torch.bfloat16"}
        assert all(torch.isfinite(torch.tensor(result["norms"])))


def test_shard_units_for_vit_resnet_and_unknown_backbones(caplog: pytest.LogCaptureFixture) -> None:
    import timm

    from dino_scale.models.dino import DINOHead, MultiCropWrapper, build_student_teacher
    from dino_scale.train.backends.fsdp import shard_units

    vit, _ = build_student_teacher(tiny_config(1).model)
    assert [name for name, _ in shard_units(vit)] == ["backbone.blocks.0", "backbone.blocks.1", "head"]
    resnet = MultiCropWrapper(timm.create_model("resnet18", num_classes=0), DINOHead(512, 16, 32, 8))
    assert [name for name, _ in shard_units(resnet)] == [f"backbone.layer{i}" for i in range(1, 5)] + ["head"]
    plain = MultiCropWrapper(torch.nn.Linear(4, 4), DINOHead(4, 16, 32, 8))
    with caplog.at_level("WARNING", logger="dino_scale"):
        assert [name for name, _ in shard_units(plain)] == ["head"]
    assert "root unit" in caplog.text


def test_fp16_and_missing_launcher_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from dino_scale.train.backends.fsdp import FSDPBackend

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    cfg = tiny_config(1)
    with pytest.raises(Unavailable, match="needs a launcher"):
        FSDPBackend(cfg, cfg.batch_plan(1))
    fp16 = load_config("tiny-test.json", ['deepspeed.fp16={"enabled": true}'])
    with pytest.raises(Unavailable, match="bf16"):
        FSDPBackend(fp16, fp16.batch_plan(1))


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
