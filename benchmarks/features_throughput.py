"""Images/s of frozen-backbone feature extraction, fp32 vs bf16, per backbone, against the matmul rate.

Not a test: a rough measurement to pick ``FeatureSpec.precision``. It writes random PNGs to a
temporary directory, times image decoding alone, then times :func:`rsitr.features.compute_features`
(decoding overlapped with compute, backbone, RoIAlign) after a one-batch warm-up, best of
``--repeats`` runs, and prints a table.

``torch.utils.flop_counter.FlopCounterMode`` counts the floating-point work of one image's
backbone forward (``forward_levels``) at the image size; it is the same for both precisions and
leaves out RoIAlign and pooling, which are small. Images/s times FLOPs per image gives the
achieved GFLOP/s, reported as a fraction of the matmul rates of the row's precision (fp32 rows
against fp32 rates, bf16 rows against bf16 rates), through ``torch.mm`` and through oneDNN, as
:func:`rsitr_train.profiling.matmul_rates` measures them before and after the timed runs (the higher
kept). The achieved rate includes whatever decoding the overlap fails to hide, so it is a lower
bound on the backbone's own rate. Numbers on a shared machine are rough.

Usage::

    python benchmarks/features_throughput.py [--images 64] [--batch-size 32] [--image-size 256] [--repeats 2]
                                             [--boxes grid activation]

``--boxes`` adds rows per region-box source (``activation`` proposals are chosen from the same
forward pass; their extra cost is the difference to the ``grid`` row).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rsitr.backbones import create_backbone
from rsitr.data.dataset import RetrievalDataset
from rsitr.data.images import load_image
from rsitr.features import FeatureSpec, compute_features
from rsitr_train.profiling import best_rates, count_flops, format_rates, matmul_rates


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


def extract_rate(dataset: RetrievalDataset, spec: FeatureSpec, batch_size: int, repeats: int) -> tuple[float, float]:
    """(best images/s over ``repeats`` runs, max |region value|) after a one-batch warm-up.

    The best run is reported because other processes on a shared machine only ever slow it down.
    """
    compute_features(dataset.subset(list(range(min(batch_size, dataset.num_images)))), spec,
                     batch_size=batch_size, progress=False)
    best, peak = 0.0, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        feats = compute_features(dataset, spec, batch_size=batch_size, progress=False)
        best = max(best, dataset.num_images / (time.perf_counter() - start))
        peak = float(feats.regions.float().abs().max())
    return best, peak


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
    parser.add_argument("--rate-seconds", type=float, default=1.0,
                        help="seconds spent on each matmul rate measurement (per precision and path)")
    args = parser.parse_args()

    before = matmul_rates(args.rate_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp), args.images, args.image_size)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images, "
              f"batch {args.batch_size}, {args.image_size} px")
        print(f"decode+resize alone: {decode_rate(dataset, args.image_size):.0f} images/s (one thread)")
        rows = []
        for backbone in args.backbones:
            flops = image_flops(backbone, args.image_size)
            for precision in args.precisions:
                for boxes in args.boxes:
                    spec = replace(FeatureSpec(), backbone=backbone, image_size=args.image_size, precision=precision,
                                   boxes=boxes)
                    rate, peak = extract_rate(dataset, spec, args.batch_size, args.repeats)
                    rows.append((backbone, precision, boxes, flops, rate, peak))
    rates = best_rates(before, matmul_rates(args.rate_seconds))  # measured before and after; the higher counts
    print(format_rates(rates, "best of before and after the runs"))
    print()
    print("| backbone | precision | boxes | GFLOP / image | images / s | achieved GFLOP/s | fraction of torch.mm rate "
          "| fraction of oneDNN GEMM rate | max abs region |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for backbone, precision, boxes, flops, rate, peak in rows:
        achieved = rate * flops / 1e9
        print(f"| {backbone} | {precision} | {boxes} | {flops / 1e9:.2f} | {rate:.1f} | {achieved:.0f} "
              f"| {achieved / rates[f'mm_{precision}']:.2f} | {achieved / rates[f'onednn_{precision}']:.2f} "
              f"| {peak:.1f} |")


if __name__ == "__main__":
    main()
