"""Training-step speed of DOVE and DOVE-S, fp32 vs bf16, against the matmul rate measured in the same run.

One step = forward, backward and Adam update on a batch of (image, caption) pairs with cached
features (random here; the sizes are what matters). With ``bf16`` the forward and loss run under
CPU bfloat16 autocast (:func:`rsitr.evaluation.autocast`), as training does for
``train.precision: bf16``; backward and the update stay outside it, weights and gradients float32.

``torch.utils.flop_counter`` counts the floating-point work of a step (the same for both
precisions); dividing by the step time gives the achieved rate, reported as a fraction of the
matmul rates of the step's precision, through ``torch.mm`` and through oneDNN, as
:func:`rsitr_train.profiling.matmul_rates` measures them before and after the timed steps (the higher
kept). The best of the timed steps is reported because other work on a shared machine only ever
slows a step down.

    python benchmarks/training_speed.py [--batch-size 100] [--length 20] [--steps 5] [--precisions fp32,bf16] [--models dove,dove-s]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from rsitr.features import FeatureSpec, feature_dims
from rsitr.models import create_model, get_model_spec
from rsitr.precision import autocast
from rsitr_train.profiling import best_rates, best_step_seconds, count_flops, format_rates, matmul_rates


def batch(dims: dict, n: int, length: int, vocab: int):
    features = {f"level{i}": torch.randn(n, c) for i, c in enumerate(dims["level_channels"], start=1)}
    features["regions"] = torch.randn(n, 36, dims["region_channels"])
    features["region_mask"] = torch.ones(n, 36, dtype=torch.bool)
    lengths = torch.randint(length // 2, length + 1, (n,))
    tokens = torch.randint(1, vocab, (n, int(lengths.max())))
    return features, tokens, lengths, torch.arange(n)


def make_step(name: str, batch_size: int, length: int, vocab: int, precision: str) -> Callable[[], None]:
    """A closure running one training step of model ``name`` on a fixed random batch."""
    dims = feature_dims(FeatureSpec(backbone=get_model_spec(name).backbone))
    model = create_model(name, dims, vocab)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    inputs = batch(dims, batch_size, length, vocab)

    def step() -> None:
        with autocast(precision):
            loss = model.training_loss(*inputs)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--length", type=int, default=20, help="longest caption of a batch (tokens)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (best is reported)")
    parser.add_argument("--vocab-size", type=int, default=2500)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--models", default="dove,dove-s")
    parser.add_argument("--rate-seconds", type=float, default=1.0,
                        help="seconds spent on each matmul rate measurement (per precision and path)")
    args = parser.parse_args()
    torch.manual_seed(0)
    before = matmul_rates(args.rate_seconds)
    rows = []
    for name in args.models.split(","):
        for precision in args.precisions.split(","):
            torch.manual_seed(0)
            step = make_step(name, args.batch_size, args.length, args.vocab_size, precision)
            step()  # warm-up: oneDNN builds its kernels and Adam its state on first use
            flops = count_flops(step)
            seconds = best_step_seconds(step, 0, args.steps)
            rows.append((name, precision, flops, seconds))
    rates = best_rates(before, matmul_rates(args.rate_seconds))  # measured before and after; the higher counts
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(format_rates(rates, "best of before and after the steps"))
    print()
    print("| model | precision | batch | GFLOP / step | seconds / step | pairs / s | achieved GFLOP/s "
          "| fraction of torch.mm rate | fraction of oneDNN GEMM rate |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, precision, flops, seconds in rows:
        achieved = flops / seconds / 1e9
        print(f"| {name} | {precision} | {args.batch_size} | {flops / 1e9:.1f} | {seconds:.3f} "
              f"| {args.batch_size / seconds:.0f} | {achieved:.0f} | {achieved / rates[f'mm_{precision}']:.2f} "
              f"| {achieved / rates[f'onednn_{precision}']:.2f} |")


if __name__ == "__main__":
    main()
