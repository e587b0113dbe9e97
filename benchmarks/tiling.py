"""Which tiling finds a described place in a scene: tile size, overlap and scales, on UCM mosaics.

Not a test: the measurement behind the defaults of ``rsitr index build`` (``--tile``, ``--overlap``,
``--scales``). It builds scenes whose ground truth is known and asks whether a sentence finds its
place:

* Each scene is a 5 × 5 grid of 256-pixel images of a dataset split (UCM-Captions ``val`` by
  default: images the models never trained on), cropped at a seeded random offset to 1024 × 1024,
  so that image borders do not line up with any tile grid. The crop holds 3 × 3 images whole (the
  query images, each used once over all scenes) and parts of 16 others (fillers, drawn from the
  same split). Scenes are written as GeoTIFFs (a UTM CRS, 0.3 m pixels: UCM's resolution).
* All scenes go into one index per tiling; every caption of every query image is a text query
  (``rsitr search`` with its defaults: first stage, then the full score over 100 candidates).
* A result tile *hits* when its centre lies inside the caption's image in the scene. Reported:
  hit@1, @5 and @10 (percent of queries with a hit among the first k tiles), tiles per scene
  (what the index stores and encodes), and indexing seconds. A tile at scale 2 is 512 px: its
  centre can lie in the true image while three quarters of it show others, so larger tiles find
  more with less precision: the table states the tile area beside the hit rates.

Every model given by ``--models`` (bundles of the same recipe trained with different seeds) indexes
and searches every tiling; the table gives mean ± std over models.

Usage::

    python benchmarks/tiling.py --dataset ../shared/data/ucm_captions --models runs/models/dove-s-ucm-seed0 ... \\
        [--split val] [--out runs/tiling] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.crs import CRS
from rasterio.transform import from_origin

from rsitr.data import load_dataset
from rsitr.data.images import read_image
from rsitr_serve.indexer import build_index
from rsitr_serve.search import TileSearcher

CHIP = 256
GRID = 5
CROP = 1024
#: Tilings compared: (tile, overlap, scales).
TILINGS = [(256, 0.0, (1.0,)), (256, 0.25, (1.0,)), (256, 0.5, (1.0,)), (192, 0.5, (1.0,)), (384, 0.5, (1.0,)),
           (256, 0.5, (1.0, 2.0))]


def make_scenes(dataset, split: str, out: Path, seed: int) -> list[dict]:
    """Write the mosaics; returns per scene its file and the pixel box and captions of each whole image."""
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in dataset.split_indices(split)]
    order = list(rng.permutation(ids))
    per_scene = (GRID - 2) ** 2
    scenes = []
    out.mkdir(parents=True, exist_ok=True)
    for number in range(len(order) // per_scene):
        queries = order[number * per_scene:(number + 1) * per_scene]
        others = [i for i in ids if i not in queries]
        fillers = list(rng.choice(others, size=GRID * GRID - per_scene, replace=False))
        canvas = np.zeros((GRID * CHIP, GRID * CHIP, 3), dtype=np.uint8)
        offset = rng.integers(CHIP // 8, CHIP - CHIP // 8, size=2)  # crop origin inside the first row/column
        layout = {}
        for row in range(GRID):
            for col in range(GRID):
                inner = 1 <= row <= GRID - 2 and 1 <= col <= GRID - 2
                image_id = queries.pop(0) if inner else fillers.pop(0)
                chip = read_image(dataset.image_path(image_id)).resize((CHIP, CHIP), Image.Resampling.BILINEAR)
                canvas[row * CHIP:(row + 1) * CHIP, col * CHIP:(col + 1) * CHIP] = np.asarray(chip)
                if inner:
                    x, y = col * CHIP - int(offset[0]), row * CHIP - int(offset[1])
                    layout[image_id] = (x, y, x + CHIP, y + CHIP)
        crop = canvas[offset[1]:offset[1] + CROP, offset[0]:offset[0] + CROP]
        path = out / f"scene_{number:03d}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=CROP, height=CROP, count=3, dtype="uint8",
                           crs=CRS.from_epsg(32611), transform=from_origin(380_000.0 + 400 * number, 3_760_000.0, 0.3, 0.3),
                           tiled=True, blockxsize=256, blockysize=256) as raster:
            raster.write(np.moveaxis(crop, -1, 0))
        scenes.append({"file": str(path.resolve()),
                       "images": {i: {"box": box, "captions": [dataset.captions[c] for c in dataset.captions_of(i)]}
                                  for i, box in layout.items()}})
    return scenes


def hit_rates(searcher: TileSearcher, scenes: list[dict], ks=(1, 5, 10)) -> dict[str, float]:
    """Percent of caption queries with a tile centred in the true image among the first k results."""
    found = {k: 0 for k in ks}
    total = 0
    for scene in scenes:
        for image in scene["images"].values():
            x1, y1, x2, y2 = image["box"]
            for caption in image["captions"]:
                results = searcher.search_text(caption, k=max(ks), rerank=100)
                hits = [r.file == scene["file"] and x1 <= r.window.x + r.window.width / 2 < x2
                        and y1 <= r.window.y + r.window.height / 2 < y2 for r in results]
                for k in ks:
                    found[k] += any(hits[:k])
                total += 1
    return {f"hit@{k}": 100.0 * found[k] / total for k in ks} | {"queries": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", default="runs/tiling")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    dataset = load_dataset(args.dataset)
    scenes = make_scenes(dataset, args.split, out / "scenes", args.seed)
    rows = []
    for tile, overlap, scales in TILINGS:
        per_model = []
        for number, model in enumerate(args.models):
            index = out / f"index_t{tile}_o{overlap}_s{'-'.join(f'{s:g}' for s in scales)}_m{number}"
            started = time.perf_counter()
            summary = build_index([out / "scenes"], model, index, tile=tile, overlap=overlap, scales=scales, progress=False)
            seconds = time.perf_counter() - started
            with TileSearcher(index) as searcher:
                rates = hit_rates(searcher, scenes)
                count = len(searcher)
            per_model.append({**rates, "tiles_per_scene": count / len(scenes), "index_seconds": seconds,
                              "tiles_encoded": summary.tiles_encoded})
            print(f"tile {tile} overlap {overlap} scales {scales} model {number}: {per_model[-1]}", flush=True)
        rows.append({"tile": tile, "overlap": overlap, "scales": list(scales), "runs": per_model})
    report = render(rows, scenes, args)
    print(report)
    (out / "tiling.md").write_text(report)
    (out / "tiling.json").write_text(json.dumps(rows, indent=2))


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def render(rows: list[dict], scenes: list[dict], args: argparse.Namespace) -> str:
    queries = rows[0]["runs"][0]["queries"]
    lines = [f"Localisation in {len(scenes)} mosaics of {args.split} images ({CROP} × {CROP} px, {queries} caption queries), "
             f"{len(args.models)} models; mean ± std over models",
             "", "| tile | overlap | scales | tiles / scene | hit@1 | hit@5 | hit@10 | index s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        runs = row["runs"]
        lines.append(f"| {row['tile']} | {row['overlap']} | {','.join(f'{s:g}' for s in row['scales'])} | "
                     f"{runs[0]['tiles_per_scene']:.0f} | " + " | ".join(_mean_std([r[key] for r in runs])
                                                               for key in ("hit@1", "hit@5", "hit@10", "index_seconds")) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
