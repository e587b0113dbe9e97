"""The first-stage vector index: unit vectors by tile id, searched by inner product (= cosine).

An image index stores one unit-length first-stage vector per tile (DOVE's V_M, see
:meth:`rsitr.bundle.RetrievalBundle.first_stage`); a text query's T_G ranks the tiles by inner
product, and the pairwise model re-ranks the best few hundred. This module keeps those vectors in a
FAISS index addressed by the tile database's integer ids:

* ``flat``: exact search (``IndexFlatIP`` in an ``IndexIDMap2``);
* ``ivf``: an inverted file of ``nlist`` spherical k-means lists, ``nprobe`` of them visited per
  query, vectors stored as float32 (``IndexIVFFlat``) or 8-bit scalar codes (``IndexIVFScalarQuantizer``);
* ``hnsw``: a navigable small-world graph (``IndexHNSWFlat`` in an ``IndexIDMap2``).

:func:`choose_spec` picks the kind and its parameters from the number of vectors (see its figures).

The tile database is the truth and the index is derived from it: :func:`sync` makes an index hold
exactly the database's ids (adds the missing, removes the extra), so an index left behind by an
interrupted run is brought back in line by calling it again. :meth:`VectorIndex.save` writes FAISS's
own binary format atomically plus a JSON file beside it (``<file>.json``: spec, count, the FAISS
file's SHA-256 and the caller's metadata); :meth:`VectorIndex.load` refuses a missing, truncated or
foreign file, or a pair whose digests disagree (an interrupted save), with a one-line
:class:`~rsitr.errors.CheckpointError`: the caller rebuilds the index from the database then.

Results are ordered by score, then by id among equal scores (which equal-scored vectors make the
top k at its boundary is FAISS's choice); a result row with fewer than k vectors is padded with id
-1 and score -inf. FAISS runs on its own OpenMP threads; an index uses ``threads`` of them only when
the caller asks (``threads=None`` leaves FAISS's setting alone). Setting ``threads`` changes a
process-wide setting for the length of each call, so a server searching from several Python threads
sets FAISS's threads once at start-up and keeps ``threads=None``. Searches may run concurrently;
adding, removing and saving may not run beside anything else on the same index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from rsitr.errors import CheckpointError, ConfigError
from rsitr.io import atomic_path, check_keys, read_json, write_json
from rsitr.progress import get_logger, progress_bar

logger = get_logger(__name__)

VECTOR_KINDS = ("auto", "flat", "ivf", "hnsw")
INDEX_KINDS = VECTOR_KINDS[1:]
IVF_STORAGES = ("flat", "sq8")
VECTORS_FORMAT = "rsitr-vectors-v1"

#: choose_spec's rule, set from ``benchmarks/vector_index.py`` runs (figures in choose_spec's docstring).
FLAT_MAX_COUNT = 50_000
AUTO_APPROXIMATE_KIND = "ivf"
IVF_LISTS_PER_SQRT = 4.0
IVF_PROBED_SHARE = 1 / 64
IVF_MIN_PROBES = 64
IVF_DEFAULT_STORAGE = "flat"
HNSW_M = 16
HNSW_EF_SEARCH = 200
HNSW_EF_CONSTRUCTION = 200

#: k-means needs this many training vectors per list to place it (FAISS warns below 39) ...
MIN_TRAINING_PER_LIST = 39
#: ... and trains on this many: at 100k vectors (1265 lists) 39, 64 and 256 per list gave the same
#: recall within 0.002 at every nprobe, and k-means time grows with it (FAISS's own cap is 256).
TRAINING_PER_LIST = 64

#: IndexIDMap2's id → position hash map (a libstdc++ node of 32 bytes + a bucket pointer); measured
#: 35 bytes per vector over IndexIDMap at 1M vectors.
REVERSE_MAP_BYTES = 40
ID_BYTES = 8  # int64 tile ids, one per vector
HNSW_NODE_BYTES = 12  # per node: an 8-byte offset into the links and a 4-byte level
LINK_BYTES = 4  # HNSW links are int32 positions

_CHUNK = 10_000  # vectors fetched and added per step of sync
_UNIT_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class VectorIndexSpec:
    """What a vector index is: its kind, the vectors' dimension and the kind's parameters.

    Attributes:
        kind: ``"flat"``, ``"ivf"`` or ``"hnsw"`` (resolved, never ``"auto"``).
        dim: the vectors' dimension.
        nlist: ivf: the number of k-means lists.
        nprobe: ivf: lists visited per query.
        m: hnsw: links per node (twice as many on the bottom layer).
        ef_search: hnsw: candidates kept while searching (FAISS uses at least k).
        ef_construction: hnsw: candidates kept while inserting.
        storage: ivf: ``"flat"`` (float32, exact scores within the probed lists) or ``"sq8"``
            (one byte per dimension, approximate scores).
    """

    kind: str
    dim: int
    nlist: int = 0
    nprobe: int = 0
    m: int = 0
    ef_search: int = 0
    ef_construction: int = 0
    storage: str = "flat"

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ConfigError(f"vector index kind must be one of {', '.join(INDEX_KINDS)}, got {self.kind!r}")
        if self.dim < 1:
            raise ConfigError(f"vector dimension must be at least 1, got {self.dim}")
        if self.kind == "ivf":
            if self.nlist < 1 or not 1 <= self.nprobe <= self.nlist:
                raise ConfigError(f"an ivf index needs nlist >= 1 and 1 <= nprobe <= nlist, got nlist {self.nlist}, "
                                  f"nprobe {self.nprobe}")
            if self.storage not in IVF_STORAGES:
                raise ConfigError(f"ivf storage must be one of {', '.join(IVF_STORAGES)}, got {self.storage!r}")
        if self.kind == "hnsw" and (self.m < 2 or self.ef_search < 1 or self.ef_construction < 1):
            raise ConfigError(f"an hnsw index needs m >= 2, ef_search >= 1 and ef_construction >= 1, got m {self.m}, "
                              f"ef_search {self.ef_search}, ef_construction {self.ef_construction}")

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-ready mapping."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VectorIndexSpec:
        """The spec a :meth:`to_dict` mapping describes; ConfigError on unknown keys or values."""
        check_keys(data, [f.name for f in dataclasses.fields(cls)], "vector index spec")
        return cls(**data)

    def bytes_per_vector(self, count: int | None = None) -> float:
        """Memory the index holds per vector: codes + id + graph links (+ shared parts over ``count``).

        flat: 4·dim + 8 (id) + 40 (IndexIDMap2's reverse map); ivf: 4·dim (or dim for sq8) + 8 (the
        id in its list); hnsw: 4·dim + 8 + 40 + the links, 4 bytes each, 2·m on the bottom layer and
        m on each upper layer (1/(m-1) upper layers on average) + 12 (offset and level). With
        ``count``, the parts shared by all vectors are spread over them (ivf's centroids, 4·dim per
        list, and sq8's trained ranges). The serialized file holds less: no reverse map.
        """
        if self.kind == "flat":
            return 4 * self.dim + ID_BYTES + REVERSE_MAP_BYTES
        if self.kind == "hnsw":
            links = LINK_BYTES * (2 * self.m + self.m / (self.m - 1))
            return 4 * self.dim + ID_BYTES + REVERSE_MAP_BYTES + links + HNSW_NODE_BYTES
        code = self.dim if self.storage == "sq8" else 4 * self.dim
        shared = 4 * self.dim * self.nlist + (8 * self.dim if self.storage == "sq8" else 0)
        return code + ID_BYTES + (shared / count if count else 0.0)

    def training_size(self, count: int) -> int:
        """How many of ``count`` vectors to train an ivf index on (0 for kinds that need none)."""
        return min(count, TRAINING_PER_LIST * self.nlist) if self.kind == "ivf" else 0


def _probes(nlist: int) -> int:
    """choose_spec's nprobe for ``nlist`` lists: a fixed share of them, at least IVF_MIN_PROBES."""
    return min(nlist, max(IVF_MIN_PROBES, math.ceil(IVF_PROBED_SHARE * nlist)))


def _lists(count: int) -> int:
    """choose_spec's nlist for ``count`` vectors: IVF_LISTS_PER_SQRT·sqrt(count), each list trainable."""
    return max(1, min(round(IVF_LISTS_PER_SQRT * math.sqrt(count)), count // MIN_TRAINING_PER_LIST))


def choose_spec(count: int, dim: int, kind: str = "auto", **overrides: Any) -> VectorIndexSpec:
    """The index for ``count`` vectors of dimension ``dim``: ``kind`` with parameters from the count.

    ``auto`` is exact (``flat``) up to FLAT_MAX_COUNT vectors and ``ivf`` above. ivf: nlist =
    IVF_LISTS_PER_SQRT·sqrt(count) (at most count/39, so k-means can place every list), nprobe =
    IVF_PROBED_SHARE of the lists, at least IVF_MIN_PROBES (all of them when there are fewer);
    hnsw: m HNSW_M, ef_search HNSW_EF_SEARCH, ef_construction HNSW_EF_CONSTRUCTION. ``overrides`` replace any parameter
    (``nlist=…, nprobe=…, m=…, ef_search=…, ef_construction=…, storage=…``); an nprobe not given
    follows the nlist that is.

    Why (``benchmarks/vector_index.py``: 512-d DOVE V_M vectors of UCM-Captions as seeds at centre
    cosine 0.733, its 9450 caption vectors T_G as queries, 500 single queries, k 100, recall against
    the exact top k). Recall and bytes are properties of the data; the timings are PROVISIONAL
    (2 FAISS threads on a shared 2-core machine), to be replaced by a run alone:

    * flat reads every vector per query, so its latency grows linearly with the count (p50
      1.4 ms at 10k, 10.7 ms at 100k). Up to FLAT_MAX_COUNT = 50k it stays at a few ms, the
      order of the rest of a query (encoding the text, re-ranking a few hundred candidates
      pairwise), and exact search needs no training, is deterministic at any thread count and
      never goes stale as tiles are added; at 100k an ivf answers 20x faster (0.55 ms) at recall
      1.0000.
    * ivf nlist = 4·sqrt(count): at 100k, 2·, 4· and 8·sqrt(count) lists (632, 1265, 2530) all
      reach recall@10 >= 0.997 at nprobe 32; 4· balances k-means time (grows with the square of
      the factor: 8, 14, 28 s to build on one thread) against search time (0.54, 0.34, 0.28 ms).
      Training on 39, 64 or 256 vectors per list changed recall by < 0.002: 64 (TRAINING_PER_LIST).
    * nprobe = max(64, nlist/64): 32 probes already give recall@10 0.9936-0.9998 (recall@100
      0.993-0.997) at every count and nlist measured (10k: 256 lists; 100k: 632-2530; 300k: 2191;
      the spread at 100k is the training sample's), 16 probes 0.980-0.991; 64 probes give recall@10
      1.0000 and recall@100 >= 0.999 at 10k and 100k for 1.6x the time of 32, a margin worth its
      cost since the re-ranker reads the top few hundred. The share (1/64) takes over above 4096
      lists (about 1M vectors), where it is not measured yet.
    * storage flat, not sq8: sq8 holds 4x less (546 vs 2082 bytes per vector at 100k) but its
      approximate scores cap recall@10 at 0.983-0.990 however many lists are probed.
    * auto's approximate kind is ivf, not hnsw: at 100k hnsw (m 16, ef_construction 200) reaches
      recall@10 0.9914 / 0.9962 at ef_search 128 / 200 (recall@100 0.954 / 0.981) in 0.42 / 0.54 ms,
      where ivf (nprobe 64) gives recall@10 and recall@100 1.0000 in 0.55 ms; hnsw builds 3x slower (23 s vs 7 s), holds more
      (2240 vs 2082 bytes), is deterministic only on one thread and cannot remove a vector without
      rebuilding. m 32 was no better at 100k (recall@10 0.990 / 0.998 at ef_search 128 / 200) and
      builds slower, so HNSW_M is 16 and HNSW_EF_SEARCH 200.
    """
    if kind not in VECTOR_KINDS:
        raise ConfigError(f"vector index kind must be one of {', '.join(VECTOR_KINDS)}, got {kind!r}")
    settable = [f.name for f in dataclasses.fields(VectorIndexSpec) if f.name not in ("kind", "dim")]
    check_keys(overrides, settable, "vector index", what="parameter")
    if count < 0:
        raise ConfigError(f"vector count must be non-negative, got {count}")
    if kind == "auto":
        kind = "flat" if count <= FLAT_MAX_COUNT else AUTO_APPROXIMATE_KIND
    params: dict[str, Any] = {}
    if kind == "ivf":
        nlist = overrides.get("nlist", _lists(count))
        params = {"nlist": nlist, "nprobe": _probes(nlist), "storage": IVF_DEFAULT_STORAGE}
    elif kind == "hnsw":
        params = {"m": HNSW_M, "ef_search": HNSW_EF_SEARCH, "ef_construction": HNSW_EF_CONSTRUCTION}
    return VectorIndexSpec(kind=kind, dim=dim, **{**params, **overrides})


def rebuild_needed(spec: VectorIndexSpec, count: int, kind: str = "auto", **overrides: Any) -> bool:
    """Whether an index built as ``spec`` no longer suits ``count`` vectors and should be rebuilt.

    True when :func:`choose_spec` (same ``kind`` and ``overrides``) now picks another kind, or an
    ivf with more than twice or less than half the lists (the lists were trained for another size).
    """
    wanted = choose_spec(count, spec.dim, kind, **overrides)
    if wanted.kind != spec.kind:
        return True
    return wanted.kind == "ivf" and not 0.5 <= spec.nlist / wanted.nlist <= 2


def training_ids(ids: np.ndarray, spec: VectorIndexSpec, seed: int = 0) -> np.ndarray:
    """The sorted ids, drawn from ``ids`` with ``seed``, whose vectors an ivf index is trained on."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    size = spec.training_size(len(ids))
    if size >= len(ids):
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, size=size, replace=False))


# ----------------------------------------------------------------------------------------------
# Checking arrays


def _as_ids(ids: np.ndarray, what: str = "ids") -> np.ndarray:
    """``ids`` as a 1-D int64 array of non-negative values (-1 marks padding in results)."""
    array = np.asarray(ids)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{what} must be a 1-D array of integers, got shape {array.shape} of {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        raise ValueError(f"{what} must be non-negative, got {int(array.min())}")
    return array


def _as_vectors(vectors: np.ndarray, dim: int, what: str = "vectors", unit: bool = True) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 (n, dim) array of finite (unit-length) rows."""
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"{what} must be an (n, {dim}) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} hold NaN or infinite values")
    if unit and array.size:
        norms = np.linalg.norm(array, axis=1)
        worst = int(np.argmax(np.abs(norms - 1)))
        if abs(norms[worst] - 1) > _UNIT_TOLERANCE:
            raise ValueError(f"{what} must be unit length (inner product = cosine); row {worst} has norm {norms[worst]:.4f}")
    return array


def _order(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row by score descending, then id ascending; padding (id -1, score -inf) last."""
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    tie_key = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((tie_key, -scores), axis=-1)
    return np.take_along_axis(scores, order, axis=-1), np.take_along_axis(ids, order, axis=-1)


def exact_search(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top ``k`` of each query by inner product, computed in numpy: (q, k) scores and ids.

    The reference the approximate kinds are measured against (independent of FAISS). Padded with
    id -1 / score -inf when there are fewer than ``k`` vectors; ordered as VectorIndex.search orders.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = _as_ids(ids)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if vectors.ndim != 2 or queries.ndim != 2 or queries.shape[1] != vectors.shape[1] or len(ids) != len(vectors):
        raise ValueError(f"exact_search needs (n, d) vectors, n ids and (q, d) queries, got {vectors.shape}, "
                         f"{ids.shape} and {queries.shape}")
    take = min(k, len(vectors))
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    block = max(1, (1 << 26) // max(1, len(vectors)))  # about 256 MB of scores at a time
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ vectors.T
        if take < len(vectors):
            top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        else:
            top = np.broadcast_to(np.arange(len(vectors)), scores.shape)
        out_scores[start:start + block, :take] = np.take_along_axis(scores, top, axis=1)
        out_ids[start:start + block, :take] = ids[top]
    return _order(out_scores, out_ids)


# ----------------------------------------------------------------------------------------------
# The index


@contextlib.contextmanager
def _faiss_threads(threads: int | None) -> Iterator[None]:
    """Run FAISS on ``threads`` OpenMP threads inside the block (its own setting when None)."""
    if threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _empty_index(spec: VectorIndexSpec, seed: int) -> Any:
    """An empty FAISS index of ``spec`` (an ivf still untrained)."""
    if spec.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(spec.dim))
    if spec.kind == "hnsw":
        graph = faiss.IndexHNSWFlat(spec.dim, spec.m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = spec.ef_construction
        graph.hnsw.efSearch = spec.ef_search
        return faiss.IndexIDMap2(graph)
    quantizer = faiss.IndexFlatIP(spec.dim)
    ivf: Any
    if spec.storage == "sq8":
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, spec.dim, spec.nlist, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT)
    else:
        ivf = faiss.IndexIVFFlat(quantizer, spec.dim, spec.nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    ivf.cp.spherical = True  # unit centroids: inner product with a centroid then ranks by angle, not by its norm
    ivf.nprobe = spec.nprobe
    return ivf


def _kind_of(index: Any) -> tuple[str, str]:
    """(kind, ivf storage) of a FAISS index this module writes; ("", "") for anything else."""
    if isinstance(index, faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexHNSWFlat):
            return "hnsw", "flat"
        if isinstance(inner, faiss.IndexFlatIP):
            return "flat", "flat"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf", "flat"
    if isinstance(index, faiss.IndexIVFScalarQuantizer) and index.sq.qtype == faiss.ScalarQuantizer.QT_8bit:
        return "ivf", "sq8"
    return "", ""


def meta_path(path: str | Path) -> Path:
    """The JSON file beside an index file: ``<file>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


class VectorIndex:
    """Unit vectors by integer id in a FAISS index of ``spec``; build with :meth:`create` or :meth:`load`.

    Attributes:
        spec: the index's kind, dimension and parameters.
        threads: FAISS threads for adding, training and searching (None: FAISS's own setting).
    """

    def __init__(self, spec: VectorIndexSpec, index: Any, threads: int | None = None) -> None:
        self.spec = spec
        self.threads = threads
        self._index = index  # a FAISS index (SWIG classes: typed Any, the stubs lack most attributes)
        self._held: np.ndarray | None = None  # sorted ids held, computed when first asked for

    @classmethod
    def create(cls, spec: VectorIndexSpec, training: np.ndarray | None = None, seed: int = 0,
               threads: int | None = None) -> VectorIndex:
        """An empty index of ``spec``; an ivf is trained on ``training`` (a sample of the vectors).

        Training is deterministic under ``seed`` (FAISS's k-means seed and sampling). Pass at least
        39·nlist vectors, best :meth:`VectorIndexSpec.training_size` of them (:func:`training_ids`).
        """
        index = _empty_index(spec, seed)
        if spec.kind == "ivf":
            if training is None:
                raise ValueError(f"an ivf index needs training vectors (at least {spec.nlist}, best "
                                 f"{TRAINING_PER_LIST * spec.nlist}), got none")
            sample = _as_vectors(training, spec.dim, "training vectors")
            if len(sample) < spec.nlist:
                raise ValueError(f"an ivf index of {spec.nlist} lists needs at least {spec.nlist} training vectors, "
                                 f"got {len(sample)}")
            if len(sample) < MIN_TRAINING_PER_LIST * spec.nlist:
                logger.warning("training %d lists on %d vectors: fewer than %d per list places them poorly",
                               spec.nlist, len(sample), MIN_TRAINING_PER_LIST)
            with _faiss_threads(threads):
                index.train(sample)
        return cls(spec, index, threads)

    # ------------------------------------------------------------------------------- contents

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        """The sorted int64 ids the index holds."""
        if self._held is None:
            self._held = np.sort(self._stored_ids())
        return self._held.copy()

    def _stored_ids(self) -> np.ndarray:
        """The ids in the index's own order (id map, or the inverted lists one after another)."""
        if self.spec.kind != "ivf":
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)
        lists = self._index.invlists
        parts = [np.zeros(0, dtype=np.int64)]
        for list_no in range(lists.nlist):
            size = lists.list_size(list_no)
            if size:
                pointer = lists.get_ids(list_no)
                parts.append(faiss.rev_swig_ptr(pointer, size).astype(np.int64))
                lists.release_ids(list_no, pointer)
        return np.concatenate(parts)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add unit ``vectors`` (float32 (n, dim)) under new, distinct int64 ``ids``."""
        ids = _as_ids(ids)
        vectors = _as_vectors(vectors, self.spec.dim)
        if len(ids) != len(vectors):
            raise ValueError(f"got {len(ids)} ids for {len(vectors)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids to add must be distinct")
        held = self.ids()
        present = ids[np.isin(ids, held)]
        if present.size:
            listed = ", ".join(str(i) for i in present[:5]) + (", …" if present.size > 5 else "")
            raise ValueError(f"{present.size} ids are in the index already ({listed}); remove them first")
        self._insert(ids, vectors)
        self._held = np.union1d(held, ids)

    def _insert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add checked vectors under checked ids; the held-id cache is the caller's to update."""
        self._held = None
        with _faiss_threads(self.threads):
            self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors of ``ids`` (ids it does not hold are ignored); returns how many went.

        flat and ivf remove in place (a pass over the vectors). An HNSW graph cannot drop a node,
        so hnsw rebuilds the graph from the vectors it keeps: as slow as building it anew.
        """
        held = self.ids()
        going = np.intersect1d(np.unique(_as_ids(ids)), held, assume_unique=True)
        if not going.size:
            return 0
        if self.spec.kind == "hnsw":
            self._rebuild_without(going)
        else:
            removed = int(self._index.remove_ids(going))
            if removed != going.size:
                raise RuntimeError(f"FAISS removed {removed} of {going.size} vectors")
        self._held = np.setdiff1d(held, going, assume_unique=True)
        return int(going.size)

    def _rebuild_without(self, going: np.ndarray) -> None:
        """Rebuild an hnsw index from its vectors but those of ``going``, added in id order."""
        graph = self._graph()
        stored = self._stored_ids()
        keep = np.flatnonzero(~np.isin(stored, going))
        keep = keep[np.argsort(stored[keep])]
        logger.info("rebuilding the HNSW graph of %d vectors to remove %d", keep.size, going.size)
        vectors = graph.reconstruct_n(0, graph.ntotal)[keep]
        self._index = _empty_index(self.spec, 0)
        self._insert(stored[keep], np.ascontiguousarray(vectors))

    # ------------------------------------------------------------------------------- searching

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change how hard a search looks (ivf ``nprobe``, hnsw ``ef_search``) without rebuilding."""
        changes: dict[str, Any] = {name: value for name, value in (("nprobe", nprobe), ("ef_search", ef_search)) if value is not None}
        wrong = {"nprobe": "ivf", "ef_search": "hnsw"}
        for name in changes:
            if self.spec.kind != wrong[name]:
                raise ConfigError(f"{name} applies to {wrong[name]} indexes, this one is {self.spec.kind}")
        self.spec = dataclasses.replace(self.spec, **changes)
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        if self.spec.kind == "ivf":
            self._index.nprobe = self.spec.nprobe
        elif self.spec.kind == "hnsw":
            self._graph().hnsw.efSearch = self.spec.ef_search

    def _graph(self) -> Any:
        """The IndexHNSWFlat inside an hnsw index's id map."""
        return faiss.downcast_index(self._index.index)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` vectors of each query: (q, k) float32 scores and int64 ids, -1 / -inf padded."""
        queries = _as_vectors(queries, self.spec.dim, "queries", unit=False)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if len(self) == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        with _faiss_threads(self.threads):
            scores, ids = self._index.search(queries, k)
        return _order(scores, ids.astype(np.int64))

    # ------------------------------------------------------------------------------- files

    def save(self, path: str | Path, meta: dict[str, str]) -> None:
        """Write the index to ``path`` (FAISS's format) and ``<path>.json`` (spec, count, digest, ``meta``).

        Each file is written to a temporary file and renamed; the JSON file records the FAISS file's
        SHA-256, so a save interrupted between the two renames is caught by :meth:`load`.
        """
        bad = sorted(key for key, value in meta.items() if not isinstance(key, str) or not isinstance(value, str))
        if bad:
            raise ValueError(f"index metadata must map strings to strings; not so for {', '.join(map(str, bad))}")
        path = Path(path)
        digest = hashlib.sha256()
        with atomic_path(path) as tmp, tmp.open("wb") as handle:
            def write(chunk: bytes) -> None:
                digest.update(chunk)
                handle.write(chunk)

            writer = faiss.PyCallbackIOWriter(write)  # type: ignore[attr-defined]  # missing from the stubs
            faiss.write_index(self._index, writer)
            del writer  # flushes FAISS's buffer into ``write``
        write_json(meta_path(path), {"format": VECTORS_FORMAT, "spec": self.spec.to_dict(), "count": len(self),
                                     "bytes": path.stat().st_size, "sha256": digest.hexdigest(), "meta": meta})

    @classmethod
    def load(cls, path: str | Path, dim: int | None = None, threads: int | None = None) -> tuple[VectorIndex, dict[str, str]]:
        """The index saved at ``path`` and its metadata; one-line CheckpointError when it is unusable.

        Unusable: ``path`` or its JSON file missing, truncated, foreign or not matching each other,
        or (with ``dim``) vectors of another dimension than the caller's model produces.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(path, "vector index not found")
        record, spec = _read_record(meta_path(path))
        if dim is not None and spec.dim != dim:
            raise CheckpointError(path, f"holds {spec.dim}-d vectors, the model's first stage is {dim}-d; rebuild the index")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(path, f"is {size} bytes, {meta_path(path).name} says {record['bytes']}: truncated or "
                                        "replaced; rebuild the index")
        index, digest = _read_faiss(path)
        if digest != record["sha256"]:
            raise CheckpointError(path, f"does not match {meta_path(path).name} (an interrupted save?); rebuild the index")
        kind, storage = _kind_of(index)
        if (kind, storage if kind == "ivf" else "flat") != (spec.kind, spec.storage if kind == "ivf" else "flat"):
            raise CheckpointError(path, f"holds a {kind or type(index).__name__} index, its metadata says {spec.kind}")
        if index.d != spec.dim or index.metric_type != faiss.METRIC_INNER_PRODUCT or index.ntotal != record["count"]:
            raise CheckpointError(path, f"holds {index.ntotal} vectors of dim {index.d}, its metadata says "
                                        f"{record['count']} of dim {spec.dim} (inner product)")
        if kind == "ivf" and index.nlist != spec.nlist:
            raise CheckpointError(path, f"has {index.nlist} lists, its metadata says {spec.nlist}")
        loaded = cls(spec, index, threads)
        loaded._apply_search_params()
        return loaded, dict(record["meta"])


def _read_record(path: Path) -> tuple[dict[str, Any], VectorIndexSpec]:
    """The JSON record beside an index file, checked, and the spec it holds."""
    record = read_json(path, CheckpointError)
    if not isinstance(record, dict) or record.get("format") != VECTORS_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(path, f"not an rsitr vector index record (format {found!r})")
    missing = [key for key in ("spec", "count", "bytes", "sha256", "meta") if key not in record]
    if missing:
        raise CheckpointError(path, f"vector index record lacks {', '.join(missing)}")
    try:
        spec = VectorIndexSpec.from_dict(dict(record["spec"]))
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid vector index spec: {exc}") from exc
    return record, spec


def _read_faiss(path: Path) -> tuple[Any, str]:
    """The FAISS index in ``path`` and the file's SHA-256, read in one pass."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        def read(size: int) -> bytes:
            chunk = handle.read(size)
            digest.update(chunk)
            return chunk

        reader = faiss.PyCallbackIOReader(read)  # type: ignore[attr-defined]  # missing from the stubs
        try:
            index: Any = faiss.read_index(reader)
        except RuntimeError as exc:
            raise CheckpointError(path, "not a readable FAISS index (truncated or another kind of file); "
                                        "rebuild the index") from exc
        finally:
            del reader
        digest.update(handle.read())  # bytes after the index, if any, belong to the file's digest too
    return index, digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Keeping an index in line with the tile database


def sync(index: VectorIndex, wanted_ids: np.ndarray, fetch: Callable[[np.ndarray], np.ndarray], *,
         chunk_size: int = _CHUNK, progress: bool = True) -> tuple[int, int]:
    """Make ``index`` hold exactly ``wanted_ids``; returns (added, removed). Idempotent.

    Removes the ids it holds that are not wanted, then adds the missing ones in id order,
    ``chunk_size`` at a time, with their vectors from ``fetch(ids)`` (float32 (n, dim) unit rows
    in the order of ``ids``), behind a progress bar when there is more than one chunk.
    """
    wanted = _as_ids(wanted_ids, "wanted ids")
    unique = np.unique(wanted)
    if len(unique) != len(wanted):
        raise ValueError(f"wanted ids hold {len(wanted) - len(unique)} duplicates")
    held = index.ids()
    extra = np.setdiff1d(held, unique, assume_unique=True)
    missing = np.setdiff1d(unique, held, assume_unique=True)
    removed = index.remove(extra) if extra.size else 0
    with progress_bar(total=len(missing), desc="adding vectors", unit="vector", enabled=progress and len(missing) > chunk_size) as bar:
        for start in range(0, len(missing), chunk_size):
            ids = missing[start:start + chunk_size]
            vectors = _as_vectors(fetch(ids), index.spec.dim, f"fetched vectors of ids {ids[0]}..{ids[-1]}")
            if len(vectors) != len(ids):
                raise ValueError(f"fetch returned {len(vectors)} vectors for {len(ids)} ids")
            index._insert(ids, vectors)
            bar.update(len(ids))
    if missing.size or extra.size:
        logger.info("vector index: added %d, removed %d, holds %d", missing.size, removed, len(index))
    return int(missing.size), removed
