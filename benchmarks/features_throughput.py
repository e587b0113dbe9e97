"""Images/s of frozen-backbone feature extraction, before and after the speed paths, against the matmul rate.

Not a test: a rough measurement to pick ``FeatureSpec.precision`` and to see how close the feature
computation gets to the machine's matmul rate. It writes random PNGs to a temporary directory,
times image decoding alone, then, per backbone, precision and path, times
:func:`rsitr.features.compute_features` (decoding overlapped with compute, backbone, pooling,
RoIAlign, float16 rounding) after a warm-up, best of ``--repeats`` rounds that alternate the paths,
and prints a table.

Paths (timed in alternation in one run, so that both see the same machine):

* ``before``: the computation as it was (:func:`previous_features`): the backbone's BatchNorms run
  as modules, every level map is copied to float32, and RoIAlign samples the map point by point
  (``grid_sample``);
* ``after``: :func:`rsitr.features.backbone_features` as it is: BatchNorm folded into the
  convolutions for the frozen forward (:mod:`rsitr.backbones.fold`), pooling reads the bf16 maps
  in float32 a few images at a time, RoIAlign is one batched product with a weight matrix
  (:func:`rsitr.features.roi.roi_mean`).

Both rows run the same ResNet modules, whose residual sum is now in place (bit-identical, a few
per cent of a CPU forward), so ``before`` is slightly faster than the code it stands for was.

Each ``after`` row also reports the largest difference of its stored features (levels and
regions, as the cache holds them) from the ``before`` ones of the same images, next to the
difference between the bf16 and fp32 features of the ``before`` path, the scale of bf16 rounding
(differences relative to the largest value of the feature, and the share of region boxes that
changed, which only ``activation`` proposals can).

``torch.utils.flop_counter.FlopCounterMode`` counts the floating-point work of one image's
backbone forward (``forward_levels``) at the image size; it is the same for both precisions and
leaves out RoIAlign and pooling. Images/s times FLOPs per image gives the achieved GFLOP/s,
reported as a fraction of the matmul rates of the row's precision (fp32 rows against fp32 rates,
bf16 rows against bf16 rates), through ``torch.mm`` and through oneDNN, as
:func:`rsitr_train.profiling.matmul_rates` measures them before and after the timed runs (the higher
kept). The achieved rate includes whatever decoding the overlap fails to hide, so it is a lower
bound on the computation's own rate; ``--no-decode`` times :func:`backbone_features` on one
decoded batch instead. Numbers on a shared machine are rough.

Usage::

    python benchmarks/features_throughput.py [--images 64] [--batch-size 32] [--image-size 256] [--repeats 2]
                                             [--backbones resnet50 resnet18] [--precisions fp32 bf16]
                                             [--boxes grid activation] [--no-decode]

``--boxes`` adds rows per region-box source (``activation`` proposals are chosen from the same
forward pass; their extra cost is the difference to the ``grid`` row).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

import rsitr.features.compute as compute
from rsitr.backbones import Backbone, backbone_info, create_backbone
from rsitr.data.dataset import RetrievalDataset
from rsitr.data.images import load_image
from rsitr.features import FeatureSpec, compute_features, load_backbone
from rsitr.features.spec import LEVEL_KEYS, MAP_PREFIX, parse_maps
from rsitr.precision import autocast
from rsitr_train.profiling import RATE_DTYPES, best_rates, count_flops, format_rates, matmul_rates

PATHS = ("before", "after")


def make_dataset(root: Path, count: int, size: int) -> RetrievalDataset:
    """``count`` random RGB PNGs of ``size`` x ``size`` and one caption each."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        name = f"img{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name)
        files.append(name)
    return RetrievalDataset(name="bench", image_dir=root, image_files=files, image_splits=["test"] * count,
                            captions=["x"] * count, caption_image=np.arange(count))


def decode_rate(dataset: RetrievalDataset, size: int) -> float:
    """Images/s of decoding and resizing alone, on one thread."""
    start = time.perf_counter()
    for i in range(dataset.num_images):
        load_image(dataset.image_path(i), size)
    return dataset.num_images / (time.perf_counter() - start)


def _previous_roi_align(features: Tensor, boxes: Tensor, spatial_scale: float, output_size: int,
                        sampling_ratio: int) -> Tensor:
    """RoIAlign as it was computed before: bilinear ``grid_sample`` at every sample point (same definition)."""
    b, c, h, w = features.shape
    n, steps = boxes.shape[1], output_size * sampling_ratio
    scaled = boxes.to(torch.float32) * spatial_scale - 0.5
    frac = (torch.arange(steps, dtype=torch.float32, device=boxes.device) + 0.5) / steps

    def axis(lo: Tensor, hi: Tensor, size: int) -> tuple[Tensor, Tensor]:
        coord = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * frac
        valid = (coord >= -1.0) & (coord <= float(size))
        return coord.clamp(0.0, float(size - 1)) / max(size - 1, 1) * 2.0 - 1.0, valid

    gx, vx = axis(scaled[..., 0], scaled[..., 2], w)
    gy, vy = axis(scaled[..., 1], scaled[..., 3], h)
    grid = torch.stack(torch.broadcast_tensors(gx.unsqueeze(-2), gy.unsqueeze(-1)), dim=-1)
    grid = grid.reshape(b, n * steps, steps, 2).to(features.dtype)
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=True)
    valid = (vy.unsqueeze(-1) & vx.unsqueeze(-2)).to(features.dtype)
    sampled = sampled.reshape(b, c, n, steps, steps) * valid.unsqueeze(1)
    bins = sampled.reshape(b, c, n, output_size, sampling_ratio, output_size, sampling_ratio).mean(dim=(4, 6))
    return bins.permute(0, 2, 1, 3, 4)


def previous_features(model: Backbone, images: Tensor, boxes: Tensor, mask: Tensor, spec: FeatureSpec,
                      precision: str | None = None, given: Tensor | None = None) -> dict[str, Tensor]:
    """:func:`rsitr.features.backbone_features` as it was before the speed paths (grid and activation boxes, no D4)."""
    if spec.dihedral:
        raise ValueError("the previous path is kept here without dihedral averaging")
    images = images.contiguous(memory_format=torch.channels_last)
    with autocast(precision or spec.precision, images.device):
        levels = [lvl.float() for lvl in model.forward_levels(images)]
    out = {key: lvl.mean(dim=(2, 3)) for key, lvl in zip(LEVEL_KEYS, levels)}
    names = backbone_info(spec.backbone).level_names
    for level, size in parse_maps(spec.maps, spec.backbone):
        out[f"{MAP_PREFIX}{level}"] = F.adaptive_avg_pool2d(levels[names.index(level)], size)
    index = names.index(spec.region_level)
    if spec.boxes == "activation" and spec.num_regions:
        boxes, mask = compute._with_proposals(levels, boxes, mask, given, model, spec)
    pooled = _previous_roi_align(levels[index], boxes, 1.0 / model.level_strides[index], spec.roi_output_size, 2)
    out["regions"] = pooled.mean(dim=(3, 4)) * mask.unsqueeze(-1).to(torch.float32)
    out["region_mask"], out["region_boxes"] = mask, boxes
    return out


@contextlib.contextmanager
def feature_path(path: str) -> Iterator[None]:
    """Run :func:`rsitr.features.compute_features` through ``path`` (``before`` swaps in :func:`previous_features`)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    current = compute.backbone_features
    if path == "before":
        compute.backbone_features = previous_features
    try:
        yield
    finally:
        compute.backbone_features = current


def _interleaved(runs: dict[str, Callable[[], dict[str, Tensor]]], count: int,
                 repeats: int) -> dict[str, tuple[float, dict[str, Tensor]]]:
    """Per path, (best images/s, its output) over ``repeats`` rounds that run every path once, after one warm-up each.

    Rounds alternate the paths, so that both see the same load on a shared machine; the best run
    is kept because other processes only ever slow one down.
    """
    for run in runs.values():
        run()
    best: dict[str, tuple[float, dict[str, Tensor]]] = {path: (0.0, {}) for path in runs}
    for _ in range(repeats):
        for path, run in runs.items():
            start = time.perf_counter()
            feats = run()
            best[path] = (max(best[path][0], count / (time.perf_counter() - start)), feats)
    return best


def extract_rates(dataset: RetrievalDataset, spec: FeatureSpec, batch_size: int,
                  repeats: int) -> dict[str, tuple[float, dict[str, Tensor]]]:
    """Per path, (best images/s, stored features) of :func:`rsitr.features.compute_features` over the whole dataset."""

    def runner(path: str) -> Callable[[], dict[str, Tensor]]:
        def run() -> dict[str, Tensor]:
            with feature_path(path):
                return compute_features(dataset, spec, batch_size=batch_size, progress=False).tensors()
        return run

    return _interleaved({path: runner(path) for path in PATHS}, dataset.num_images, repeats)


def compute_rates(dataset: RetrievalDataset, spec: FeatureSpec, batch_size: int,
                  repeats: int) -> dict[str, tuple[float, dict[str, Tensor]]]:
    """Like :func:`extract_rates` for the computation alone: one decoded batch, ``backbone_features`` + float16 rounding."""
    batch = compute.dataset_batch(dataset, range(min(batch_size, dataset.num_images)), spec, None)
    model = load_backbone(spec)

    def runner(function: Callable[..., dict[str, Tensor]]) -> Callable[[], dict[str, Tensor]]:
        def run() -> dict[str, Tensor]:
            with torch.inference_mode():
                return compute.as_stored(function(model, batch.images, batch.boxes, batch.mask, spec, given=batch.given), spec)
        return run

    runs = {"before": runner(previous_features), "after": runner(compute.backbone_features)}
    return _interleaved(runs, len(batch.images), repeats)


def _relative(a: Tensor, b: Tensor) -> float:
    """max |a - b| over max |b| (0 for empty tensors): random-init ResNet-50 maps reach the hundreds."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[float, float, float]:
    """(largest relative difference of a from b over the four level vectors, over the regions; share of boxes that differ)."""
    levels = max(_relative(a[k], b[k]) for k in LEVEL_KEYS)
    regions = _relative(a["regions"], b["regions"])
    boxes = float((a["region_boxes"] != b["region_boxes"]).any(-1).float().mean()) if a["regions"].numel() else 0.0
    return levels, regions, boxes


def image_flops(backbone: str, size: int) -> float:
    """Floating-point operations of one image's backbone forward (``forward_levels``) at ``size`` px."""
    model = create_backbone(backbone).eval().requires_grad_(False)
    image = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        return count_flops(lambda: model.forward_levels(image))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "resnet18"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--boxes", nargs="+", default=["grid"], help="region-box sources (grid, activation)")
    parser.add_argument("--no-decode", action="store_true", help="time the computation on one decoded batch only")
    parser.add_argument("--rate-seconds", type=float, default=1.0,
                        help="seconds spent on each matmul rate measurement (per precision and path)")
    args = parser.parse_args()

    before = matmul_rates(args.rate_seconds)
    measure = compute_rates if args.no_decode else extract_rates
    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp), args.images, args.image_size)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images, "
              f"batch {args.batch_size}, {args.image_size} px, {'computation only' if args.no_decode else 'with decoding'}")
        print(f"decode+resize alone: {decode_rate(dataset, args.image_size):.0f} images/s (one thread)")
        rows = []
        for backbone in args.backbones:
            flops = image_flops(backbone, args.image_size)
            for boxes in args.boxes:
                outputs: dict[tuple[str, str], dict[str, Tensor]] = {}
                for precision in args.precisions:
                    spec = replace(FeatureSpec(), backbone=backbone, image_size=args.image_size, precision=precision,
                                   boxes=boxes)
                    measured = measure(dataset, spec, args.batch_size, args.repeats)
                    for path in PATHS:
                        rate, outputs[precision, path] = measured[path]
                        diff = max_difference(outputs[precision, path], outputs[precision, "before"])
                        rows.append((backbone, precision, boxes, path, flops, rate, diff))
                if {"fp32", "bf16"} <= set(args.precisions):
                    scale = max_difference(outputs["bf16", "before"], outputs["fp32", "before"])
                    rows.append((backbone, "bf16 vs fp32", boxes, "before", flops, float("nan"), scale))
    rates = best_rates(before, matmul_rates(args.rate_seconds))  # measured before and after; the higher counts
    print(format_rates(rates, "best of before and after the runs"))
    print()
    print("| backbone | precision | boxes | path | GFLOP / image | images / s | achieved GFLOP/s | fraction of torch.mm rate "
          "| fraction of oneDNN GEMM rate | max rel diff levels / regions vs before | boxes changed |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for backbone, precision, boxes, path, flops, rate, (d_levels, d_regions, d_boxes) in rows:
        shown = f"{d_levels:.2g} / {d_regions:.2g} | {d_boxes:.0%}"
        if precision not in RATE_DTYPES:  # the bf16-vs-fp32 reference row
            print(f"| {backbone} | {precision} | {boxes} | {path} | | | | | | {shown} |")
            continue
        achieved = rate * flops / 1e9
        print(f"| {backbone} | {precision} | {boxes} | {path} | {flops / 1e9:.2f} | {rate:.1f} | {achieved:.0f} "
              f"| {achieved / rates[f'mm_{precision}']:.2f} | {achieved / rates[f'onednn_{precision}']:.2f} "
              f"| {shown} |")


if __name__ == "__main__":
    main()
