"""Training-step speed of DOVE and DOVE-S against the matmul rate measured in the same run.

One step = forward, backward and Adam update on a batch of (image, caption) pairs with cached
features (random here; the sizes are what matters). ``torch.utils.flop_counter`` counts the
floating-point work of a step; dividing by the step time gives the achieved rate, reported as a
fraction of the float32 matmul rate measured on this machine right before.

    python benchmarks/training_speed.py [--batch-size 100] [--length 20] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from rsitr.features import FeatureSpec, feature_dims
from rsitr.models import create_model, get_model_spec


def matmul_rate(repeats: int = 10) -> float:
    a, b = torch.randn(8192, 512), torch.randn(512, 1536)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 8192 * 512 * 1536 * repeats / (time.perf_counter() - started) / 1e9


def batch(dims: dict, n: int, length: int, vocab: int):
    features = {f"level{i}": torch.randn(n, c) for i, c in enumerate(dims["level_channels"], start=1)}
    features["regions"] = torch.randn(n, 36, dims["region_channels"])
    features["region_mask"] = torch.ones(n, 36, dtype=torch.bool)
    lengths = torch.randint(length // 2, length + 1, (n,))
    tokens = torch.randint(1, vocab, (n, int(lengths.max())))
    return features, tokens, lengths, torch.arange(n)


def train_step(model, optimizer, inputs) -> None:
    """Forward, backward and one Adam update."""
    loss = model.training_loss(*inputs)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--length", type=int, default=20, help="longest caption of a batch (tokens)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=2500)
    args = parser.parse_args()
    torch.manual_seed(0)
    rate = matmul_rate()
    print(f"torch threads {torch.get_num_threads()}; fp32 matmul rate measured: {rate:.0f} GFLOP/s")
    print("| model | batch | GFLOP / step | seconds / step | pairs / s | achieved GFLOP/s | fraction of matmul rate |")
    print("|---|---|---|---|---|---|---|")
    for name in ("dove", "dove-s"):
        dims = feature_dims(FeatureSpec(backbone=get_model_spec(name).backbone))
        model = create_model(name, dims, args.vocab_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
        inputs = batch(dims, args.batch_size, args.length, args.vocab_size)
        train_step(model, optimizer, inputs)
        with FlopCounterMode(display=False) as counter:
            train_step(model, optimizer, inputs)
        gflop = counter.get_total_flops() / 1e9
        started = time.perf_counter()
        for _ in range(args.steps):
            train_step(model, optimizer, inputs)
        seconds = (time.perf_counter() - started) / args.steps
        print(f"| {name} | {args.batch_size} | {gflop:.1f} | {seconds:.3f} | {args.batch_size / seconds:.0f} | {gflop / seconds:.0f} | {gflop / seconds / rate:.2f} |")


if __name__ == "__main__":
    main()
