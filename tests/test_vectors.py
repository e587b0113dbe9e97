"""The first-stage vector index: exact search against numpy, recall of the approximate kinds, ids,
sync with a tile database, files, and the size rule of choose_spec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rsitr.errors import CheckpointError, ConfigError
from rsitr_serve import vectors as vx
from rsitr_serve.vectors import VectorIndex, VectorIndexSpec, choose_spec, exact_search, meta_path, sync, training_ids

DIM = 32
SPECS = {
    "flat": VectorIndexSpec("flat", DIM),
    "ivf": VectorIndexSpec("ivf", DIM, nlist=16, nprobe=16),  # every list probed: exact within the lists
    "ivf-sq8": VectorIndexSpec("ivf", DIM, nlist=16, nprobe=16, storage="sq8"),
    "hnsw": VectorIndexSpec("hnsw", DIM, m=16, ef_search=64, ef_construction=64),
}


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clustered(count: int, seed: int, centres: int = 20, centre_cosine: float = 0.8) -> np.ndarray:
    """Unit vectors around random unit centres, each at about ``centre_cosine`` of its centre."""
    rng = np.random.default_rng(seed)
    middles = unit(rng.standard_normal((centres, DIM)))
    sigma = np.sqrt((1 / centre_cosine**2 - 1) / DIM)
    return unit(middles[rng.integers(centres, size=count)] + sigma * rng.standard_normal((count, DIM)))


def brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k by a full sort of every score (score descending, then id), padded with -1 / -inf."""
    scores = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    out_scores = np.full((len(queries), k), -np.inf)
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for row, query_scores in enumerate(scores):
        order = np.lexsort((ids, -query_scores))[:k]
        out_scores[row, :len(order)] = query_scores[order]
        out_ids[row, :len(order)] = ids[order]
    return out_scores, out_ids


def built(spec: VectorIndexSpec, vectors: np.ndarray, ids: np.ndarray, seed: int = 0) -> VectorIndex:
    index = VectorIndex.create(spec, vectors if spec.kind == "ivf" else None, seed=seed, threads=1)
    index.add(ids, vectors)
    return index


def recall_at(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(np.intersect1d(f[:k], e[:k])) / k for f, e in zip(found, exact)]))


# ----------------------------------------------------------------------------------------------
# Search


@pytest.mark.parametrize("k", [7, 60])
def test_flat_search_equals_brute_force(k):
    vectors, queries = clustered(50, seed=1), clustered(9, seed=2)
    ids = np.arange(50, dtype=np.int64) * 3 + 1  # not contiguous, as after removals
    index = built(SPECS["flat"], vectors, ids)
    scores, found = index.search(queries, k)
    want_scores, want_ids = brute_force(vectors, ids, queries, k)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert scores.dtype == np.float32 and found.dtype == np.int64
    exact_scores, exact_ids = exact_search(vectors, ids, queries, k)
    np.testing.assert_array_equal(exact_ids, want_ids)
    np.testing.assert_allclose(exact_scores, want_scores, atol=1e-5)


def test_equal_scores_come_in_id_order_and_padding_last():
    e1, e2 = np.eye(DIM, dtype=np.float32)[:2]
    index = built(SPECS["flat"], np.stack([e1, e1, e2]), np.array([9, 4, 7]))
    scores, found = index.search(e1[None], 5)
    assert found.tolist() == [[4, 9, 7, -1, -1]]
    assert scores.tolist() == [[1.0, 1.0, 0.0, -np.inf, -np.inf]]
    assert exact_search(np.stack([e1, e1, e2]), np.array([9, 4, 7]), e1[None], 5)[1].tolist() == found.tolist()


def test_an_empty_index_returns_only_padding():
    scores, found = VectorIndex.create(SPECS["flat"]).search(clustered(2, seed=0), 3)
    assert (found == -1).all() and np.isneginf(scores).all()


@pytest.mark.parametrize(("spec", "bound"), [
    (VectorIndexSpec("ivf", DIM, nlist=40, nprobe=10), 0.95),
    (VectorIndexSpec("ivf", DIM, nlist=40, nprobe=10, storage="sq8"), 0.93),
    (VectorIndexSpec("hnsw", DIM, m=16, ef_search=128, ef_construction=100), 0.95),
], ids=["ivf", "ivf-sq8", "hnsw"])
def test_approximate_kinds_find_the_exact_top_ten(spec, bound):
    vectors, queries = clustered(4000, seed=3), clustered(100, seed=4)
    ids = np.arange(1, 4001, dtype=np.int64)
    training = vectors[training_ids(ids, spec) - 1] if spec.kind == "ivf" else None
    index = VectorIndex.create(spec, training, threads=1)
    index.add(ids, vectors)
    _, found = index.search(queries, 10)
    _, exact = exact_search(vectors, ids, queries, 10)
    assert recall_at(found, exact, 10) >= bound


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_same_inputs_and_seed_give_the_same_results(kind):
    vectors, queries = clustered(1500, seed=5), clustered(20, seed=6)
    ids = np.arange(10, 1510, dtype=np.int64)
    spec = SPECS[kind] if kind == "hnsw" else VectorIndexSpec("ivf", DIM, nlist=24, nprobe=4)
    first, second = (built(spec, vectors, ids, seed=7).search(queries, 10) for _ in range(2))
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[0], second[0])


def test_search_params_change_without_rebuilding_and_only_for_their_kind():
    vectors = clustered(800, seed=8)
    index = built(VectorIndexSpec("ivf", DIM, nlist=20, nprobe=1), vectors, np.arange(800))
    index.set_search_params(nprobe=20)
    _, found = index.search(vectors[:10], 10)
    np.testing.assert_array_equal(found, exact_search(vectors, np.arange(800), vectors[:10], 10)[1])
    assert index.spec.nprobe == 20
    with pytest.raises(ConfigError, match="ef_search applies to hnsw"):
        index.set_search_params(ef_search=10)


# ----------------------------------------------------------------------------------------------
# Ids


@pytest.mark.parametrize("name", list(SPECS))
def test_add_remove_and_ids_round_trip(name):
    vectors = clustered(300, seed=9)
    ids = np.random.default_rng(0).permutation(np.arange(1, 1000, 3))[:300].astype(np.int64)
    index = built(SPECS[name], vectors, ids)
    assert len(index) == 300
    np.testing.assert_array_equal(index.ids(), np.sort(ids))
    going = ids[:40]
    assert index.remove(np.concatenate([going, [2, 5]])) == 40  # 2 and 5 were never added
    assert index.remove(going) == 0
    kept = ids[40:]
    np.testing.assert_array_equal(index.ids(), np.sort(kept))
    assert len(index) == 260
    _, found = index.search(vectors, 10)
    assert not np.isin(found, going).any()
    if name != "ivf-sq8":  # sq8 scores are approximate; the others find each kept vector itself first
        np.testing.assert_array_equal(found[40:, 0], kept)


@pytest.mark.parametrize(("ids", "vectors", "message"), [
    (np.array([1, 2]), np.ones((2, DIM + 1), np.float32), "must be an \\(n, 32\\) array"),
    (np.array([1, 1]), None, "distinct"),
    (np.array([1, -2]), None, "non-negative"),
    (np.array([1, 2, 3]), None, "3 ids for 2 vectors"),
    (np.array([1, 2]), np.full((2, DIM), 0.5, np.float32), "unit length"),
    (np.array([7, 8]), None, "in the index already \\(7\\)"),
])
def test_bad_additions_are_one_line_errors(ids, vectors, message):
    index = built(SPECS["flat"], clustered(1, seed=0), np.array([7]))
    with pytest.raises(ValueError, match=message) as caught:
        index.add(ids, clustered(2, seed=1) if vectors is None else vectors)
    assert "\n" not in str(caught.value)
    assert len(index) == 1


def test_hnsw_removal_rebuilds_the_graph_of_the_rest_in_id_order():
    vectors, queries = clustered(600, seed=10), clustered(30, seed=11)
    ids = np.arange(600, 0, -1, dtype=np.int64)  # added in descending id order
    index = built(SPECS["hnsw"], vectors, ids)
    index.remove(ids[::3])
    keep = np.setdiff1d(np.arange(600), np.arange(0, 600, 3))
    order = keep[np.argsort(ids[keep])]
    fresh = built(SPECS["hnsw"], vectors[order], ids[order])
    for got, want in zip(index.search(queries, 10), fresh.search(queries, 10)):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------
# Sync with the tile database


class Tiles:
    """A stand-in tile database: vector of id i is row i of a table; records what was fetched."""

    def __init__(self, count: int) -> None:
        self.table = clustered(count, seed=12)
        self.fetched: list[np.ndarray] = []

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        self.fetched.append(ids.copy())
        return self.table[ids]


@pytest.mark.parametrize("name", ["flat", "ivf", "hnsw"])
def test_sync_adds_the_missing_removes_the_extra_and_is_idempotent(name):
    tiles = Tiles(400)
    spec = SPECS[name]
    index = VectorIndex.create(spec, tiles.table if spec.kind == "ivf" else None, threads=1)

    def check(wanted: np.ndarray, expect: tuple[int, int]) -> None:
        tiles.fetched.clear()
        assert sync(index, wanted, tiles.fetch, chunk_size=64, progress=False) == expect
        np.testing.assert_array_equal(index.ids(), np.sort(wanted))
        fetched = np.concatenate(tiles.fetched) if tiles.fetched else np.zeros(0, np.int64)
        assert all(len(chunk) <= 64 for chunk in tiles.fetched)
        assert len(fetched) == expect[0]  # only the missing vectors are fetched
        if len(wanted):
            _, found = index.search(tiles.table[wanted], 1)
            np.testing.assert_array_equal(found[:, 0], wanted)

    first = np.arange(1, 301)
    check(first, (300, 0))  # from empty
    check(first, (0, 0))  # idempotent
    subset = first[first % 4 != 0]
    check(subset, (0, 75))  # from a superset
    disjoint = np.arange(301, 400)
    check(disjoint, (99, len(subset)))  # from a disjoint set
    check(disjoint, (0, 0))
    check(np.zeros(0, np.int64), (0, 99))


def test_sync_rejects_duplicate_ids_and_a_fetch_of_the_wrong_shape():
    index = VectorIndex.create(SPECS["flat"])
    with pytest.raises(ValueError, match="1 duplicates"):
        sync(index, np.array([1, 2, 2]), Tiles(3).fetch, progress=False)
    with pytest.raises(ValueError, match="3 vectors for 2 ids"):
        sync(index, np.array([1, 2]), lambda ids: clustered(3, seed=0), progress=False)


# ----------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("name", list(SPECS))
def test_save_and_load_give_identical_results(tmp_path, name):
    vectors, queries = clustered(500, seed=13), clustered(25, seed=14)
    index = built(SPECS[name], vectors, np.arange(5, 505))
    path = tmp_path / "tiles.faiss"
    index.save(path, {"model": "abc123"})
    loaded, meta = VectorIndex.load(path, dim=DIM)
    assert meta == {"model": "abc123"} and loaded.spec == index.spec and len(loaded) == 500
    for got, want in zip(loaded.search(queries, 20), index.search(queries, 20)):
        np.testing.assert_array_equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles.faiss", "tiles.faiss.json"]  # no temporary left


def _saved(tmp_path: Path, vectors: np.ndarray | None = None) -> Path:
    vectors = clustered(200, seed=15) if vectors is None else vectors
    path = tmp_path / "tiles.faiss"
    built(SPECS["flat"], vectors, np.arange(len(vectors))).save(path, {})
    return path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _foreign(path: Path) -> None:
    path.write_bytes(b"not an index" * 100)
    record = json.loads(meta_path(path).read_text())
    meta_path(path).write_text(json.dumps({**record, "bytes": path.stat().st_size}))


def _interrupted(path: Path) -> None:
    """The FAISS file of a later save beside the JSON file of an earlier one (same size)."""
    record = meta_path(path).read_text()
    built(SPECS["flat"], clustered(200, seed=16), np.arange(200)).save(path, {})
    meta_path(path).write_text(record)


@pytest.mark.parametrize(("damage", "message"), [
    (_truncate, "truncated"),
    (_foreign, "not a readable FAISS index"),
    (_interrupted, "an interrupted save"),
    (lambda path: meta_path(path).unlink(), "file not found"),
    (lambda path: path.unlink(), "vector index not found"),
    (lambda path: meta_path(path).write_text('{"format": "other"}'), "not an rsitr vector index record"),
], ids=["truncated", "foreign", "interrupted", "no-json", "no-index", "other-json"])
def test_an_unusable_file_is_a_one_line_error_naming_it(tmp_path, damage, message):
    path = _saved(tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=message) as caught:
        VectorIndex.load(path)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path))


def test_load_refuses_vectors_of_another_dimension(tmp_path):
    with pytest.raises(CheckpointError, match="holds 32-d vectors, the model's first stage is 64-d"):
        VectorIndex.load(_saved(tmp_path), dim=64)


@pytest.mark.parametrize("name", list(SPECS))
def test_bytes_per_vector_matches_the_file_but_for_the_reverse_map(tmp_path, name):
    count = 3000
    spec = SPECS[name]
    index = built(spec, clustered(count, seed=17), np.arange(count))
    index.save(tmp_path / "x.faiss", {})
    per_vector = (tmp_path / "x.faiss").stat().st_size / count
    in_memory_only = 0 if spec.kind == "ivf" else vx.REVERSE_MAP_BYTES  # IndexIDMap2 rebuilds it on load
    # within 0.5%: headers, and the random number of upper HNSW layers (1/(m-1) per node on average)
    assert per_vector == pytest.approx(spec.bytes_per_vector(count) - in_memory_only, rel=0.005)


# ----------------------------------------------------------------------------------------------
# Choosing the index


def test_choose_spec_is_exact_up_to_the_threshold_and_approximate_above():
    threshold = vx.FLAT_MAX_COUNT
    assert choose_spec(threshold, 512).kind == "flat"
    above = choose_spec(threshold + 1, 512)
    assert above.kind in ("ivf", "hnsw") and above.dim == 512
    assert choose_spec(0, 512).kind == "flat"
    assert choose_spec(10, 512, "hnsw").kind == "hnsw"  # an explicit kind is kept at any size


def test_choose_spec_scales_ivf_lists_with_the_square_root_of_the_count():
    small, large = choose_spec(250_000, 256, "ivf"), choose_spec(4 * 250_000, 256, "ivf")
    assert large.nlist == pytest.approx(2 * small.nlist, abs=1)
    for spec, count in ((small, 250_000), (large, 1_000_000)):
        assert 1 <= spec.nprobe <= spec.nlist
        assert vx.MIN_TRAINING_PER_LIST * spec.nlist <= spec.training_size(count) <= count
    assert choose_spec(100, 16, "ivf").nlist * vx.MIN_TRAINING_PER_LIST <= 100  # few vectors: every list trainable


def test_choose_spec_overrides():
    spec = choose_spec(1_000_000, 64, "ivf", nlist=10, storage="sq8")
    assert (spec.nlist, spec.storage) == (10, "sq8") and 1 <= spec.nprobe <= 10
    assert choose_spec(10, 64, "hnsw", m=8).m == 8
    with pytest.raises(ConfigError, match="unknown parameter"):
        choose_spec(10, 64, "ivf", lists=3)
    with pytest.raises(ConfigError, match="kind must be one of"):
        choose_spec(10, 64, "annoy")
    with pytest.raises(ConfigError, match="nprobe <= nlist"):
        choose_spec(10, 64, "ivf", nlist=4, nprobe=5)


def test_rebuild_needed_when_the_count_outgrows_the_index():
    spec = choose_spec(vx.FLAT_MAX_COUNT, 64)
    assert not vx.rebuild_needed(spec, vx.FLAT_MAX_COUNT // 2)
    assert vx.rebuild_needed(spec, vx.FLAT_MAX_COUNT + 1)
    ivf = choose_spec(200_000, 64)
    assert not vx.rebuild_needed(ivf, 300_000)
    assert vx.rebuild_needed(ivf, 200_000 * 25)  # five times the lists wanted


def test_spec_round_trips_through_its_dict():
    spec = choose_spec(80_000, 128, "ivf", storage="sq8")
    assert VectorIndexSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ConfigError, match="unknown key"):
        VectorIndexSpec.from_dict({**spec.to_dict(), "extra": 1})


def test_training_ids_are_a_seeded_sample():
    spec = VectorIndexSpec("ivf", DIM, nlist=4, nprobe=1)
    ids = np.arange(10, 5000, 2)
    first = training_ids(ids, spec, seed=3)
    np.testing.assert_array_equal(first, training_ids(ids, spec, seed=3))
    assert len(first) == spec.training_size(len(ids)) and np.isin(first, ids).all()
    assert (np.diff(first) > 0).all()
