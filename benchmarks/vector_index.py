"""First-stage vector index: build time, memory, single-query latency and recall of flat / ivf / hnsw.

For each count, builds every kind of :mod:`rsitr_serve.vectors` with a few parameter settings and
measures: build time (training included), memory per vector (the saved file's size / count, and
``VectorIndexSpec.bytes_per_vector``), the latency of single-query searches (k = 100, one query at
a time, as a search service runs them; p50 and p99) and recall@10 / recall@100 against the exact
top k of :func:`rsitr_serve.vectors.exact_search`. The exact flat index is the baseline of the same
run: every latency is also given as a ratio to its p50. The row marked ``auto`` is what
:func:`rsitr_serve.vectors.choose_spec` picks for that count.

Vectors are drawn around real encodings: each is normalize(c + σ·ε) with c a random row of
``--seeds-file`` (unit image embeddings of a trained model) and ε standard Gaussian; σ makes the
mean cosine between a vector and its centre ``--centre-cosine``. A generated vector stands for an
unseen tile that resembles the real image c, so the fitting value is the cosine between real
images and their nearest real neighbour: the script measures it on the seeds and uses it unless
told otherwise (0.73 for DOVE's V_M on UCM-Captions, 1890 images). Isotropic ε spreads vectors over
all dimensions, where real embeddings concentrate in a few dozen, so the approximate kinds are if
anything harder than on real tiles. Queries are rows of ``--queries-file`` (real text embeddings
T_G) or, without it, a held-out fifth of the seeds (real images as queries), used as they are.
Without a seeds file the centres are ``--centres`` random unit vectors (a seeded Gaussian mixture)
and the queries are drawn like the vectors; the output says which source was used.

    python benchmarks/vector_index.py                                   # mixture, 10k and 100k
    python benchmarks/vector_index.py --export-seeds /tmp/seeds --model runs/bench-ucm/dove/seed0 \\
        --dataset ../shared/data/ucm_captions --dataset-name ucm         # real V_M and T_G vectors
    python benchmarks/vector_index.py --seeds-file /tmp/seeds/images.npy --queries-file /tmp/seeds/texts.npy \\
        --counts 10000,100000,1000000 --threads 2 --json vector_index.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsitr_serve import vectors as vx
from rsitr_serve.vectors import VectorIndex, VectorIndexSpec, choose_spec, exact_search, meta_path, training_ids

MIXTURE_CENTRE_COSINE = 0.73  # DOVE V_M on UCM-Captions: mean cosine of an image and its nearest other image
HELD_OUT_SHARE = 0.2
_GENERATE_CHUNK = 100_000


# ----------------------------------------------------------------------------------------------
# Vectors


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32)."""
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def read_vectors(path: Path) -> np.ndarray:
    """The unit rows of a ``.npy`` file or of the only (or first) tensor of a safetensors file."""
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    else:
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        array = tensors[sorted(tensors)[0]]
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise SystemExit(f"{path}: expected an (n, d) array of vectors, got shape {array.shape}")
    return normalize(array)


def nearest_neighbour_cosine(vectors: np.ndarray, block: int = 1024) -> float:
    """Mean cosine between each vector and its nearest other vector."""
    best = np.empty(len(vectors), dtype=np.float32)
    for start in range(0, len(vectors), block):
        scores = vectors[start:start + block] @ vectors.T
        rows = np.arange(len(scores))
        scores[rows, start + rows] = -np.inf  # not itself
        best[start:start + block] = scores.max(axis=1)
    return float(best.mean())


def noise_scale(centre_cosine: float, dim: int) -> float:
    """σ with E[cos(c, normalize(c + σ·ε))] ≈ centre_cosine for unit c and ε ~ N(0, I_dim).

    |c + σε|² ≈ 1 + σ²·dim and c·(c + σε) ≈ 1, so the cosine is 1/sqrt(1 + σ²·dim).
    """
    if not 0 < centre_cosine < 1:
        raise SystemExit(f"--centre-cosine must be in (0, 1), got {centre_cosine}")
    return float(np.sqrt((1 / centre_cosine**2 - 1) / dim))


def around(centres: np.ndarray, count: int, sigma: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """``count`` vectors normalize(c + σ·ε) around random rows c of ``centres``, and their mean centre cosine."""
    parts, cosines = [], 0.0
    for start in range(0, count, _GENERATE_CHUNK):
        n = min(_GENERATE_CHUNK, count - start)
        chosen = centres[rng.integers(len(centres), size=n)]
        drawn = normalize(chosen + sigma * rng.standard_normal(chosen.shape, dtype=np.float32))
        cosines += float((drawn * chosen).sum())
        parts.append(drawn)
    return np.concatenate(parts), cosines / max(1, count)


@dataclass
class Corpus:
    """The vectors and queries of one run, and a sentence saying where they came from."""

    vectors: np.ndarray
    queries: np.ndarray
    source: str


def make_corpus(args: argparse.Namespace, count: int, rng: np.random.Generator) -> Corpus:
    """``count`` vectors and ``args.queries`` queries, from the seeds files or a Gaussian mixture."""
    if args.seeds_file is not None:
        seeds = read_vectors(args.seeds_file)
        order = rng.permutation(len(seeds))
        if args.queries_file is not None:
            centres, pool = seeds, read_vectors(args.queries_file)
            query_source = f"{len(pool)} real query vectors of {args.queries_file}"
        else:
            held = max(1, int(HELD_OUT_SHARE * len(seeds)))
            centres, pool = seeds[order[held:]], seeds[order[:held]]
            query_source = f"{held} held-out seeds (not used as centres)"
        if pool.shape[1] != centres.shape[1]:
            raise SystemExit(f"{args.queries_file}: {pool.shape[1]}-d queries for {centres.shape[1]}-d seeds")
        neighbour = nearest_neighbour_cosine(centres)
        target = args.centre_cosine if args.centre_cosine is not None else neighbour
        vectors, achieved = around(centres, count, noise_scale(target, centres.shape[1]), rng)
        queries = pool[rng.choice(len(pool), size=args.queries, replace=len(pool) < args.queries)]
        source = (f"{len(centres)} real seeds of {args.seeds_file} (their nearest-neighbour cosine "
                  f"{neighbour:.3f}); centre cosine target {target:.3f}, achieved {achieved:.3f}; "
                  f"queries: {query_source}")
        return Corpus(vectors, queries, source)
    dim = args.dim or 512
    centres = normalize(rng.standard_normal((args.centres, dim), dtype=np.float32))
    target = args.centre_cosine if args.centre_cosine is not None else MIXTURE_CENTRE_COSINE
    sigma = noise_scale(target, dim)
    vectors, achieved = around(centres, count, sigma, rng)
    queries, _ = around(centres, args.queries, sigma, rng)
    source = (f"no seeds file: a seeded Gaussian mixture of {args.centres} random unit centres in {dim}-d; centre cosine "
              f"target {target:.3f}, achieved {achieved:.3f}; queries drawn from the same mixture")
    return Corpus(vectors, queries, source)


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Setting:
    """One index to build (``spec``) and the search parameters to measure it with."""

    spec: VectorIndexSpec
    searches: tuple[dict[str, int], ...]
    auto: dict[str, int] | None = None  # the search parameters choose_spec picks, when it picks this build


def settings(args: argparse.Namespace, count: int, dim: int) -> Iterator[Setting]:
    """The builds of one count: flat, ivf per (lists factor, storage), hnsw per m; auto's among them."""
    auto = choose_spec(count, dim)
    builds: list[tuple[VectorIndexSpec, tuple[dict[str, int], ...]]] = [(choose_spec(count, dim, "flat"), ({},))]
    if "ivf" in args.kinds:
        for factor in args.ivf_lists_per_sqrt:
            nlist = max(1, min(round(factor * np.sqrt(count)), count // vx.MIN_TRAINING_PER_LIST))
            for storage in args.storages:
                spec = choose_spec(count, dim, "ivf", nlist=nlist, storage=storage)
                probes = sorted({p for p in args.nprobes if p <= nlist} | {spec.nprobe})
                builds.append((spec, tuple({"nprobe": p} for p in probes)))
    if "hnsw" in args.kinds:
        for m in args.hnsw_m:
            spec = choose_spec(count, dim, "hnsw", m=m, ef_construction=args.ef_construction)
            builds.append((spec, tuple({"ef_search": e} for e in sorted(set(args.ef_search) | {spec.ef_search}))))
    if auto.kind == "ivf" and not any(spec.kind == "ivf" and spec.nlist == auto.nlist and spec.storage == auto.storage
                                      for spec, _ in builds):
        builds.append((auto, ({"nprobe": auto.nprobe},)))
    for spec, searches in builds:
        marked = _build_key(auto) == _build_key(spec)
        yield Setting(spec, searches, _search_params(auto) if marked else None)


def _build_key(spec: VectorIndexSpec) -> tuple[Any, ...]:
    """What building depends on: the spec without its search parameters."""
    return spec.kind, spec.dim, spec.nlist, spec.m, spec.ef_construction, spec.storage


def _search_params(spec: VectorIndexSpec) -> dict[str, int]:
    return {"ivf": {"nprobe": spec.nprobe}, "hnsw": {"ef_search": spec.ef_search}}.get(spec.kind, {})


# ----------------------------------------------------------------------------------------------
# Measuring


def build(spec: VectorIndexSpec, vectors: np.ndarray, ids: np.ndarray, threads: int, seed: int) -> tuple[VectorIndex, float]:
    """The index of ``spec`` holding ``vectors``, and the seconds it took (training included)."""
    started = time.perf_counter()
    training = vectors[training_ids(ids, spec, seed) - 1] if spec.kind == "ivf" else None
    index = VectorIndex.create(spec, training, seed=seed, threads=threads)
    index.add(ids, vectors)
    return index, time.perf_counter() - started


def saved_bytes(index: VectorIndex) -> int:
    """Size of the index's FAISS file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vectors.faiss"
        index.save(path, {})
        size = path.stat().st_size
        meta_path(path).unlink()
    return size


def latencies(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds of each single-query search, and the ids each returned."""
    for query in queries[:10]:  # warm caches and thread pools
        index.search(query[None], k)
    times, found = np.empty(len(queries)), np.empty((len(queries), k), dtype=np.int64)
    for row, query in enumerate(queries):
        started = time.perf_counter()
        _, ids = index.search(query[None], k)
        times[row] = (time.perf_counter() - started) * 1000
        found[row] = ids[0]
    return times, found


def recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean share of the exact top ``k`` that the approximate top ``k`` holds."""
    hits = [len(np.intersect1d(f[:k], e[:k][e[:k] >= 0])) / max(1, int((e[:k] >= 0).sum())) for f, e in zip(found, exact)]
    return float(np.mean(hits))


def describe(spec: VectorIndexSpec, search: dict[str, int]) -> str:
    if spec.kind == "ivf":
        return f"nlist {spec.nlist}, {spec.storage}, nprobe {search['nprobe']}"
    if spec.kind == "hnsw":
        return f"m {spec.m}, efC {spec.ef_construction}, ef {search['ef_search']}"
    return "exact"


def measure_count(args: argparse.Namespace, corpus: Corpus, count: int) -> list[dict[str, Any]]:
    """Rows of one count: every setting's build, memory, latency and recall."""
    vectors, queries = corpus.vectors[:count], corpus.queries
    ids = np.arange(1, count + 1, dtype=np.int64)
    _, exact = exact_search(vectors, ids, queries, args.k)
    rows: list[dict[str, Any]] = []
    baseline = None
    for setting in settings(args, count, vectors.shape[1]):
        index, seconds = build(setting.spec, vectors, ids, args.threads, args.seed)
        file_bytes = saved_bytes(index)
        for search in setting.searches:
            if search:
                index.set_search_params(**search)
            times, found = latencies(index, queries, args.k)
            p50, p99 = float(np.percentile(times, 50)), float(np.percentile(times, 99))
            baseline = baseline or (p50, p99)  # flat comes first
            rows.append({"count": count, "kind": setting.spec.kind, "params": describe(setting.spec, search),
                         "auto": setting.auto == search, "spec": index.spec.to_dict(), "build_s": seconds,
                         "file_bytes_per_vector": file_bytes / count,
                         "bytes_per_vector": setting.spec.bytes_per_vector(count), "p50_ms": p50, "p99_ms": p99,
                         "p50_vs_exact": p50 / baseline[0], "p99_vs_exact": p99 / baseline[1],
                         "recall@10": recall(found, exact, 10), "recall@100": recall(found, exact, min(100, args.k))})
            print(_row(rows[-1]), flush=True)
        del index
    return rows


HEADER = ("| count | kind | parameters | build s | bytes/vector (file) | bytes/vector (held) | p50 ms | p99 ms | "
          "p50 × exact | p99 × exact | recall@10 | recall@100 |")


def _row(row: dict[str, Any]) -> str:
    kind = f"**{row['kind']} (auto)**" if row["auto"] else row["kind"]
    return (f"| {row['count']:,} | {kind} | {row['params']} | {row['build_s']:.2f} | {row['file_bytes_per_vector']:.0f} | "
            f"{row['bytes_per_vector']:.0f} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {row['p50_vs_exact']:.3f} | "
            f"{row['p99_vs_exact']:.3f} | {row['recall@10']:.4f} | {row['recall@100']:.4f} |")


# ----------------------------------------------------------------------------------------------
# Seeds from a trained model


def export_seeds(args: argparse.Namespace) -> None:
    """Write ``images.npy`` (first-stage image vectors) and ``texts.npy`` (caption vectors) of a dataset."""
    from rsitr import load_model
    from rsitr.data import load_dataset
    from rsitr.features.cache import extract_features

    bundle = load_model(args.model)
    dataset = load_dataset(args.dataset, name=args.dataset_name)
    features = extract_features(dataset, bundle.feature_spec, args.cache_dir)
    images = bundle.encode_features(features.select(np.arange(features.num_images)))
    texts = bundle.encode_texts(dataset.captions)
    image_vectors, text_vectors = bundle.first_stage(images, texts)
    args.export_seeds.mkdir(parents=True, exist_ok=True)
    np.save(args.export_seeds / "images.npy", image_vectors.numpy().astype(np.float32))
    np.save(args.export_seeds / "texts.npy", text_vectors.numpy().astype(np.float32))
    print(f"wrote {image_vectors.shape[0]} image and {text_vectors.shape[0]} text vectors "
          f"({image_vectors.shape[1]}-d) to {args.export_seeds}")


# ----------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--counts", type=_ints, default=[10_000, 100_000], help="comma-separated vector counts")
    parser.add_argument("--dim", type=int, default=None, help="dimension without a seeds file (default 512)")
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=["ivf", "hnsw"],
                        help="approximate kinds to measure beside the exact baseline")
    parser.add_argument("--queries", type=int, default=500, help="single-query searches per setting")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads")
    parser.add_argument("--seeds-file", type=Path, default=None, help=".npy or .safetensors of real unit image vectors")
    parser.add_argument("--queries-file", type=Path, default=None, help=".npy or .safetensors of real unit query vectors")
    parser.add_argument("--centre-cosine", type=float, default=None,
                        help="mean cosine of a vector and its centre (default: the seeds' nearest-neighbour cosine)")
    parser.add_argument("--centres", type=int, default=1000, help="mixture centres without a seeds file")
    parser.add_argument("--ivf-lists-per-sqrt", type=_floats, default=[vx.IVF_LISTS_PER_SQRT], help="nlist = factor·sqrt(count)")
    parser.add_argument("--nprobes", type=_ints, default=[8, 16, 32, 64, 128])
    parser.add_argument("--storages", type=lambda s: s.split(","), default=["flat", "sq8"])
    parser.add_argument("--hnsw-m", type=_ints, default=[vx.HNSW_M])
    parser.add_argument("--ef-search", type=_ints, default=[100, 128], help="besides choose_spec's")
    parser.add_argument("--ef-construction", type=int, default=vx.HNSW_EF_CONSTRUCTION)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the rows and the settings as JSON")
    parser.add_argument("--export-seeds", type=Path, default=None, help="write seeds of --model on --dataset here and stop")
    parser.add_argument("--model", type=Path, default=None, help="a run folder or model bundle (with --export-seeds)")
    parser.add_argument("--dataset", type=Path, default=None, help="a dataset path (with --export-seeds)")
    parser.add_argument("--dataset-name", default=None, help="the dataset's name, as the feature cache knows it")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "rsitr", help="feature cache")
    args = parser.parse_args(argv)
    if args.export_seeds is not None and (args.model is None or args.dataset is None):
        parser.error("--export-seeds needs --model and --dataset")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.export_seeds is not None:
        export_seeds(args)
        return
    import faiss

    rng = np.random.default_rng(args.seed)
    corpus = make_corpus(args, max(args.counts), rng)
    print(f"vectors: {corpus.source}")
    print(f"dim {corpus.vectors.shape[1]}, k {args.k}, {args.queries} single-query searches per setting, "
          f"FAISS threads {args.threads} (machine: {faiss.omp_get_max_threads()}), seed {args.seed}")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    rows = [row for count in sorted(args.counts) for row in measure_count(args, corpus, count)]
    if args.json is not None:
        settings_used = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
        report = {"source": corpus.source, "faiss": faiss.__version__, "settings": settings_used, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
