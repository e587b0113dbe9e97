"""Retrieval metrics against hand-computed cases and a naive reference implementation."""

import numpy as np
import pytest
import torch

from rsitr.evaluation import (
    METRIC_KEYS,
    blockwise_similarity,
    chance_metrics,
    class_oracle_metrics,
    i2t_ranks,
    recall_metrics,
    t2i_ranks,
)


def reference_metrics(sims: np.ndarray, image_of_caption: np.ndarray) -> dict:
    """Naive loops in the style of the field's reference evaluation (argsort, first hit)."""
    n_images, n_captions = sims.shape
    i2t = []
    for i in range(n_images):
        order = np.argsort(-sims[i], kind="stable")
        own = np.flatnonzero(image_of_caption == i)
        i2t.append(min(int(np.where(order == c)[0][0]) for c in own))
    t2i = []
    for c in range(n_captions):
        order = np.argsort(-sims[:, c], kind="stable")
        t2i.append(int(np.where(order == image_of_caption[c])[0][0]))
    out = {}
    for name, ranks in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        out[f"{name}_medr"] = np.floor(np.median(ranks)) + 1
        out[f"{name}_meanr"] = ranks.mean() + 1
    recalls = [out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    out["rsum"] = sum(recalls)
    out["mR"] = sum(recalls) / 6
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    n_images = 37
    captions_per_image = rng.integers(1, 7, size=n_images)  # not always 5
    image_of_caption = np.repeat(np.arange(n_images), captions_per_image)
    rng.shuffle(image_of_caption)
    img = rng.normal(size=(n_images, 8))
    txt = img[image_of_caption] + rng.normal(scale=1.5, size=(len(image_of_caption), 8))
    sims = img @ txt.T
    got = recall_metrics(sims, image_of_caption)
    ref = reference_metrics(sims, image_of_caption)
    assert list(got) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(ref[key]), key


def test_hand_computed_case():
    # 3 images, 2 captions each: captions 0,1 -> image 0; 2,3 -> 1; 4,5 -> 2
    image_of_caption = np.array([0, 0, 1, 1, 2, 2])
    sims = np.array([
        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: best own caption (0.9) ranks first -> rank 0
        [0.5, 0.0, 0.1, 0.2, 0.0, 0.0],  # image 1: best own 0.2, beaten by caption 0 (0.5) -> rank 1
        [0.0, 0.3, 0.7, 0.6, 0.4, 0.1],  # image 2: best own 0.4, beaten by 0.7, 0.6 -> rank 2
    ])
    assert i2t_ranks(sims, image_of_caption).tolist() == [0, 1, 2]
    # caption columns: c0 own img0 0.9 top -> 0; c1 own img0 0.1 < 0.3 -> 1; c2 own img1 0.1 < .8,.7 -> 2
    # c3 own img1 0.2 < 0.6 -> 1; c4 own img2 0.4 top -> 0; c5 own img2 0.1 top -> 0
    assert t2i_ranks(sims, image_of_caption).tolist() == [0, 1, 2, 1, 0, 0]
    m = recall_metrics(sims, image_of_caption)
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == 100.0
    assert m["t2i_r1"] == pytest.approx(50.0)
    assert m["i2t_medr"] == 2.0  # median rank 1 (0-based) -> floor(1) + 1
    assert m["t2i_meanr"] == pytest.approx(np.mean([0, 1, 2, 1, 0, 0]) + 1)
    assert m["mR"] == pytest.approx(m["rsum"] / 6)


def test_constant_scores_are_not_rewarded():
    """Ties count against the query: a model that scores everything equally sits at the bottom."""
    image_of_caption = np.repeat(np.arange(20), 5)
    m = recall_metrics(np.zeros((20, 100)), image_of_caption)
    assert m["i2t_r10"] == 0.0 and m["t2i_r10"] == 0.0
    assert m["t2i_medr"] == 20.0  # 19 wrong images tie with the true one


def test_chance_level_matches_random_rankings():
    rng = np.random.default_rng(0)
    image_of_caption = np.repeat(np.arange(30), 5)
    runs = [recall_metrics(rng.random((30, 150)), image_of_caption) for _ in range(400)]
    chance = chance_metrics(30, image_of_caption)
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r10", "mR"):
        assert np.mean([r[key] for r in runs]) == pytest.approx(chance[key], abs=1.5), key


def test_input_validation():
    with pytest.raises(ValueError, match="image_of_caption"):
        recall_metrics(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        recall_metrics(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        recall_metrics(np.array([[np.nan, 0.0]]), np.array([0, 0]))


def test_blockwise_assembly_independent_of_block_size():
    full = torch.randn(23, 41)

    def score(rows, cols):
        return full[rows, cols]

    for ib, cb in ((1, 1), (5, 7), (64, 64)):
        assert torch.equal(blockwise_similarity(score, 23, 41, ib, cb), full)


def test_class_oracle_is_perfect_when_every_class_has_one_image() -> None:
    oracle = class_oracle_metrics(["a", "b", "c"], np.array([0, 0, 1, 2, 2, 2]))
    assert oracle["mR"] == pytest.approx(100.0)


def test_class_oracle_of_a_single_class_is_chance() -> None:
    image_of_caption = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5, 6, 7, 8, 9, 10, 11, 11])
    oracle = class_oracle_metrics(["x"] * 12, image_of_caption)
    chance = chance_metrics(12, image_of_caption)
    for key, value in chance.items():
        assert oracle[key] == pytest.approx(value), key


def test_class_oracle_matches_random_rankings_within_classes() -> None:
    """Average of real rankings that put the query's class first, in random order inside it."""
    rng = np.random.default_rng(0)
    classes = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3])
    image_of_caption = np.repeat(np.arange(13), rng.integers(1, 4, 13))
    same = (classes[:, None] == classes[image_of_caption][None, :]).astype(float)
    draws = [recall_metrics(same + 1e-3 * rng.random(same.shape), image_of_caption) for _ in range(3000)]
    oracle = class_oracle_metrics(classes.tolist(), image_of_caption)
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "mR"):
        assert oracle[key] == pytest.approx(np.mean([d[key] for d in draws]), abs=1.0), key
