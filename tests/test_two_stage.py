"""Two-stage retrieval: hand-computed orders, the limits depth 1 and depth ≥ n, and its metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsitr.evaluation import recall_metrics
from rsitr_serve.two_stage import top_candidates, two_stage_metrics, two_stage_order, two_stage_scores

# 3 queries × 5 items. Row 1 ties in the first stage (items 0, 1, 3), row 2 in the full score
# (items 0, 1, 3), where first-stage order (3, 1, 0) differs from index order.
FIRST = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3],
                      [0.4, 0.4, 0.8, 0.4, 0.0],
                      [0.1, 0.2, 0.3, 0.4, 0.5]])
FULL = torch.tensor([[0.2, 0.9, 0.8, 0.6, 0.1],
                     [0.5, 0.5, 0.1, 0.9, 0.5],
                     [0.7, 0.7, 0.0, 0.7, 0.3]])
HAND_ORDERS = {
    1: [[0, 3, 2, 4, 1], [2, 0, 1, 3, 4], [4, 3, 2, 1, 0]],  # the first-stage order
    2: [[3, 0, 2, 4, 1], [0, 2, 1, 3, 4], [3, 4, 2, 1, 0]],
    5: [[1, 2, 3, 0, 4], [3, 0, 1, 4, 2], [3, 1, 0, 4, 2]],  # full score; its ties in first-stage order
}


def tie_free(n_images: int, n_captions: int, seed: int) -> torch.Tensor:
    """Random scores without ties (a permutation of distinct values)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_images * n_captions, generator=generator).reshape(n_images, n_captions).float() / 100


@pytest.mark.parametrize("depth", sorted(HAND_ORDERS))
def test_two_stage_order_by_hand(depth: int) -> None:
    assert two_stage_order(FIRST, FULL, depth).tolist() == HAND_ORDERS[depth]


def test_top_candidates_by_hand_with_lower_index_first_on_ties() -> None:
    assert top_candidates(FIRST, 2).tolist() == [[0, 3], [2, 0], [4, 3]]
    assert top_candidates(FIRST, 4)[1].tolist() == [2, 0, 1, 3]
    assert top_candidates(FIRST, 9).shape == (3, 5)


def test_order_scores_rank_exactly_as_the_order() -> None:
    scores = two_stage_scores(FIRST, FULL, 2)
    assert scores[0].tolist() == [4.0, 1.0, 3.0, 5.0, 2.0]  # order 3, 0, 2, 4, 1 → 5, 4, 3, 2, 1
    for row, order in zip(scores, HAND_ORDERS[2], strict=True):
        assert len(set(row.tolist())) == 5
        assert torch.argsort(row, descending=True).tolist() == order


def test_strict_scores_by_hand() -> None:
    # depth 5: one candidate group, dense ranks of full 0.9 → 0, 0.5 → 1, 0.1 → 2, scored 10 − rank
    assert two_stage_scores(FIRST, FULL, 5, ties="strict")[1].tolist() == [9.0, 9.0, 8.0, 10.0, 9.0]
    # depth 2: candidates 2, 0 (full 0.1, 0.5) → 7 − rank; the rest 1, 3, 4 (first 0.4, 0.4, 0.0) → 3 − rank
    assert two_stage_scores(FIRST, FULL, 2, ties="strict")[1].tolist() == [7.0, 3.0, 6.0, 3.0, 2.0]


@pytest.mark.parametrize("depth", [5, 6, 100])
def test_depth_of_all_items_is_the_full_ranking(depth: int) -> None:
    first, full = tie_free(4, 5, seed=1), tie_free(4, 5, seed=2)
    assert two_stage_order(first, full, depth).tolist() == torch.argsort(full, dim=1, descending=True).tolist()
    sims_first, sims_full = tie_free(5, 10, seed=3), tie_free(5, 10, seed=4)
    image_of_caption = np.repeat(np.arange(5), 2)
    for ties in ("strict", "order"):
        assert two_stage_metrics(sims_first, sims_full, image_of_caption, 2 * depth, ties) == recall_metrics(sims_full, image_of_caption)


def test_strict_view_keeps_exhaustive_ties_and_order_view_breaks_them_by_index() -> None:
    # two images whose single captions have the same words: identical columns in both stages
    sims = torch.tensor([[0.5, 0.5], [0.3, 0.3]])
    image_of_caption = np.array([0, 1])
    strict = two_stage_metrics(sims, sims, image_of_caption, 2)
    assert strict == recall_metrics(sims, image_of_caption)
    assert strict["i2t_r1"] == 0.0  # each image's own caption ties with the other one: counted against it
    assert two_stage_metrics(sims, sims, image_of_caption, 2, ties="order")["i2t_r1"] == 50.0  # caption 0 sorts first


@pytest.mark.parametrize("depth", [0, -1, 1.5, True])
def test_depth_below_one_or_not_an_integer_is_refused(depth: object) -> None:
    with pytest.raises(ValueError, match="depth must be an integer of at least 1"):
        two_stage_order(FIRST, FULL, depth)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="depth"):
        top_candidates(FIRST, depth)  # type: ignore[arg-type]


def test_depth_one_keeps_the_first_stage_ranking() -> None:
    first, full = tie_free(6, 7, seed=5), tie_free(6, 7, seed=6)
    order = two_stage_order(first, full, 1)
    assert order.tolist() == torch.argsort(first, dim=1, descending=True).tolist()
    assert order[:, 0].tolist() == first.argmax(dim=1).tolist()
    image_of_caption = np.arange(7) % 6
    assert two_stage_metrics(first, full, image_of_caption, 1) == recall_metrics(first, image_of_caption)


@pytest.mark.parametrize("ties", ["strict", "order"])
def test_full_equal_to_first_gives_first_stage_metrics_at_any_depth(ties: str) -> None:
    first = tie_free(6, 12, seed=7)
    image_of_caption = np.arange(12) // 2
    expected = recall_metrics(first, image_of_caption)
    for depth in (1, 2, 3, 5, 12, 50):
        assert two_stage_metrics(first, first.clone(), image_of_caption, depth, ties) == expected


@pytest.mark.parametrize("depth", [1, 2, 3, 7])
def test_views_agree_without_ties(depth: int) -> None:
    first, full = tie_free(7, 14, seed=8), tie_free(7, 14, seed=9)
    image_of_caption = np.arange(14) % 7
    assert two_stage_metrics(first, full, image_of_caption, depth, "strict") == \
        two_stage_metrics(first, full, image_of_caption, depth, "order")


def true_at_rank(rank: int, decoy: bool, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n queries, n items) scores where query q's true item q is at 1-based first-stage ``rank``.

    The true item has the best full score, unless ``decoy``: then another candidate — first-stage
    rank 1, or rank 2 when the true item holds rank 1 — scores higher in full.
    """
    generator = torch.Generator().manual_seed(seed)
    first, full = torch.empty(n, n), torch.rand(n, n, generator=generator) * 0.5
    for query in range(n):
        others = [item for item in torch.randperm(n, generator=generator).tolist() if item != query]
        by_first = others[: rank - 1] + [query] + others[rank - 1 :]
        first[query, by_first] = 1.0 - torch.arange(n, dtype=torch.float32) / 10
        full[query, query] = 1.0
        if decoy:
            full[query, by_first[1 if rank == 1 else 0]] = 2.0
    return first, full


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("decoy", [False, True])
def test_true_item_found_first_iff_it_is_a_candidate_and_best_in_full(direction: str, rank: int, decoy: bool) -> None:
    first, full = true_at_rank(rank, decoy)
    image_of_caption = np.arange(6)  # one caption per image, same index
    if direction == "t2i":  # caption queries rank images: the sims are (images, captions)
        first, full = first.T, full.T
    for depth in range(1, 7):
        metrics = two_stage_metrics(first, full, image_of_caption, depth)
        decoy_is_candidate = decoy and (rank > 1 or depth >= 2)
        found = depth >= rank and not decoy_is_candidate
        assert metrics[f"{direction}_r1"] == (100.0 if found else 0.0), depth
        if not decoy and depth < rank:  # not re-scored: the true item stays at its first-stage rank
            assert metrics[f"{direction}_meanr"] == rank


def test_numpy_inputs_give_the_same_metrics() -> None:
    first, full = tie_free(4, 8, seed=10), tie_free(4, 8, seed=11)
    image_of_caption = np.arange(8) // 2
    assert two_stage_metrics(first.numpy(), full.numpy(), image_of_caption, 3) == \
        two_stage_metrics(first, full, torch.from_numpy(image_of_caption), 3)


def test_bad_inputs_are_refused_with_the_problem() -> None:
    with pytest.raises(ValueError, match="full scores have shape"):
        two_stage_order(FIRST, FULL[:, :4], 2)
    with pytest.raises(ValueError, match="must be 2-D"):
        top_candidates(FIRST[0], 2)
    with pytest.raises(ValueError, match="first-stage scores contain NaN"):
        two_stage_order(torch.full((2, 3), float("nan")), torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match="ties must be one of"):
        two_stage_scores(FIRST, FULL, 2, ties="reference")
