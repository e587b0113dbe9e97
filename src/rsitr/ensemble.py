"""Score-level ensembles: several models' (n_images, n_captions) score matrices combined into one.

Models score on different scales: DOVE and VSE++ return a cosine in [-1, 1], a model that sums a
global and a local cosine returns values in [-2, 2], SCAN pools its region-word cosines with a
log-sum-exp whose range depends on its temperature. A plain average of raw scores would let the
model with the widest range decide the ranking. :func:`zscore` maps each matrix to zero mean and
unit standard deviation over all of its entries, which puts every member on one scale.

Choices (written down because the literature does not fix them):

* Statistics over the *whole* matrix, one mean and one std per member. This is an increasing
  affine map, so it changes no member's ranking in either direction; it only sets how much each
  member weighs in the sum. Per-row (per-query) or per-column normalisation is not used: it
  would move one query's scores relative to another's, and the i2t and t2i directions read the
  same matrix by rows and by columns, so a row normalisation would change the t2i ranks (and a
  column one the i2t ranks) of a single member.
* The statistics come from the unlabelled scores of the split being ranked (two numbers per
  member) and never from which caption belongs to which image: no label enters the ensemble.
* A member whose matrix is constant carries no ranking information; its z-score is taken as all
  zeros (it adds nothing) rather than dividing by zero.
* Everything is computed in float64 and returned as float64: casting back to float32 could merge
  two scores that a member kept apart, and an ensemble of one model must rank exactly as the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _as_float64(matrix: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(matrix, torch.Tensor):
        return matrix.detach().cpu().double().numpy()
    return np.asarray(matrix, dtype=np.float64)


def zscore(matrix: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(matrix - mean) / std`` over all entries (population std), float64; all zeros if the matrix is constant."""
    values = _as_float64(matrix)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"a score matrix must be 2-D and non-empty, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("a score matrix contains NaN or infinite values")
    centred = values - values.mean()
    std = float(values.std())
    return centred / std if std > 0 else np.zeros_like(centred)


def ensemble_weights(count: int, weights: Sequence[float] | None = None) -> np.ndarray:
    """Member weights summing to 1: equal when ``weights`` is None, else ``weights`` rescaled.

    Weights must be finite and non-negative with a positive sum, one per member; only their ratios matter.
    """
    if count < 1:
        raise ValueError("an ensemble needs at least one member")
    if weights is None:
        return np.full(count, 1.0 / count)
    values = np.asarray(weights, dtype=np.float64)
    if values.shape != (count,):
        raise ValueError(f"{len(values)} weight(s) for {count} member(s)")
    if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(values)}")
    return values / values.sum()


def normalised_average(matrices: Sequence[np.ndarray | torch.Tensor], weights: Sequence[float] | None = None) -> np.ndarray:
    """The weighted mean of the members' z-scored score matrices (:func:`zscore`), float64.

    Args:
        matrices: one (n_images, n_captions) score matrix per member, all of the same shape, rows
            and columns in the same order.
        weights: one non-negative weight per member (rescaled to sum 1); None = equal weights.

    Returns:
        ``sum_m w_m * zscore(S_m)`` with ``sum_m w_m = 1``.
    """
    if not matrices:
        raise ValueError("an ensemble needs at least one score matrix")
    shares = ensemble_weights(len(matrices), weights)
    shape = tuple(matrices[0].shape)
    total = np.zeros(shape, dtype=np.float64)
    for index, (matrix, share) in enumerate(zip(matrices, shares, strict=True)):
        if tuple(matrix.shape) != shape:
            raise ValueError(f"score matrix {index} has shape {tuple(matrix.shape)}, expected {shape}")
        total += share * zscore(matrix)
    return total


def shared_text_ids(text_ids: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
    """Caption text ids for an ensemble: two captions share an id when they share it in *every* member.

    Each member tokenises with its own vocabulary, so two captions that read the same to one member
    (e.g. words it does not know) may differ for another; only captions that are identical inputs
    to every member are sure to tie in the averaged matrix. With one member the partition is that
    member's (the ids are renumbered, which no metric sees).
    """
    if not text_ids:
        raise ValueError("no text ids given")
    rows = np.stack([np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64) for ids in text_ids])
    return np.unique(rows, axis=1, return_inverse=True)[1].reshape(-1)
