"""DOVE's pairwise IGA scoring: the evaluation path (``IGA._nonlinear_scores_fast``) against Eq. 26–28
written out pair by pair, in fp32 and bf16, independent of tiles and batches, and the training path's
gradients."""

import pytest
import torch
from torch.nn import functional as F

from rsitr.models.dove import IGA

DIM = 48


def make_iga(pair_block=8192, seed=0):
    """A random IGA with a non-linear head whose biases are far from zero (so every term of t_ij matters)."""
    torch.manual_seed(seed)
    iga = IGA(DIM, "nonlinear", True, pair_block).eval()
    with torch.no_grad():
        for p in iga.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return iga


def inputs(n_images, n_texts, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_images, DIM, generator=g), torch.randn(n_texts, DIM, generator=g),
            torch.randn(n_images, DIM, generator=g))


def per_pair(iga, region_mean, text_mean, visual):
    """cos(V_MR_i, head(s_ij g_j + r_i)) for every pair, through ``aligned_texts`` (Eq. 26–28), float32."""
    n_i, n_t = region_mean.shape[0], text_mean.shape[0]
    rows, cols = torch.arange(n_i).repeat_interleave(n_t), torch.arange(n_t).repeat(n_i)
    _, guided = iga.aligned_texts(region_mean[rows], text_mean[cols])
    return F.cosine_similarity(guided.float(), visual[rows].float(), dim=-1).view(n_i, n_t)


# 13 captions > 5 images: one image per tile (rows = captions); 3 captions < 5 images: rows = images.
SHAPES = [(5, 13), (5, 3), (1, 1), (9, 1)]


@pytest.mark.parametrize(("n_images", "n_texts"), SHAPES)
def test_fast_path_matches_per_pair_formula_fp32(n_images, n_texts):
    iga = make_iga()
    x = inputs(n_images, n_texts)
    with torch.no_grad():
        got = iga.pair_scores(*x)
        want = per_pair(iga, *x)
    assert got.dtype == torch.float32 and got.shape == (n_images, n_texts)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("n_images", "n_texts"), [(16, 40), (40, 3)])
def test_fast_path_bf16_error_at_most_the_reference_one_and_not_bf16_rounded(n_images, n_texts):
    iga = make_iga()
    x = inputs(n_images, n_texts)
    with torch.no_grad():
        exact = per_pair(iga, *x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = iga.pair_scores(*x)
            reference = iga._nonlinear_scores_differentiable(*_projected(iga, *x))
    fast_error = (fast - exact).abs().max().item()
    reference_error = (reference - exact).abs().max().item()
    assert 0 < fast_error <= 1.25 * reference_error
    # Finished in float32: almost no score is a bf16 number (a bf16-rounded score would tie close candidates).
    assert (fast.bfloat16().float() == fast).float().mean() < 0.1


def _projected(iga, region_mean, text_mean, visual):
    """(r, g, s, visual) as ``pair_scores`` hands them to the head."""
    r, g = iga.project(region_mean, text_mean)
    return r, g, iga.gate(r @ g.T), visual


@pytest.mark.parametrize(("n_images", "n_texts"), [(6, 11), (11, 4)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fast_path_independent_of_tile_size(n_images, n_texts, precision):
    x = inputs(n_images, n_texts)
    results = []
    for pair_block in (1, 3, 7, 8192):
        iga = make_iga(pair_block)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            results.append(iga.pair_scores(*x))
    tol = 1e-6 if precision == "fp32" else 1e-4  # bf16: the GEMM's blocking may change with the tile's rows
    for other in results[1:]:
        assert torch.allclose(other, results[0], atol=tol, rtol=0)


def test_fast_path_independent_of_batch_composition():
    """A pair's score does not depend on the other images and captions scored with it (both tile layouts)."""
    iga = make_iga()
    region_mean, text_mean, visual = inputs(7, 12)
    with torch.no_grad():
        full = iga.pair_scores(region_mean, text_mean, visual)
        some = iga.pair_scores(region_mean[2:5], text_mean[[1, 4, 9, 10, 11]], visual[2:5])  # rows = captions
        query = iga.pair_scores(region_mean, text_mean[6:7], visual)  # one caption vs every image: rows = images
        single = iga.pair_scores(region_mean[3:4], text_mean[8:9], visual[3:4])
    assert torch.allclose(some, full[2:5][:, [1, 4, 9, 10, 11]], atol=1e-6, rtol=0)
    assert torch.allclose(query[:, 0], full[:, 6], atol=1e-6, rtol=0)
    assert torch.allclose(single[0, 0], full[3, 8], atol=1e-6, rtol=0)


def test_evaluation_uses_fast_path_and_training_the_reference(monkeypatch):
    iga = make_iga()
    x = inputs(4, 9)

    def refuse(*args):
        raise AssertionError("wrong path")

    monkeypatch.setattr(iga, "_nonlinear_block", refuse)
    with torch.no_grad():
        iga.pair_scores(*x)  # the fast path never calls the reference tiles
    monkeypatch.undo()
    monkeypatch.setattr(iga, "_nonlinear_scores_fast", refuse)
    assert iga.pair_scores(*x).requires_grad  # with grad enabled: the differentiable path


@pytest.mark.parametrize(("n_images", "n_texts"), [(3, 10), (5, 2)])
def test_training_path_gradients_match_per_pair_formula(n_images, n_texts):
    """Gradients of a weighted sum of scores, to the parameters and to all three inputs, equal those of
    the explicit per-pair formula (the training loss of Eq. 31 backpropagates through pair_scores)."""
    iga = make_iga(pair_block=7).train()
    weights = torch.randn(n_images, n_texts, generator=torch.Generator().manual_seed(5))
    grads = []
    for scorer in (iga.pair_scores, lambda *x: per_pair(iga, *x)):
        x = [t.clone().requires_grad_() for t in inputs(n_images, n_texts)]
        iga.zero_grad()
        (scorer(*x) * weights).sum().backward()
        grads.append([t.grad.clone() for t in x] + [p.grad.clone() for p in iga.parameters()])
    for got, want in zip(*grads, strict=True):
        assert got.abs().sum() > 0
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
