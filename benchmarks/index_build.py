"""Index build throughput against ``rsitr features`` throughput, and memory on a 20,000-pixel scene.

Not a test: the measurement behind docs/search.md. In one process, alone on the machine:

1. **Baselines**: ``rsitr features`` (:func:`rsitr.features.extract_features` into a fresh cache
   folder: the command's whole work) over every image of a dataset with the model bundle's own
   feature spec (backbone, weights, input size, precision), and its computation alone
   (:func:`rsitr.features.compute.compute_dataset_tensors`, no cache written): images/s.
2. **Index build** of the same image files with the same bundle (``rsitr index build``; each
   256-pixel chip is one tile at ``--tile 256``): tiles/s over the whole job (hashing the files,
   reading, backbone, the model's image encoder, shards, catalogue, vector index), and the ratio to
   the baseline. Both decode in a thread beside the backbone.
3. **Precision**: the same build with the backbone in fp32, for the speed the bf16 path buys (the
   accuracy of bf16 features is measured by ``benchmarks/precision_accuracy.py``).
4. **A large scene** (``--big-side``, default 20,000): a tiled GeoTIFF of that side, written block
   by block from the dataset's chips, indexed with the default tiling. Reported: tiles, tiles/s,
   and the peak resident memory of the process during the build (sampled every 50 ms) against
   the raster's size in memory: windowed reading keeps it bounded.

Usage::

    python benchmarks/index_build.py --dataset ../shared/data/ucm_captions --model runs/models/dove-s-ucm-seed0 \\
        [--out runs/index-build] [--big-side 20000] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window

from rsitr import load_model
from rsitr.data import load_dataset
from rsitr.data.images import read_image
from rsitr.features import extract_features
from rsitr.features.compute import compute_dataset_tensors
from rsitr_serve.indexer import build_index


def resident_bytes() -> int:
    """The process's resident set size now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """The highest resident set size seen while the block runs (sampled in a thread)."""

    def __init__(self, every: float = 0.05) -> None:
        self.every = every
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self.start = resident_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.every)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def baseline_rates(dataset, spec, batch_size: int, cache: Path) -> dict[str, float]:
    """Images/s of ``rsitr features`` (into an empty cache folder) and of its computation alone."""
    started = time.perf_counter()
    extract_features(dataset, spec, cache, batch_size=batch_size, progress=False)
    command = time.perf_counter() - started
    started = time.perf_counter()
    compute_dataset_tensors(dataset, spec, batch_size=batch_size, progress=False)
    computation = time.perf_counter() - started
    return {"command_images_per_s": dataset.num_images / command, "command_seconds": command,
            "computation_images_per_s": dataset.num_images / computation, "computation_seconds": computation}


def write_big_scene(path: Path, side: int, chips: list[Path], seed: int) -> int:
    """A ``side`` × ``side`` tiled GeoTIFF of randomly placed chips, written 1024 rows at a time; returns its raw bytes."""
    rng = np.random.default_rng(seed)
    pictures = [np.asarray(read_image(p).resize((256, 256))) for p in chips[:64]]
    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8", tiled=True,
                       blockxsize=512, blockysize=512, crs=CRS.from_epsg(32611),
                       transform=from_origin(380_000.0, 3_760_000.0, 0.3, 0.3)) as raster:
        for top in range(0, side, 1024):
            rows = min(1024, side - top)
            band = np.zeros((rows, side, 3), dtype=np.uint8)
            for y in range(0, rows, 256):
                for x in range(0, side, 256):
                    chip = pictures[int(rng.integers(len(pictures)))]
                    h, w = min(256, rows - y), min(256, side - x)
                    band[y:y + h, x:x + w] = chip[:h, :w]
            raster.write(np.moveaxis(band, -1, 0), window=Window(0, top, side, rows))
    return side * side * 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default="runs/index-build")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--big-side", type=int, default=20000, help="side of the large scene (0: skip it)")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.set_num_threads(2)
    dataset = load_dataset(args.dataset)
    bundle = load_model(args.model)
    spec = bundle.feature_spec
    results: dict = {"machine_threads": torch.get_num_threads(), "images": dataset.num_images,
                     "backbone": spec.backbone, "image_size": spec.image_size, "precision": spec.precision}
    compute_dataset_tensors(dataset, spec, batch_size=args.batch_size, progress=False)  # warm-up: file cache, kernels
    results["features"] = baseline_rates(dataset, spec, args.batch_size, out / "cache")
    rate = results["features"]["command_images_per_s"]
    computation = results["features"]["computation_images_per_s"]
    print(f"rsitr features: {rate:.1f} images/s; its computation alone {computation:.1f} images/s", flush=True)
    folder = dataset.image_dir
    summary = build_index([folder], args.model, out / "index-bf16", tile=256, batch_size=args.batch_size, progress=False)
    results["index"] = {"tiles": summary.tiles_encoded, "tiles_per_s": summary.tiles_per_second, "seconds": summary.seconds,
                        "ratio_to_features": summary.tiles_per_second / rate,
                        "ratio_to_computation": summary.tiles_per_second / computation}
    print(f"index build: {summary.tiles_per_second:.1f} tiles/s, {summary.tiles_per_second / rate:.2f} of rsitr features, "
          f"{summary.tiles_per_second / computation:.2f} of its computation alone", flush=True)
    fp32_model = out / "model-fp32-features"
    bundle.feature_spec = replace(spec, precision="fp32")
    bundle.save(fp32_model)
    fp32 = build_index([folder], fp32_model, out / "index-fp32", tile=256, batch_size=args.batch_size, progress=False)
    results["index_fp32"] = {"tiles_per_s": fp32.tiles_per_second, "seconds": fp32.seconds,
                             "bf16_speedup": summary.tiles_per_second / fp32.tiles_per_second}
    print(f"index build with fp32 features: {fp32.tiles_per_second:.1f} tiles/s (bf16 is "
          f"{summary.tiles_per_second / fp32.tiles_per_second:.2f}x)", flush=True)
    if args.big_side:
        scene = out / "big" / "scene.tif"
        scene.parent.mkdir()
        raw = write_big_scene(scene, args.big_side, [dataset.image_path(i) for i in range(dataset.num_images)], seed=0)
        with PeakMemory() as memory:
            big = build_index([scene.parent], args.model, out / "index-big", batch_size=args.batch_size, progress=False)
        results["big"] = {"side": args.big_side, "raw_bytes": raw, "file_bytes": scene.stat().st_size,
                          "tiles": big.tiles_encoded, "tiles_per_s": big.tiles_per_second, "seconds": big.seconds,
                          "rss_before": memory.start, "rss_peak": memory.peak,
                          "rss_growth_fraction_of_raw": (memory.peak - memory.start) / raw}
        print(f"{args.big_side} x {args.big_side} scene: {big.tiles_encoded} tiles at {big.tiles_per_second:.1f} tiles/s; "
              f"resident memory {memory.start / 2**20:.0f} -> peak {memory.peak / 2**20:.0f} MiB "
              f"(raster {raw / 2**20:.0f} MiB)", flush=True)
    (out / "index_build.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
