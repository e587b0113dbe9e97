"""Pairwise scoring speed of DOVE: every (image, caption) pair of a test-set-sized problem.

Encodes random features and captions with a randomly initialised DOVE (ResNet-50 feature sizes)
and scores all pairs, the two stages ``rsitr.evaluation.compute_similarity`` runs, in float32 and
in bf16 (``precision="bf16"``: CPU autocast). The dominant cost is one d×d product per pair in
IGA's non-linear head; the script measures the machine's matmul rate in the same run and reports
the scoring rate as a fraction of it, for the scoring stage alone and end to end.

Each precision scores twice, BEFORE (the tiles of before the fast path, kept here as
``legacy_block``: a batched product over an expanded W2) and AFTER (the evaluation path that
``compute_similarity`` takes, ``IGA._nonlinear_scores_fast``), from the same encodings; the last
column is the largest score difference between the two, and the final lines the bf16 error of each
against fp32. On a shared machine compare the two within one run (ratios), not across runs.

    python benchmarks/scoring_speed.py                 # RSITMD test size: 452 images × 2260 captions
    python benchmarks/scoring_speed.py --images 1093 --captions 5465   # RSICD test size
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from functools import partial

import torch

from rsitr.evaluation import encode_image_chunks, encode_text_chunks, score_encodings
from rsitr.models import create_model
from rsitr.models.base import RetrievalModel
from rsitr.models.dove import IGA
from rsitr.models.layers import full_precision

LEVEL_CHANNELS = [256, 512, 1024, 2048]
REGION_CHANNELS = 1024
DIMS = {"level_channels": LEVEL_CHANNELS, "region_channels": REGION_CHANNELS}


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Measured GFLOP/s of a (4·size × 512) @ (512 × 512) product, the shape IGA runs (best of ``repeats``)."""
    a = torch.randn(4 * size, 512, dtype=dtype)
    b = torch.randn(512, 512, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * a.shape[0] * 512 * 512 / best / 1e9


def legacy_block(iga: IGA, r: torch.Tensor, g: torch.Tensor, s: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """The IGA tile as it was before the fast path (the "before"): W2 as a batched product over an
    expanded weight for tiles of 8 captions or more, which under autocast casts W2 once per image."""
    mlp = iga.head
    w1_g = g @ mlp.fc1.weight.T
    w1_r = r @ mlp.fc1.weight.T + mlp.fc1.bias
    hidden = torch.addcmul(w1_r[:, None, :], s[..., None], w1_g[None]).relu_()
    if g.shape[0] < 8:
        text = torch.addmm(mlp.fc2.bias, hidden.reshape(-1, hidden.shape[-1]), mlp.fc2.weight.T)
        text = text.view(hidden.shape).add_(r[:, None, :])
    else:
        w2 = mlp.fc2.weight.T.expand(hidden.shape[0], -1, -1)
        text = torch.baddbmm((r + mlp.fc2.bias)[:, None, :], hidden, w2)
    text.addcmul_(s[..., None], g[None])
    with full_precision():
        dot = (text * visual[:, None, :].to(text.dtype)).sum(-1, dtype=torch.float32)
        norms = (torch.linalg.vector_norm(text, dim=-1, dtype=torch.float32)
                 * torch.linalg.vector_norm(visual, dim=-1, keepdim=True, dtype=torch.float32))
        return dot / norms.clamp(min=1e-12)


@contextlib.contextmanager
def reference_scoring(model: RetrievalModel) -> Iterator[None]:
    """Within the block, DOVE's evaluation scores come from the tiles of before the fast path (the "before")."""
    iga: IGA = model.iga  # type: ignore[assignment]
    iga._nonlinear_scores_fast = iga._nonlinear_scores_differentiable  # type: ignore[method-assign]
    iga._nonlinear_block = partial(legacy_block, iga)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del iga._nonlinear_scores_fast
        del iga._nonlinear_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=452)
    parser.add_argument("--captions", type=int, default=2260)
    parser.add_argument("--vocab-size", type=int, default=2500)
    parser.add_argument("--skip-before", action="store_true", help="time only the current (AFTER) path")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model("dove", DIMS, args.vocab_size).eval()
    n = args.images
    features = {f"level{i}": torch.randn(n, c) for i, c in enumerate(LEVEL_CHANNELS, start=1)}
    features["regions"] = torch.randn(n, 36, REGION_CHANNELS)
    features["region_mask"] = torch.ones(n, 36, dtype=torch.bool)
    lengths = torch.randint(6, 25, (args.captions,))
    tokens = torch.randint(1, args.vocab_size, (args.captions, int(lengths.max())))
    tokens[torch.arange(tokens.shape[1])[None] >= lengths[:, None]] = 0
    pairs = args.images * args.captions
    pair_flops = 2 * pairs * 512 * 512
    print(f"{args.images} images × {args.captions} captions = {pairs:,} pairs; torch threads {torch.get_num_threads()}")
    print("| path | precision | encoding s | scoring s | end-to-end s | pairs/s (scoring) | matmul GFLOP/s measured "
          "| fraction of matmul rate: scoring | end to end | max abs diff vs before |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    paths: list[tuple[str, Callable[[], contextlib.AbstractContextManager[None]]]] = [
        ("before", lambda: reference_scoring(model)), ("after", contextlib.nullcontext)]
    if args.skip_before:
        paths = paths[1:]
    scores: dict[tuple[str, str], torch.Tensor] = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rate = matmul_rate(dtype)
        started = time.perf_counter()
        images = encode_image_chunks(model, features, precision)
        texts = encode_text_chunks(model, tokens, lengths, {}, precision)
        encoding = time.perf_counter() - started
        for path, scope in paths:
            with scope():
                started = time.perf_counter()
                scores[path, precision] = score_encodings(model, images, texts, precision)
                scoring = time.perf_counter() - started
            before = scores.get(("before", precision))
            diff = float("nan") if before is None else (scores[path, precision] - before).abs().max().item()
            fraction = [pair_flops / seconds / 1e9 / rate for seconds in (scoring, encoding + scoring)]
            print(f"| {path} | {precision} | {encoding:.2f} | {scoring:.2f} | {encoding + scoring:.2f} | {pairs / scoring:,.0f} "
                  f"| {rate:.0f} | {fraction[0]:.2f} | {fraction[1]:.2f} | {diff:.2e} |")
    for path, _ in paths:
        error = (scores[path, "bf16"] - scores[path, "fp32"]).abs().max().item()
        print(f"{path}: max abs bf16 - fp32 score difference {error:.2e}")


if __name__ == "__main__":
    main()
