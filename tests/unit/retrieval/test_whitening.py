"""The PCA whitening file: written atomically (a full disk is one WriteFailed), read back checked (a wrong
dimension, non-finite coefficients, another transform, garbage or a pickle are one InputError naming the file and,
for shapes, the expected and found ones), and applied only to descriptors of its input dimension."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from dino_scale.errors import InputError, NotFound, WriteFailed
from dino_scale.retrieval.embed import Whitening


def learned(d_in: int = 16, d_out: int = 8, seed: int = 0) -> Whitening:
    data = np.random.default_rng(seed).standard_normal((max(100, 2 * d_out), d_in)).astype(np.float32)
    return Whitening.learn(data, d_out)


class Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))  # unpickling creates the marker


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def test_round_trip_returns_the_sha256_and_whitens_alike(tmp_path: Path) -> None:
    whitening = learned()
    sha256 = whitening.save(tmp_path / "w.faiss")
    assert sha256 == hashlib.sha256((tmp_path / "w.faiss").read_bytes()).hexdigest()
    loaded = Whitening.load(tmp_path / "w.faiss", 16, 8)
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), whitening(x))
    assert loaded.path == tmp_path / "w.faiss"


def test_descriptors_of_another_dimension_are_one_line_naming_the_file_and_shapes(tmp_path: Path) -> None:
    whitening = learned()
    whitening.save(tmp_path / "w.faiss")
    loaded = Whitening.load(tmp_path / "w.faiss")
    with pytest.raises(InputError) as caught:
        loaded(np.zeros((3, 12), np.float32))  # faiss itself: a bare AssertionError
    message = str(caught.value)
    assert "w.faiss" in message and "[n, 16]" in message and "[3, 12]" in message and "\n" not in message


def _broken_pca(tmp_path: Path) -> Path:
    pca = learned().transform
    matrix = faiss.vector_to_array(pca.A)
    matrix[7] = np.inf
    faiss.copy_array_to_vector(matrix, pca.A)
    faiss.write_VectorTransform(pca, str(tmp_path / "w.faiss"))
    return tmp_path / "w.faiss"


def _write(tmp_path: Path, data: bytes) -> Path:
    (tmp_path / "w.faiss").write_bytes(data)
    return tmp_path / "w.faiss"


def _rotation(tmp_path: Path) -> Path:
    rotation = faiss.RandomRotationMatrix(16, 8)
    rotation.init(0)
    faiss.write_VectorTransform(rotation, str(tmp_path / "w.faiss"))
    return tmp_path / "w.faiss"


def _saved(tmp_path: Path, d_in: int, d_out: int) -> Path:
    learned(d_in, d_out).save(tmp_path / "w.faiss")
    return tmp_path / "w.faiss"


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (
            lambda t: _saved(t, 16, 4),
            "whitens 16 -> 4 dimensions (matrix shape [4, 16]); expected 16 -> 8 (shape [8, 16])",
        ),
        (lambda t: _saved(t, 32, 8), "whitens 32 -> 8 dimensions (matrix shape [8, 32]); expected 16 -> 8"),
        (_broken_pca, "NaN or infinite"),
        (lambda t: _write(t, b"garbage" * 10), "not a readable whitening transform"),
        (lambda t: _write(t, b""), "ends too early"),
        (lambda t: _write(t, (_saved(t, 16, 8)).read_bytes()[:60]), "ends too early"),
        (lambda t: _write(t, npy(np.eye(16, dtype=np.float32)[:8])), "not a readable whitening transform"),
        (lambda t: _write(t, npy(np.eye(16, dtype=np.float64)[:8])), "not a readable whitening transform"),
        (lambda t: _write(t, npy(np.array([Planted(t / "marker")]), allow_pickle=True)), "not a readable whitening"),
        (_rotation, "RandomRotationMatrix, not a PCA whitening"),
    ],
    ids=[
        "out dim",
        "in dim",
        "non-finite",
        "garbage",
        "empty",
        "truncated",
        "npy f32",
        "npy f64",
        "pickle",
        "rotation",
    ],
)
def test_a_damaged_file_is_one_input_error_naming_it(tmp_path: Path, make: Any, needle: str) -> None:
    path = make(tmp_path)
    with pytest.raises(InputError) as caught:
        Whitening.load(path, 16, 8)
    message = str(caught.value)
    assert str(path) in message and needle in message and "\n" not in message, message
    assert not (tmp_path / "marker").exists()  # nothing was unpickled


def test_a_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="w.faiss"):
        Whitening.load(tmp_path / "w.faiss")


def test_a_full_disk_while_saving_is_one_write_failed_and_leaves_nothing(tmp_path: Path) -> None:
    resource = pytest.importorskip("resource")
    import signal

    path = tmp_path / "w.faiss"
    learned().save(path)
    previous = path.read_bytes()
    big = learned(256, 256)  # a 256 KiB matrix
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))  # writes past 16 KiB fail (EFBIG), like ENOSPC
    try:
        with pytest.raises(WriteFailed, match=r"cannot write .*w\.faiss: File too large"):
            big.save(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.faiss"]
