"""Pretraining throughput of ResNet-18/50 on CPU: fp32 vs bf16 autocast, NCHW vs channels_last.

Not a test: a measurement to choose ``PretrainConfig.precision`` and ``channels_last`` and to see
how close a training step gets to the machine's matmul rate. One step is what
:func:`rsitr_train.pretrain.train_epoch` does per batch: forward, cross-entropy, backward and an SGD
(Nesterov momentum) update, on random inputs of the configured size.

``torch.utils.flop_counter.FlopCounterMode`` counts the floating-point work of one step (forward
and backward; it is the same for every precision and layout). The bf16 and fp32 matmul rates are
measured in the same run (before and after the steps, the higher kept), both through ``torch.mm``
and through oneDNN, and each configuration's achieved GFLOP/s is reported as a fraction of the
rates of its own precision. The augmentation of a batch (uint8 at 8/7 of the size in, one
warp plus colour jitter out) is timed too, since it runs on the same cores. Numbers on a shared
machine are rough; the best of the timed steps is reported because other work only slows a step.

Usage::

    python benchmarks/pretrain_speed.py [--batch-size 32] [--steps 3] [--image-size 224] [--backbones resnet18,resnet50]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rsitr.backbones import create_backbone
from rsitr.precision import autocast
from rsitr_train.augment import AugmentConfig, augment_batch
from rsitr_train.profiling import best_rates, best_step_seconds, count_flops, format_rates, matmul_rates


def make_step(backbone: str, batch: int, size: int, precision: str, channels_last: bool,
              classes: int = 30) -> Callable[[], None]:
    """A closure running one training step of ``backbone`` on a fixed random batch."""
    model = create_backbone(backbone, seed=0)
    model.fc = torch.nn.Linear(model.fc.in_features, classes)
    images = torch.randn(batch, 3, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, classes, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    model.train()

    def step() -> None:
        with autocast(precision):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_flops(backbone: str, batch: int, size: int) -> float:
    """Floating-point operations of one forward + backward pass, as FlopCounterMode counts them."""
    return count_flops(make_step(backbone, batch, size, "fp32", channels_last=False))


def augment_rate(batch: int, size: int, repeats: int = 3) -> float:
    """Images/s of :func:`rsitr_train.augment.augment_batch` from uint8 at 8/7 of ``size`` to ``size``."""
    stored = round(size * 8 / 7)
    images = torch.randint(0, 256, (batch, 3, stored, stored), dtype=torch.uint8)
    config, generator = AugmentConfig(), torch.Generator().manual_seed(0)
    augment_batch(images, config, size, generator)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        augment_batch(images, config, size, generator)
        best = min(best, time.perf_counter() - started)
    return batch / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (best is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    parser.add_argument("--backbones", default="resnet18,resnet50")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    before = matmul_rates()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"augmentation (uint8 {round(args.image_size * 8 / 7)} px -> {args.image_size} px, batch {args.batch_size}): "
          f"{augment_rate(args.batch_size, args.image_size):.0f} images/s")
    rows = []
    for backbone in args.backbones.split(","):
        flops = step_flops(backbone, args.batch_size, args.image_size)
        for precision in ("fp32", "bf16"):
            for channels_last in (False, True):
                step = make_step(backbone, args.batch_size, args.image_size, precision, channels_last)
                seconds = best_step_seconds(step, args.warmup, args.steps)
                rows.append((backbone, precision, "channels_last" if channels_last else "NCHW", flops, seconds))
    rates = best_rates(before, matmul_rates())  # measured before and after; the higher counts
    print(format_rates(rates, "best of before and after the steps"))
    print()
    print("| backbone | precision | layout | batch | GFLOP / step | seconds / step | images / s "
          "| achieved GFLOP/s | fraction of torch.mm rate | fraction of oneDNN GEMM rate |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for backbone, precision, layout, flops, seconds in rows:
        achieved = flops / seconds / 1e9
        print(f"| {backbone} | {precision} | {layout} | {args.batch_size} | {flops / 1e9:.1f} | {seconds:.2f} "
              f"| {args.batch_size / seconds:.1f} | {achieved:.0f} | {achieved / rates[f'mm_{precision}']:.2f} "
              f"| {achieved / rates[f'onednn_{precision}']:.2f} |")


if __name__ == "__main__":
    main()
