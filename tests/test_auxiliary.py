"""Identical-caption negatives and auxiliary scene supervision (rsitr_train.auxiliary)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from rsitr.data.tokenized import SplitData
from rsitr.errors import ConfigError
from rsitr.losses import same_image_mask, shared_text_mask, triplet_ranking_loss
from rsitr.models import create_model
from rsitr_train.auxiliary import SceneSupervision, identical_text_tables, scene_label_table
from rsitr_train.config import load_config
from rsitr_train.trainer import train


def _split(caption_image: list[int], text_ids: list[int], caption_ids: list[int]) -> SplitData:
    n = len(caption_image)
    images = sorted(set(caption_image))
    return SplitData(image_ids=torch.tensor(images), tokens=torch.zeros(n, 1, dtype=torch.long), lengths=torch.ones(n, dtype=torch.long),
                     caption_image=torch.tensor(caption_image), caption_local_image=np.array([images.index(i) for i in caption_image]),
                     caption_ids=torch.tensor(caption_ids), extras={}, text_ids=torch.tensor(text_ids))


def test_shared_text_mask_marks_copies_of_any_own_caption() -> None:
    # image 0 says texts {7, 8}; image 1 says {9}; image 2 says {7}
    image_texts = torch.tensor([[7, 8], [9, -1], [7, -1]])
    captions = torch.tensor([8, 9, 7])  # column j's caption (pair j's)
    mask = shared_text_mask(image_texts, captions)
    expected = torch.tensor([[True, False, True],    # image 0 owns 8 and 7
                             [False, True, False],   # image 1 owns 9 only
                             [False, False, True]])  # image 2 owns 7
    assert torch.equal(mask, expected)
    assert not shared_text_mask(torch.tensor([[-1]]), torch.tensor([-1])).any()  # padding never matches


def test_identical_text_tables_list_each_images_texts() -> None:
    data = _split(caption_image=[4, 4, 1, 1, 6], text_ids=[0, 1, 1, 2, 0], caption_ids=[10, 11, 3, 4, 12])
    image_texts, caption_texts = identical_text_tables(data, num_images=8, num_captions=14)
    assert image_texts.shape == (8, 2)
    assert sorted(image_texts[4].tolist()) == [0, 1] and sorted(image_texts[1].tolist()) == [1, 2]
    assert image_texts[6].tolist() == [0, -1] and image_texts[0].tolist() == [-1, -1]
    assert caption_texts[[10, 11, 3, 4, 12]].tolist() == [0, 1, 1, 2, 0]
    assert (caption_texts[[0, 1, 2, 5, 13]] == -1).all()


def test_masked_loss_drops_exactly_the_copied_caption_terms() -> None:
    sims = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.7, 0.3], [0.6, 0.0, 0.5]])
    image_ids = torch.tensor([0, 1, 2])
    # caption 2 (of image 2) repeats caption 0 (of image 0) word for word, and vice versa
    copies = torch.tensor([[True, False, True], [False, True, False], [True, False, True]])
    plain = triplet_ranking_loss(sims, same_image_mask(image_ids), margin=0.2)
    masked = triplet_ranking_loss(sims, copies, margin=0.2)
    # hinge terms by hand: (i=0, j=2) caption side 0.2-0.9+0.8=0.1, image side (caption 2, image 0) 0.2-0.5+0.8=0.5
    # (i=2, j=0) caption side 0.2-0.5+0.6=0.3, image side (caption 0, image 2) 0.2-0.9+0.6=0 -> removed: 0.9 / 3 pairs
    assert float(plain - masked) == pytest.approx(0.9 / 3, abs=1e-6)


def test_model_non_negatives_follow_the_switch() -> None:
    model = create_model("vsepp", {"level_channels": [8, 8, 8, 16]}, vocab_size=10, embed_dim=8, word_dim=4)
    image_ids, caption_ids = torch.tensor([0, 1]), torch.tensor([0, 1])
    assert torch.equal(model.non_negatives(image_ids, caption_ids), torch.eye(2, dtype=torch.bool))
    model.mask_identical_captions(torch.tensor([[5], [5]]), torch.tensor([5, 5]))  # both images say the same
    assert model.non_negatives(image_ids, caption_ids).all()
    model.mask_identical_captions(None, None)
    assert torch.equal(model.non_negatives(image_ids, caption_ids), torch.eye(2, dtype=torch.bool))


def test_scene_supervision_is_weighted_cross_entropy() -> None:
    head = SceneSupervision("visual", dim=3, labels=torch.tensor([2, 0, -1, 1]), weight=0.5)
    with torch.no_grad():
        head.classifier.weight.copy_(torch.eye(3))
        head.classifier.bias.zero_()
    embedding = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    loss = head({"visual": embedding}, torch.tensor([0, 1])).detach()
    expected = -np.log(np.e / (np.e + 2))  # the right class scores 1, the two others 0
    assert loss.item() == pytest.approx(0.5 * expected, rel=1e-6)
    assert head.classifier.out_features == 3


def tiny(dataset, cache, **extra):
    overrides = [f"data.path={dataset}", f"features.cache_dir={cache}", "features.image_size=64", "features.precision=fp32",
                 "model.name=dove-s", "model.params={embed_dim: 32, word_dim: 16}", "train.epochs=1",
                 "train.batch_size=16", "train.lr=0.001"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def test_training_with_both_levers_logs_the_scene_term_and_changes_the_weights(tiny_synth, tmp_path) -> None:
    cache = tmp_path / "cache"
    train(tiny(tiny_synth, cache), tmp_path / "plain", progress=False)
    train(tiny(tiny_synth, cache, **{"train.scene_loss": 0.5, "train.mask_identical_captions": "true"}), tmp_path / "both",
          progress=False)
    rows = list(csv.DictReader((tmp_path / "both" / "metrics.csv").open()))
    assert float(rows[0]["scene"]) > 0
    state = torch.load(tmp_path / "both" / "resume.pt", weights_only=True)
    assert "classifier.weight" in state["scene"]
    plain = torch.load(tmp_path / "plain" / "resume.pt", weights_only=True)["model"]
    assert not torch.equal(plain["msv.mlp.fc1.weight"], state["model"]["msv.mlp.fc1.weight"])


def test_scene_labels_come_from_the_training_split_only(tiny_synth) -> None:
    from rsitr.data import load_dataset

    dataset = load_dataset(tiny_synth)
    train_ids = torch.tensor(dataset.split_indices("train"))
    table, classes = scene_label_table(dataset, train_ids)
    assert (table[train_ids] >= 0).all()
    others = torch.tensor(sorted(set(range(dataset.num_images)) - set(train_ids.tolist())))
    assert (table[others] == -1).all()
    assert classes == sorted({dataset.scene_labels[i] for i in train_ids.tolist()})


def test_bad_scene_loss_is_a_config_error(tiny_synth, tmp_path) -> None:
    with pytest.raises(ConfigError, match="scene_loss"):
        tiny(tiny_synth, tmp_path, **{"train.scene_loss": -1})


@pytest.mark.parametrize(("scores", "patience", "min_epochs", "stop"), [
    ([1, 2, 3], 2, 0, False),          # still improving
    ([1, 3, 2, 2], 2, 0, True),        # best at epoch 2, two epochs without a better one
    ([1, 3, 2, 3], 2, 0, True),        # a tie is not an improvement: the first maximum is the best
    ([3, 1, 1], 2, 5, False),          # too early to stop
    ([3, 1, 1, 1, 1], 2, 5, True),
    ([3, 1, 1, 1], 0, 0, False),       # patience 0 never stops
])
def test_patience_rule(scores, patience, min_epochs, stop) -> None:
    from rsitr_train.loop import patience_exhausted

    assert patience_exhausted([float(s) for s in scores], patience, min_epochs) is stop


def test_early_stopping_stops_and_a_rerun_stays_stopped(tiny_synth, tmp_path, monkeypatch) -> None:
    from rsitr_train import trainer as training

    scores = iter([0.5, 0.9, 0.4, 0.3, 0.2, 0.1])
    original = training.evaluate_split

    def scripted(*args, **kwargs):
        metrics, *rest = original(*args, **kwargs)
        return ({**metrics, "mR": next(scores)}, *rest)

    monkeypatch.setattr(training, "evaluate_split", scripted)
    config = tiny(tiny_synth, tmp_path / "cache", **{"train.epochs": 6, "train.patience": 2, "train.min_epochs": 3})
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["epochs_run"] == 4 and summary["best_epoch"] == 2  # epochs 3 and 4 did not beat epoch 2
    again = train(config, tmp_path / "run", progress=False)
    assert again["epochs_run"] == 4
