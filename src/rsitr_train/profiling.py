"""Measuring how close a CPU computation gets to the machine's matmul rate.

The speed benchmarks report throughput as a fraction of a bound: the GFLOP/s of a large GEMM
measured in the same run, in the same precision. The pieces they share live here, so that the
bound is measured the same way everywhere:

* :func:`matmul_rates`: GFLOP/s of a square GEMM in float32 and bfloat16, through ``torch.mm``
  and through oneDNN;
* :func:`count_flops`: the floating-point work of one call, as
  ``torch.utils.flop_counter.FlopCounterMode`` counts it (matmuls, convolutions, attention; not
  elementwise work, normalisation or RoIAlign), so it is the same for every precision;
* :func:`best_seconds`, :func:`best_step_seconds`: the fastest of several timed calls, since
  other work on a shared machine only ever slows a call down;
* :func:`best_rates`: the higher of rates measured before and after a benchmark, for the same
  reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.mkldnn import to_mkldnn

#: The precisions :func:`matmul_rates` measures, and the dtypes they run in.
RATE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def best_seconds(run: Callable[[], object], budget: float) -> float:
    """Fastest call of ``run`` over about ``budget`` seconds (at least three calls, after two warm-ups)."""
    for _ in range(2):
        run()
    best, spent, calls = float("inf"), 0.0, 0
    while spent < budget or calls < 3:
        started = time.perf_counter()
        run()
        elapsed = time.perf_counter() - started
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return best


def best_step_seconds(step: Callable[[], object], warmup: int, steps: int) -> float:
    """Fastest of ``steps`` timed calls after ``warmup`` untimed ones (oneDNN builds kernels on first use)."""
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(steps):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best


def matmul_rates(seconds: float = 1.0, n: int = 2048) -> dict[str, float]:
    """GFLOP/s of an ``n`` x ``n`` x ``n`` product per precision, through ``torch.mm`` and oneDNN.

    Keys ``mm_fp32``, ``mm_bf16``, ``onednn_fp32``, ``onednn_bf16``; each rate is the best call
    over about ``seconds`` seconds. ``torch.mm`` in float32 runs MKL's sgemm, which on AMD CPUs
    may take a narrower code path than the oneDNN kernels convolutions use; the oneDNN product
    (an MKL-DNN linear layer) shows what those kernels reach on a plain GEMM. bf16 products go
    to oneDNN either way.
    """
    rates: dict[str, float] = {}
    flops = 2 * n**3
    x = torch.randn(n, n)
    layer = torch.nn.Linear(n, n, bias=False).eval()
    for name, dtype in RATE_DTYPES.items():
        a, b = x.to(dtype), layer.weight.detach().to(dtype)
        rates[f"mm_{name}"] = flops / best_seconds(partial(torch.mm, a, b), seconds) / 1e9
        with torch.no_grad():
            fused = to_mkldnn(layer, dtype=dtype)
            xm = x.to(dtype).to_mkldnn()
            rates[f"onednn_{name}"] = flops / best_seconds(partial(fused, xm), seconds) / 1e9
    return rates


def best_rates(*measurements: dict[str, float]) -> dict[str, float]:
    """Per key, the highest of several :func:`matmul_rates` results (other load only lowers a rate)."""
    return {key: max(m[key] for m in measurements) for key in measurements[0]}


def count_flops(fn: Callable[[], object]) -> float:
    """Floating-point operations of one call of ``fn``, as ``FlopCounterMode`` counts them.

    A multiply-add counts as two operations. Only ops the counter knows (matmuls, convolutions,
    attention, forward and backward) are counted, so the count does not depend on precision.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def format_rates(rates: dict[str, float], measured: str = "best of before and after the runs") -> str:
    """One line naming the four matmul rates of :func:`matmul_rates`, for a benchmark's report."""
    parts = [f"{kind} {precision} {rates[f'{key}_{precision}']:.0f}"
             for kind, key in (("torch.mm", "mm"), ("oneDNN", "onednn")) for precision in RATE_DTYPES]
    return f"matmul rate (GFLOP/s, {measured}): " + ", ".join(parts)
