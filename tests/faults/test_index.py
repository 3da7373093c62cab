"""Faults against `dino-scale index` / `search` / `dedup` index folders, through the command line.

One small index folder (20 tiny images, a tiny untrained ViT, shards of 6 rows) is built once; every case copies it,
damages one thing, then checks that `search` and `dedup` stop with one "Error:" line naming the file (and the
manifest key), and that re-running `index` repairs what it cannot read (a warning naming the file), re-embeds only
what it had to, and ends with the same index content. A full disk (ENOSPC injected at every kind of write) ends
in one line naming the path and leaves the folder searchable and resumable; SIGKILL at every write resumes to
exactly the uninterrupted index.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from support import ARCH, REPO, TINY, gradient_photo, set_key

from dino_scale import io as dio
from dino_scale.cli import main as cli
from dino_scale.io import save_safetensors
from dino_scale.models.backbones import create_backbone
from dino_scale.retrieval import index as retrieval
from dino_scale.retrieval import vector_index

N_IMAGES = 20
BUILD = ("--image-size", "32", "--shard-size", "6", "--batch-size", "3", "--workers", "0")  # shards of whole batches


@dataclass
class Base:
    root: Path
    model: Path
    images: Path
    plain: Path  # index of `images` (shards 6, 6, 6, 2)
    whitened: Path  # the same with --whiten-on images --whiten-dim 8
    grow: Path  # 14 images when `small` was indexed, 20 now
    small: Path
    hits: list[str]  # search hits of the query in `plain`
    marker: Path  # created by unpickling any of the pickles planted here: must never exist


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def index(base: Base, out: Path, *extra: object, images: Path | None = None) -> Result:
    return invoke("index", "--images", images or base.images, "--model", base.model, "--out", out, *BUILD, *extra)


def search(base: Base, folder: Path) -> Result:
    return invoke(
        "search", "--index", folder, "--query", base.images / "03.png", "-k", "5", "--json", "-", "--workers", "0"
    )


def dedup(folder: Path) -> Result:
    return invoke("dedup", "--index", folder, "--threshold", "0.999")


def hits(result: Result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [hit["key"] for hit in json.loads(result.stdout)["results"][0]["neighbours"]]


def one_line_error(result: Result, *needles: str) -> str:
    """The command failed with exit status 1 and one "Error: ..." line, the last, holding every needle."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a ClickException, not a traceback
    lines = result.output.strip().splitlines()
    assert [line for line in lines if line.startswith("Error:")] == [lines[-1]], result.output
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def embedded(result: Result) -> int:
    """How many images an index run embedded (its "N to embed" line)."""
    assert result.exit_code == 0, result.output
    return int(re.search(r"(\d+) to embed", result.output).group(1))


def content(folder: Path) -> dict[str, np.ndarray]:
    """key -> vector of every row the faiss index holds (opened like search opens it)."""
    opened = retrieval.open_index(folder)
    vectors = opened.vectors()
    assert opened.index.ntotal == len(vectors)
    return {opened.meta(i)["key"]: vectors[i] for i in range(len(vectors))}


def same_content(a: Path, b: Path) -> None:
    found, expected = content(a), content(b)
    assert sorted(found) == sorted(expected)
    for key, vector in expected.items():  # re-embedded in other batches: equal up to float16 rounding
        np.testing.assert_allclose(found[key], vector, atol=2e-3)


def same_files(a: Path, b: Path) -> None:
    """Byte-identical index folders (shards, faiss index, rows), as an uninterrupted run writes them."""
    ma, mb = (json.loads((folder / "manifest.json").read_text()) for folder in (a, b))
    assert ma["shards"] == mb["shards"] and ma["index"] == mb["index"] and ma["dim"] == mb["dim"]
    names = [s[part] for s in ma["shards"] for part in ("vectors", "meta")]
    for name in names:
        assert (a / "embeddings" / name).read_bytes() == (b / "embeddings" / name).read_bytes(), name
    for name in ("index.faiss", "index_rows.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def debris(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


class Planted:
    """Unpickling this creates the marker file: the proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def pickled_npy(marker: Path) -> bytes:
    path = marker.with_name("pickled.npy")
    np.save(path, np.array([Planted(marker)], dtype=object), allow_pickle=True)
    return path.read_bytes()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    root = tmp_path_factory.mktemp("index_faults")
    torch.manual_seed(0)
    model = root / "tiny.safetensors"
    kwargs = {k: v for k, v in TINY.items() if k != "img_size"}
    save_safetensors(
        create_backbone(ARCH, **TINY).state_dict(), model, {"arch": ARCH, "timm_kwargs": json.dumps(kwargs)}
    )
    images, grow = root / "images", root / "grow"
    images.mkdir()
    grow.mkdir()
    for n in range(N_IMAGES):
        gradient_photo(40, 30, seed=n).save(images / f"{n:02d}.png")
    for n in range(14):
        shutil.copy2(images / f"{n:02d}.png", grow)
    base = Base(root, model, images, root / "plain", root / "whitened", grow, root / "small", [], root / "unpickled")
    assert embedded(index(base, base.plain)) == N_IMAGES
    assert embedded(index(base, base.whitened, "--whiten-on", images, "--whiten-dim", "8")) == N_IMAGES
    assert embedded(index(base, base.small, images=grow)) == 14
    for n in range(14, N_IMAGES):
        shutil.copy2(images / f"{n:02d}.png", grow)
    base.hits = hits(search(base, base.plain))
    assert base.hits[0] == str((images / "03.png").resolve())
    return base


@pytest.fixture
def copy(base: Base, tmp_path: Path) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        return Path(shutil.copytree(folder, tmp_path / folder.name))

    return make


# ----------------------------------------------------------------------------------------------------------
# Tampered manifests
# ----------------------------------------------------------------------------------------------------------


def edit(change: Callable[[dict[str, Any]], None]) -> Callable[[str], str]:
    def mutate(text: str) -> str:
        manifest = json.loads(text)
        change(manifest)
        return json.dumps(manifest, indent=2)

    return mutate


def setting(*path: object, value: Any = None, delete: bool = False) -> Callable[[str], str]:
    return edit(lambda manifest: set_key(manifest, path, value, delete))


# (case, tamper, what the one-line error holds besides manifest.json, images the repairing index run embeds)
WHOLE = N_IMAGES  # the manifest says nothing trustworthy about the vectors: everything is embedded again
MANIFEST_CASES: list[tuple[str, Callable[[str], str | bytes | None], str, int]] = [
    ("deleted", lambda text: None, "has no manifest.json", WHOLE),
    ("top-level list", lambda text: f"[{text}]", "must hold a JSON object", WHOLE),
    ("top-level number", lambda text: "7", "must hold a JSON object", WHOLE),
    ("deep nesting", lambda text: "[" * 100_000 + "]" * 100_000, "nested too deeply", WHOLE),
    ("truncated", lambda text: text[: len(text) // 2], "is not valid JSON", WHOLE),
    ("empty file", lambda text: "", "is not valid JSON", WHOLE),
    ("not UTF-8", lambda text: b"\xff\xfe" + text.encode(), "is not valid JSON", WHOLE),
    ("version missing", setting("manifest_version", delete=True), "manifest_version is missing", WHOLE),
    ("version as a string", setting("manifest_version", value="1"), "manifest_version must be", WHOLE),
    ("version true", setting("manifest_version", value=True), "manifest_version must be", WHOLE),
    ("model missing", setting("model", delete=True), "model is missing", WHOLE),
    ("model {}", setting("model", value={}), "model.path is missing", WHOLE),
    ("model a list", setting("model", value=["x"]), "model must be an object", WHOLE),
    ("model.sha256 null", setting("model", "sha256", value=None), "model.sha256 must be a non-empty string", WHOLE),
    ("model.path a number", setting("model", "path", value=3), "model.path must be", WHOLE),
    ("image_size as a string", setting("model", "image_size", value="32"), "model.image_size must be", WHOLE),
    ("image_size negative", setting("model", "image_size", value=-32), "model.image_size must be", WHOLE),
    ("image_size huge", setting("model", "image_size", value=10**12), "model.image_size must be", WHOLE),
    ("image_size a float", setting("model", "image_size", value=32.0), "model.image_size must be", WHOLE),
    ("model.which unknown", setting("model", "which", value="nobody"), "model.which must be one of", WHOLE),
    ("descriptor unknown", setting("descriptor", value="gem"), "descriptor must be one of", WHOLE),
    ("descriptor null", setting("descriptor", value=None), "descriptor must be", WHOLE),
    ("dim missing", setting("dim", delete=True), "dim is missing", WHOLE),
    ("dim as a string", setting("dim", value="48"), "dim must be an integer", WHOLE),
    ("dim huge", setting("dim", value=10**9), "dim must be an integer", WHOLE),
    ("dim null with shards", setting("dim", value=None), "dim is null", WHOLE),
    ("whitening a number", setting("whitening", value=1), "whitening must be an object", WHOLE),
    ("shards missing", setting("shards", delete=True), "shards is missing", WHOLE),
    ("shards as a string", setting("shards", value="emb-000000.npy"), "shards must be a list", WHOLE),
    ("shards an object", setting("shards", value={"0": 1}), "shards must be a list", WHOLE),
    ("shard entry a string", setting("shards", 0, value="x"), "shards[0] must be an object", 6),
    ("shard rows missing", setting("shards", 1, "rows", delete=True), "shards[1].rows is missing", 6),
    ("shard rows negative", setting("shards", 1, "rows", value=-6), "shards[1].rows must be", 6),
    ("shard rows huge", setting("shards", 1, "rows", value=10**15), "shards[1].rows must be", 6),
    ("shard rows as a string", setting("shards", 1, "rows", value="6"), "shards[1].rows must be", 6),
    ("shard rows wrong", setting("shards", 1, "rows", value=7), "emb-000001.jsonl has 6 rows", 6),
    ("shard outside the folder", setting("shards", 1, "vectors", value="../../x.npy"), "shards[1].vectors", 6),
    ("shard absolute path", setting("shards", 1, "meta", value="/etc/passwd"), "shards[1].meta must name", 6),
    ("shard names mismatched", setting("shards", 1, "meta", value="emb-000002.jsonl"), "shards[1].meta", 6),
    (
        "shard files missing",
        edit(lambda m: m["shards"][3].update(vectors="emb-000009.npy", meta="emb-000009.jsonl")),
        "emb-000009.jsonl is missing",
        2,
    ),
    ("shard listed twice", edit(lambda m: m["shards"].__setitem__(2, m["shards"][1])), "listed twice", 6),
    ("shard sha256 not hex", setting("shards", 1, "meta_sha256", value="nothex"), "shards[1].meta_sha256", 6),
    ("shard sha256 wrong", setting("shards", 1, "meta_sha256", value="0" * 64), "emb-000001.jsonl does not match", 6),
    ("index missing", setting("index", delete=True), "index is missing", 0),
    ("index a string", setting("index", value="index.faiss"), "index must be an object", 0),
    ("index.file outside", setting("index", "file", value="/etc/passwd"), "index.file must be one of", 0),
    ("index.num_vectors a string", setting("index", "num_vectors", value="20"), "index.num_vectors must be", 0),
    ("index.num_vectors negative", setting("index", "num_vectors", value=-1), "index.num_vectors must be", 0),
    ("index.num_vectors > rows", setting("index", "num_vectors", value=10**6), "the shards hold 20 rows", 0),
    ("index.num_vectors wrong", setting("index", "num_vectors", value=19), "index.faiss holds 20 vectors", 0),
    ("index.type unknown", setting("index", "type", value="lsh"), "index.type must be one of", 0),
    ("index.sha256 wrong", setting("index", "sha256", value="f" * 64), "index.faiss does not match", 0),
    ("index_type a number", setting("index_type", value=7), "index_type must be", 0),
    ("created an object", setting("created", value={"a": 1}), "created must be", 0),
]

# Where the index run meets the damage elsewhere than a query does.
WARNED = {
    "deleted": "manifest.json is missing",
    "index.num_vectors wrong": "index_rows.npy holds int64 [20, 2], expected int64 [19, 2]",
}


@pytest.mark.parametrize(
    ("case", "tamper", "needle", "re_embedded"), MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES]
)
def test_tampered_manifest_is_one_line_for_queries_and_repaired_by_index(
    base: Base,
    copy: Callable[[Path], Path],
    case: str,
    tamper: Callable[[str], str | bytes | None],
    needle: str,
    re_embedded: int,
) -> None:
    folder = copy(base.plain)
    manifest = folder / "manifest.json"
    damaged = tamper(manifest.read_text())
    if damaged is None:
        manifest.unlink()
    else:
        manifest.write_bytes(damaged.encode() if isinstance(damaged, str) else damaged)
    # Damage the manifest's checks catch names manifest.json; what only the files show names the file.
    file_named = "" if re.search(r"\.(jsonl|npy|faiss) ", needle) else "manifest.json"
    one_line_error(search(base, folder), file_named, needle)
    one_line_error(dedup(folder), needle)

    repaired = index(base, folder)
    assert embedded(repaired) == re_embedded, repaired.output
    warnings = [line for line in repaired.output.splitlines() if line.startswith("warning:")]
    warned = WARNED.get(case, needle)
    assert warnings and any(warned in line for line in warnings), repaired.output
    same_content(folder, base.plain)
    assert hits(search(base, folder)) == base.hits
    assert not debris(folder)


def test_manifest_of_a_newer_version_is_refused_not_rebuilt(base: Base, copy: Callable[[Path], Path]) -> None:
    folder = copy(base.plain)
    manifest = folder / "manifest.json"
    manifest.write_text(setting("manifest_version", value=2)(manifest.read_text()))
    before = manifest.read_bytes()
    for result in (search(base, folder), dedup(folder), index(base, folder)):
        one_line_error(result, "manifest.json", "manifest_version 2", "newer dino-scale")
    assert manifest.read_bytes() == before


def test_a_folder_that_is_no_index_folder_is_not_overwritten(base: Base, tmp_path: Path) -> None:
    folder = tmp_path / "webapp"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    one_line_error(index(base, folder), "manifest_version is missing", "not an index folder")
    assert json.loads((folder / "manifest.json").read_text()) == {"name": "my web app", "icons": []}


# ----------------------------------------------------------------------------------------------------------
# Damaged derived files: shards, index.faiss, index_rows.npy, whitening
# ----------------------------------------------------------------------------------------------------------


def write(path: Path, data: bytes | Callable[[bytes], bytes]) -> None:
    path.write_bytes(data(path.read_bytes()) if callable(data) else data)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def float32_npy(data: bytes) -> bytes:
    return npy_bytes(np.zeros((6, 48), np.float32))


def random_index_bytes(data: bytes) -> bytes:
    """Another valid flat index of the same size and dimension (other vectors)."""
    other = vector_index.build_index(np.random.default_rng(1).standard_normal((20, 48)).astype(np.float32), "flat")
    return faiss.serialize_index(other).tobytes()


def out_of_range_rows(folder: Path) -> None:
    """index_rows.npy naming a row no shard holds, its sha256 recorded so that only the bounds check can catch it."""
    rows = np.load(folder / "index_rows.npy")
    rows[3] = (0, 99)
    np.save(folder / "index_rows.npy", rows)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["index"]["rows_sha256"] = dio.file_sha256(folder / "index_rows.npy")
    (folder / "manifest.json").write_text(json.dumps(manifest))


# (case, file, damage, needle of the one-line error, images re-embedded by the repairing index run)
FILE_CASES: list[tuple[str, str, Any, str, int]] = [
    ("vectors garbage", "embeddings/emb-000001.npy", b"garbage" * 20, "emb-000001.npy", 6),
    ("vectors truncated", "embeddings/emb-000001.npy", lambda d: d[: len(d) // 2], "emb-000001.npy", 6),
    ("vectors empty", "embeddings/emb-000001.npy", b"", "emb-000001.npy", 6),
    ("vectors float32", "embeddings/emb-000001.npy", float32_npy, "float32", 6),
    ("vectors pickled", "embeddings/emb-000001.npy", "pickle", "emb-000001.npy", 6),
    ("vectors a folder", "embeddings/emb-000002.npy", "folder", "emb-000002.npy is not a file", 6),
    ("rows file garbage", "embeddings/emb-000001.jsonl", b"\xff\xfe garbage\n" * 6, "emb-000001.jsonl", 6),
    ("rows file extra line", "embeddings/emb-000001.jsonl", lambda d: d + b"{}\n", "emb-000001.jsonl", 6),
    ("rows file missing", "embeddings/emb-000003.jsonl", None, "emb-000003.jsonl is missing", 2),
    ("index.faiss garbage", "index.faiss", b"garbage" * 100, "index.faiss", 0),
    ("index.faiss truncated", "index.faiss", lambda d: d[: len(d) // 2], "index.faiss", 0),
    ("index.faiss empty", "index.faiss", b"", "index.faiss", 0),
    ("index.faiss other vectors", "index.faiss", random_index_bytes, "index.faiss does not match the sha256", 0),
    ("index.faiss missing", "index.faiss", None, "index.faiss is missing", 0),
    ("index.faiss pickled", "index.faiss", "pickle", "index.faiss", 0),
    ("index_rows garbage", "index_rows.npy", b"garbage", "index_rows.npy", 0),
    ("index_rows pickled", "index_rows.npy", "pickle", "index_rows.npy", 0),
    ("index_rows out of range", "index_rows.npy", out_of_range_rows, "names rows that no committed shard", 0),
    ("skipped.jsonl garbage", "skipped.jsonl", b"\x00\xff" * 50, None, 0),
    ("index_log.jsonl garbage", "index_log.jsonl", b"\x00\xff" * 50, None, 0),
]


@pytest.mark.parametrize(
    ("case", "name", "damage", "needle", "re_embedded"), FILE_CASES, ids=[c[0] for c in FILE_CASES]
)
def test_damaged_file_is_one_line_for_queries_and_rebuilt_by_index(
    base: Base, copy: Callable[[Path], Path], case: str, name: str, damage: Any, needle: str | None, re_embedded: int
) -> None:
    folder = copy(base.plain)
    path = folder / name
    if damage is None:
        path.unlink()
    elif damage == "folder":
        path.unlink()
        path.mkdir()
    elif damage == "pickle":
        path.write_bytes(pickled_npy(base.marker))
    elif callable(damage) and damage.__name__ == "out_of_range_rows":
        damage(folder)
    else:
        write(path, damage)
    if needle is None:  # files that are only written: queries never read them
        assert hits(search(base, folder)) == base.hits
    else:
        one_line_error(search(base, folder), needle)
        one_line_error(dedup(folder), needle)
    repaired = index(base, folder)
    assert embedded(repaired) == re_embedded, repaired.output
    if needle is not None:  # the warning names the file
        assert any(line.startswith("warning:") and path.name in line for line in repaired.output.splitlines())
    same_content(folder, base.plain)
    if re_embedded == 0:
        same_files(folder, base.plain)  # the faiss index is rebuilt to the very same bytes
    assert hits(search(base, folder)) == base.hits
    assert not base.marker.exists()
    assert not debris(folder)


def transform_bytes(transform: Any) -> bytes:
    buffer: list[bytes] = []
    faiss.write_VectorTransform(transform, faiss.PyCallbackIOWriter(lambda chunk: buffer.append(chunk) or len(chunk)))
    return b"".join(buffer)


def pca_bytes(d_in: int, d_out: int, nan: bool = False) -> bytes:
    pca = faiss.PCAMatrix(d_in, d_out, -0.5, False)
    pca.train(np.random.default_rng(0).standard_normal((200, d_in)).astype(np.float32))
    if nan:
        matrix = faiss.vector_to_array(pca.A)
        matrix[5] = np.nan
        faiss.copy_array_to_vector(matrix, pca.A)
    return transform_bytes(pca)


def rotation_bytes() -> bytes:
    rotation = faiss.RandomRotationMatrix(48, 8)
    rotation.init(0)
    return transform_bytes(rotation)


# (case, new whitening.faiss (None: deleted), what a query's one-line error says once its sha256 is recorded)
WHITENING_CASES: list[tuple[str, Callable[[Base], bytes | None], str]] = [
    ("wrong dimension", lambda b: pca_bytes(48, 4), "whitens 48 -> 4 dimensions (matrix shape [4, 48])"),
    ("wrong input dimension", lambda b: pca_bytes(96, 8), "expected 48 -> 8 (shape [8, 48])"),
    ("non-finite", lambda b: pca_bytes(48, 8, nan=True), "NaN or infinite"),
    ("garbage bytes", lambda b: b"garbage" * 30, "not a readable whitening transform"),
    ("truncated", lambda b: (b.whitened / "whitening.faiss").read_bytes()[:100], "ends too early"),
    ("npy float64", lambda b: npy_bytes(np.eye(48)[:8]), "not a readable whitening transform"),
    ("npy float16", lambda b: npy_bytes(np.eye(48, dtype=np.float16)[:8]), "not a readable whitening"),
    ("pickled npy", lambda b: pickled_npy(b.marker), "not a readable whitening transform"),
    ("another transform", lambda b: rotation_bytes(), "RandomRotationMatrix, not a PCA"),
    ("missing", lambda b: None, "whitening.faiss is missing"),
]


@pytest.mark.parametrize("recorded", ["sha256 kept", "sha256 recorded"])
@pytest.mark.parametrize(("case", "replace", "needle"), WHITENING_CASES, ids=[c[0] for c in WHITENING_CASES])
def test_damaged_whitening_is_one_line_and_learned_again_by_index(
    base: Base,
    copy: Callable[[Path], Path],
    case: str,
    replace: Callable[[Base], bytes | None],
    needle: str,
    recorded: str,
) -> None:
    folder = copy(base.whitened)
    path = folder / "whitening.faiss"
    data = replace(base)
    if data is None:
        path.unlink()
    else:
        path.write_bytes(data)
    if recorded == "sha256 recorded" and data is not None:
        # As a careful tamperer would: then what catches it is the check of its content.
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["whitening"]["sha256"] = dio.file_sha256(path)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    else:
        needle = "is missing" if data is None else "does not match the sha256 recorded in manifest.json"
    one_line_error(search(base, folder), "whitening.faiss", needle)
    repaired = index(base, folder, "--whiten-on", base.images, "--whiten-dim", "8")
    warnings = [line for line in repaired.output.splitlines() if line.startswith("warning:")]
    assert any("whitening.faiss" in line and needle in line for line in warnings), repaired.output
    assert (folder / "whitening.faiss").read_bytes() == (base.whitened / "whitening.faiss").read_bytes()
    if "does not match" in needle or data is None:
        # Learned again on the same images: the very same whitening, so the committed rows stay.
        assert embedded(repaired) == 0, repaired.output
        same_files(folder, base.whitened)
    else:
        # The recorded sha256 was the tamperer's: nothing proves the rows were whitened like this; embedded again.
        assert embedded(repaired) == N_IMAGES, repaired.output
        same_content(folder, base.whitened)
    assert hits(search(base, folder)) == hits(search(base, base.whitened))
    assert not base.marker.exists()
    assert not debris(folder)


def test_whitening_that_does_not_fit_the_model_is_one_line_naming_it_and_its_shapes(
    base: Base, copy: Callable[[Path], Path]
) -> None:
    """A whitening whose file and manifest agree (96 -> 8) but not with the model (48-dim descriptors): faiss would
    stop the query on a bare AssertionError."""
    folder = copy(base.whitened)
    path = folder / "whitening.faiss"
    path.write_bytes(pca_bytes(96, 8))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["whitening"].update(sha256=dio.file_sha256(path), in_dim=96)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(search(base, folder), "whitening.faiss", "whitens 96-dimensional", "[n, 96]", "[1, 48]")


# ----------------------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------------------


class DiskFills:
    """Wraps every atomic write of the index; the `fail_at`-th one (1-based) hits ENOSPC once its bytes are in the
    temporary file (as a failing close / fsync does). Records the paths written."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int = 0) -> None:
        self.real, self.fail_at, self.paths = dio.atomic_write, fail_at, []
        for module in (dio, vector_index):
            monkeypatch.setattr(module, "atomic_write", self)

    def __call__(self, path: Path, write: Callable[[Path], None], needed: int | None = None) -> None:
        self.paths.append(Path(path))
        if len(self.paths) != self.fail_at:
            return self.real(path, write, needed)

        def fill(tmp: Path) -> None:
            write(tmp)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

        return self.real(path, fill, needed)


def kinds(paths: list[Path]) -> dict[str, list[int]]:
    """Call numbers (1-based) of each kind of file written: emb-N.npy -> emb-*.npy."""
    found: dict[str, list[int]] = {}
    for number, path in enumerate(paths, 1):
        found.setdefault(re.sub(r"\d{6}", "*", path.name), []).append(number)
    return found


def disk_full_points(paths: list[Path]) -> list[int]:
    """The first and the last write of every kind of file."""
    return sorted({number for numbers in kinds(paths).values() for number in (numbers[0], numbers[-1])})


@pytest.mark.parametrize("scenario", ["fresh", "incremental", "whitened"])
def test_full_disk_at_every_kind_of_write_is_one_line_and_resumable(
    base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str
) -> None:
    extra: tuple[object, ...] = ("--whiten-on", base.images, "--whiten-dim", "8") if scenario == "whitened" else ()
    images = base.grow if scenario == "incremental" else base.images
    start = base.small if scenario == "incremental" else None
    start_hits = hits(search(base, start)) if start else None

    def fresh(name: str) -> Path:
        folder = tmp_path / name
        if start is not None:
            shutil.copytree(start, folder)
        return folder

    with monkeypatch.context() as patch:
        recorder = DiskFills(patch)
        reference = fresh("reference")
        assert index(base, reference, *extra, images=images).exit_code == 0
    expected_kinds = {"emb-*.npy", "emb-*.jsonl", "manifest.json", "index_log.jsonl", "skipped.jsonl", "index.faiss"}
    expected_kinds |= {"index_rows.npy"} | ({"whitening.faiss"} if scenario == "whitened" else set())
    assert set(kinds(recorder.paths)) == expected_kinds
    if start is None:  # every file of the folder came through the atomic writers: none is written directly
        assert {p for p in reference.rglob("*") if p.is_file()} == set(recorder.paths)
    committed = kinds(recorder.paths)["manifest.json"][-1]
    end_hits = hits(search(base, reference))
    for point in disk_full_points(recorder.paths):
        folder = fresh(f"full-{point}")
        with monkeypatch.context() as patch:
            DiskFills(patch, fail_at=point)
            failed = index(base, folder, *extra, images=images)
        path = str(folder / recorder.paths[point - 1].relative_to(reference))
        needs = () if path.endswith("skipped.jsonl") else ("it needs about",)  # (nothing skipped: 0 bytes)
        one_line_error(failed, f"cannot write {path}", "No space left on device", "free in", *needs)
        assert not debris(folder), (point, debris(folder))
        if start is not None:  # still searchable: the previous content until the final manifest write commits
            assert hits(search(base, folder)) == (start_hits if point <= committed else end_hits), point
        resumed = index(base, folder, *extra, images=images)
        assert resumed.exit_code == 0, (point, resumed.output)
        same_files(folder, reference)
        assert not debris(folder)


# ----------------------------------------------------------------------------------------------------------
# SIGKILL
# ----------------------------------------------------------------------------------------------------------

KILLER = textwrap.dedent(
    """
    import json, os, signal, sys, traceback
    from dino_scale.retrieval import index as retrieval

    images, model, root = sys.argv[1:4]
    real_fsync = os.fsync

    def run(out, kill_at):
        # In a forked child (this process never runs the model itself): SIGKILL at the kill_at-th fsync, i.e. with
        # a temporary file written but not renamed (odd) or a file renamed but its folder not synced (even).
        pid = os.fork()
        if pid == 0:
            calls = [0]

            def fsync(fd):
                calls[0] += 1
                if calls[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                real_fsync(fd)

            os.fsync = fsync
            try:
                options = retrieval.IndexOptions(images=images, model=model, out=out, image_size=32, shard_size=6,
                                                 batch_size=3, workers=0, progress=False)
                retrieval.run_index(options, echo=lambda _: None)
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        return "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else os.WEXITSTATUS(status)

    assert run(f"{root}/reference", 0) == 0
    points = [int(p) for p in sys.argv[4:]]
    report = {}
    for point in points:
        out = f"{root}/kill-{point}"
        report[point] = [run(out, point), run(out, 0)]
    print(json.dumps(report), flush=True)
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks a child per kill")
def test_sigkill_at_every_write_resumes_to_the_uninterrupted_index(base: Base, tmp_path: Path) -> None:
    # An uninterrupted run of this layout (4 shards) fsyncs twice per atomic write: count them.
    with pytest.MonkeyPatch.context() as patch:
        recorder = DiskFills(patch)
        assert index(base, tmp_path / "count").exit_code == 0
    points = list(range(1, 2 * len(recorder.paths) + 1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", KILLER, str(base.images), str(base.model), str(tmp_path), *map(str, points)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {str(p): ["killed", 0] for p in points}, run.stderr[-3000:]
    reference = tmp_path / "reference"
    same_content(reference, base.plain)
    for point in points:
        folder = tmp_path / f"kill-{point}"
        same_files(folder, reference)
        assert not debris(folder), point
