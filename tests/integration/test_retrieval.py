"""`dino-scale index / search / dedup / eval` end to end: a briefly trained tiny ViT exported to ONNX, images from
the sample shards written out as files."""

import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from support import SAMPLE_TRAIN, SAMPLE_VAL, SIZE, brief_run, export_vit

from dino_scale.cli import main as cli
from dino_scale.data.augment import eval_crop
from dino_scale.data.copies import mild_copy
from dino_scale.eval.copy_detection import copy_detection_metrics, micro_average_precision, ranks_of_originals
from dino_scale.io import file_sha256
from dino_scale.retrieval import index as retrieval

N_IMAGES = 48


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ViT trained 4 steps, exported twice (teacher with cls+gem, student with cls), and image files."""
    root = tmp_path_factory.mktemp("retrieval")
    run = brief_run(root, "tiny-test.json")
    onnx_path, student_path = root / "export" / "tiny.onnx", root / "other" / "student.onnx"
    assert export_vit(run, "--out", str(onnx_path), "--outputs", "cls,patch_gem").exit_code == 0
    assert export_vit(run, "--out", str(student_path), "--which", "student").exit_code == 0
    images = root / "images"
    images.mkdir()
    with tarfile.open(Path(SAMPLE_VAL) / "val-000000.tar") as tar:
        members = [m for m in tar if m.name.endswith((".jpg", ".png"))][:N_IMAGES]
        for m in members:
            (images / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    return {"root": root, "run": run, "onnx": onnx_path, "student": student_path, "images": images}


def invoke(*args: str) -> "CliRunner.Result":
    result = CliRunner().invoke(cli, list(args))
    return result


def index_cli(images: object, model: object, out: object, *extra: str) -> "CliRunner.Result":
    return invoke("index", "--images", str(images), "--model", str(model), "--out", str(out), *extra)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))


def write_mild_copy(source: Path, target: Path, seed: int) -> None:
    copy = mild_copy(Image.open(source).convert("RGB"), random.Random(seed))
    copy.save(target, quality=90)


def test_index_then_search_finds_the_original_of_a_mild_copy(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "idx"
    result = index_cli(
        str(trained["images"]), str(trained["onnx"]), str(out), "--descriptor", "cls+gem", "--workers", "1"
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["sha256"] == file_sha256(trained["onnx"])
    assert manifest["index"]["type"] == "flat" and manifest["index"]["num_vectors"] == N_IMAGES
    vectors = np.load(out / "embeddings" / manifest["shards"][0]["vectors"])
    assert vectors.dtype == np.float16 and np.allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1, atol=2e-3)
    meta = [json.loads(line) for line in (out / "embeddings" / manifest["shards"][0]["meta"]).read_text().splitlines()]
    first = image_files(trained["images"])[0]
    assert meta[0]["path"] == str(first.resolve()) and meta[0]["sha256"] == file_sha256(first)
    assert meta[0]["bytes"] == first.stat().st_size and (meta[0]["width"], meta[0]["height"]) == Image.open(first).size

    queries = tmp_path / "queries"
    queries.mkdir()
    originals = image_files(trained["images"])[::12]
    for n, original in enumerate(originals):
        write_mild_copy(original, queries / f"q{n}.jpg", seed=n)
    result = invoke("search", "--index", str(out), "--query", str(queries), "-k", "5", "--json", "-", "--workers", "0")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert [r["query"] for r in found["results"]] == [str((queries / f"q{n}.jpg").resolve()) for n in range(4)]
    for result_row, original in zip(found["results"], originals, strict=True):
        hits = result_row["neighbours"]
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert hits[0]["path"] == str(original.resolve()), hits[:2]
        assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:], strict=False))
    # The text form prints the same ranking.
    text = invoke("search", "--index", str(out), "--query", str(queries / "q0.jpg"), "-k", "2", "--workers", "0")
    lines = text.output.splitlines()
    assert text.exit_code == 0 and lines[0] == f"image size {SIZE} (the size tiny.onnx was exported at: its sidecar)"
    assert lines[1].startswith("query ") and str(originals[0].resolve()) in lines[2]


def _index(images: Path, model: Path, out: Path, **kwargs: object) -> dict:
    options = retrieval.IndexOptions(
        images=str(images), model=str(model), out=str(out), workers=0, progress=False, **kwargs
    )
    return retrieval.run_index(options, echo=lambda _: None)


@pytest.mark.faults
def test_interrupted_index_run_resumes_to_the_uninterrupted_result(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _index(trained["images"], trained["onnx"], whole, batch_size=5, shard_size=10)

    real_embed = retrieval.embed

    def interrupted(*args: object, **kwargs: object):  # noqa: ANN202
        for number, batch in enumerate(real_embed(*args, **kwargs)):
            if number == 5:  # 25 images embedded: 2 shards of 10 committed, 5 rows in flight
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(retrieval, "embed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _index(trained["images"], trained["onnx"], resumed, batch_size=5, shard_size=10)
    state = json.loads((resumed / "manifest.json").read_text())
    assert [s["rows"] for s in state["shards"]] == [10, 10] and state["index"] is None
    assert not [p for p in resumed.rglob("*") if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="did not finish"):
        retrieval.open_index(resumed)

    monkeypatch.setattr(retrieval, "embed", real_embed)
    summary = _index(trained["images"], trained["onnx"], resumed, batch_size=5, shard_size=10)
    assert summary["embedded"] == N_IMAGES - 20
    a, b = json.loads((whole / "manifest.json").read_text()), json.loads((resumed / "manifest.json").read_text())
    assert a["shards"] == b["shards"] and [s["rows"] for s in a["shards"]] == [10, 10, 10, 10, 8]
    for shard in a["shards"]:
        assert np.array_equal(
            np.load(whole / "embeddings" / shard["vectors"]), np.load(resumed / "embeddings" / shard["vectors"])
        )
        assert (whole / "embeddings" / shard["meta"]).read_text() == (
            resumed / "embeddings" / shard["meta"]
        ).read_text()
    assert a["index"] == b["index"]
    assert (whole / "index.faiss").read_bytes() == (resumed / "index.faiss").read_bytes()
    # Nothing new: a third run embeds nothing and keeps the index.
    assert _index(trained["images"], trained["onnx"], resumed, batch_size=5, shard_size=10)["embedded"] == 0


def test_adding_and_changing_images_embeds_only_those(trained: dict[str, Path], tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(trained["images"], images)
    extra = image_files(images)[-6:]
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    for path in extra:
        shutil.move(path, held_out / path.name)
    out = tmp_path / "idx"
    assert _index(images, trained["onnx"], out)["embedded"] == N_IMAGES - 6
    for path in held_out.iterdir():
        shutil.move(path, images / path.name)
    summary = _index(images, trained["onnx"], out)
    assert summary["embedded"] == 6 and summary["vectors"] == N_IMAGES
    # A changed file is embedded again; its new row replaces the old one in the faiss index.
    changed = image_files(images)[0]
    Image.open(image_files(images)[1]).save(changed)
    summary = _index(images, trained["onnx"], out)
    assert summary["embedded"] == 1 and summary["vectors"] == N_IMAGES
    opened = retrieval.open_index(out)
    rows = [opened.meta(i) for i in range(opened.index.ntotal)]
    assert [r["key"] for r in rows].count(str(changed.resolve())) == 1
    assert rows[-1]["sha256"] == file_sha256(changed)


def test_another_model_is_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "idx"
    _index(trained["images"], trained["onnx"], out)
    result = index_cli(trained["images"], trained["student"], out)
    assert result.exit_code != 0 and "different model" in result.output and "sha256" in result.output
    query = image_files(trained["images"])[0]
    result = invoke("search", "--index", str(out), "--query", str(query), "--model", str(trained["student"]))
    assert result.exit_code != 0 and "different model" in result.output
    result = index_cli(str(trained["images"]), str(trained["onnx"]), str(out), "--descriptor", "cls+gem")
    assert result.exit_code != 0 and "'cls' descriptors" in result.output


def test_awkward_images_are_indexed_and_unreadable_ones_skipped_and_reported(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good = image_files(trained["images"])[:4]
    for path in good:
        shutil.copy(path, images / path.name)
    photo = Image.open(good[0]).convert("RGB")
    photo.convert("CMYK").save(images / "cmyk.jpg")
    sixteen = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(images / "grey16.png")  # mode I;16
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(images / "alpha.png")
    photo.resize((4000, 3000)).save(images / "large.jpg", quality=80)
    (images / "empty.jpg").write_bytes(b"")
    (images / "garbage.png").write_bytes(b"this is not an image at all")
    (images / "truncated.jpg").write_bytes(good[0].read_bytes()[: good[0].stat().st_size // 2])
    (images / "notes.txt").write_text("ignored: not an image file name")
    out = tmp_path / "idx"
    result = index_cli(images, trained["onnx"], out, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "skipped 3 unreadable" in result.output and "1 non-image file(s) ignored" in result.output
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(Path(s["key"]).name for s in skipped) == ["empty.jpg", "garbage.png", "truncated.jpg"]
    assert all(s["reason"] for s in skipped)
    opened = retrieval.open_index(out)
    indexed = {Path(opened.meta(i)["key"]).name: opened.meta(i) for i in range(opened.index.ntotal)}
    assert set(indexed) == {p.name for p in good} | {"cmyk.jpg", "grey16.png", "alpha.png", "large.jpg"}
    assert (indexed["large.jpg"]["width"], indexed["large.jpg"]["height"]) == (4000, 3000)
    # The same picture in another encoding lands next to its source.
    vectors = opened.vectors()
    names = [Path(opened.meta(i)["key"]).name for i in range(len(vectors))]
    nearest = names[int(np.argsort(-(vectors @ vectors[names.index("large.jpg")]))[1])]
    assert nearest in {good[0].name, "cmyk.jpg", "alpha.png"}, nearest


def test_dedup_groups_exact_and_near_copies(trained: dict[str, Path], tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(trained["images"], images)
    originals = image_files(images)[:3]
    for n, original in enumerate(originals):
        shutil.copy(original, images / f"zz_exact_{n}{original.suffix}")
        write_mild_copy(original, images / f"zz_near_{n}.jpg", seed=100 + n)
    out = tmp_path / "idx"
    _index(images, trained["onnx"], out, descriptor="cls+gem")
    result = invoke("dedup", "--index", str(out), "--threshold", "0.999", "--json", str(tmp_path / "exact.json"))
    assert result.exit_code == 0, result.output
    exact = json.loads((tmp_path / "exact.json").read_text())
    assert {frozenset(Path(m).name for m in g["members"]) for g in exact["groups"]} >= {
        frozenset({o.name, f"zz_exact_{n}{o.suffix}"}) for n, o in enumerate(originals)
    }
    # A near copy's similarity to its original, against the closest pair of two distinct sample images.
    opened = retrieval.open_index(out)
    vectors = opened.vectors()
    keys = [Path(opened.meta(i)["key"]).name for i in range(len(vectors))]
    similarity = vectors @ vectors.T
    near = min(similarity[keys.index(o.name), keys.index(f"zz_near_{n}.jpg")] for n, o in enumerate(originals))
    threshold = float(near) - 1e-4
    found = retrieval.find_duplicates(out, threshold)
    groups = [sorted(Path(m).name for m in g["members"]) for g in found["groups"]]
    for n, original in enumerate(originals):
        group = next(g for g in groups if original.name in g)
        assert {f"zz_exact_{n}{original.suffix}", f"zz_near_{n}.jpg"} <= set(group), groups
    # Every grouped pair really is above the threshold, and images in different groups are not.
    for g in found["groups"]:
        assert all(score >= threshold for _, _, score in g["pairs"])
    assert invoke("dedup", "--index", str(out), "--threshold", "2").exit_code != 0


def test_short_form_uses_the_newest_export(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "export").mkdir()
    for suffix in ("", ".json"):
        shutil.copy(str(trained["onnx"]) + suffix, tmp_path / "export" / f"tiny.onnx{suffix}")
    result = invoke("index", "--images", str(trained["images"]), "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "model: export/tiny.onnx (newest in export/)" in result.output and "index: index/tiny" in result.output
    assert json.loads((tmp_path / "index/tiny/manifest.json").read_text())["index"]["num_vectors"] == N_IMAGES


def test_whitening_is_learned_recorded_and_applied(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "idx"
    whiten = ("--whiten-on", SAMPLE_TRAIN, "--whiten-dim", "32", "--workers", "0")
    result = index_cli(trained["images"], trained["onnx"], out, *whiten)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["whitening"]["images"] == 768 and manifest["whitening"]["out_dim"] == manifest["dim"] == 32
    query = tmp_path / "q.jpg"
    original = image_files(trained["images"])[5]
    write_mild_copy(original, query, seed=7)
    found = json.loads(
        invoke("search", "--index", str(out), "--query", str(query), "--json", "-", "--workers", "0").stdout
    )
    assert found["results"][0]["neighbours"][0]["path"] == str(original.resolve())
    refused = index_cli(str(trained["images"]), str(trained["onnx"]), str(out), "--whiten-on", SAMPLE_VAL)
    assert refused.exit_code != 0 and "whitening" in refused.output


def _onnx_cls(path: Path, shard_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """cls features and labels of every sample, decoded with PIL here and run through onnxruntime directly."""
    crop = eval_crop(SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images, labels = [], []
    for tar_path in sorted(Path(shard_dir).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar}
            for name, member in members.items():
                if name.endswith(".cls"):
                    stem = name[: -len(".cls")]
                    image_name = next(n for n in members if n.startswith(stem + ".") and not n.endswith(".cls"))
                    image = Image.open(io.BytesIO(tar.extractfile(members[image_name]).read())).convert("RGB")
                    images.append(crop(image))
                    labels.append(int(tar.extractfile(member).read()))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = ((torch.stack(images).float() / 255 - mean) / std).numpy()
    cls = np.concatenate([session.run(["cls"], {"images": x[i : i + 64]})[0] for i in range(0, len(x), 64)])
    return cls / np.linalg.norm(cls, axis=1, keepdims=True), np.array(labels)


def test_knn_eval_agrees_with_brute_force(trained: dict[str, Path], tmp_path: Path) -> None:
    report_path = tmp_path / "knn.json"
    result = invoke(
        "eval",
        "knn",
        "--model",
        str(trained["student"]),
        "--train",
        SAMPLE_TRAIN,
        "--test",
        SAMPLE_VAL,
        "-k",
        "10,20,100,200",
        "--json",
        str(report_path),
        "--workers",
        "1",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    train_x, train_y = _onnx_cls(trained["student"], SAMPLE_TRAIN)
    test_x, test_y = _onnx_cls(trained["student"], SAMPLE_VAL)
    assert report["train"]["images"] == len(train_y) == 768 and report["test"]["images"] == len(test_y) == 240
    similarity = test_x @ train_x.T
    for k in (10, 20, 100, 200):
        top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        votes = np.zeros((len(test_y), 6))
        for row in range(len(test_y)):
            for column in top[row]:
                votes[row, train_y[column]] += np.exp(similarity[row, column] / 0.07)
        ranked = np.argsort(-votes, axis=1)
        top1 = 100 * np.mean(ranked[:, 0] == test_y)
        top5 = 100 * np.mean((ranked[:, :5] == test_y[:, None]).any(axis=1))
        got = report["results"][str(k)]
        # Classes without a vote tie at 0, and the two sorts may order them differently: top-5 may differ by one.
        assert abs(got["top1"] - top1) < 1e-4 and abs(got["top5"] - top5) <= 100 / 240 + 1e-4, (k, got, top1, top5)


def test_copy_detection_metrics_on_a_hand_made_case() -> None:
    # 3 queries x 4 database images; originals 0, 2, 3.
    similarity = np.array([[0.9, 0.1, 0.2, 0.3], [0.5, 0.8, 0.7, 0.1], [0.2, 0.6, 0.1, 0.4]])
    positives = np.array([0, 2, 3])
    assert ranks_of_originals(similarity, positives).tolist() == [1, 2, 2]
    metrics = copy_detection_metrics(similarity, positives)
    assert metrics["mAP"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    # Pooled ranking: 0.9 (match), 0.8, 0.7 (match), 0.6, 0.5, 0.4 (match), ... -> (1 + 2/3 + 3/6) / 3.
    assert metrics["micro_AP"] == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    assert micro_average_precision(np.array([0.3, 0.2]), np.array([False, False]), 0) == 0.0


def test_copy_detection_eval_reports_consistent_numbers(trained: dict[str, Path], tmp_path: Path) -> None:
    report_path = tmp_path / "cd.json"
    result = invoke(
        "eval",
        "copy-detection",
        "--model",
        str(trained["onnx"]),
        "--images",
        str(trained["images"]),
        "--queries",
        "12",
        "--json",
        str(report_path),
        "--workers",
        "1",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    ranks = np.array([q["rank"] for q in report["per_query"]])
    assert report["queries"] == len(ranks) == 12 and report["database"]["images"] == N_IMAGES
    assert report["results"]["mAP"] == pytest.approx(float(np.mean(1 / ranks)))
    assert 0 < report["results"]["micro_AP"] <= 1 and all(q["edits"] for q in report["per_query"])
    assert len({q["original"] for q in report["per_query"]}) == 12
    # Chance level is about (1/N) * H_N ~ 0.09 for 48 images: features must beat it.
    assert report["results"]["mAP"] > 0.2, report["results"]


def test_linear_eval_on_an_exported_model_uses_its_source_weights(trained: dict[str, Path], tmp_path: Path) -> None:
    report_path = tmp_path / "linear.json"
    result = invoke(
        "eval",
        "linear",
        "--model",
        str(trained["onnx"]),
        "--train",
        SAMPLE_TRAIN,
        "--test",
        SAMPLE_VAL,
        "--n-last-blocks",
        "2",
        "--avgpool-patchtokens",
        "--epochs",
        "20",
        "--json",
        str(report_path),
        "--workers",
        "1",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    source = json.loads(Path(str(trained["onnx"]) + ".json").read_text())["source"]["path"]
    assert report["model"]["image_size"] == SIZE and report["model"]["weights"] == source
    assert report["results"]["feature_dim"] == 3 * 48 and report["results"]["num_classes"] == 6
    assert report["train"]["images"] == 768 and report["test"]["images"] == 240
    # Six balanced classes: chance is 16.7 %; even briefly trained features separate the sample's places.
    assert report["results"]["top1"] > 40, report["results"]
    assert (
        invoke(
            "eval",
            "linear",
            "--model",
            str(trained["run"]),
            "--train",
            SAMPLE_TRAIN,
            "--test",
            SAMPLE_VAL,
            "--n-last-blocks",
            "3",
        ).exit_code
        != 0
    )  # the tiny ViT has 2 blocks


def test_index_type_override_sticks_and_hnsw_search_agrees_with_exact(trained: dict[str, Path], tmp_path: Path) -> None:
    exact, approximate = tmp_path / "exact", tmp_path / "hnsw"
    _index(trained["images"], trained["onnx"], exact)
    _index(trained["images"], trained["onnx"], approximate, index_type="hnsw")
    _index(trained["images"], trained["onnx"], approximate)  # no --index-type: the index keeps its own
    manifest = json.loads((approximate / "manifest.json").read_text())
    assert manifest["index_type"] == "hnsw" and manifest["index"]["type"] == "hnsw"
    query = image_files(trained["images"])[3]
    hits = [
        [h["path"] for h in retrieval.search_images(folder, query, k=5, workers=0)["results"][0]["neighbours"]]
        for folder in (exact, approximate)
    ]
    assert hits[0] == hits[1] and hits[0][0] == str(query.resolve())
