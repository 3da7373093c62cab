from __future__ import annotations

import hashlib
import os
import stat

import faiss
import numpy as np
import pytest

from dino_scale.retrieval import vector_index as vi


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def clustered(n: int, d: int, clusters: int, seed: int = 0, spread: float = 0.6) -> np.ndarray:
    """Unit vectors around random centres: the structure real image descriptors have, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    points = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    return unit(points)


def brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    similarity = queries.astype(np.float64) @ base.astype(np.float64).T
    ids = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarity, ids, axis=1), ids


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def cluster_data() -> tuple[np.ndarray, np.ndarray]:
    data = clustered(4200, 64, clusters=60, seed=1)
    return data[:4000], data[4000:]


@pytest.fixture(scope="module")
def built(cluster_data) -> dict[str, faiss.Index]:
    base, _ = cluster_data
    return {kind: vi.build_index(base, kind) for kind in ("flat", "hnsw", "ivfpq")}


# -- choose_index_type ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_vectors", "expected"),
    [(0, "flat"), (1, "flat"), (vi.EXACT_LIMIT - 1, "flat"), (vi.EXACT_LIMIT, "hnsw"), (50_000_000, "hnsw")],
)
def test_auto_switches_to_approximate_at_exact_limit(num_vectors, expected):
    assert vi.choose_index_type(num_vectors) == expected
    assert vi.choose_index_type(num_vectors, "auto") == expected


@pytest.mark.parametrize("requested", ["flat", "hnsw", "ivfpq"])
@pytest.mark.parametrize("num_vectors", [10, 10_000_000])
def test_explicit_type_overrides_size(requested, num_vectors):
    assert vi.choose_index_type(num_vectors, requested) == requested


@pytest.mark.parametrize("bad", ["HNSW", "ivf", "", "exact"])
def test_unknown_index_type_is_named(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        vi.choose_index_type(1000, bad)


def test_negative_size_rejected():
    with pytest.raises(ValueError, match="num_vectors"):
        vi.choose_index_type(-1)


def test_auto_build_picks_flat_for_small_sets():
    assert vi.describe_index(vi.build_index(random_unit(50, 8)))["type"] == "flat"


# -- search correctness ----------------------------------------------------------------------------------------------


def test_flat_matches_numpy_brute_force():
    base, queries = random_unit(700, 32, seed=2), random_unit(25, 32, seed=3)
    scores, ids = vi.search(vi.build_index(base, "flat"), queries, 10)
    expected_scores, expected_ids = brute_force(base, queries, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == (25, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_reach_high_recall(kind, built, cluster_data):
    base, queries = cluster_data
    scores, ids = vi.search(built[kind], queries, 10)
    truth_scores, truth = brute_force(base, queries, 10)
    assert recall_at_k(ids, truth) >= 0.9
    # ivfpq re-ranks exactly and hnsw stores floats: whatever they return carries the true cosine.
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ base.T, ids, axis=1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all(), "results must be best first"


def test_search_params_change_results(built, cluster_data):
    """The recall test above would pass with parameters ignored; starving the search must visibly hurt it."""
    base, queries = cluster_data
    _, truth = brute_force(base, queries, 10)
    index = faiss.deserialize_index(faiss.serialize_index(built["ivfpq"]))
    vi.set_search_params(index, nprobe=1, k_factor=1)
    assert recall_at_k(vi.search(index, queries, 10)[1], truth) < 0.8


def test_k_is_clipped_to_index_size():
    base = random_unit(5, 16)
    for kind in ("flat", "hnsw"):
        scores, ids = vi.search(vi.build_index(base, kind), random_unit(3, 16, seed=9), 10)
        assert ids.shape == scores.shape == (3, 5)
        assert all(sorted(row) == list(range(5)) for row in ids.tolist())


def test_missing_results_are_trailing_minus_one_with_minus_inf():
    base = clustered(2000, 32, clusters=40, seed=4)
    index = vi.build_index(base, "ivfpq", nlist=40)
    vi.set_search_params(index, nprobe=1)  # one list of ~50 vectors cannot fill k=200
    scores, ids = vi.search(index, base[:20], 200)
    assert ids.shape == (20, 200)
    missing = ids < 0
    assert missing.any(), "test setup should leave slots unfilled"
    assert np.isneginf(scores[missing]).all()
    assert np.isfinite(scores[~missing]).all()
    # Once a row has a missing slot, every later slot is missing too.
    assert (np.diff(missing.astype(int), axis=1) >= 0).all()


# -- parameters and description -------------------------------------------------------------------------------------


def test_describe_index_reports_parameters(built):
    hnsw = vi.describe_index(built["hnsw"])
    assert hnsw == {
        "type": "hnsw",
        "num_vectors": 4000,
        "dim": 64,
        "metric": "inner_product",
        "hnsw_m": vi.DEFAULT_HNSW_M,
        "ef_construction": vi.DEFAULT_EF_CONSTRUCTION,
        "ef_search": vi.DEFAULT_EF_SEARCH,
    }
    ivfpq = vi.describe_index(built["ivfpq"])
    assert ivfpq["type"] == "ivfpq" and ivfpq["num_vectors"] == 4000
    assert 64 % ivfpq["pq_m"] == 0
    assert ivfpq["nprobe"] == min(vi.DEFAULT_NPROBE, ivfpq["nlist"]) and ivfpq["k_factor"] == vi.DEFAULT_K_FACTOR
    assert vi.describe_index(built["flat"]) == {
        "type": "flat",
        "num_vectors": 4000,
        "dim": 64,
        "metric": "inner_product",
    }


def test_recorded_search_params_can_be_reapplied(cluster_data):
    base, _ = cluster_data
    source = vi.build_index(base[:500], "hnsw", ef_search=41)
    target = vi.build_index(base[:500], "hnsw")
    vi.set_search_params(target, **vi.search_params_of(vi.describe_index(source)))
    assert target.hnsw.efSearch == 41


def test_set_search_params_ignores_inapplicable_and_rejects_bad_values(built):
    vi.set_search_params(built["flat"], ef_search=10, nprobe=3, k_factor=2)  # nothing applies to flat
    with pytest.raises(ValueError, match="ef_search"):
        vi.set_search_params(built["hnsw"], ef_search=0)
    with pytest.raises(ValueError, match="nprobe"):
        vi.set_search_params(built["ivfpq"], nprobe=-2)


def test_foreign_index_is_rejected():
    foreign = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 2, faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(ValueError, match="IndexIVFFlat"):
        vi.describe_index(foreign)
    with pytest.raises(ValueError, match="not inner product"):
        vi.describe_index(faiss.IndexFlatL2(8))


# -- persistence ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "params"), [("flat", {}), ("hnsw", {"ef_search": 77}), ("ivfpq", {"nprobe": 5, "k_factor": 3})]
)
def test_save_load_round_trip_keeps_results_and_search_params(kind, params, cluster_data, tmp_path):
    base, queries = cluster_data
    index = vi.build_index(base[:1500], kind)
    vi.set_search_params(index, **params)
    before = vi.search(index, queries, 10)
    path = tmp_path / f"{kind}.faiss"
    vi.save_index(index, path)
    loaded = vi.load_index(path)
    assert vi.describe_index(loaded) == vi.describe_index(index)
    for name, value in params.items():
        assert vi.describe_index(loaded)[name] == value
    after = vi.search(loaded, queries, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])


def test_saved_file_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        vi.save_index(vi.build_index(random_unit(10, 4), "flat"), tmp_path / "index.faiss")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "index.faiss").stat().st_mode) == 0o644


_write_index = faiss.write_index


def _fail_midway(index, writer):
    _write_index(index, writer)  # the bytes are in the temporary file...
    raise RuntimeError("disk full")  # ...then faiss fails


def _fail_replace(src, dst):
    raise OSError("rename failed")


@pytest.mark.parametrize(("target", "failure"), [("write_index", _fail_midway), ("replace", _fail_replace)])
def test_failed_save_keeps_previous_file_and_leaves_no_temp(target, failure, tmp_path, monkeypatch):
    path = tmp_path / "index.faiss"
    vi.save_index(vi.build_index(random_unit(20, 8), "flat"), path)
    original = path.read_bytes()
    monkeypatch.setattr(faiss if target == "write_index" else os, target, failure)
    with pytest.raises((RuntimeError, OSError)):
        vi.save_index(vi.build_index(random_unit(30, 8, seed=5), "flat"), path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss"]


def test_load_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.faiss"):
        vi.load_index(tmp_path / "nope.faiss")


def test_load_garbage_names_path(tmp_path):
    garbage = tmp_path / "garbage.faiss"
    garbage.write_bytes(b"this is not a faiss index" * 10)
    with pytest.raises(ValueError, match="garbage.faiss"):
        vi.load_index(garbage)


def test_load_truncated_index_names_path(tmp_path):
    path = tmp_path / "cut.faiss"
    vi.save_index(vi.build_index(random_unit(200, 16), "hnsw"), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.faiss"):
        vi.load_index(path)


# -- input validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vectors", "message"),
    [
        (np.zeros(8, np.float32), "2-D"),
        (np.zeros((0, 8), np.float32), "empty"),
        (np.zeros((4, 0), np.float32), "empty"),
        (np.ones((4, 8), np.int64), "int64"),
        ([[1.0, 0.0]], "numpy array"),
    ],
)
def test_build_rejects_malformed_vectors(vectors, message):
    with pytest.raises(ValueError, match=message):
        vi.build_index(vectors)


def test_build_names_non_finite_rows():
    vectors = random_unit(10, 8)
    vectors[3, 1] = np.nan
    vectors[7, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 row\(s\).*rows 3, 7"):
        vi.build_index(vectors)


def test_build_accepts_float64_and_checks_ivfpq_params():
    vectors = random_unit(100, 12).astype(np.float64)
    assert vi.build_index(vectors, "flat").ntotal == 100
    with pytest.raises(ValueError, match="at least 1000 vectors"):
        vi.build_index(vectors, "ivfpq")
    vectors = random_unit(1000, 12)
    with pytest.raises(ValueError, match="pq_m=5"):
        vi.build_index(vectors, "ivfpq", pq_m=5)
    with pytest.raises(ValueError, match="nlist=5000"):
        vi.build_index(vectors, "ivfpq", nlist=5000)


def test_search_rejects_bad_queries_and_k(built):
    with pytest.raises(ValueError, match="dimension 32"):
        vi.search(built["flat"], random_unit(2, 32), 5)
    with pytest.raises(ValueError, match="NaN"):
        vi.search(built["flat"], np.full((1, 64), np.nan, np.float32), 5)
    with pytest.raises(ValueError, match="k must be"):
        vi.search(built["flat"], random_unit(1, 64), 0)


@pytest.fixture
def file_size_limit():
    """``limit(n)``: writes past n bytes in any file fail with EFBIG, as writes on a full disk fail with ENOSPC (this
    process only; restored afterwards). Set it just around the write under test."""
    resource = pytest.importorskip("resource")
    import signal

    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


def test_a_write_that_runs_out_of_space_is_one_write_failed_naming_the_path(tmp_path, file_size_limit):
    """faiss's own FILE* writer reports a failed write late or never (a truncated file); save_index writes through
    Python, so the OSError surfaces at once and becomes WriteFailed, and the previous file stays."""
    from dino_scale.errors import WriteFailed

    path = tmp_path / "index.faiss"
    vi.save_index(vi.build_index(random_unit(10, 8), "flat"), path)
    previous = path.read_bytes()
    big = vi.build_index(random_unit(2000, 64, seed=1), "flat")  # 512 KiB
    file_size_limit(64 * 1024)
    try:
        with pytest.raises(WriteFailed, match=r"cannot write .*index\.faiss: File too large") as caught:
            vi.save_index(big, path)
    finally:
        file_size_limit(-1)
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss"]
    assert vi.save_index(big, path) == hashlib.sha256(path.read_bytes()).hexdigest()  # returns the file's sha256
