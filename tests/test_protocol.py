"""Protocol integrity: no annotation in a query, no report on the selection split, DOVE's resplits, ties."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rsitr.data import RetrievalDataset, load_dataset
from rsitr.data.imagefolder import scene_classification_data
from rsitr.data.splits import apply_assignment, carve_selection, reallocate, write_assignment
from rsitr.data.tokenized import split_data
from rsitr.errors import CheckpointError, ConfigError
from rsitr.evaluation import compute_similarity, distinct_text_metrics, recall_metrics
from rsitr.text import Vocabulary, distinct_rows
from rsitr_cli.main import main
from rsitr_train.config import load_config
from rsitr_train.experiments import resolve_protocol
from rsitr_train.trainer import SPLITS_FILE, build_model, evaluate_split, prepare, train


def _labelled(n_per_class: int = 10) -> RetrievalDataset:
    """3 scene classes; per class n train, 2 val, 2 test images; one caption each."""
    files, splits, labels = [], [], []
    for name in ("beach", "forest", "port"):
        for k in range(n_per_class + 4):
            files.append(f"{name}_{k:02d}.png")
            splits.append("train" if k < n_per_class else ("val" if k < n_per_class + 2 else "test"))
            labels.append(name)
    return RetrievalDataset(name="lab", image_dir=Path("."), image_files=files, image_splits=splits,
                            captions=[f"caption {f}" for f in files], caption_image=np.arange(len(files)),
                            scene_labels=labels)


# ------------------------------------------------------------------------------------------ splits


def test_carve_selection_is_seeded_stratified_and_touches_only_train() -> None:
    dataset = _labelled()
    carved = carve_selection(dataset, 0.2, seed=0)
    chosen = carved.split_indices("select")
    assert len(chosen) == 6  # round(10 * 0.2) per class, 3 classes
    assert sorted(dataset.scene_labels[i] for i in chosen) == ["beach"] * 2 + ["forest"] * 2 + ["port"] * 2
    assert all(dataset.image_splits[i] == "train" for i in chosen)
    assert [s for s in carved.image_splits if s in ("val", "test")] == [s for s in dataset.image_splits if s in ("val", "test")]
    assert carve_selection(dataset, 0.2, seed=0).image_splits == carved.image_splits
    assert carve_selection(dataset, 0.2, seed=1).split_indices("select") != chosen
    with pytest.raises(ConfigError, match="already has a 'val' split"):
        carve_selection(dataset, 0.2, name="val")


def test_block_carve_takes_the_last_images_of_each_class() -> None:
    dataset = _labelled()
    carved = carve_selection(dataset, 0.2, mode="block")
    assert sorted(carved.image_files[i] for i in carved.split_indices("select")) == [
        f"{name}_{k:02d}.png" for name in ("beach", "forest", "port") for k in (8, 9)]
    with pytest.raises(ConfigError, match="carve mode"):
        carve_selection(dataset, 0.2, mode="stripes")


def test_carved_selection_split_is_the_pretraining_hold_out() -> None:
    """A backbone pretrained with --val-split none --val-fraction f --seed s never saw the selection images' labels."""
    dataset = _labelled(n_per_class=20)
    held_out = scene_classification_data(dataset, val_split=None, val_fraction=0.1, seed=4)
    carved = carve_selection(dataset, 0.1, seed=4)
    val_files = sorted(Path(p).name for p in held_out.val_paths)
    assert val_files == sorted(carved.image_files[i] for i in carved.split_indices("select"))


def test_reallocate_keeps_sizes_and_leaves_test_alone() -> None:
    dataset = _labelled()
    a, b = reallocate(dataset, ["train", "val"], seed=0), reallocate(dataset, ["train", "val"], seed=1)
    for shuffled in (a, b):
        assert len(shuffled.split_indices("train")) == 30 and len(shuffled.split_indices("val")) == 6
        assert shuffled.split_indices("test") == dataset.split_indices("test")
    assert a.split_indices("val") != b.split_indices("val") != dataset.split_indices("val")
    assert reallocate(dataset, ["train", "val"], seed=0).image_splits == a.image_splits


def test_split_assignment_round_trip_and_errors(tmp_path) -> None:
    dataset = _labelled()
    carved = carve_selection(dataset, 0.2, seed=3)
    write_assignment(tmp_path / "splits.json", carved)
    assert apply_assignment(dataset, tmp_path / "splits.json").image_splits == carved.image_splits
    smaller = dataset.subset(list(range(5)))
    with pytest.raises(CheckpointError, match="is not in dataset"):
        apply_assignment(smaller, tmp_path / "splits.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a split assignment"):
        apply_assignment(dataset, tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------ protocol


def _train_val_only(tiny_synth: Path, tmp_path: Path) -> Path:
    """The tiny synthetic dataset with its test images relabelled val (a train/val-only release)."""
    data = json.loads(tiny_synth.read_text())
    for image in data["images"]:
        if image["split"] == "test":
            image["split"] = "val"
    path = tmp_path / "dataset_trainval.json"
    path.write_text(json.dumps(data))
    (tmp_path / "images").symlink_to(tiny_synth.parent / "images")
    return path


def test_protocol_reports_test_or_carves_a_selection_split(tiny_synth, tmp_path) -> None:
    with_test = resolve_protocol({"data": {"path": str(tiny_synth)}})
    assert (with_test.selection_split, with_test.report_split, with_test.overrides) == ("val", "test", ())
    train_val = resolve_protocol({"data": {"path": str(_train_val_only(tiny_synth, tmp_path))}})
    assert (train_val.selection_split, train_val.report_split) == ("select", "val")
    assert "data.selection_fraction=0.1" in train_val.overrides and "data.val_split=select" in train_val.overrides
    optimistic = resolve_protocol({"data": {"path": str(tiny_synth)}}, report_selection=True)
    assert optimistic.report_split == optimistic.selection_split == "val"
    assert "selection split (optimistic)" in optimistic.describe()


def _bench_args(dataset: Path, out: Path, cache: Path) -> list[str]:
    return ["--quiet", "benchmark", "--dataset", str(dataset), "--models", "dove-s", "--epochs", "1",
            "--cache-dir", str(cache), "--set", "model.params.embed_dim=32", "--set", "model.params.word_dim=16",
            "--set", "features.image_size=64", "--out", str(out)]


def test_benchmark_on_a_train_val_dataset_selects_on_a_carved_split_and_reports_val(tiny_synth, tmp_path, capsys) -> None:
    dataset = _train_val_only(tiny_synth, tmp_path)
    out = tmp_path / "bench"
    assert main([*_bench_args(dataset, out, tmp_path / "cache"), "--seeds", "1"]) == 0
    report = json.loads((out / "benchmark.json").read_text())
    assert (report["split"], report["selection_split"], report["optimistic"]) == ("val", "select", False)
    assert "selected on select, reported on val" in (out / "benchmark.md").read_text()
    stored = json.loads((out / "dove-s" / "seed0" / SPLITS_FILE).read_text())["splits"]
    original = load_dataset(dataset)
    train_files = {original.image_files[i] for i in original.split_indices("train")}
    assert stored["select"] and set(stored["select"]) <= train_files
    assert set(stored["val"]) == {original.image_files[i] for i in original.split_indices("val")}
    assert not set(stored["select"]) & set(stored["train"])
    assert "Distinct-text view" in (out / "benchmark.md").read_text()
    capsys.readouterr()


def test_reporting_the_selection_split_needs_the_flag_and_is_labelled(tiny_synth, tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    assert main([*_bench_args(tiny_synth, out, tmp_path / "cache"), "--seeds", "1", "--report-selection-split"]) == 0
    report = json.loads((out / "benchmark.json").read_text())
    assert report["split"] == report["selection_split"] == "val" and report["optimistic"] is True
    assert "selection split (optimistic)" in (out / "benchmark.md").read_text()
    capsys.readouterr()


def test_resplits_reallocate_train_and_val_and_report_test(tiny_synth, tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    assert main([*_bench_args(tiny_synth, out, tmp_path / "cache"), "--resplits", "2"]) == 0
    report = json.loads((out / "benchmark.json").read_text())
    assert report["split"] == "test" and [r["seed"] for r in report["runs"]] == [0, 1]
    stored = [json.loads((out / "dove-s" / f"resplit{k}" / SPLITS_FILE).read_text())["splits"] for k in (0, 1)]
    original = load_dataset(tiny_synth)
    assert stored[0]["train"] != stored[1]["train"]
    for splits in stored:
        assert len(splits["train"]) == len(original.split_indices("train"))
        assert set(splits["test"]) == {original.image_files[i] for i in original.split_indices("test")}
    assert "2 random train/val reallocation(s)" in (out / "benchmark.md").read_text()
    code = main([*_bench_args(_train_val_only(tiny_synth, tmp_path), tmp_path / "b2", tmp_path / "cache"), "--resplits", "2"])
    assert code == 2 and "needs a dataset with a test split" in capsys.readouterr().err


def test_a_run_is_evaluated_on_the_splits_it_stored(tiny_synth, tmp_path) -> None:
    """Changing how splits are derived later does not move a finished run's splits."""
    from rsitr_train.runs import load_run

    overrides = [f"data.path={tiny_synth}", f"features.cache_dir={tmp_path / 'cache'}", "features.image_size=64",
                 "model.name=dove-s", "model.params={embed_dim: 32, word_dim: 16}", "train.epochs=1",
                 "data.resplit=[train, val]", "data.split_seed=5"]
    run = tmp_path / "run"
    train(load_config(None, overrides), run, progress=False)
    stored = json.loads((run / SPLITS_FILE).read_text())["splits"]
    config = (run / "config.yaml").read_text().replace("split_seed: 5", "split_seed: 6")
    (run / "config.yaml").write_text(config)
    _, prepared = load_run(run, progress=False)
    assert [prepared.dataset.image_files[i] for i in prepared.dataset.split_indices("val")] == stored["val"]


# ------------------------------------------------------------------------------------------ keywords


def _with_keywords(tiny_synth: Path, tmp_path: Path, name: str, test_words: list[str]) -> Path:
    """A copy of the tiny dataset whose images carry keyword lists; test images get ``test_words``."""
    data = json.loads(tiny_synth.read_text())
    for image in data["images"]:
        image["keywords"] = list(test_words) if image["split"] == "test" else ["field", "tree"]
    folder = tmp_path / name
    folder.mkdir()
    (folder / "images").symlink_to(tiny_synth.parent / "images")
    path = folder / "dataset.json"
    path.write_text(json.dumps(data))
    return path


def test_evaluation_scores_do_not_read_the_dataset_keywords(tiny_synth, tmp_path) -> None:
    """AMFMN's test queries carry only their own words: editing the test images' keywords moves no score."""
    sims = []
    for name, words in (("a", ["plane", "runway"]), ("b", ["ship", "harbor", "water"])):
        path = _with_keywords(tiny_synth, tmp_path, name, words)
        config = load_config(None, [f"data.path={path}", f"features.cache_dir={tmp_path / 'cache'}",
                                    "features.image_size=64", "model.name=amfmn-sim", "data.name=kw",
                                    "model.params={embed_dim: 32, word_dim: 16, multiscale_channels: 16}",
                                    "text.vocab=null"])
        vocab = Vocabulary.build(["plane runway ship harbor water field tree", *load_dataset(path).captions])
        prepared = prepare(config, vocab=vocab, progress=False)
        model = build_model(prepared)
        sims.append(evaluate_split(model, prepared, "test", progress=False)[1])
        train_data = split_data(prepared.dataset, "train", vocab, 48, model.text_inputs, dataset_keywords=True)
        assert train_data.extras["keyword_lengths"].max() == 2  # training captions do read "field tree"
    assert torch.equal(sims[0], sims[1])


# ------------------------------------------------------------------------------------------ ties


def test_reference_tie_order_against_hand_computed_ranks() -> None:
    # captions 0, 1 belong to image 1, caption 2 to image 0; image 0's own caption ties with caption 1.
    sims = np.array([[0.1, 0.5, 0.5],
                     [0.9, 0.2, 0.2]])
    owner = np.array([1, 1, 0])
    # strict: the tied wrong caption 1 counts against image 0 -> rank 1; image 1 rank 0.
    assert recall_metrics(sims, owner)["i2t_r1"] == 50.0
    # reference: argsort([0.1, 0.5, 0.5]) = [0, 1, 2], reversed [2, 1, 0]: own caption 2 comes first.
    assert recall_metrics(sims, owner, ties="reference")["i2t_r1"] == 100.0
    # a constant matrix: strict ranks every true item last; reversed argsort of four equal scores
    # is [3, 2, 1, 0], so the reference order ranks image 3 first and finds its 2 of the 8 captions.
    owner8 = np.repeat(np.arange(4), 2)
    assert recall_metrics(np.zeros((4, 8)), owner8)["t2i_r1"] == 0.0
    assert recall_metrics(np.zeros((4, 8)), owner8, ties="reference")["t2i_r1"] == 25.0
    with pytest.raises(ValueError, match="ties"):
        recall_metrics(sims, owner, ties="optimistic")


def test_distinct_text_view_counts_an_image_with_the_same_text_as_found() -> None:
    # images 0 and 1 both have the text "a" (captions 0 and 2); image 1 also has "b" (caption 1).
    sims = np.array([[0.1, 0.0, 0.1],
                     [0.9, 0.8, 0.9]])
    owner, texts = np.array([0, 1, 1]), np.array([7, 3, 7])
    standard = recall_metrics(sims, owner)
    assert standard["t2i_r1"] == pytest.approx(200 / 3)  # caption 0 ("a", image 0) ranks image 1 first
    distinct = distinct_text_metrics(sims, owner, texts)
    assert distinct["t2i_r1"] == 100.0  # text "a" ranks image 1 first, which has "a" too
    assert distinct["i2t_r1"] == 100.0
    with pytest.raises(ValueError, match="text_of_caption"):
        distinct_text_metrics(sims, owner, np.array([1, 2]))


def test_distinct_rows_groups_equal_inputs_in_order_of_appearance() -> None:
    tokens = torch.tensor([[4, 5, 0], [6, 0, 0], [4, 5, 9], [6, 0, 0], [4, 5, 0]])
    lengths = torch.tensor([2, 1, 3, 1, 2])
    first, inverse = distinct_rows(tokens, lengths)
    assert first.tolist() == [0, 1, 2] and inverse.tolist() == [0, 1, 2, 1, 0]
    extras = {"keyword_tokens": torch.tensor([[1], [1], [1], [2], [1]])}
    first, inverse = distinct_rows(tokens, lengths, extras)
    assert first.tolist() == [0, 1, 2, 3] and inverse.tolist() == [0, 1, 2, 3, 0]


def test_equal_captions_get_bit_identical_scores() -> None:
    from rsitr.features import feature_dims
    from rsitr.features.spec import FeatureSpec
    from rsitr.models import create_model, get_model_spec

    spec = get_model_spec("dove-s").with_overrides({"embed_dim": 32, "word_dim": 16}, {})
    dims = feature_dims(FeatureSpec(backbone="resnet18", image_size=64))
    torch.manual_seed(0)
    model = create_model(spec, feature_dims=dims, vocab_size=20).eval()
    generator = torch.Generator().manual_seed(1)
    features = {f"level{k + 1}": torch.randn(5, c, generator=generator) for k, c in enumerate(dims["level_channels"])}
    features["regions"] = torch.randn(5, 36, dims["region_channels"], generator=generator)
    features["region_mask"] = torch.ones(5, 36, dtype=torch.bool)
    tokens = torch.randint(1, 20, (70, 6), generator=generator)
    lengths = torch.randint(2, 7, (70,), generator=generator)
    lengths[3], lengths[64:] = 6, 2
    tokens[65], lengths[65] = tokens[3], lengths[3]  # caption 65 repeats caption 3, in a chunk of other shape
    for precision in ("fp32", "bf16"):
        sims = compute_similarity(model, features, tokens, lengths, progress=False, precision=precision)
        assert torch.equal(sims[:, 65], sims[:, 3]), precision


def test_training_drops_the_items_an_audit_file_lists(tiny_synth, tmp_path) -> None:
    """``--exclude``: listed training captions and images leave training; val and test stay as they were."""
    from rsitr.data.audit import normalise_caption

    dataset = load_dataset(tiny_synth)
    train_ids = dataset.split_indices("train")
    image_out, caption_image = dataset.image_files[train_ids[0]], train_ids[1]
    caption = dataset.captions[dataset.captions_of(caption_image)[0]]
    exclusions = {"exclusions": {
        "images": [{"dataset": dataset.name, "image": image_out}],
        "captions": [{"dataset": dataset.name, "image": dataset.image_files[caption_image],
                      "caption": normalise_caption(caption)}]}}
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(exclusions))
    config = load_config(None, [f"data.path={tiny_synth}", f"features.cache_dir={tmp_path / 'cache'}",
                                "features.image_size=64", "model.name=dove-s", f"data.exclude={path}"])
    prepared = prepare(config, progress=False)
    kept = prepared.dataset
    assert image_out not in {kept.image_files[i] for i in kept.split_indices("train")}
    assert len(kept.split_indices("train")) == len(train_ids) - 1
    train_captions = [kept.captions[c] for c in range(kept.num_captions) if kept.image_splits[kept.caption_image[c]] == "train"]
    assert caption not in [t for c, t in zip(kept.caption_image, kept.captions, strict=True)
                           if kept.image_files[c] == dataset.image_files[caption_image]]
    assert len(train_captions) < sum(len(dataset.captions_of(i)) for i in train_ids)
    for split in ("val", "test"):
        assert kept.split(split).captions == dataset.split(split).captions


def test_exclusions_can_be_restricted_to_the_evaluation_split(tiny_synth, tmp_path, capsys) -> None:
    """``--exclude-against``: an entry that collides only with another split is kept in training."""
    dataset = load_dataset(tiny_synth)
    image_out = dataset.image_files[dataset.split_indices("train")[0]]
    path = tmp_path / "audit.json"
    path.write_text(json.dumps({"exclusions": {"images": [
        {"dataset": dataset.name, "image": image_out, "conflicts": ["other/test"]}]}}))
    base = [f"data.path={tiny_synth}", f"features.cache_dir={tmp_path / 'cache'}", "features.image_size=64",
            "model.name=dove-s", f"data.exclude={path}"]
    train_files = lambda prepared: {prepared.dataset.image_files[i] for i in prepared.dataset.split_indices("train")}  # noqa: E731
    assert image_out not in train_files(prepare(load_config(None, base), progress=False))
    kept = prepare(load_config(None, [*base, "data.exclude_against=[synth/test]"]), progress=False)
    assert image_out in train_files(kept)
    run = tmp_path / "run"
    assert main(["--quiet", "train", "--dataset", str(tiny_synth), "--model", "dove-s", "--epochs", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--set", "features.image_size=64", "--exclude", str(path),
                 "--exclude-against", "other/test", "--out", str(run)]) == 0
    assert image_out not in json.loads((run / SPLITS_FILE).read_text())["splits"]["train"]
    capsys.readouterr()
