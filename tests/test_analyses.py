"""``rsitr analyze``: DOVE's analyses (Figs. 7–10, per-class recall, scene confusion) as a static report.

The report runs end to end on random-weight bundles over the tiny synthetic dataset (no training:
every check here is about the analysis, not the model's quality); its computations are checked
against hand-made score matrices.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from helpers import random_bundle, random_tokens
from rsitr.bundle import load_model
from rsitr.data import load_dataset
from rsitr.data.splits import reallocate, write_assignment
from rsitr.errors import ConfigError, DatasetError
from rsitr.evaluation import recall_metrics
from rsitr.features.detections import read_detections
from rsitr.io import write_json
from rsitr.models import create_model
from rsitr_cli.main import main
from rsitr_serve import analyses
from rsitr_serve.analyses import (
    SECTION_KEYS,
    analysis_dataset,
    check_inequalities,
    choose_queries,
    division_table,
    encode_split,
    per_class_recall,
    read_detection_labels,
    report_split,
    resolve_split,
    row_normalised,
    sample_for_tsne,
    scene_confusion,
    significant_from_detections,
    significant_from_names,
    subset_metrics,
    top_confusions,
    tsne_layout,
    unit_distance,
)


@pytest.fixture(scope="module")
def dove_bundle(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("analysis") / "dove"
    random_bundle(folder, model="dove-s", image_size=64)
    return folder


@pytest.fixture(scope="module")
def report(dove_bundle, tiny_synth, tmp_path_factory) -> Path:
    """The report of a random DOVE-S bundle on the tiny dataset's test split, divided by its true objects."""
    out = tmp_path_factory.mktemp("report")
    code = main(["analyze", str(dove_bundle), "--dataset", str(tiny_synth), "--out", str(out),
                 "--detections", str(tiny_synth.parent / "detections.json"), "--quiet"])
    assert code == 0
    return out


def _strict_json(path: Path):
    def no_constant(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constant)


def test_every_section_is_on_the_page_and_every_figure_decodes(report):
    page = (report / "index.html").read_text(encoding="utf-8")
    for key in SECTION_KEYS:
        assert f'<section id="{key}">' in page, key
    assert "Not available" not in page  # DOVE with a division and scene labels: every section applies
    figures = re.findall(r'<img src="([^"]+)"', page)
    assert set(figures) == {"fig7_significance.png", "fig8_sentence_retrieval.png", "fig8_image_retrieval.png",
                            "fig9_distances.png", "fig10_tsne.png", "scene_confusion.png"}
    for name in figures:
        with Image.open(report / name) as picture:
            picture.load()
            assert picture.format == "PNG" and min(picture.size) > 100
    record = _strict_json(report / "analysis.json")
    assert set(SECTION_KEYS) <= set(record)
    assert not list(report.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_report_numbers_are_those_of_the_split(report, dove_bundle, tiny_synth):
    """The overview and the Fig. 7 sets equal recall_metrics of the split's matrix and of its submatrices."""
    record = _strict_json(report / "analysis.json")
    dataset = load_dataset(tiny_synth)
    data = encode_split(load_model(dove_bundle), dataset.split("test"), "test", progress=False)
    assert record["overview"]["metrics"] == pytest.approx(recall_metrics(data.sims, data.image_of_caption))
    significant = np.isin(data.dataset.image_files, record["significance"]["significant_images"])
    assert 0 < significant.sum() < len(significant), "the tiny test split should hold both kinds"
    for name, keep in (("significant", significant), ("insignificant", ~significant)):
        images = np.flatnonzero(keep)
        captions = [c for c, i in enumerate(data.image_of_caption) if keep[i]]
        owner = [int(np.flatnonzero(images == data.image_of_caption[c])[0]) for c in captions]
        expected = recall_metrics(data.sims[np.ix_(images, captions)], np.array(owner))
        assert record["significance"]["sets"][name]["metrics"] == pytest.approx(expected)
        assert record["significance"]["sets"][name]["n_images"] == len(images)
    queries = record["qualitative"]["image_queries"]
    assert len(queries) == 2 and all(len(q["top"]) == 5 for q in queries)
    first = queries[0]
    assert [hit["caption"] for hit in first["top"]] == list(np.argsort(-data.sims[first["query"]], kind="stable")[:5])


def test_subset_metrics_are_recall_metrics_of_the_submatrix():
    rng = np.random.default_rng(0)
    sims = rng.normal(size=(6, 12))
    owner = np.repeat(np.arange(6), 2)
    keep = np.array([True, False, True, True, False, False])
    sub = sims[[0, 2, 3]][:, [0, 1, 4, 5, 6, 7]]
    assert subset_metrics(sims, owner, keep) == recall_metrics(sub, np.array([0, 0, 1, 1, 2, 2]))
    assert subset_metrics(sims, owner, np.zeros(6, dtype=bool)) is None
    table = division_table(sims, owner, keep)
    assert table["full"]["metrics"] == recall_metrics(sims, owner)
    assert (table["significant"]["n_images"], table["insignificant"]["n_captions"]) == (3, 6)


def test_per_class_recall_by_hand():
    # images 0, 1 are class a, image 2 class b; caption c belongs to image owner[c]
    sims = np.array([[0.9, 0.1, 0.8, 0.0],
                     [0.2, 0.7, 0.1, 0.5],
                     [0.3, 0.8, 0.2, 0.9]])
    owner = np.array([0, 1, 2, 2])
    got = per_class_recall(sims, owner, ["a", "a", "b"])
    # i2t ranks: image 0 -> caption 0 first (0); image 1 -> caption 1 first (0); image 2 -> best own caption 3 first (0)
    # t2i ranks: caption 0 -> image 0 (0); caption 1 -> image 2 beats image 1 (1); caption 2 -> images 0 beats 2 (1);
    # caption 3 -> image 2 first (0)
    assert got["a"]["n_images"] == 2 and got["a"]["n_captions"] == 2
    assert got["a"]["i2t_r1"] == 100.0 and got["a"]["t2i_r1"] == 50.0 and got["a"]["t2i_r5"] == 100.0
    assert got["b"]["i2t_r1"] == 100.0 and got["b"]["t2i_r1"] == 50.0
    assert got["a"]["mR"] == pytest.approx((100 * 3 + 50 + 100 + 100) / 6)


def test_scene_confusion_and_top_pairs_by_hand():
    sims = np.array([[0.9, 0.1, 0.8, 0.0, 0.6],
                     [0.2, 0.7, 0.1, 0.5, 0.1],
                     [0.3, 0.8, 0.2, 0.9, 0.2]])
    owner = np.array([0, 1, 2, 2, 1])
    # top-1 image of each caption: 0, 2, 0, 2, 0 -> classes a, b, a, b, a; true classes a, a, b, b, a
    classes, counts = scene_confusion(sims, owner, ["a", "a", "b"])
    assert classes == ["a", "b"]
    assert counts.tolist() == [[2, 1], [1, 1]]
    assert row_normalised(counts).tolist() == [[2 / 3, 1 / 3], [0.5, 0.5]]
    assert row_normalised(np.zeros((2, 2), dtype=np.int64)).tolist() == [[0, 0], [0, 0]]
    pairs = top_confusions(["a", "b", "c"], np.array([[5, 2, 2], [0, 4, 3], [1, 0, 0]]), k=2)
    assert [(p["true"], p["top1"], p["count"]) for p in pairs] == [("b", "c", 3), ("a", "b", 2)]


def _detections_file(tmp_path: Path) -> Path:
    path = tmp_path / "detections.json"
    write_json(path, {"format": "rsitr-detections-v1", "images": {
        "roads.png": {"boxes": [[0, 0, 64, 8]], "scores": [0.95], "labels": ["road"]},
        "car.png": {"boxes": [[0, 0, 4, 4], [1, 1, 60, 60]], "scores": [0.4, 0.9], "labels": ["car", "tree"]},
        "plain.png": {"boxes": [[2, 2, 9, 9]], "scores": [0.8]},
        "empty.png": {"boxes": [], "scores": []},
    }})
    return path


def test_significant_split_from_a_detections_file(tmp_path):
    path = _detections_file(tmp_path)
    found, labels = read_detections(path), read_detection_labels(path)
    files = ["roads.png", "sub/car.png", "plain.png", "empty.png", "missing.png"]
    # roads only: ignored; car under the threshold; an unlabelled box counts; no box or no entry: insignificant
    assert significant_from_detections(files, found, labels, 0.5).tolist() == [False, False, True, False, False]
    assert significant_from_detections(files, found, labels, 0.3).tolist() == [False, True, True, False, False]
    assert significant_from_detections(files, found, labels, 0.5, ignored=()).tolist() == [True, True, True, False, False]
    assert significant_from_detections(files, found, labels, 0.95, ignored=()).tolist() == [False] * 5  # strictly above


def test_significant_split_from_a_list_of_names(tmp_path, dove_bundle, tiny_synth):
    assert significant_from_names(["a/x.png", "y.png", "z.png"], ["x.png", "z.png"]).tolist() == [True, False, True]
    listing = tmp_path / "significant.txt"
    listing.write_text("# significant images\n\nsynth_99999.png\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="significant.txt.*none of its 1 names"):
        analyses.analyze(dove_bundle, tmp_path / "out", dataset=tiny_synth, significant_list=listing, progress=False)
    assert not (tmp_path / "out").exists()  # checked before anything is written
    listing.write_text("#\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="names no image"):
        analyses.analyze(dove_bundle, tmp_path / "out", dataset=tiny_synth, significant_list=listing, progress=False)


FEATURE_DIMS = {"level_channels": [8, 16, 32, 64], "region_channels": 32}


@pytest.mark.parametrize("overrides", [{}, {"iga_head": "linear"}, {"iga": False}, {"test_score": "final+global"}],
                         ids=["nonlinear IGA", "linear IGA", "no IGA", "final+global"])
def test_dove_pair_embeddings_agree_with_the_final_scores(overrides):
    torch.manual_seed(0)
    model = create_model("dove", FEATURE_DIMS, 50, embed_dim=32, word_dim=16, **overrides).eval()
    g = torch.Generator().manual_seed(1)
    features = {f"level{i}": torch.randn(5, c, generator=g) for i, c in enumerate(FEATURE_DIMS["level_channels"], start=1)}
    features["regions"] = torch.randn(5, 6, 32, generator=g)
    features["region_mask"] = torch.ones(5, 6, dtype=torch.bool)
    tokens, lengths = random_tokens(5, 50, 2, 8, seed=2)
    with torch.no_grad():
        images, texts = model.encode_image(features), model.encode_text(tokens, lengths)
        pairs = model.pair_embeddings(images, texts)
        final = model.final_scores(images, texts)
    assert set(pairs) == {"V_M", "V_R", "V_MR", "T_G", "T_RG"} and model.final_pair == ("V_MR", "T_RG")
    image_key, text_key = model.final_pair
    assert torch.allclose(F.cosine_similarity(pairs[image_key], pairs[text_key], dim=-1), final.diagonal(), atol=1e-5)
    if overrides.get("iga", True):
        assert not torch.allclose(pairs["T_RG"], pairs["T_G"])
        assert torch.allclose(pairs["V_R"], model.iga.regional(images["region_mean"]))
    else:
        assert torch.equal(pairs["T_RG"], pairs["T_G"]) and torch.equal(pairs["V_R"], images["region_mean"])
    with pytest.raises(ValueError, match="aligned"):
        model.pair_embeddings(images, {k: v[:3] for k, v in texts.items()})


def test_a_model_without_pair_embeddings_gets_notes_not_errors(tmp_path, tiny_synth):
    bundle = tmp_path / "vsepp"
    random_bundle(bundle, model="vsepp", image_size=64, backbone="resnet18")
    with pytest.raises(NotImplementedError, match="vsepp"):
        load_model(bundle).model.pair_embeddings({}, {})
    page = analyses.analyze(bundle, tmp_path / "out", dataset=tiny_synth, queries=1, progress=False)
    record = _strict_json(page.with_name("analysis.json"))
    assert record["distances"]["available"] is False and "vsepp" in record["distances"]["reason"]
    assert record["significance"]["available"] is False  # a bundle without a division given
    assert record["tsne"]["available"] and "separable embeddings" in record["tsne"]["embeddings"]
    page_text = page.read_text(encoding="utf-8")
    assert page_text.count("Not available") == 2 and (tmp_path / "out" / "fig10_tsne.png").is_file()


def test_distances_and_inequalities_by_hand():
    assert unit_distance(np.array([[1.0, 0.0], [3.0, 0.0]]), np.array([[0.0, 2.0], [1.0, 0.0]])) == pytest.approx([2**0.5, 0.0])
    names = ["d(V_MR,T_RG)", "d(V_M,T_G)", "d(V_R,V_MR)", "d(V_R,V_M)", "d(V_R,T_RG)", "d(V_R,T_G)"]
    values = [[0.1, 0.2, 0.5], [0.3, 0.3, 0.3], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.1, 0.9, 0.9], [0.5, 0.5, 0.5]]
    checks = check_inequalities({n: np.array(v) for n, v in zip(names, values)})
    assert [c["inequality"] for c in checks] == ["d(V_MR,T_RG) < d(V_M,T_G)", "d(V_R,V_MR) < d(V_R,V_M)",
                                                 "d(V_R,T_RG) < d(V_R,T_G)"]
    first, second, third = checks
    assert first["holds_on_means"] and first["holds_on_medians"] and first["fraction_of_pairs"] == pytest.approx(2 / 3)
    assert not second["holds_on_means"] and second["fraction_of_pairs"] == 0.0
    # mean 0.633 > 0.5 but median 0.9 > 0.5: fails both; one pair of three holds
    assert not third["holds_on_means"] and not third["holds_on_medians"] and third["fraction_of_pairs"] == pytest.approx(1 / 3)


def test_tsne_is_deterministic_under_its_seed_and_keeps_clusters_apart():
    rng = np.random.default_rng(0)
    centres = np.zeros((2, 8))
    centres[0, 0], centres[1, 1] = 1.0, 1.0  # orthogonal directions: the layout sees unit vectors
    points = np.concatenate([centres[0] + 0.05 * rng.normal(size=(20, 8)), centres[1] + 0.05 * rng.normal(size=(20, 8))])
    first, again = tsne_layout(points, 3), tsne_layout(points, 3)
    assert first.shape == (40, 2) and np.array_equal(first, again)
    cluster = np.repeat([0, 1], 20)
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1) + np.eye(40) * 1e9
    assert np.array_equal(cluster[distances.argmin(axis=1)], cluster)  # every nearest neighbour is in its own cluster


def test_tsne_sample_takes_whole_images_within_the_cap():
    owner = np.repeat(np.arange(10), 3)
    owner = owner[owner != 4]  # image 4 has no caption: never drawn
    images, captions = sample_for_tsne(owner, 10, 13, seed=0)
    assert len(images) == 3 and len(images) + len(captions) <= 13 and 4 not in images
    assert set(owner[captions]) == set(images.tolist()) and len(captions) == 3 * len(images)
    assert np.array_equal(sample_for_tsne(owner, 10, 13, seed=0)[0], images)
    assert choose_queries(5, 9, seed=1) == [0, 1, 2, 3, 4] and len(set(choose_queries(100, 3, seed=1))) == 3


def test_splits_and_datasets_of_runs_and_bundles(tmp_path, tiny_synth, dove_bundle):
    from rsitr_train.trainer import SPLITS_FILE

    assert analyses.RUN_SPLITS == SPLITS_FILE
    dataset = load_dataset(tiny_synth)
    assert report_split(dataset) == "test" and resolve_split(dataset, "val") == "val"
    train_val = dataclasses.replace(dataset, image_splits=["train" if s == "test" else s for s in dataset.image_splits])
    assert resolve_split(train_val, None) == "val"
    with pytest.raises(ConfigError, match=r"no 'select' split \(has: train, val, test\)"):
        resolve_split(dataset, "select")
    with pytest.raises(ConfigError, match="names no dataset; give --dataset"):
        analysis_dataset(dove_bundle)
    # a run directory: config.yaml names the data, splits.json the split each image had
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"data:\n  path: {json.dumps(str(tiny_synth))}\n", encoding="utf-8")
    shuffled = reallocate(dataset, ["train", "test"], seed=5)
    write_assignment(run / SPLITS_FILE, shuffled)
    assert analyses.is_run_directory(run) and not analyses.is_run_directory(dove_bundle)
    got = analysis_dataset(run)
    assert got.image_splits == shuffled.image_splits != dataset.image_splits
    assert analyses.default_out_dir(run, "test") == run / "analysis_test"


def test_cli_errors_are_one_line(dove_bundle, tiny_synth, tmp_path, capsys):
    code = main(["analyze", str(dove_bundle), "--dataset", str(tiny_synth), "--split", "select", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "has: train, val, test" in err
    code = main(["analyze", str(dove_bundle), "--out", str(tmp_path / "o")])
    assert code == 2 and "give --dataset PATH" in capsys.readouterr().err


def test_significant_classes_divide_by_scene_label_and_unknown_classes_are_one_line() -> None:
    from rsitr.data.dataset import RetrievalDataset
    from rsitr_serve.analyses import divide_split

    split = RetrievalDataset("toy", Path("."), ["a.png", "b.png", "c.png", "d.png"], ["val"] * 4, ["x", "y", "z", "w"],
                             np.arange(4), scene_labels=["airplane", "forest", "airplane", "harbor"])
    division = divide_split(split, None, 0.5, (), None, ["airplane", "harbor"])
    assert division is not None and division.significant.tolist() == [True, False, True, True]
    with pytest.raises(ConfigError, match="beach not a scene class"):
        divide_split(split, None, 0.5, (), None, ["beach"])
