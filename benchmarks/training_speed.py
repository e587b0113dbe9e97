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

``--variants`` compares implementations in the same run, the steps of the variants interleaved so
that a change of load on a shared machine hits them alike:

* ``before``: the previous step, kept here as the reference: the text GRU through
  ``pack_padded_sequence`` (``RecurrentTextEncoder.encode_packed``), IGA's training tile as a
  batched product over an expanded W2 (``scoring_speed.legacy_block``) and Adam's default
  per-parameter loop;
* ``after``: the current step, as training runs it: the sorted-batch GRU recurrence with its
  hand-written backward (``RecurrentTextEncoder.encode``), IGA's tile as one flat product
  (``IGA._nonlinear_block``) and fused Adam.

Both variants start from the same seeded weights and batch, so they do the same work up to the
FLOP count of the recurrence (the packed GRU skips finished captions, and so does the sorted one).

    python benchmarks/training_speed.py [--batch-size 100] [--length 20] [--steps 5] [--precisions fp32,bf16] [--models dove,dove-s] [--variants before,after]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from rsitr.features import FeatureSpec, feature_dims
from rsitr.models import create_model, get_model_spec
from rsitr.models.dove import IGA
from rsitr.models.layers import RecurrentTextEncoder
from rsitr.precision import autocast
from rsitr_train.profiling import best_rates, count_flops, format_rates, matmul_rates
from scoring_speed import legacy_block  # the benchmarks folder is on the path of a script run from it

#: The implementations ``--variants`` selects (see the module docstring).
VARIANTS = ("before", "after")


def batch(dims: dict, n: int, length: int, vocab: int):
    features = {f"level{i}": torch.randn(n, c) for i, c in enumerate(dims["level_channels"], start=1)}
    features["regions"] = torch.randn(n, 36, dims["region_channels"])
    features["region_mask"] = torch.ones(n, 36, dtype=torch.bool)
    lengths = torch.randint(length // 2, length + 1, (n,))
    tokens = torch.randint(1, vocab, (n, int(lengths.max())))
    return features, tokens, lengths, torch.arange(n)


def make_step(name: str, batch_size: int, length: int, vocab: int, precision: str,
              variant: str = "after") -> Callable[[], None]:
    """A closure running one training step of model ``name`` on a fixed random batch, as ``variant`` implements it."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    dims = feature_dims(FeatureSpec(backbone=get_model_spec(name).backbone))
    model = create_model(name, dims, vocab)
    model.train()
    if variant == "before":
        for module in model.modules():
            if isinstance(module, RecurrentTextEncoder):
                module.encode = module.encode_packed  # type: ignore[method-assign]
            if isinstance(module, IGA):
                module._nonlinear_block = partial(legacy_block, module)  # type: ignore[method-assign]
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, fused=variant == "after")
    inputs = batch(dims, batch_size, length, vocab)

    def step() -> None:
        with autocast(precision):
            loss = model.training_loss(*inputs)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def interleaved_best_seconds(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Fastest of ``rounds`` timed calls of each step, the steps taken in turn (one call of each per round)."""
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for key, step in steps.items():
            started = time.perf_counter()
            step()
            best[key] = min(best[key], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--length", type=int, default=20, help="longest caption of a batch (tokens)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (best is reported)")
    parser.add_argument("--vocab-size", type=int, default=2500)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--models", default="dove,dove-s")
    parser.add_argument("--variants", default="before,after", help=f"implementations to compare, of {', '.join(VARIANTS)}")
    parser.add_argument("--rate-seconds", type=float, default=1.0,
                        help="seconds spent on each matmul rate measurement (per precision and path)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    torch.manual_seed(0)
    before = matmul_rates(args.rate_seconds)
    rows = []
    for name in args.models.split(","):
        for precision in args.precisions.split(","):
            steps, flops = {}, {}
            for variant in variants:
                torch.manual_seed(0)  # the same weights and batch for every variant
                steps[variant] = make_step(name, args.batch_size, args.length, args.vocab_size, precision, variant)
                steps[variant]()  # warm-up: oneDNN builds its kernels and Adam its state on first use
                flops[variant] = count_flops(steps[variant])
            seconds = interleaved_best_seconds(steps, args.steps)
            rows += [(name, precision, variant, flops[variant], seconds[variant]) for variant in variants]
    rates = best_rates(before, matmul_rates(args.rate_seconds))  # measured before and after; the higher counts
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(format_rates(rates, "best of before and after the steps"))
    print()
    print("| model | precision | variant | batch | GFLOP / step | seconds / step | pairs / s | achieved GFLOP/s "
          "| fraction of torch.mm rate | fraction of oneDNN GEMM rate |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, precision, variant, flops_, seconds_ in rows:
        achieved = flops_ / seconds_ / 1e9
        print(f"| {name} | {precision} | {variant} | {args.batch_size} | {flops_ / 1e9:.1f} | {seconds_:.3f} "
              f"| {args.batch_size / seconds_:.0f} | {achieved:.0f} | {achieved / rates[f'mm_{precision}']:.2f} "
              f"| {achieved / rates[f'onednn_{precision}']:.2f} |")


if __name__ == "__main__":
    main()
