"""An index folder's manifest.json, checked before anything acts on it: every malformed shape is one DamagedIndex
naming the file and the key (read_manifest, for search and dedup); repair_manifest (for index runs) drops what can
be rebuilt with a warning, starts afresh when nothing can be trusted, and never touches a folder that is not an
index folder. (The same cases end to end, through the command line: tests/faults/test_index.py.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from support import set_key

from dino_scale.errors import InputError
from dino_scale.retrieval.index import DamagedIndex, read_manifest, repair_manifest

SHA = "a" * 64


def valid() -> dict[str, Any]:
    return {
        "manifest_version": 1,
        "model": {"path": "/m.onnx", "kind": "onnx", "sha256": SHA, "image_size": 32, "outputs": ["cls"]},
        "descriptor": "cls",
        "whitening": None,
        "dim": 48,
        "shards": [
            {"vectors": f"emb-{n:06d}.npy", "meta": f"emb-{n:06d}.jsonl", "rows": 6, "vectors_sha256": SHA}
            for n in range(3)
        ],
        "index": {"file": "index.faiss", "rows_file": "index_rows.npy", "type": "flat", "num_vectors": 18, "dim": 48},
        "index_type": "auto",
        "created": "2026-01-01T00:00:00+00:00",
        "command": "dino-scale index",
    }


def folder_with(tmp_path: Path, manifest: Any, embeddings: bool = True) -> Path:
    folder = tmp_path / "idx"
    folder.mkdir()
    if embeddings:
        (folder / "embeddings").mkdir()
    text = manifest if isinstance(manifest, (str, bytes)) else json.dumps(manifest)
    (folder / "manifest.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return folder


def changed(*path: Any, value: Any = None, delete: bool = False) -> dict[str, Any]:
    manifest = valid()
    set_key(manifest, path, value, delete)
    return manifest


def test_a_valid_manifest_reads_back(tmp_path: Path) -> None:
    assert read_manifest(folder_with(tmp_path, valid())) == valid()
    assert read_manifest(tmp_path) is None  # no manifest: a new folder


MALFORMED = [
    ("top-level list", [valid()], "must hold a JSON object"),
    ("top-level string", '"manifest"', "must hold a JSON object"),
    ("deep nesting", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("not JSON", '{"manifest_version": 1,', "is not valid JSON"),
    ("not UTF-8", b"\xff\xfe{}", "is not valid JSON"),
    ("version missing", changed("manifest_version", delete=True), "manifest_version is missing"),
    ("version 0", changed("manifest_version", value=0), "manifest_version must be an integer in 1..1"),
    ("model {}", changed("model", value={}), "model.path is missing"),
    ("model.sha256 null", changed("model", "sha256", value=None), "model.sha256 must be a non-empty string, got null"),
    (
        "image_size string",
        changed("model", "image_size", value="32"),
        'model.image_size must be an integer in 1..16384, got "32"',
    ),
    ("image_size bool", changed("model", "image_size", value=True), "model.image_size must be an integer"),
    ("descriptor", changed("descriptor", value=["cls"]), "descriptor must be a non-empty string"),
    ("dim negative", changed("dim", value=-48), "dim must be an integer in 1..65536, got -48"),
    ("whitening file outside", changed("whitening", value={"file": "../w.faiss"}), "whitening.file must be one of"),
    ("shards string", changed("shards", value="emb-000000.npy"), "shards must be a list"),
    ("shard entry null", changed("shards", 1, value=None), "shards[1] must be an object, got null"),
    ("shard path outside", changed("shards", 1, "vectors", value="../../etc/x.npy"), "shards[1].vectors must name"),
    ("shard absolute", changed("shards", 0, "meta", value="/etc/passwd"), "shards[0].meta must name a file"),
    ("shard rows negative", changed("shards", 2, "rows", value=-1), "shards[2].rows must be an integer"),
    ("shard rows huge", changed("shards", 2, "rows", value=10**20), "shards[2].rows must be an integer"),
    ("shard sha", changed("shards", 0, "vectors_sha256", value=5), "shards[0].vectors_sha256 must be a sha256"),
    ("index string", changed("index", value="index.faiss"), "index must be an object"),
    ("num_vectors", changed("index", "num_vectors", value=19.5), "index.num_vectors must be an integer"),
    ("num_vectors > rows", changed("index", "num_vectors", value=10**9), "index.num_vectors is 1000000000, but"),
    ("index.dim", changed("index", "dim", value=64), "index.dim is 64, but dim is 48"),
    ("index_type", changed("index_type", value=None), "index_type must be a non-empty string, got null"),
    ("command", changed("command", value=3), "command must be a string, got 3"),
]


@pytest.mark.parametrize(("manifest", "needle"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_a_malformed_manifest_is_one_line_naming_the_file_and_key(tmp_path: Path, manifest: Any, needle: str) -> None:
    folder = folder_with(tmp_path, manifest)
    with pytest.raises(DamagedIndex) as caught:
        read_manifest(folder)
    message = str(caught.value)
    assert message.startswith(str(folder / "manifest.json")) and needle in message, message
    assert "\n" not in message
    assert isinstance(caught.value, InputError)


def test_a_newer_manifest_is_refused_by_both_readers(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, changed("manifest_version", value=2))
    for read in (read_manifest, lambda f: repair_manifest(f, print)):
        with pytest.raises(InputError, match="manifest_version 2 was written by a newer dino-scale") as caught:
            read(folder)
        assert not isinstance(caught.value, DamagedIndex)


def test_repair_drops_damaged_shard_entries_and_the_faiss_record(tmp_path: Path) -> None:
    manifest = valid()
    manifest["shards"][1]["rows"] = "6"
    manifest["shards"].append(copy.deepcopy(manifest["shards"][0]))  # listed twice
    manifest["created"] = 5
    warnings: list[str] = []
    repaired = repair_manifest(folder_with(tmp_path, manifest), warnings.append)
    assert repaired is not None
    assert [s["vectors"] for s in repaired["shards"]] == ["emb-000000.npy", "emb-000002.npy"]
    assert repaired["index"] is None  # it indexed 18 rows; 12 remain
    assert "created" not in repaired
    assert len(warnings) == 4 and all("manifest.json" in w for w in warnings)
    assert any("shards[1].rows" in w for w in warnings) and any("shards[3].vectors" in w for w in warnings)


def test_repair_starts_afresh_when_the_vectors_cannot_be_trusted(tmp_path: Path) -> None:
    warnings: list[str] = []
    assert repair_manifest(folder_with(tmp_path, changed("model", value={})), warnings.append) is None
    assert len(warnings) == 1 and "model.path is missing" in warnings[0] and "manifest.json" in warnings[0]


def test_repair_never_rebuilds_a_folder_that_is_no_index_folder(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, {"name": "web app"}, embeddings=False)
    with pytest.raises(DamagedIndex, match="manifest_version is missing.*not an index folder"):
        repair_manifest(folder, print)
