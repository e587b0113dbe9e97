"""Ensembles of runs: the z-scored average by hand, one-member and self ensembles equal ``rsitr evaluate``, guards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from rsitr.ensemble import ensemble_weights, normalised_average, shared_text_ids, zscore
from rsitr.errors import ConfigError
from rsitr_cli.main import main
from rsitr_train.ensemble import evaluate_ensemble, parse_weights
from rsitr_train.runs import evaluate_run
from rsitr_train.trainer import train
from test_training import tiny_config

VIEWS = ("metrics", "metrics_reference_ties", "metrics_distinct_text")


def test_normalised_average_of_a_2x3_example_by_hand() -> None:
    a = np.array([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])  # mean 1, std 1
    b = torch.tensor([[15.0, 25.0, 15.0], [25.0, 15.0, 25.0]])  # mean 20, std 5: another scale, a tensor
    np.testing.assert_allclose(zscore(a), [[-1, -1, -1], [1, 1, 1]])
    np.testing.assert_allclose(zscore(b), [[-1, 1, -1], [1, -1, 1]])
    np.testing.assert_allclose(normalised_average([a, b]), [[-1, 0, -1], [1, 0, 1]])
    np.testing.assert_allclose(normalised_average([a, b], weights=[1, 3]), [[-1, 0.5, -1], [1, -0.5, 1]])
    np.testing.assert_allclose(normalised_average([a, b], weights=[0, 2]), zscore(b))
    # a constant member adds nothing; a raw average would have let b's wider scale decide
    np.testing.assert_allclose(normalised_average([np.full((2, 3), 7.0), b], weights=[1, 1]), 0.5 * zscore(b))
    assert normalised_average([a, b]).dtype == np.float64


def test_normalised_average_refuses_bad_input() -> None:
    a = np.zeros((2, 3))
    with pytest.raises(ValueError, match="shape"):
        normalised_average([a, np.zeros((3, 2))])
    with pytest.raises(ValueError, match="2 weight"):
        normalised_average([a, a, a], weights=[1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        ensemble_weights(2, [1, -1])
    with pytest.raises(ValueError, match="non-negative"):
        ensemble_weights(2, [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        zscore(np.array([[1.0, np.nan]]))
    np.testing.assert_allclose(ensemble_weights(3), [1 / 3] * 3)


def test_shared_text_ids_keep_only_captions_identical_to_every_member() -> None:
    ids = shared_text_ids([np.array([0, 0, 1, 1, 0]), torch.tensor([5, 6, 7, 7, 5])])
    assert ids[2] == ids[3] and ids[0] == ids[4]
    assert len({ids[0], ids[1], ids[2]}) == 3


def test_parse_weights() -> None:
    assert parse_weights(None, 2) is None
    assert parse_weights("1,0.5", 2) == [1.0, 0.5]
    for text in ("1", "1,x", "1,-2"):
        with pytest.raises(ConfigError, match="--weights"):
            parse_weights(text, 2)


@pytest.fixture(scope="module")
def runs(tiny_synth, tmp_path_factory):
    """Two one-epoch DOVE-S runs, other seeds and score scales (a cosine; a sum of two), one backbone (about 8 s)."""
    root = tmp_path_factory.mktemp("ensemble")
    cache = root / "cache"
    train(tiny_config(tiny_synth, cache, epochs=1), root / "dove", progress=False)
    train(tiny_config(tiny_synth, cache, epochs=1, **{"train.seed": 1, "model.params": "{embed_dim: 32, word_dim: 16, "
                                                      "test_score: final+global}"}), root / "global", progress=False)
    return root


def test_an_ensemble_of_one_run_or_of_a_run_with_itself_is_that_run(runs) -> None:
    alone = evaluate_run(runs / "dove", "test", runs / "eval_dove.json", progress=False)
    one = evaluate_ensemble([runs / "dove"], "test", progress=False)
    twice = evaluate_ensemble([runs / "dove", runs / "dove"], "test", weights=[1, 3], progress=False)
    for view in VIEWS:
        assert one["members"][0][view] == alone[view], view
        assert one["ensemble"][view] == alone[view], view
        assert twice["ensemble"][view] == alone[view], view
    assert twice["n_runs"] == 2 and [m["weight"] for m in twice["members"]] == [0.25, 0.75]
    assert one["n_distinct_texts"] == alone["n_distinct_texts"] and one["chance"] == alone["chance"]


def test_cli_ensemble_of_two_models_with_weights(runs, capsys) -> None:
    dove, other = str(runs / "dove"), str(runs / "global")
    evaluated = {name: evaluate_run(runs / name, None, runs / f"eval_{name}.json", progress=False) for name in ("dove", "global")}
    out = runs / "ensemble.json"
    assert main(["--quiet", "ensemble", dove, other, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| ensemble (2 runs) |" in table and f"| dove-s {other} |" in table and "| chance |" in table
    saved = json.loads(out.read_text())
    assert saved["split"] == "test"  # the runs' report split, as rsitr evaluate picks it
    assert [m["metrics"] for m in saved["members"]] == [evaluated["dove"]["metrics"], evaluated["global"]["metrics"]]
    assert main(["--quiet", "ensemble", dove, other, "--weights", "0,2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ensemble"]["metrics"] == evaluated["global"]["metrics"]  # weight 0 drops dove
    assert main(["--quiet", "ensemble", dove, other, "--weights", "1,2,3"]) == 2
    assert "--weights" in capsys.readouterr().err


def test_a_split_a_member_trained_or_selected_on_is_refused(runs, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"dove: split 'val' chose this run's checkpoint"):
        evaluate_ensemble([runs / "dove", runs / "global"], "val", progress=False)
    with pytest.raises(ConfigError, match="trained this run"):
        evaluate_ensemble([runs / "dove"], "train", progress=False)
    selected_on_test = _copy_run(runs / "dove", tmp_path / "selected", val_split="test")
    for split in ("test", None):  # named, or the first run's report split
        with pytest.raises(ConfigError, match=r"selected: split 'test' chose this run's checkpoint"):
            evaluate_ensemble([runs / "global", selected_on_test], split, progress=False)


def _copy_run(run, out, **data):
    """A copy of a run directory whose config's ``data`` section has ``data`` changed."""
    shutil.copytree(run, out)
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["data"].update(data)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    return out


def test_members_whose_split_differs_are_refused(runs, tiny_synth, tmp_path) -> None:
    data = json.loads(tiny_synth.read_text())  # the same images, one test caption reworded
    image = next(image for image in data["images"] if image["split"] == "test")
    image["sentences"][0]["raw"] = "an entirely different sentence"
    image["sentences"][0]["tokens"] = ["an", "entirely", "different", "sentence"]
    dataset = tmp_path / "dataset_other.json"
    dataset.write_text(json.dumps(data))
    (tmp_path / "images").symlink_to(tiny_synth.parent / "images")
    other = _copy_run(runs / "dove", tmp_path / "other", path=str(dataset))
    with pytest.raises(ConfigError, match=r"other: its 'test' split differs from that of .*dove \(captions"):
        evaluate_ensemble([runs / "dove", other], "test", progress=False)
