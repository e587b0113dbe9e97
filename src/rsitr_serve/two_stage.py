"""Two-stage retrieval as an exact rule over score matrices, and its retrieval metrics.

A search over a large index runs in two stages. Stage one ranks every item by the inner product
of a separable pair of unit embeddings (:meth:`rsitr.bundle.RetrievalBundle.first_stage`; for
DOVE the global pair V_M / T_G), which an index answers by nearest neighbour. Stage two re-scores
the ``depth`` best first-stage candidates with the model's full pairwise score
(:meth:`~rsitr.bundle.RetrievalBundle.score`; for DOVE cos(V_MR, T_RG) through IGA) and orders
them by it. This module states that rule on whole score matrices, so its accuracy can be measured
against exhaustive pairwise scoring (``benchmarks/two_stage.py``).

The rule, per query (one row of ``(n_queries, n_items)`` score matrices):

* candidates: the ``min(depth, n_items)`` items of highest first-stage score; equal first-stage
  scores put the lower item index first (a stable sort), so the cut is deterministic;
* the candidates come first, ordered by the full score; equal full scores keep first-stage order;
* every other item follows, in first-stage order.

``depth`` is at least 1. Depth 1 never changes the first-stage order (one candidate has nothing
to be re-ordered against); depth ≥ ``n_items`` is the full score's ranking.

Two ways to turn the rule into metrics (``ties`` of :func:`two_stage_scores` and
:func:`two_stage_metrics`):

* ``"order"``: the metric sees exactly :func:`two_stage_order`, tie-breaks by index included: the
  score of the item at 0-based position r is ``n_items - r``, so distinct positions never tie.
* ``"strict"`` (the default of :func:`two_stage_metrics`): the metric sees the two-stage *score*
  under :func:`rsitr.evaluation.recall_metrics`'s strict tie rule: a candidate's key is (1, its
  full score), any other item's (0, its first-stage score), and items with equal keys tie against
  the query. Captions with the same words score exactly alike in both stages, so on a caption set
  whose captions repeat (UCM-Captions val: 1050 captions, 391 texts) the ``"order"`` view lets the
  item index decide whether an image's own copy of a sentence beats another image's copy; the
  strict view counts that tie against the query, as the exhaustive headline does. With it, depth ≥
  ``n_items`` gives exactly ``recall_metrics(full)`` even when the full score has ties, so the gap
  between the two measures the cut alone, not a change of tie rule. (The cut itself still takes
  tied first-stage items by index; that is what a search returns.)

Both views build an exact score matrix from ranks (dense ranks for ``"strict"``), never from
offsets added to raw scores, whose float rounding could merge or swap values. The ranks are float32
for the metric code, which holds them exactly up to 2**23 items per query (the strict view's ranks
reach twice the item count).
"""

from __future__ import annotations

import numpy as np
import torch

from rsitr.evaluation import RECALL_KS, recall_metrics

TIE_VIEWS = ("strict", "order")
#: Largest count of items per query whose ranks float32 holds exactly (the metric code reads float32).
MAX_EXACT_ITEMS = 2**23


def _check_depth(depth: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"depth must be an integer of at least 1 (the number of candidates to re-score), got {depth!r}")


def _check_scores(first: torch.Tensor, full: torch.Tensor | None = None) -> None:
    if first.ndim != 2:
        raise ValueError(f"first-stage scores must be 2-D (n_queries, n_items), got shape {tuple(first.shape)}")
    if full is not None and full.shape != first.shape:
        raise ValueError(f"full scores have shape {tuple(full.shape)}, the first-stage scores {tuple(first.shape)}")
    for name, scores in (("first-stage", first), ("full", full)):
        if scores is not None and not torch.isfinite(scores).all():
            raise ValueError(f"{name} scores contain NaN or infinite values")
    if first.shape[1] > MAX_EXACT_ITEMS:
        raise ValueError(f"{first.shape[1]} items per query: two-stage metrics are exact up to {MAX_EXACT_ITEMS}")


def _check_ties(ties: str) -> None:
    if ties not in TIE_VIEWS:
        raise ValueError(f"ties must be one of {', '.join(TIE_VIEWS)}, got {ties!r}")


def _descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Item indices of each row by descending score; equal scores keep ascending index (stable sort)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def top_candidates(first: torch.Tensor, depth: int) -> torch.Tensor:
    """The ``min(depth, n_items)`` best first-stage items of each query, best first.

    Args:
        first: (n_queries, n_items) first-stage scores, higher = better.
        depth: how many candidates stage two re-scores, at least 1.

    Returns:
        (n_queries, min(depth, n_items)) int64 item indices. Equal scores put the lower index first.
    """
    _check_depth(depth)
    _check_scores(first)
    return _descending_order(first)[:, : min(depth, first.shape[1])]


def _split_order(first: torch.Tensor, full: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates re-ordered by the full score (ties: first-stage order), and the rest in first-stage order."""
    _check_depth(depth)
    _check_scores(first, full)
    order = _descending_order(first)
    candidates, rest = order[:, :depth], order[:, depth:]
    by_full = torch.sort(full.gather(1, candidates), dim=1, descending=True, stable=True).indices
    return candidates.gather(1, by_full), rest


def two_stage_order(first: torch.Tensor, full: torch.Tensor, depth: int) -> torch.Tensor:
    """Every item of each query in final two-stage rank order (the module's rule).

    Args:
        first: (n_queries, n_items) first-stage scores.
        full: (n_queries, n_items) full scores of the same pairs.
        depth: candidates re-scored per query, at least 1 (more than ``n_items`` = all).

    Returns:
        (n_queries, n_items) int64 item indices, best first: the ``depth`` first-stage candidates
        ordered by ``full`` (ties: first-stage order), then every other item in first-stage order.
    """
    candidates, rest = _split_order(first, full, depth)
    return torch.cat([candidates, rest], dim=1)


def _order_scores(order: torch.Tensor) -> torch.Tensor:
    """Scores ``n_items - position``: descending order is ``order``, and no two positions tie."""
    n_items = order.shape[1]
    values = torch.arange(n_items, 0, -1, dtype=torch.float32, device=order.device).expand_as(order)
    return torch.empty(order.shape, dtype=torch.float32, device=order.device).scatter_(1, order, values)


def _dense_ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based dense rank of each entry within its row, highest first; equal values share a rank."""
    ordered = torch.sort(values, dim=1, descending=True)
    starts_new_value = torch.zeros(ordered.values.shape, dtype=torch.long, device=values.device)
    starts_new_value[:, 1:] = (ordered.values[:, 1:] != ordered.values[:, :-1]).long()
    return torch.empty_like(starts_new_value).scatter_(1, ordered.indices, starts_new_value.cumsum(dim=1))


def _strict_scores(first: torch.Tensor, full: torch.Tensor, depth: int) -> torch.Tensor:
    """Scores of key (1, full) for candidates and (0, first) for the rest, as exact dense ranks.

    A non-candidate with dense rank r among the non-candidates gets ``n_rest - r`` (in [1, n_rest]);
    a candidate with dense rank r among the candidates gets ``n_items + n_candidates - r`` (above
    ``n_items``), so every candidate scores above every other item and equal keys score equally.
    """
    candidates, rest = _split_order(first, full, depth)
    n_candidates, n_rest = candidates.shape[1], rest.shape[1]
    scores = torch.empty(first.shape, dtype=torch.float32, device=first.device)
    candidate_ranks = _dense_ranks(full.gather(1, candidates))
    scores.scatter_(1, candidates, (first.shape[1] + n_candidates - candidate_ranks).float())
    if n_rest:
        scores.scatter_(1, rest, (n_rest - _dense_ranks(first.gather(1, rest))).float())
    return scores


def two_stage_scores(first: torch.Tensor, full: torch.Tensor, depth: int, ties: str = "order") -> torch.Tensor:
    """A (n_queries, n_items) float32 score matrix that ranks items as two-stage retrieval does.

    Built from ranks, not from the raw scores (see the module doc):

    * ``ties="order"``: the item at 0-based position r of :func:`two_stage_order` scores
      ``n_items - r``; all scores of a row differ, and their descending order is exactly
      :func:`two_stage_order`.
    * ``ties="strict"``: candidates score ``n_items + n_candidates - r`` for dense rank r of their
      full score among the candidates, the other items ``n_rest - r`` for dense rank r of their
      first-stage score among themselves. Every candidate is above every other item, and two items
      tie exactly when both are candidates with equal full scores, or both are not and have equal
      first-stage scores.
    """
    _check_ties(ties)
    if ties == "order":
        return _order_scores(two_stage_order(first, full, depth))
    return _strict_scores(first, full, depth)


def _as_scores(scores: torch.Tensor | np.ndarray) -> torch.Tensor:
    return scores.detach() if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray(scores))


def two_stage_metrics(first_sims: torch.Tensor | np.ndarray, full_sims: torch.Tensor | np.ndarray,
                      image_of_caption: torch.Tensor | np.ndarray, depth: int, ties: str = "strict") -> dict[str, float]:
    """Retrieval metrics of two-stage retrieval at ``depth``, each direction from its own ranking.

    Text→image: the queries are the captions and the items the images (a re-ranked short list of
    images per caption); image→text: the queries are the images and the items the captions. The
    metric definitions are :func:`rsitr.evaluation.recall_metrics`' (strict tie rule) applied to
    :func:`two_stage_scores` of each direction; ``ties`` picks the view (see the module doc).

    Args:
        first_sims: (n_images, n_captions) first-stage scores.
        full_sims: (n_images, n_captions) full scores.
        image_of_caption: (n_captions,) image index of each caption.
        depth: candidates re-scored per query, at least 1.
        ties: ``"strict"`` (default) or ``"order"``.

    Returns:
        the keys of :func:`rsitr.evaluation.recall_metrics`.
    """
    first, full = _as_scores(first_sims), _as_scores(full_sims)
    _check_scores(first, full)
    image_queries = recall_metrics(two_stage_scores(first, full, depth, ties), image_of_caption)
    caption_queries = recall_metrics(two_stage_scores(first.T, full.T, depth, ties).T, image_of_caption)
    return _merge_directions(image_queries, caption_queries)


def _merge_directions(image_queries: dict[str, float], caption_queries: dict[str, float]) -> dict[str, float]:
    """i2t metrics of one ranking and t2i metrics of another, with rsum and mR of the six recalls.

    rsum adds the recalls in :func:`rsitr.evaluation.recall_metrics`' order, so a two-stage result
    equal to an exhaustive one matches it to the last bit.
    """
    merged = {key: value for key, value in image_queries.items() if key.startswith("i2t_")}
    merged.update({key: value for key, value in caption_queries.items() if key.startswith("t2i_")})
    recalls = [merged[f"{direction}_r{k}"] for direction in ("i2t", "t2i") for k in RECALL_KS]
    merged["rsum"] = float(sum(recalls))
    merged["mR"] = merged["rsum"] / len(recalls)
    return {key: merged[key] for key in image_queries}
