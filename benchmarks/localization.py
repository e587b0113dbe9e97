"""Semantic localisation: speed on a 5,000 × 5,000 scene, SeLo metrics on benchmarks with ground truth, figures.

Three sub-commands:

``speed``   one ``rsitr localize`` of a 5,000 × 5,000 px tiled GeoTIFF (a large synthetic scene,
            :func:`rsitr.data.synth.large_scenes.generate_large_scenes`) at window sizes 128, 256, 512,
            with the time of every stage, and the fusion of the same window scores the way the SeLo
            reference does it (a Python loop adding each window into full-size sum and count arrays)
            timed in the same run as the baseline of the vectorised fusion::

                python benchmarks/localization.py speed --model runs/models/dove-s-ucm-seed0 --out runs/localization

``table``   ``rsitr localize-eval`` of several models on several benchmarks (folders holding
            ``anno.json`` and ``images/``, as ``rsitr data scenes`` and ``rsitr data mosaics`` write
            them); a model given as ``name=DIR1+DIR2`` is several seeds, reported as the mean ± std over
            seeds of the per-benchmark mean::

                python benchmarks/localization.py table --bench synth=runs/loc-synth --bench ucm=runs/loc-ucm \\
                    --model dove=runs/bench-synth/dove/seed0 ... --out runs/localization

``blocks``  which block of a synthetic scene is hottest for the parking lot's own caption: six drawings of
            the slow test's fixed layout (parking, residential, storage, farmland), then random scenes::

                python benchmarks/localization.py blocks --model runs/demo-loc/run

``figure``  a picture of a few samples of one benchmark: the scene with the true region outlined and
            the heat-map overlay beside it::

                python benchmarks/localization.py figure --bench runs/loc-synth --model runs/bench-synth/dove-s/seed0 \\
                    --samples 0,3 --out docs/localization_synth.jpg

Run each alone on the machine: the timings are the point.
"""

from __future__ import annotations

import argparse
import json
import platform
import textwrap
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from PIL import Image

from rsitr.bundle import load_model
from rsitr.data.synth.large_scenes import generate_large_scenes
from rsitr.io import write_json, write_text
from rsitr.localization_metrics import average_metrics, prob_from_heat, read_annotations, selo_metrics
from rsitr_serve.localize import (
    DEFAULT_BLUR,
    DEFAULT_SIZES,
    colour_overlay,
    fuse_window_scores,
    localize,
    normalise_and_smooth,
    selo_windows,
    write_localization,
)
from rsitr_serve.localize_eval import REPORTED, evaluate_localization

PUBLISHED = [("AMFMN (RSITMD), SeLo test set, scales 256/512/768", "0.6920", "0.3323", "0.6667", "0.6772"),
             ("VSE++, SeLo test set", "–", "–", "–", "0.6045"),
             ("SCAN, SeLo test set", "–", "–", "–", "0.6247")]


# ----------------------------------------------------------------------------------- speed


def _speed_scene(folder: Path, side: int, seed: int) -> Path:
    """A ``side`` × ``side`` synthetic scene written as a tiled GeoTIFF (the windowed-reading path)."""
    tif = folder / f"scene_{side}.tif"
    if tif.is_file():
        return tif
    generate_large_scenes(folder / "png", num_scenes=1, seed=seed, size_range=(side, side), block_range=(600, 1200),
                          blocks_per_scene=(6, 9), progress=False)
    pixels = np.asarray(Image.open(folder / "png" / "images" / "scene_00000.png").convert("RGB"))
    profile = {"driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8", "tiled": True,
               "blockxsize": 512, "blockysize": 512, "crs": "EPSG:32633",
               "transform": rasterio.transform.from_origin(500_000.0, 5_000_000.0, 0.3, 0.3)}
    with rasterio.open(tif, "w", **profile) as out:
        out.write(np.moveaxis(pixels, -1, 0))
    return tif


def loop_fusion(windows: list, scores: np.ndarray, width: int, height: int) -> np.ndarray:
    """The reference's way: each window added into full-size sum and count arrays in a Python loop."""
    total = np.zeros((height, width), dtype=np.float32)
    count = np.zeros((height, width), dtype=np.float32)
    for w, s in zip(windows, scores):
        total[w.y : w.y + w.height, w.x : w.x + w.width] += s
        count[w.y : w.y + w.height, w.x : w.x + w.width] += 1
    return total / np.maximum(count, 1)


def run_speed(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    scene = _speed_scene(out, args.side, args.seed)
    started = time.perf_counter()
    bundle = load_model(args.model)
    load_seconds = time.perf_counter() - started
    localize(bundle, scene, [args.sentence], sizes=(256,), blur=1, progress=False)  # warm-up: first-call costs
    started = time.perf_counter()
    result = localize(bundle, scene, [args.sentence], sizes=DEFAULT_SIZES, blur=DEFAULT_BLUR, progress=False)
    write_localization(result, out / "speed_outputs")  # heat PNG, overlay JPEG, GeoTIFF, JSON: as `rsitr localize`
    wall = time.perf_counter() - started
    tick = time.perf_counter()
    fast = fuse_window_scores(result.windows, result.scores[:, 0], result.width, result.height)
    fast_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    slow = loop_fusion(result.windows, result.scores[:, 0], result.width, result.height)
    loop_seconds = time.perf_counter() - tick
    record = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
              "model": str(args.model), "backbone": bundle.spec.backbone, "input_side": bundle.feature_spec.image_size,
              "precision": bundle.feature_spec.precision, "image": f"{result.width} x {result.height}",
              "sizes": list(DEFAULT_SIZES), "windows": len(result.windows), "wall_seconds": round(wall, 2),
              "model_load_seconds": round(load_seconds, 2),
              "stages": {k: round(v, 2) for k, v in result.times.seconds.items()},
              "windows_per_second": round(len(result.windows) / wall, 1),
              "fusion_vectorised_seconds": round(fast_seconds, 4), "fusion_loop_seconds": round(loop_seconds, 3),
              "fusion_speedup": round(loop_seconds / fast_seconds, 1),
              "fusion_max_difference": float(np.abs(fast - slow).max())}
    write_json(out / f"speed-{Path(args.model).name}.json", record)
    print(json.dumps(record, indent=2))


# ----------------------------------------------------------------------------------- table


def _models(specs: list[str]) -> list[tuple[str, list[str]]]:
    return [(name, paths.split("+")) for name, paths in (spec.split("=", 1) for spec in specs)]


def _evaluate(bench: Path, model_dir: str, out: Path, tag: str) -> dict:
    cached = out / f"{tag}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    bundle = load_model(model_dir)
    report = evaluate_localization(bundle, bench / "anno.json", bench / "images", progress=False)
    report["model_dir"] = model_dir
    write_json(cached, report)
    print(f"{tag}: Rmi {report['mean']['rmi']:.4f} in {report['seconds']['total']:.0f} s", flush=True)
    return report


def _chance(bench: Path, out: Path, tag: str, seed: int) -> dict:
    """The SeLo metrics of heat maps fused from uniform random window scores: what no model at all gets."""
    cached = out / f"{tag}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    started = time.perf_counter()
    samples = read_annotations(bench / "anno.json")
    rng = np.random.default_rng(seed)
    rows = []
    for sample in samples:
        width, height = Image.open(bench / "images" / sample.image).size
        windows = selo_windows(width, height, DEFAULT_SIZES)
        heat = normalise_and_smooth(fuse_window_scores(windows, rng.random(len(windows)), width, height), DEFAULT_BLUR)
        rows.append(selo_metrics(prob_from_heat(heat), sample.polygons))
    report = {"samples": rows, "mean": average_metrics([{k: r[k] for k in REPORTED} for r in rows]),
              "seconds": {"total": time.perf_counter() - started}}
    write_json(cached, report)
    return report


def _row(name: str, reports: list[dict]) -> str:
    if len(reports) == 1:
        mean = reports[0]["mean"]
        cells = [f"{mean[k]:.4f} ± {mean[k + '_std']:.4f}" for k in REPORTED]
        spread = "over samples"
    else:
        cells = [f"{np.mean([r['mean'][k] for r in reports]):.4f} ± {np.std([r['mean'][k] for r in reports]):.4f}"
                 for k in REPORTED]
        spread = f"over {len(reports)} seeds"
    seconds = np.mean([r["seconds"]["total"] for r in reports])
    samples = len(reports[0]["samples"])
    return f"| {name} | {samples} | " + " | ".join(cells) + f" | {spread} | {seconds:.0f} |"


def run_table(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    lines = []
    for bench_spec in args.bench:
        bench_name, bench_dir = bench_spec.split("=", 1)
        lines += [f"### {bench_name} ({bench_dir})", "",
                  "| model | samples | Rsu ↑ | Ras ↓ | Rda ↑ | Rmi ↑ | ± | seconds per run |", "|---|---|---|---|---|---|---|---|"]
        for name, dirs in _models(args.model):
            reports = [_evaluate(Path(bench_dir), d, out, f"{bench_name}-{name}-{k}") for k, d in enumerate(dirs)]
            lines.append(_row(name, reports))
        chance = [_chance(Path(bench_dir), out, f"{bench_name}-chance-{seed}", seed) for seed in range(3)]
        lines.append(_row("chance (uniform random window scores)", chance))
        lines.append("")
    lines += ["Published (other images: the SeLo test set, 59 samples over 22 images at about 0.3 m):", "",
              "| model | Rsu | Ras | Rda | Rmi |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in PUBLISHED]
    write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


# ----------------------------------------------------------------------------------- blocks


def _hottest_block(bundle, scene, pixels, folder: Path, caption: str) -> tuple[str, dict[str, float]]:
    path = folder / "blocks_scene.png"
    Image.fromarray(pixels).save(path)
    heat = localize(bundle, path, [caption], progress=False).heat[0].astype(np.float64)
    means = {b.scene_type: float(heat[b.y : b.y + b.side, b.x : b.x + b.side].mean()) for b in scene.blocks}
    return max(means, key=means.__getitem__), means


def run_blocks(args: argparse.Namespace) -> None:
    """Which block is hottest for the parking lot's own caption: the slow test's layout, then random scenes."""
    from rsitr.data.synth.large_scenes import compose_large_scene, make_large_scene

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_model(args.model)
    plans = [("parking", 100, 100, 1024), ("residential", 1400, 100, 1024), ("storage", 100, 1400, 1024),
             ("farmland", 1400, 1400, 1024)]
    rows = []
    for seed in range(args.seeds):
        scene, pixels = compose_large_scene(seed, 2600, 2600, plans)
        best, means = _hottest_block(bundle, scene, pixels, out, scene.blocks[0].captions[0])
        rows.append({"layout": "fixed", "seed": seed, "hottest": best, "means": means})
    index = 0
    while sum(r["layout"] == "random" for r in rows) < args.random:
        scene, pixels = make_large_scene(0, index, (2600, 2600), (1024, 1100), (3, 4), captions_per_block=1)
        index += 1
        parking = [b for b in scene.blocks if b.scene_type == "parking"]
        if parking:
            best, means = _hottest_block(bundle, scene, pixels, out, parking[0].captions[0])
            rows.append({"layout": "random", "scene": index - 1, "hottest": best, "means": means})
    for row in rows:
        print(row["layout"], row.get("seed", row.get("scene")), "hottest:", row["hottest"],
              {k: round(v, 1) for k, v in row["means"].items()})
    write_json(out / "blocks.json", rows)


# ----------------------------------------------------------------------------------- figure


def run_figure(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = Path(args.bench)
    samples = read_annotations(bench / "anno.json")
    chosen = [int(k) for k in args.samples.split(",")]
    bundle = load_model(args.model)
    fig, axes = plt.subplots(len(chosen), 2, figsize=(10, 5 * len(chosen)), squeeze=False)
    for row, index in enumerate(chosen):
        sample = samples[index]
        path = bench / "images" / sample.image
        result = localize(bundle, path, [sample.caption], blur=args.blur, progress=False)
        pixels = np.asarray(Image.open(path).convert("RGB"))
        wrapped = textwrap.fill(f"“{sample.caption.strip()}”", 60)
        for ax, picture, title in ((axes[row][0], pixels, wrapped),
                                   (axes[row][1], colour_overlay(pixels, result.heat[0]), f"heat map ({bundle.spec.name})")):
            ax.imshow(picture)
            for polygon in sample.polygons:
                closed = np.vstack([polygon, polygon[:1]])
                ax.plot(closed[:, 0], closed[:, 1], color="white", linewidth=2)
            ax.set_title(title, fontsize=10)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=args.dpi, pil_kwargs={"quality": 85} if str(args.out).endswith(".jpg") else None)
    print(f"figure: {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    speed = sub.add_parser("speed")
    speed.add_argument("--model", required=True)
    speed.add_argument("--side", type=int, default=5000)
    speed.add_argument("--seed", type=int, default=0)
    speed.add_argument("--sentence", default="many cars are parked in a parking lot beside a road")
    speed.add_argument("--threads", type=int, default=2)
    speed.add_argument("--out", default="runs/localization")
    speed.set_defaults(func=run_speed)
    table = sub.add_parser("table")
    table.add_argument("--bench", action="append", required=True, help="NAME=DIR holding anno.json and images/")
    table.add_argument("--model", action="append", required=True, help="NAME=DIR or NAME=DIR1+DIR2 (seeds)")
    table.add_argument("--threads", type=int, default=2)
    table.add_argument("--out", default="runs/localization")
    table.set_defaults(func=run_table)
    blocks = sub.add_parser("blocks")
    blocks.add_argument("--model", required=True)
    blocks.add_argument("--seeds", type=int, default=6, help="drawings of the slow test's fixed layout")
    blocks.add_argument("--random", type=int, default=5, help="random scenes of seed 0 that hold a parking lot")
    blocks.add_argument("--out", default="runs/localization/blocks")
    blocks.set_defaults(func=run_blocks)
    figure = sub.add_parser("figure")
    figure.add_argument("--bench", required=True)
    figure.add_argument("--model", required=True)
    figure.add_argument("--samples", default="0")
    figure.add_argument("--blur", type=int, default=DEFAULT_BLUR)
    figure.add_argument("--dpi", type=int, default=80)
    figure.add_argument("--out", required=True)
    figure.set_defaults(func=run_figure)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
