"""Images/s of frozen-backbone feature extraction, fp32 vs bf16, per backbone.

Not a test: a rough measurement to pick ``FeatureSpec.precision``. It writes random PNGs to a
temporary directory, times image decoding alone, then times :func:`rsitr.features.compute_features`
(decoding overlapped with compute, backbone, RoIAlign) after a one-batch warm-up, best of
``--repeats`` runs, and prints a table. Numbers on a shared machine are rough.

Usage::

    python benchmarks/features_throughput.py [--images 64] [--batch-size 32] [--image-size 256] [--repeats 2]
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

from rsitr.data.dataset import RetrievalDataset
from rsitr.data.images import load_image
from rsitr.features import FeatureSpec, compute_features


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "resnet18"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp), args.images, args.image_size)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images, "
              f"batch {args.batch_size}, {args.image_size} px")
        print(f"decode+resize alone: {decode_rate(dataset, args.image_size):.0f} images/s (one thread)")
        print(f"{'backbone':<10} {'precision':<9} {'images/s':>9} {'max|region|':>12}")
        for backbone in args.backbones:
            for precision in args.precisions:
                spec = replace(FeatureSpec(), backbone=backbone, image_size=args.image_size, precision=precision)
                rate, peak = extract_rate(dataset, spec, args.batch_size, args.repeats)
                print(f"{backbone:<10} {precision:<9} {rate:>9.1f} {peak:>12.1f}")


if __name__ == "__main__":
    main()
