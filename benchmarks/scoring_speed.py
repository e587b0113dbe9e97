"""Pairwise scoring speed of DOVE: every (image, caption) pair of a test-set-sized problem.

Encodes random features and captions with a randomly initialised DOVE (ResNet-50 feature sizes),
then times ``rsitr.evaluation.compute_similarity`` end to end (encoding both sides + scoring all
pairs), in float32 and under bfloat16 autocast. The dominant cost is one d×d product per pair in
IGA's non-linear head; the script measures the machine's matmul rate in the same run and reports
the scoring rate as a fraction of it.

    python benchmarks/scoring_speed.py                 # RSITMD test size: 452 images × 2260 captions
    python benchmarks/scoring_speed.py --images 1093 --captions 5465   # RSICD test size
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from rsitr.evaluation import compute_similarity
from rsitr.models import create_model

DIMS = {"level_channels": [256, 512, 1024, 2048], "region_channels": 1024}


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Measured GFLOP/s of a (4·size × 512) @ (512 × 512) product, the shape IGA runs."""
    a = torch.randn(4 * size, 512, dtype=dtype)
    b = torch.randn(512, 512, dtype=dtype)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * a.shape[0] * 512 * 512 * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=452)
    parser.add_argument("--captions", type=int, default=2260)
    parser.add_argument("--vocab-size", type=int, default=2500)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model("dove", DIMS, args.vocab_size).eval()
    n = args.images
    features = {f"level{i}": torch.randn(n, c) for i, c in enumerate(DIMS["level_channels"], start=1)}
    features["regions"] = torch.randn(n, 36, DIMS["region_channels"])
    features["region_mask"] = torch.ones(n, 36, dtype=torch.bool)
    lengths = torch.randint(6, 25, (args.captions,))
    tokens = torch.randint(1, args.vocab_size, (args.captions, int(lengths.max())))
    tokens[torch.arange(tokens.shape[1])[None] >= lengths[:, None]] = 0
    pair_flops = 2 * args.images * args.captions * 512 * 512
    print(f"{args.images} images × {args.captions} captions = {args.images * args.captions:,} pairs; torch threads {torch.get_num_threads()}")
    print("| precision | seconds | pairs/s | matmul GFLOP/s measured | scoring GFLOP/s (IGA head) | fraction of matmul rate |")
    print("|---|---|---|---|---|---|")
    for name, dtype in (("fp32", torch.float32), ("bf16 autocast", torch.bfloat16)):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
        with ctx:
            started = time.perf_counter()
            compute_similarity(model, features, tokens, lengths, progress=False)
            seconds = time.perf_counter() - started
        rate = matmul_rate(dtype)
        achieved = pair_flops / seconds / 1e9
        print(f"| {name} | {seconds:.2f} | {args.images * args.captions / seconds:,.0f} | {rate:.0f} | {achieved:.0f} | {achieved / rate:.2f} |")


if __name__ == "__main__":
    main()
