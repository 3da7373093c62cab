"""Checkpoints under attack and decay: planted pickles, damaged and foreign files, full disks.

* Nothing a checkpoint folder supplies is unpickled beyond plain values: a payload (a pickle whose __reduce__ would
  create a marker file) planted in every file a resume reads - a single .pt, DeepSpeed's model and ZeRO optimizer
  files, trainer_state.pt, student_full.pt, DCP's .metadata and its data files - is refused with one line naming
  the file, even when the attacker also rewrote the manifest; latest.json is never followed out of the folder.
* A damaged or foreign newest checkpoint (the corpus below, single files and folders) is reported by path and the
  previous good one is resumed, with exactly its tensors; with nothing usable, --resume fails with one line.
* A full disk or a read-only folder during a save ends in one WriteFailed line on every rank, the previous checkpoint
  stays the latest and no debris is left: injected OSErrors (single file, DeepSpeed and DCP folders), and a real
  4-MiB tmpfs where the machine allows one without root (a user + mount namespace).

The in-process tests resume through TrainState.resume, what the training loop calls; the two-process ones run as one
launch (test_distributed.launch_plan) that trains, fails, plants and resumes in turn.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from support import REPO, SAMPLE_TRAIN, official_checkpoint

from dino_scale import run_dir as layout
from dino_scale.config import load_config
from dino_scale.errors import CheckpointError, WriteFailed
from dino_scale.io import atomic_torch_save, load_checkpoint, save_safetensors
from dino_scale.train import checkpoint

pytestmark = pytest.mark.slow  # every test here trains, or resumes what a fixture trained

SETS = (
    f"data.train_shards={json.dumps(SAMPLE_TRAIN)}",
    "data.samples_per_epoch=16",  # 2 steps per epoch of 8
    "epochs=2",
    "max_steps=4",
    "checkpoint_every=2",
    "keep_checkpoints=10",
    "data.num_workers=0",
    "model.drop_path_rate=0.0",
)


# --- payloads ------------------------------------------------------------------------------------------------------


class Payload:
    """Unpickled by a plain unpickler, this creates `marker` (it runs `exec`): proof that a loader ran planted code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({self.marker!r}, 'w').close()",)


def plant_torch_file(path: Path, marker: Path) -> None:
    """Replace a torch file by one whose pickle runs the payload; the manifest is rewritten to match (the attacker
    controls the folder), so that the unpickler, not the checksum, is what must refuse it."""
    with open(path, "wb") as f:
        torch.save({"teacher": Payload(str(marker)), "student": Payload(str(marker))}, f)


def rewrite_manifest(checkpoint_path: Path) -> None:
    manifest = layout.manifest_path(checkpoint_path)
    if checkpoint_path.is_dir():
        root, names = checkpoint_path, layout.checkpoint_files(checkpoint_path)
    else:
        root, names = checkpoint_path.parent, [checkpoint_path.name]
    checkpoint.write_manifest(manifest, layout.step_of(checkpoint_path), checkpoint.digest_files(root, names))


def live(load: Callable[[], Any], marker: Path) -> bool:
    """Whether a plain loader runs the planted payload (so that refusing it means something); removes the marker."""
    with contextlib.suppress(Exception):  # what the payload returns need not be a checkpoint
        load()
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


# --- resuming in this process, as the training loop does --------------------------------------------------------


def config(run_dir: Path, *overrides: str) -> Any:
    return load_config("tiny-test.json", [*SETS, f"output_dir={json.dumps(str(run_dir))}", *overrides])


def resume(run_dir: Path, *overrides: str) -> tuple[Any, Any]:
    """(the TrainState after TrainState.resume, the backend); raises what resume raises."""
    from dino_scale.train.backends import make_backend
    from dino_scale.train.loop import build_networks, plan_data
    from dino_scale.train.loss import DINOLoss
    from dino_scale.train.state import TrainState

    cfg = config(run_dir, *overrides)
    backend = make_backend(cfg)
    _, teacher = build_networks(cfg, backend)
    loss = DINOLoss(cfg.model.out_dim, 2, cfg.dino.student_temp, cfg.dino.center_momentum, backend.sum_over_ranks)
    state = TrainState(cfg, backend, teacher, loss, plan_data(cfg, backend))
    assert state.resume(run_dir)
    return state, backend


@pytest.fixture(scope="module")
def single_file_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local run with single-file checkpoints at steps 2 and 4."""
    from dino_scale.train.loop import train

    run_dir = tmp_path_factory.mktemp("faults") / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config(run_dir))
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.fixture(scope="module")
def folder_run(single_file_run: Path) -> Path:
    """The same checkpoints as folders laid out as DeepSpeed ZeRO-2 writes them (trainer_state.pt, student_full.pt,
    deepspeed/*), each with its manifest; the local backend resumes them through student_full.pt."""
    run_dir = single_file_run.parent / "folder"
    shutil.copytree(single_file_run, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    for step in (2, 4):
        state = load_checkpoint(layout.checkpoint_path(single_file_run, step, folder=False))
        config_ = dict(state["config"], backend="deepspeed")
        config_["deepspeed"] = {**config_["deepspeed"], "zero_optimization": {"stage": 2}}
        staging = layout.staging_path(run_dir, step)
        (staging / "deepspeed").mkdir(parents=True)
        trainer = {k: v for k, v in state.items() if k not in ("student", "optimizer", "grad_scaler")}
        atomic_torch_save({**trainer, "backend": "deepspeed", "config": config_}, staging / "trainer_state.pt")
        atomic_torch_save({"student": state["student"], "optimizer": state["optimizer"]}, staging / "student_full.pt")
        atomic_torch_save({"module": state["student"]}, staging / "deepspeed" / "mp_rank_00_model_states.pt")
        checkpoint.commit_checkpoint_dir(staging, layout.checkpoint_path(run_dir, step, folder=True), keep_last=0)
    return run_dir


def student_of(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    path = layout.checkpoint_path(run_dir, step, folder=False)
    if path.exists():
        return load_checkpoint(path)["student"]
    return load_checkpoint(layout.checkpoint_path(run_dir, step, folder=True) / "student_full.pt")["student"]


# --- the corpus: damaged and foreign newest checkpoints --------------------------------------------------------------


def flip_bits(path: Path) -> None:
    """Flip one bit in the middle of the file: inside tensor data for every file here (they are mostly tensors)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(fraction: float) -> Callable[[Path], None]:
    def cut(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return cut


def truncate_to(size: int) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(path.read_bytes()[:size])


def drop_manifest_entry(path: Path, checkpoint_path: Path) -> None:
    manifest = layout.manifest_path(checkpoint_path)
    data = json.loads(manifest.read_text())
    name = path.relative_to(checkpoint_path).as_posix() if checkpoint_path.is_dir() else path.name
    del data["files"][name]
    data["files"].setdefault("another.pt", {"bytes": 1, "sha256": "0" * 64})
    manifest.write_text(json.dumps(data))


def foreign(make: Callable[[Path], Any]) -> Callable[[Path, Path], None]:
    """Replace the file by a foreign one and rewrite the manifest to match: only the structure can give it away."""

    def replace(path: Path, checkpoint_path: Path) -> None:
        make(path)
        rewrite_manifest(checkpoint_path)

    return replace


def _another_model(path: Path) -> None:
    state = load_checkpoint(path)
    key = "student" if "student" in state else "teacher"
    name = next(iter(state[key]))
    state[key][name] = torch.zeros(3, 3)
    torch.save(state, path)


FOREIGN = {
    "dict-without-student": lambda path: torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, path),
    "list": lambda path: torch.save([torch.ones(2), 3], path),
    "safetensors-renamed": lambda path: save_safetensors({"w": torch.ones(2)}, path),
    "official-dino": official_checkpoint,
    "another-model": _another_model,
    "text": lambda path: path.write_text("not a checkpoint"),
}

# (name, file to damage: "" for a single-file checkpoint, else the path inside the folder, how)
DAMAGE: list[tuple[str, str, Callable[..., None]]] = [
    ("bit-flip", "", flip_bits),
    ("truncated-half", "", truncate(0.5)),
    ("truncated-100", "", truncate_to(100)),
    ("truncated-last-byte", "", truncate(0.99999)),
    ("zero-byte", "", truncate_to(0)),
    ("bit-flip", "student_full.pt", flip_bits),
    ("bit-flip", "deepspeed/mp_rank_00_model_states.pt", flip_bits),
    ("truncated-half", "trainer_state.pt", truncate(0.5)),
    ("truncated-100", "student_full.pt", truncate_to(100)),
    ("zero-byte", "trainer_state.pt", truncate_to(0)),
]
MISSING: list[tuple[str, str]] = [  # a file gone, or dropped from the manifest
    ("missing-file", ""),
    ("missing-file", "student_full.pt"),
    ("missing-file", "deepspeed/mp_rank_00_model_states.pt"),
    ("missing-manifest-entry", ""),
    ("missing-manifest-entry", "trainer_state.pt"),
    ("manifest-not-json", ""),
    ("manifest-not-json", "manifest.json"),
    ("unlisted-file", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
]
FOREIGN_FILES = [
    *((name, "") for name in FOREIGN),
    *((name, "student_full.pt") for name in FOREIGN),
    ("dict-without-student", "trainer_state.pt"),
    ("list", "trainer_state.pt"),
]


def run_copy(single_file_run: Path, folder_run: Path, inside: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the single-file run (`inside` empty) or of the folder run, and its step-4 checkpoint."""
    source = folder_run if inside else single_file_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    return run_dir, layout.checkpoint_path(run_dir, 4, folder=bool(inside))


def break_checkpoint(case: str, inside: str, how: Any, checkpoint_path: Path) -> None:
    target = checkpoint_path / inside if inside else checkpoint_path
    if case == "missing-file":
        target.unlink()
    elif case == "missing-manifest-entry":
        drop_manifest_entry(target, checkpoint_path)
    elif case == "manifest-not-json":
        layout.manifest_path(checkpoint_path).write_text('{"format": "dino-scale checkpoint manifest", "files": {')
    elif case == "unlisted-file":
        target.write_bytes(b"PK\x03\x04 someone's file")
    elif case in FOREIGN:
        foreign(FOREIGN[case])(target, checkpoint_path)
    else:
        how(target)


CORPUS = [
    *((name, inside, how) for name, inside, how in DAMAGE),
    *((name, inside, None) for name, inside in MISSING),
    *((name, inside, None) for name, inside in FOREIGN_FILES),
]


@pytest.mark.parametrize(("case", "inside", "how"), CORPUS, ids=[f"{c}-{i or 'single-file'}" for c, i, _ in CORPUS])
def test_damaged_or_foreign_latest_falls_back_to_the_previous_good_one(
    single_file_run: Path,
    folder_run: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
    inside: str,
    how: Any,
) -> None:
    run_dir, bad = run_copy(single_file_run, folder_run, inside, tmp_path)
    break_checkpoint(case, inside, how, bad)
    with caplog.at_level(logging.WARNING, logger="dino_scale"):
        state, backend = resume(run_dir)
    assert state.step == 2  # not 4
    assert f"checkpoint {bad} is unusable" in caplog.text
    good = student_of(run_dir, 2)  # never the damaged tensors: exactly the previous checkpoint's
    assert all(torch.equal(tensor, good[name]) for name, tensor in backend.student.state_dict().items())


@pytest.mark.parametrize(
    ("case", "inside", "how"),
    [
        ("bit-flip", "", flip_bits),
        ("list", "", None),
        ("truncated-half", "student_full.pt", truncate(0.5)),
        ("dict-without-student", "trainer_state.pt", None),
        ("missing-file", "student_full.pt", None),
    ],
)
def test_nothing_usable_fails_with_one_line_listing_what_was_tried(
    single_file_run: Path, folder_run: Path, tmp_path: Path, case: str, inside: str, how: Any
) -> None:
    run_dir, newest = run_copy(single_file_run, folder_run, inside, tmp_path)
    older = layout.checkpoint_path(run_dir, 2, folder=bool(inside))
    for path in (newest, older):
        break_checkpoint(case, inside, how, path)
    with pytest.raises(CheckpointError) as raised:
        resume(run_dir)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"no usable checkpoint in {run_dir / 'checkpoints'}: tried ")
    assert f"{newest.name} (" in message and f"{older.name} (" in message


def test_the_command_line_says_it_in_one_line(single_file_run: Path, tmp_path: Path) -> None:
    from dino_scale.train.command import train_command

    run_dir, newest = run_copy(single_file_run, single_file_run, "", tmp_path)
    for step in (2, 4):
        truncate(0.5)(layout.checkpoint_path(run_dir, step, folder=False))
    args = ["--config", "tiny-test.json", "--output-dir", str(run_dir), "--resume"]
    for item in SETS:
        args += ["--set", item]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors == [errors[0]] and errors[0].startswith("Error: --resume: no usable checkpoint in ")
    assert "Traceback" not in result.output


def test_another_global_batch_is_refused_at_once(single_file_run: Path, tmp_path: Path) -> None:
    """Not a damaged checkpoint: this run's recipe cannot continue it, and no older one would do either."""
    from dino_scale.errors import ConfigError

    run_dir, _ = run_copy(single_file_run, single_file_run, "", tmp_path)
    with pytest.raises(ConfigError) as raised:
        resume(run_dir, "deepspeed.train_batch_size=16")
    message = str(raised.value)
    assert "\n" not in message and "written with a global batch of 8, this run has 16" in message


# --- planted payloads, single process (single files and the portable folder path) ---------------------------------


def test_payloads_planted_in_single_file_and_folder_checkpoints_never_run(
    single_file_run: Path, folder_run: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "PWNED"
    single, _ = run_copy(single_file_run, folder_run, "", tmp_path / "a")
    folder, _ = run_copy(single_file_run, folder_run, "trainer_state.pt", tmp_path / "b")
    planted = [
        layout.checkpoint_path(single, 4, folder=False),
        layout.checkpoint_path(single, 2, folder=False),
        layout.checkpoint_path(folder, 4, folder=True) / "trainer_state.pt",
        layout.checkpoint_path(folder, 2, folder=True) / "student_full.pt",
    ]
    for path in planted:
        plant_torch_file(path, marker)
        rewrite_manifest(path if path.suffix == ".pt" and path.parent.name == "checkpoints" else path.parent)
        assert live(lambda path=path: torch.load(path, weights_only=False), marker)  # the payload is real
    for run_dir, files in ((single, planted[:2]), (folder, planted[2:])):
        with pytest.raises(CheckpointError) as raised:
            resume(run_dir)
        message = str(raised.value)
        assert "\n" not in message and all(f"{file.relative_to(run_dir / 'checkpoints')}" in message for file in files)
        assert "Refusing to load" in message and "builtins.exec" in message
    assert not marker.exists()


def test_latest_json_is_never_followed_out_of_the_folder(single_file_run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    run_dir, _ = run_copy(single_file_run, single_file_run, "", tmp_path)
    outside = run_dir / "step_00000009.pt"
    plant_torch_file(outside, marker)
    for name in ("../step_00000009.pt", str(outside), "step_00000004.pt/../../step_00000009.pt"):
        (run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"step": 9, "file": name}))
        state, _ = resume(run_dir)
        assert state.step == 4
    assert not marker.exists()


# --- write failures, single process --------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
def test_full_disk_or_read_only_folder_during_a_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: int
) -> None:
    from dino_scale.train.loop import train

    real_save = torch.save

    def failing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        name = getattr(f, "name", str(f))
        if "step_00000004" in str(name):
            f.write(b"PK\x03\x04 the first bytes")
            raise OSError(failure, os.strerror(failure))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    run_dir = tmp_path / "run"
    with pytest.raises(WriteFailed) as raised:
        train(config(run_dir))
    message = str(raised.value)
    assert "\n" not in message and f"cannot write {run_dir / 'checkpoints' / 'step_00000004.pt'}" in message
    assert os.strerror(failure) in message
    if failure == errno.ENOSPC:
        assert re.search(r"\(.* free in .*; it needs about [0-9.]+ MiB\)", message), message
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert files == ["latest.json", "step_00000002.pt", "step_00000002.pt.manifest.json"]  # no debris
    monkeypatch.undo()
    assert resume(run_dir)[0].step == 2


TINY_FS = """
import json, sys
from pathlib import Path
from dino_scale.config import load_config
from dino_scale.errors import WriteFailed
from dino_scale.run_dir import verify
from dino_scale.train.loop import train
run_dir, sets = Path(sys.argv[1]), json.loads(sys.argv[2])
try:
    train(load_config("tiny-test.json", sets))
    error = None
except WriteFailed as caught:
    error = str(caught)
directory = run_dir / "checkpoints"
latest = directory / json.loads((directory / "latest.json").read_text())["file"]
print(json.dumps({"error": error, "files": sorted(p.name for p in directory.iterdir()), "latest": latest.name,
                  "verdict": verify(latest).problem}))
"""


def test_a_real_full_disk(tmp_path: Path) -> None:
    """On a 4-MiB tmpfs mounted in a user + mount namespace (no root needed; skipped where the kernel forbids it):
    two 1.4-MB checkpoints fit, the third does not. The tmpfs lives as long as the namespace, so the script that
    trains there also reports what it left."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    probe = subprocess.run(
        ["unshare", "-Urm", "mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    script = tmp_path / "tiny_fs.py"
    script.write_text(TINY_FS)
    run_dir = mount / "run"
    sets = [*SETS, "checkpoint_every=1", "epochs=4", "max_steps=8", f"output_dir={json.dumps(str(run_dir))}"]
    command = 'mount -t tmpfs -o size=4m tmpfs "$MOUNT" && exec "$PYTHON" "$SCRIPT" "$RUN" "$SETS"'
    result = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", command],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MOUNT": str(mount),
            "PYTHON": sys.executable,
            "SCRIPT": str(script),
            "RUN": str(run_dir),
            "SETS": json.dumps(sets),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"] is not None and "\n" not in report["error"], report
    assert "No space left on device" in report["error"] and "free in" in report["error"]
    assert report["verdict"] is None  # the latest checkpoint is whole
    assert [f for f in report["files"] if f.startswith(".")] == []  # no debris
    assert report["files"][-1].startswith(report["latest"])  # the newest file there is the latest checkpoint's


# --- two processes: DeepSpeed and DCP folders -----------------------------------------------------------------------


def fail_writes(backend: str, step: str) -> None:
    """(A plan action, every rank.) From now on rank 1's writes into the checkpoint of `step` fail with ENOSPC: for
    deepspeed its ZeRO optimizer file, for fsdp its DCP shard."""
    if int(os.environ["RANK"]) != 1:
        return
    staging = f".step_{int(step):08d}.partial"
    if backend == "deepspeed":
        real_save = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if staging in str(f) and "optim_states" in str(f):
                Path(f).write_bytes(b"PK\x03\x04 the first bytes")
                raise OSError(errno.ENOSPC, "No space left on device")
            real_save(obj, f, *args, **kwargs)

        torch.save = save
    else:
        from torch.distributed.checkpoint.filesystem import FileSystem

        real_stream = FileSystem.create_stream

        def create_stream(self: Any, path: Any, mode: str) -> Any:
            if staging in str(path) and "w" in mode and str(path).endswith(".distcp"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_stream(self, path, mode)

        FileSystem.create_stream = create_stream  # type: ignore[method-assign]


def copy_run(source: str, target: str) -> None:
    if int(os.environ["RANK"]) == 0:
        shutil.copytree(source, target)


def plant_deepspeed(run_dir: str, marker: str) -> None:
    """(Rank 0.) One payload per checkpoint, in each file a same-count DeepSpeed resume reads."""
    if int(os.environ["RANK"]) != 0:
        return
    for step, name in (
        (4, "trainer_state.pt"),
        (3, "deepspeed/mp_rank_00_model_states.pt"),
        (2, "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        (1, "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    ):
        folder = layout.checkpoint_path(run_dir, step, folder=True)
        plant_torch_file(folder / name, Path(marker))
        rewrite_manifest(folder)


def plant_dcp(run_dir: str, marker: str) -> None:
    """(Rank 0.) One payload per checkpoint: DCP's .metadata, a non-tensor value in each data file, trainer_state."""
    if int(os.environ["RANK"]) != 0:
        return
    step_4 = layout.checkpoint_path(run_dir, 4, folder=True)
    with open(step_4 / "dcp" / ".metadata", "wb") as f:
        pickle.dump(Payload(marker), f)
    for step, data_file in ((3, "__0_0.distcp"), (2, "__1_0.distcp")):
        plant_dcp_bytes(layout.checkpoint_path(run_dir, step, folder=True) / "dcp", data_file, marker)
    plant_torch_file(layout.checkpoint_path(run_dir, 1, folder=True) / "trainer_state.pt", Path(marker))
    for step in (1, 2, 3, 4):
        rewrite_manifest(layout.checkpoint_path(run_dir, step, folder=True))


def plant_dcp_bytes(dcp_dir: Path, data_file: str, marker: str) -> None:
    """Append a pickled payload to a DCP data file and point one non-tensor entry (an optimizer hyperparameter, which
    every rank reads) at it; DCP's default planner would torch.load it with weights_only=False."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    with open(dcp_dir / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own file, written a moment ago by this test
    index = next(
        i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata.get(i.fqn), BytesStorageMetadata)
    )
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    target = dcp_dir / data_file
    offset = target.stat().st_size
    with open(target, "ab") as f:
        f.write(payload.getvalue())
    metadata.storage_data[index] = _StorageInfo(data_file, offset, len(payload.getvalue()))
    with open(dcp_dir / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def legacy_and_damaged(run_dir: str, inside: str) -> None:
    """(Rank 0.) As if written before manifests, and the newest checkpoint's `inside` file truncated: nothing but
    the file itself (a zip CRC, DCP's own reads) can tell."""
    if int(os.environ["RANK"]) != 0:
        return
    for manifest in Path(run_dir).glob("checkpoints/step_*/manifest.json"):
        manifest.unlink()
    target = layout.checkpoint_path(run_dir, 4, folder=True) / inside
    if inside.endswith(".distcp"):
        truncate(0.5)(target)
    else:
        flip_bits(target)


@pytest.fixture(scope="module")
def two_process_faults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("deepspeed")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from test_distributed import call_action, launch_plan, train_action

    out = tmp_path_factory.mktemp("two-process-faults")
    marker = out / "PWNED"
    me = "test_checkpoints"
    five = ("max_steps=5", "checkpoint_every=1", "data.samples_per_epoch=96")  # 6 steps per epoch of 16
    plan: list[dict] = []
    for backend, sets, legacy_file in (
        (
            "deepspeed",
            ("backend=deepspeed", "deepspeed.zero_optimization.stage=2"),
            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ),
        ("fsdp", ("backend=fsdp",), "dcp/__1_0.distcp"),
    ):
        run = out / backend
        plan += [
            call_action(f"{me}:fail_writes", backend, "5"),
            train_action(run, *sets, *five),  # checkpoints 1-4, then the save of step 5 fails on rank 1
            call_action(f"{me}:copy_run", str(run), str(out / f"{backend}-legacy")),
            call_action(f"{me}:copy_run", str(run), str(out / f"{backend}-planted")),
            call_action(f"{me}:legacy_and_damaged", str(out / f"{backend}-legacy"), legacy_file),
            # (max_steps=4: the injected failure still fails step 5's save)
            train_action(out / f"{backend}-legacy", *sets, *five, "max_steps=4", resume=True),
            call_action(
                f"{me}:plant_{'dcp' if backend == 'fsdp' else 'deepspeed'}",
                str(out / f"{backend}-planted"),
                str(marker.with_name(f"PWNED-{backend}")),
            ),
            train_action(out / f"{backend}-planted", *sets, *five, resume=True),
        ]
    results = launch_plan(2, out, plan)
    return {"out": out, "marker": marker, "results": results}


def _result(faults: dict[str, Any], rank: int, backend: str, which: int) -> dict[str, Any]:
    """The `which`-th train action's result of `backend` (0: the failing save, 1: legacy, 2: planted)."""
    trains = [r for r in faults["results"][rank] if "value" not in r]
    return trains[(0 if backend == "deepspeed" else 3) + which]


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp"])
def test_full_disk_on_one_rank_stops_every_rank_with_one_line(two_process_faults: dict[str, Any], backend: str) -> None:
    run_dir = two_process_faults["out"] / backend
    messages = [_result(two_process_faults, rank, backend, 0) for rank in (0, 1)]
    for result in messages:
        assert result.get("type") == "WriteFailed", result
        assert "\n" not in result["error"] and "No space left on device" in result["error"]
        assert ".step_00000005.partial" in result["error"] and "it needs about" in result["error"]
    directory = run_dir / "checkpoints"
    assert json.loads((directory / "latest.json").read_text())["step"] == 4
    assert sorted(p.name for p in directory.iterdir()) == ["latest.json", *(f"step_{s:08d}" for s in (1, 2, 3, 4))]
    assert layout.verify(directory / "step_00000004").problem is None
    umask = os.umask(0)
    os.umask(umask)
    for path in (directory / "step_00000004").rglob("*"):  # the usual modes (0644 under umask 022), scripts aside
        if path.is_file() and path.suffix != ".py":
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp"])
def test_damaged_checkpoint_without_manifest_falls_back(two_process_faults: dict[str, Any], backend: str) -> None:
    """Written before manifests (nothing to verify against) and damaged: DeepSpeed's zip CRC, DCP's own reads (a
    CheckpointException, a BaseException) give it away; every rank falls back to step 3 and trains on."""
    for rank in (0, 1):
        assert _result(two_process_faults, rank, backend, 1).get("record", {}).get("step") == 4
    log = (two_process_faults["out"] / "plan_rank0.log").read_text()
    assert (
        f"checkpoint {two_process_faults['out'] / f'{backend}-legacy' / 'checkpoints' / 'step_00000004'} is "
        "unusable" in log
    )
    assert "has no manifest" in log


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp"])
def test_payloads_planted_in_every_file_a_resume_reads_never_run(
    two_process_faults: dict[str, Any], backend: str
) -> None:
    marker = two_process_faults["marker"].with_name(f"PWNED-{backend}")
    assert not marker.exists(), "a planted payload ran while resuming"  # (the checks below run them on purpose)
    folder = two_process_faults["out"] / f"{backend}-planted" / "checkpoints"
    if backend == "deepspeed":
        planted = [
            "step_00000004/trainer_state.pt",
            "step_00000003/deepspeed/mp_rank_00_model_states.pt",
            "step_00000002/deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "step_00000001/deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
        for name in planted:
            assert live(lambda name=name: torch.load(folder / name, weights_only=False), marker)
    else:
        planted = [
            "step_00000004/dcp/.metadata",
            "step_00000003/dcp/__0_0.distcp",
            "step_00000002/dcp/__1_0.distcp",
            "step_00000001/trainer_state.pt",
        ]
        assert live(lambda: pickle.loads((folder / planted[0]).read_bytes()), marker)
        for name in planted[1:3]:
            data = (folder / name).read_bytes()
            with open(folder / name.replace(name.split("/")[-1], ".metadata"), "rb") as f:
                entries = pickle.load(f).storage_data.values()  # written by plant_dcp_bytes, in this test
            start = next(e.offset for e in entries if e.offset + e.length == len(data))  # the appended payload
            assert live(lambda data=data, start=start: torch.load(io.BytesIO(data[start:]), weights_only=False), marker)
    for rank in (0, 1):
        result = _result(two_process_faults, rank, backend, 2)
        assert result.get("type") == "CheckpointError", result
        message = result["error"]
        assert "\n" not in message and message.startswith(f"no usable checkpoint in {folder}")
        for name in planted:
            assert name in message, (name, message)
