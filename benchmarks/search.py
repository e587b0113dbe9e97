"""Text search on a million-tile index: latency of first stage + DOVE re-rank, recall, memory.

Not a test: the measurement behind the search targets of docs/search.md. In one process, alone:

1. **Real encodings.** A DOVE model bundle encodes every image of a dataset (UCM-Captions:
   1,890 chips) into its tile encodings (V_MR, V_M, E_R), and 4 corner crops (3/4 of the side) of
   ``--crop-images`` of them: the crops say how far apart overlapping tiles of one place lie.
2. **A million tiles around them.** Each generated tile takes the encodings of a random real image
   and adds isotropic Gaussian noise to each of them, scaled per encoding so that the mean cosine
   between a generated encoding and its centre equals the mean cosine between a real crop's
   encoding and its full image's (measured in step 1, printed). The tiles are written as a real
   index (catalogue, safetensors shards, FAISS vectors via the indexer's own sync), as if
   ``rsitr index build`` had made them from ``count / 1000`` scenes of 1,000 tiles.
3. **Queries**: real captions of the split (``--split``), one at a time as a service runs them,
   through :meth:`rsitr_serve.search.TileSearcher.search_text` (k 20, re-rank 100): p50 / p99
   latency over ``--queries`` after a warm-up, and each stage's share (text encoding, first
   stage, fetching the candidates' encodings, the pairwise score, the catalogue lookup).
4. **Baselines of the same run**: exact first stage (FAISS flat inner product over every vector):
   its latency, and the recall@10 of the approximate first stage against it; exhaustive pairwise
   scoring of every tile (``exhaustive_text``) for ``--exhaustive`` queries.
5. **Memory**: vector index bytes per vector (file and in memory), shard bytes per tile, the
   searcher's resident memory.

Usage::

    python benchmarks/search.py --model runs/models/dove-s-ucm-seed0 --dataset ../shared/data/ucm_captions \\
        [--count 1000000] [--queries 500] [--out runs/search-1m]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from rsitr import load_model
from rsitr.data import load_dataset
from rsitr.data.images import read_image
from rsitr_serve.catalog import SHARD_DIR, TILE_COLUMNS, Catalog, IndexSettings, model_fingerprint
from rsitr_serve.indexer import sync_vectors, unit_rows
from rsitr_serve.search import TileSearcher
from rsitr_serve.shards import ENCODING_PREFIX, shard_name, write_shard

TILES_PER_SCENE = 1000
SHARD = 1024


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def real_encodings(bundle, dataset, crop_images: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Encodings of every dataset image, and per key the mean cosine of a 3/4 corner crop to its image."""
    paths = [dataset.image_path(i) for i in range(dataset.num_images)]
    encoded = bundle.encode_images(paths, batch_size=64)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(crop_images, len(paths)), replace=False)
    crops, owners = [], []
    for index in chosen:
        picture = np.asarray(read_image(paths[index]))
        h, w = picture.shape[:2]
        ch, cw = 3 * h // 4, 3 * w // 4
        for y, x in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)):
            crops.append(picture[y:y + ch, x:x + cw])
            owners.append(int(index))
    cropped = bundle.encode_images(crops, batch_size=64)
    cosines = {key: float(torch.nn.functional.cosine_similarity(cropped[key].float(), encoded[key][owners].float()).mean())
               for key in encoded}
    return encoded, cosines


def noise_scale(target_cosine: float) -> float:
    """s such that v = c + s·|c|·ε/√d (ε standard normal) has E[cos(v, c)] ≈ target (for large d)."""
    return float(np.sqrt(max(1.0 / target_cosine**2 - 1.0, 0.0)))


def generate_index(folder: Path, bundle, model_dir: str, real: dict[str, torch.Tensor], cosines: dict[str, float],
                   count: int, seed: int) -> dict:
    """Write a ``count``-tile index whose encodings lie around ``real`` ones; returns what it measured."""
    settings = IndexSettings(model={"path": str(Path(model_dir).resolve()), "fingerprint": model_fingerprint(model_dir),
                                    "name": bundle.spec.name, "architecture": bundle.spec.architecture},
                             first_stage=None, tile=256, overlap=0.5, scales=[1.0], bands=None, shard_size=SHARD,
                             vector_kind="auto", dim=int(real["global"].shape[1]), stage_key="global")
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    scales = {key: noise_scale(cosines[key]) for key in real}
    achieved = {key: [] for key in real}
    started = time.perf_counter()
    with Catalog(folder, writable=True) as catalog:
        settings.write(folder)
        (folder / SHARD_DIR).mkdir(exist_ok=True)
        with catalog.transaction() as db:
            for scene in range(count // TILES_PER_SCENE):
                db.execute("INSERT INTO files(path, digest, bytes, width, height, crs, info, windows, done, complete) "
                           "VALUES(?, ?, 0, 8000, 8000, NULL, '{}', ?, ?, 1)",
                           (f"/generated/scene_{scene:05d}.tif", f"generated-{scene}", TILES_PER_SCENE, TILES_PER_SCENE))
        tile_id = 1
        for shard_id, start in enumerate(range(0, count, SHARD), start=1):
            n = min(SHARD, count - start)
            centres = torch.from_numpy(rng.integers(0, real["global"].shape[0], size=n))
            tensors = {}
            for key, values in real.items():
                centre = values[centres].float()
                noise = torch.randn(centre.shape, generator=generator) * (scales[key] / np.sqrt(centre.shape[1]))
                tensors[f"{ENCODING_PREFIX}{key}"] = centre + noise * centre.norm(dim=1, keepdim=True)
                if start == 0:
                    achieved[key].append(float(torch.nn.functional.cosine_similarity(
                        tensors[f"{ENCODING_PREFIX}{key}"], centre).mean()))
            write_shard(folder / SHARD_DIR / shard_name(shard_id), tensors, list(range(tile_id, tile_id + n)))
            rows = []
            for row in range(n):
                position = start + row
                scene, within = divmod(position, TILES_PER_SCENE)
                x, y = (within % 40) * 128, (within // 40) * 128
                rows.append((scene + 1, 1.0, x, y, 256, 256, *(None,) * 8, shard_id, row))
            with catalog.transaction() as db:
                db.execute("INSERT INTO shards(id, rows, bytes) VALUES(?, ?, ?)",
                           (shard_id, n, (folder / SHARD_DIR / shard_name(shard_id)).stat().st_size))
                db.executemany(f"INSERT INTO tiles({', '.join(TILE_COLUMNS)}) VALUES({', '.join('?' * len(TILE_COLUMNS))})",
                               rows)
            tile_id += n
        written = time.perf_counter() - started
        started = time.perf_counter()
        sync_vectors(folder, catalog, settings, progress=False)
        synced = time.perf_counter() - started
    return {"noise_scales": scales, "achieved_cosine": {k: v[0] for k, v in achieved.items()}, "write_seconds": written,
            "vector_index_seconds": synced}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def timed_stages(searcher: TileSearcher, text: str, k: int, rerank: int) -> dict[str, float]:
    """The stages of ``search_text``, each timed (same calls, in the same order)."""
    model = searcher.encoders.model
    clock = time.perf_counter
    t0 = clock()
    texts = model.encode_texts([text])
    query = model.first_stage_texts(texts).numpy()
    t1 = clock()
    _, ids = searcher.vectors.search(query, max(k, rerank))
    t2 = clock()
    shards, rows = searcher.catalog.locate(ids[0])
    images = searcher.shards.gather(shards, rows, ENCODING_PREFIX)
    t3 = clock()
    full = model.score(images, texts)[:, 0].numpy()
    t4 = clock()
    order = np.argsort(-full, kind="stable")[:k]
    searcher.catalog.tiles([int(i) for i in ids[0][order]])
    t5 = clock()
    return {"encode_text": t1 - t0, "first_stage": t2 - t1, "fetch": t3 - t2, "score": t4 - t3, "catalogue": t5 - t4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--exhaustive", type=int, default=3)
    parser.add_argument("--crop-images", type=int, default=300)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--rerank", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/search-1m")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    bundle = load_model(args.model)
    dataset = load_dataset(args.dataset)
    real, cosines = real_encodings(bundle, dataset, args.crop_images, args.seed)
    print(f"real encodings: {real['global'].shape[0]} images; crop-to-image cosine {cosines}", flush=True)
    built = generate_index(out / "index", bundle, args.model, real, cosines, args.count, args.seed)
    print(f"index written: {built}", flush=True)
    del real
    rng = np.random.default_rng(args.seed)
    captions = [dataset.captions[c] for i in dataset.split_indices(args.split) for c in dataset.captions_of(i)]
    queries = [captions[i] for i in rng.choice(len(captions), size=min(args.queries, len(captions)), replace=False)]
    rss_before = resident_mib()
    searcher = TileSearcher(out / "index")
    rss_open = resident_mib()
    for text in queries[:20]:  # warm-up: page in the shards' headers, the vector lists, the kernels
        searcher.search_text(text, k=args.k, rerank=args.rerank)
    latencies, stages = [], []
    for text in queries:
        started = time.perf_counter()
        searcher.search_text(text, k=args.k, rerank=args.rerank)
        latencies.append(time.perf_counter() - started)
    for text in queries[:100]:
        stages.append(timed_stages(searcher, text, args.k, args.rerank))
    rss_queries = resident_mib()
    # baselines: exact first stage over every vector, and exhaustive pairwise scoring
    ids, _, _ = searcher.catalog.tile_locations()
    from rsitr_serve.indexer import stage_vectors_of

    vectors = stage_vectors_of(out / "index", searcher.catalog, searcher.settings, ids)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    query_vectors = unit_rows(bundle.encode_texts(queries)["global"])
    exact_latencies, recalls = [], []
    for q in range(len(queries)):
        started = time.perf_counter()
        _, exact_ids = exact.search(query_vectors[q:q + 1], 10)
        exact_latencies.append(time.perf_counter() - started)
        _, approx_ids = searcher.vectors.search(query_vectors[q:q + 1], 10)
        recalls.append(len(set(ids[exact_ids[0]]) & set(approx_ids[0])) / 10)
    exhaustive_seconds = []
    for text in queries[: args.exhaustive]:
        started = time.perf_counter()
        searcher.exhaustive_text(text, k=args.k)
        exhaustive_seconds.append(time.perf_counter() - started)
    index_file = out / "index" / "vectors.faiss"
    shard_bytes = sum(p.stat().st_size for p in (out / "index" / SHARD_DIR).glob("*"))
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    result = {
        "count": args.count, "queries": len(queries), "k": args.k, "rerank": args.rerank, "threads": args.threads,
        "crop_cosines": cosines, **built, "vector_spec": searcher.vectors.spec.to_dict(),
        "p50_ms": 1000 * p50, "p99_ms": 1000 * p99, "mean_ms": 1000 * float(np.mean(latencies)),
        "stages_mean_ms": {key: 1000 * float(np.mean([s[key] for s in stages])) for key in stages[0]},
        "exact_first_stage_p50_ms": 1000 * percentile(exact_latencies, 50),
        "exact_first_stage_p99_ms": 1000 * percentile(exact_latencies, 99),
        "recall_at_10_vs_exact": float(np.mean(recalls)), "recall_at_10_min": float(np.min(recalls)),
        "exhaustive_pairwise_s": exhaustive_seconds,
        "speedup_vs_exhaustive": float(np.mean(exhaustive_seconds)) / p50,
        "vector_file_bytes_per_vector": index_file.stat().st_size / args.count,
        "vector_bytes_per_vector": searcher.vectors.spec.bytes_per_vector(args.count),
        "shard_bytes_per_tile": shard_bytes / args.count,
        "searcher_rss_mib": {"before_open": rss_before, "after_open": rss_open, "after_queries": rss_queries},
    }
    (out / "search.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
