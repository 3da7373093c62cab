"""What a new user met with the commands that take a model, on the briefly trained tiny ViT (trained at 32 px):

* every such command runs the model at the size it was trained at by default, and prints the size and its origin;
* the parity gate's real-image check is never skipped silently, and --parity-shards takes a folder of images;
* a file of another kind given as a checkpoint, a run directory given to bench, a missing --test: one line that
  names the flag and the real problem;
* re-running `index` on an index folder uses the index's own model;
* `--json PATH|-` means the same everywhere ('-': the JSON alone on standard output), `--threads N` sets the
  process's intra-op threads.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from support import ARCH, SAMPLE_VAL, SIZE, export, photo

from dino_scale.cli import main as cli
from dino_scale.devices import available_cores
from dino_scale.io import file_sha256

TRAINED_AT = "the size the model was trained at: data.global_crop_size in"


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result: Result) -> str:
    """The error line of a failed command (and that it is one line)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 sample images as class folders (labelled sets for eval; a plain image folder for index and copy
    detection)."""
    root = tmp_path_factory.mktemp("images") / "classes"
    with tarfile.open(Path(SAMPLE_VAL) / "val-000000.tar") as tar:
        members = {m.name: m for m in tar}
        stems = sorted(name[: -len(".cls")] for name in members if name.endswith(".cls"))
        labels = {stem: int(tar.extractfile(members[f"{stem}.cls"]).read()) for stem in stems}
        chosen = [s for s in stems if labels[s] == 0][:6] + [s for s in stems if labels[s] == 1][:6]
        for stem in chosen:
            folder = root / f"class_{labels[stem]}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{stem}.jpg").write_bytes(tar.extractfile(members[f"{stem}.jpg"]).read())
    return root


@pytest.fixture(scope="module")
def artifacts(vit_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny run's teacher exported with no --image-size (so at the size it was trained at), and its student."""
    root = tmp_path_factory.mktemp("artifacts")
    teacher, student = root / "teacher.onnx", root / "student.onnx"
    result = export("--checkpoint", str(vit_run), "--out", str(teacher), "--outputs", "cls,patch_gem")
    assert result.exit_code == 0, result.output
    result = export("--checkpoint", str(vit_run), "--out", str(student), "--which", "student")
    assert result.exit_code == 0, result.output
    return {"teacher": teacher, "student": student}


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --- the image size ----------------------------------------------------------------------------------------------


def test_export_defaults_to_the_size_the_model_was_trained_at(vit_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.onnx"
    result = export("--checkpoint", str(vit_run), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"image size {SIZE} ({TRAINED_AT} {vit_run / 'config.json'})" in result.output.splitlines()
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["model"]["image_size"] == SIZE and meta["inputs"][0]["shape"] == ["batch", 3, SIZE, SIZE]


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "knn", "-k", "3"],
        ["eval", "linear", "--epochs", "2", "--n-last-blocks", "1"],
        ["eval", "copy-detection", "--queries", "2"],
        ["index"],
    ],
    ids=["knn", "linear", "copy-detection", "index"],
)
def test_commands_run_a_run_directory_at_its_trained_size(
    vit_run: Path, images: Path, tmp_path: Path, command: list[str]
) -> None:
    sets = {
        "knn": ["--train", images, "--test", images],
        "linear": ["--train", images, "--test", images],
        "copy-detection": ["--images", images, "--descriptor", "cls"],
        "index": ["--images", images, "--out", tmp_path / "idx"],
    }[command[1] if command[0] == "eval" else "index"]
    report = tmp_path / "report.json"
    json_out = ["--json", report] if command[0] == "eval" else []
    result = invoke(*command, "--model", vit_run, *sets, *json_out, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert f"image size {SIZE} ({TRAINED_AT} {vit_run / 'config.json'})" in result.output.splitlines()
    if command[0] == "eval":
        assert json.loads(report.read_text())["model"]["image_size"] == SIZE
    else:
        assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["model"]["image_size"] == SIZE


def test_an_explicit_size_and_an_artifact_size_say_where_they_come_from(
    vit_run: Path, artifacts: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    result = invoke("eval", "knn", "--model", vit_run, "--train", images, "--test", images, "-k", "3",
                    "--image-size", "48", "--workers", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "image size 48 (as given: --image-size)" in result.output.splitlines()
    result = invoke("eval", "knn", "--model", artifacts["teacher"], "--train", images, "--test", images, "-k", "3",
                    "--workers", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"image size {SIZE} (the size teacher.onnx was exported at: its sidecar)" in result.output.splitlines()


# --- the parity gate outside the checkout -----------------------------------------------------------------------


def test_the_real_image_check_is_never_skipped_silently(
    vit_run: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no shards/sample/val here
    result = invoke("export", "--checkpoint", vit_run, "--out", tmp_path / "a.onnx")
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if "real-image check skipped" in line]
    assert len(skipped) == 1 and "--parity-shards DIR" in skipped[0], result.output
    assert "images" not in result.output.split("parity (")[1]  # only the random inputs were checked
    # A folder of images serves as well as shards.
    result = invoke("export", "--checkpoint", vit_run, "--out", tmp_path / "b.onnx", "--parity-shards", images)
    assert result.exit_code == 0, result.output
    assert "real-image check skipped" not in result.output
    gated = [line for line in result.output.splitlines() if "images classes" in line]
    assert gated and all("batch 8" in line and line.endswith("ok") for line in gated), result.output
    # Named by the user, it must hold images: a missing folder, or one without a readable image, stops the export.
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "val-000000.tar").write_bytes(b"not a tar " * 100)
    for where, reason in ((tmp_path / "nowhere", "does not exist"), (garbage, "holds no readable image")):
        line = one_line_error(invoke("export", "--checkpoint", vit_run, "--out", tmp_path / "c.onnx",
                                     "--parity-shards", where))  # fmt: skip
        assert line.startswith("Error: --parity-shards: ") and reason in line, line
    assert not (tmp_path / "c.onnx").exists()


# --- one line that names the flag and the real problem ------------------------------------------------------------


def test_a_file_of_another_kind_given_as_a_checkpoint_is_named(
    artifacts: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    onnx_file, jpeg = artifacts["teacher"], next(images.rglob("*.jpg"))
    as_model = "not a checkpoint: pass it to index/search/eval/bench as --model"
    line = one_line_error(invoke("export", "--checkpoint", onnx_file, "--out", tmp_path / "x.onnx"))
    assert line == f"Error: --checkpoint: {onnx_file} is an ONNX model, {as_model}"
    line = one_line_error(invoke("convert", "--checkpoint", onnx_file, "--arch", ARCH, "--out", tmp_path / "x.st"))
    assert line == f"Error: --checkpoint: {onnx_file} is an ONNX model, {as_model}"
    line = one_line_error(invoke("eval", "knn", "--model", jpeg, "--train", images, "--test", images))
    assert line == f"Error: --model: {jpeg} is an image (JPEG), not a checkpoint"
    line = one_line_error(invoke("index", "--model", jpeg, "--images", images, "--out", tmp_path / "idx"))
    assert line == f"Error: --model: {jpeg} is an image (JPEG), not a checkpoint"


def test_bench_of_a_run_directory_says_to_export_it_or_names_its_artifacts(
    vit_run: Path, artifacts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    line = one_line_error(invoke("bench", "--model", vit_run))
    assert f"--model: {vit_run} is a run directory; bench takes an exported artifact" in line
    assert line.endswith(f"export it first: dino-scale export --checkpoint {vit_run}"), line
    (tmp_path / "export").mkdir()
    for suffix in ("", ".json"):
        shutil.copy(f"{artifacts['student']}{suffix}", tmp_path / "export" / f"tiny.onnx{suffix}")
    line = one_line_error(invoke("bench", "--model", vit_run))
    assert line.endswith("its exported artifacts: export/tiny.onnx"), line


def test_eval_names_a_wrong_set_before_anything_else(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no export/ here: the model would be the first thing to fail
    for command in (["knn"], ["linear"]):
        line = one_line_error(invoke("eval", *command, "--train", images, "--test", tmp_path / "nowhere"))
        assert line.startswith("Error: --test: ") and "nowhere" in line, line
        line = one_line_error(invoke("eval", *command, "--train", tmp_path / "nowhere", "--test", images))
        assert line.startswith("Error: --train: ") and "nowhere" in line, line
    line = one_line_error(invoke("eval", "copy-detection", "--images", images, "--whiten-on", tmp_path / "nowhere"))
    assert line.startswith("Error: --whiten-on: ") and "nowhere" in line, line


# --- index re-runs on its own model -------------------------------------------------------------------------------


def test_rerunning_index_without_model_uses_the_index_model(
    artifacts: dict[str, Path], images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = tmp_path / "idx"
    assert invoke("index", "--images", images, "--model", artifacts["teacher"], "--out", index,
                  "--workers", "0").exit_code == 0  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "export").mkdir()  # a newer, unrelated artifact: the newest in export/
    for suffix in ("", ".json"):
        shutil.copy(f"{artifacts['student']}{suffix}", tmp_path / "export" / f"student.onnx{suffix}")
    new_image = tmp_path / "more"
    shutil.copytree(images, new_image)
    photo(64, 48).save(new_image / "class_0" / "new.png")
    result = invoke("index", "--images", new_image, "--out", index, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert f"model: {artifacts['teacher'].resolve()} (the model of the index {index})" in result.output
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["model"]["sha256"] == file_sha256(artifacts["teacher"])
    assert manifest["index"]["num_vectors"] == 25  # 12 images of the first run, 13 of the second folder
    # Another --model is still checked against the index's weights.
    line = one_line_error(invoke("index", "--images", images, "--out", index, "--model", "export/student.onnx"))
    assert "different model" in line


# --- --json PATH|- and --threads ----------------------------------------------------------------------------------


def test_json_dash_prints_the_json_alone_on_standard_output(
    artifacts: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    index = tmp_path / "idx"
    model = artifacts["teacher"]
    assert invoke("index", "--images", images, "--model", model, "--out", index, "--workers", "0").exit_code == 0
    query = next(images.rglob("*.jpg"))
    found = invoke("search", "--index", index, "--query", query, "-k", "3", "--json", "-", "--workers", "0")
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)["results"][0]["neighbours"][0]["path"] == str(query.resolve())
    assert "image size" in found.stderr
    written = tmp_path / "search.json"
    assert invoke("search", "--index", index, "--query", query, "--json", written, "--workers", "0").exit_code == 0
    assert json.loads(written.read_text())["results"][0]["query"] == str(query.resolve())

    knn = invoke("eval", "knn", "--model", model, "--train", images, "--test", images, "-k", "3", "--json", "-",
                 "--workers", "0")  # fmt: skip
    assert knn.exit_code == 0, knn.output
    assert json.loads(knn.stdout)["eval"] == "knn" and "top-1" in knn.stderr
    dedup = invoke("dedup", "--index", index, "--threshold", "0.9999", "--json", "-")
    assert dedup.exit_code == 0 and json.loads(dedup.stdout)["images"] == 12
    bench = invoke("bench", "--model", model, "--batch", "2", "--warmup", "0", "--iterations", "1",
                   "--runtimes", "onnxruntime:CPU", "--json", "-")  # fmt: skip
    assert bench.exit_code == 0, bench.output
    assert [row["runtime"] for row in json.loads(bench.stdout)["results"]] == ["onnxruntime:CPU"]
    assert "img/s" in bench.stderr


def test_threads_sets_the_intra_op_threads(
    artifacts: dict[str, Path], images: Path, tmp_path: Path, threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the user's own setting would win (see devices.set_threads)
    torch.set_num_threads(2)
    args = ["--train", images, "--test", images, "-k", "3", "--workers", "0"]
    assert invoke("eval", "knn", "--model", artifacts["teacher"], *args, "--threads", "1").exit_code == 0
    assert torch.get_num_threads() == 1
    # Without --threads, the cores left after one per DataLoader worker (none here): all of them.
    assert invoke("eval", "knn", "--model", artifacts["teacher"], *args).exit_code == 0
    assert torch.get_num_threads() == available_cores()
    result = invoke("bench", "--model", artifacts["teacher"], "--batch", "1", "--warmup", "0", "--iterations", "1",
                    "--runtimes", "onnxruntime:CPU", "--threads", "1")  # fmt: skip
    assert result.exit_code == 0 and "1 threads" in result.output, result.output
