"""The data audit: repeated captions, duplicate images and leaks, and exclusions that drop train items.

Three tiny datasets are written in their real on-disk layouts, with every finding planted:

* ``alpha`` (Karpathy json + images): captions repeated within train, a train/val and a train/test
  caption, a train image that is a byte copy of a test image, a train image that is a resized
  JPEG copy of another test image, and an undecodable image file;
* ``beta`` (Karpathy json + images): a train image that is a byte copy of an alpha test image, a
  train image that is a JPEG copy of an alpha train image, a train caption that is an alpha test
  caption, a test caption that is in alpha's train split, and one that is only punctuation;
* ``gamma`` (AMFMN precomp, no images): a train caption that is an alpha val caption, and a test
  caption that is in beta's train split.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsitr.data import RetrievalDataset, load_dataset, write_karpathy
from rsitr.data import audit as audit_module
from rsitr.data.audit import (
    Exclusions,
    apply_exclusions,
    audit_datasets,
    normalise_caption,
    read_exclusions,
    render_markdown,
)
from rsitr.errors import ConfigError, DatasetError
from rsitr_cli.main import main

ALPHA = [  # file, split, captions
    ("a0.png", "train", ["A red roof near the river.", "Two boats on the water"]),
    ("a1.png", "train", ["a red roof near the river", "green fields in rows", "a white house"]),
    ("a2.png", "train", ["Many planes at the airport", "the runway is long"]),
    ("a3.png", "train", ["THE RUNWAY, is long!", "a school with a playground"]),
    ("a4.png", "train", ["a parking lot full of cars", "a church in the town"]),   # byte copy of a8
    ("a5.jpg", "train", ["a stadium with red seats", "a harbour with ships"]),     # resized JPEG copy of a9
    ("a6.png", "val", ["a bridge over a river", "a forest of pines"]),
    ("a7.png", "val", ["a desert with dunes", "Green fields in rows."]),
    ("a8.png", "test", ["Two boats on the water.", "a dense residential area"]),
    ("a9.png", "test", ["a quiet beach", "a golf course near trees", "The runway is long."]),
    ("broken.png", "train", ["a broken picture"]),                                 # not an image
]
BETA = [
    ("b0.jpg", "train", ["A quiet beach.", "a road through the hills"]),  # JPEG copy of a2
    ("b1.png", "train", ["a small lake"]),                                # byte copy of a9
    ("b2.png", "test", ["a farm with barns", " . "]),                     # nothing left after normalising
    ("b3.png", "test", ["a red roof near the river"]),
]
GAMMA = {  # precomp: split -> [(file, captions)]; no image files
    "train": [("g0.tif", ["a bridge over a river", "snow on the mountain"]), ("g1.tif", ["a big airport", "a small airport"])],
    "test": [("g2.tif", ["a golf course near trees", "a small lake"])],
}


def _picture(seed: int) -> Image.Image:
    """A smooth random 96-pixel RGB picture: unrelated seeds give pHashes far apart."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((96, 96), Image.Resampling.BICUBIC)


def _karpathy(root: Path, name: str, rows: list[tuple[str, str, list[str]]]) -> RetrievalDataset:
    captions = [c for _, _, caps in rows for c in caps]
    caption_image = [i for i, (_, _, caps) in enumerate(rows) for _ in caps]
    dataset = RetrievalDataset(name=name, image_dir=root / "images", image_files=[f for f, _, _ in rows],
                               image_splits=[s for _, s, _ in rows], captions=captions, caption_image=np.array(caption_image))
    write_karpathy(dataset, root / f"dataset_{name}.json")
    return dataset


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("audit")
    alpha, beta, gamma = base / "alpha", base / "beta", base / "gamma"
    for root in (alpha, beta):
        (root / "images").mkdir(parents=True)
    for seed, (file, _, _) in enumerate(ALPHA):
        if file.endswith(".png") and file != "broken.png":
            _picture(seed).save(alpha / "images" / file)
    images_a, images_b = alpha / "images", beta / "images"
    shutil.copyfile(images_a / "a8.png", images_a / "a4.png")
    Image.open(images_a / "a9.png").resize((72, 72), Image.Resampling.BILINEAR).save(images_a / "a5.jpg", quality=85)
    (images_a / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    Image.open(images_a / "a2.png").convert("RGB").save(images_b / "b0.jpg", quality=80)
    shutil.copyfile(images_a / "a9.png", images_b / "b1.png")
    _picture(100).save(images_b / "b2.png")
    _picture(101).save(images_b / "b3.png")
    _karpathy(alpha, "alpha", ALPHA)
    _karpathy(beta, "beta", BETA)
    (gamma / "precomp").mkdir(parents=True)
    for split, rows in GAMMA.items():
        (gamma / "precomp" / f"{split}_caps.txt").write_text("".join(c + "\n" for _, caps in rows for c in caps))
        (gamma / "precomp" / f"{split}_filename.txt").write_text("".join(f + "\n" for f, _ in rows))
    return {"alpha": alpha, "beta": beta, "gamma": gamma}


@pytest.fixture(scope="module")
def audit_dir(roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three datasets audited through the command line."""
    out = tmp_path_factory.mktemp("audit_out")
    assert main(["--quiet", "data", "audit", str(roots["alpha"]), str(roots["beta"]), str(roots["gamma"]), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def report(audit_dir: Path) -> dict:
    return json.loads((audit_dir / "audit.json").read_text())


def test_normalise_caption() -> None:
    assert normalise_caption("  Two  planes, parked near the TERMINAL . ") == "two planes parked near the terminal"
    assert normalise_caption("black-roofed\thouses_here") == "black roofed houses here"
    assert normalise_caption("ＡＢＣ") == "abc"  # NFKC: full-width letters
    assert normalise_caption(" . ") == ""


def test_captions_within_and_across_splits(report: dict) -> None:
    within = [(e["dataset"], e["split"], e["caption"], e["occurrences"], e["images"]) for e in report["captions"]["within_split"]]
    assert within == [
        ("alpha", "train", "a red roof near the river", 2, ["a0.png", "a1.png"]),
        ("alpha", "train", "the runway is long", 2, ["a2.png", "a3.png"]),
    ]
    cross = [(e["dataset"], e["caption"], e["splits"]) for e in report["captions"]["cross_split"]]
    assert cross == [
        ("alpha", "green fields in rows", {"train": ["a1.png"], "val": ["a7.png"]}),
        ("alpha", "the runway is long", {"train": ["a2.png", "a3.png"], "test": ["a9.png"]}),
        ("alpha", "two boats on the water", {"train": ["a0.png"], "test": ["a8.png"]}),
    ]
    assert report["summary"]["within_split"]["beta"]["test"] == {
        "captions": 3, "distinct": 2, "empty": 1, "repeated_texts": 0, "extra_copies": 0, "texts_on_several_images": 0}
    row = report["summary"]["within_split"]["alpha"]["train"]
    assert row == {"captions": 14, "distinct": 12, "empty": 0, "repeated_texts": 2, "extra_copies": 2, "texts_on_several_images": 2}


def test_eval_captions_in_another_datasets_train(report: dict) -> None:
    found = [(e["eval"]["dataset"], e["eval"]["split"], e["caption"], e["eval"]["images"], e["train"]["dataset"],
              e["train"]["images"], e["train"]["captions"]) for e in report["captions"]["cross_dataset"]]
    # "a golf course near trees" is in alpha test and gamma test: both evaluation splits, not a training leak
    assert found == [
        ("alpha", "val", "a bridge over a river", ["a6.png"], "gamma", ["g0.tif"], 1),
        ("alpha", "test", "a quiet beach", ["a9.png"], "beta", ["b0.jpg"], 1),
        ("beta", "test", "a red roof near the river", ["b3.png"], "alpha", ["a0.png", "a1.png"], 2),
        ("gamma", "test", "a small lake", ["g2.tif"], "beta", ["b1.png"], 1),
    ]


def test_duplicate_and_near_duplicate_images(report: dict) -> None:
    pairs = {(p["kind"], p["a"]["dataset"], p["a"]["image"], p["b"]["dataset"], p["b"]["image"]): p for p in report["images"]["pairs"]}
    assert set(pairs) == {
        ("cross_split", "alpha", "a4.png", "alpha", "a8.png"),
        ("cross_split", "alpha", "a5.jpg", "alpha", "a9.png"),
        ("cross_dataset", "alpha", "a2.png", "beta", "b0.jpg"),
        ("cross_dataset", "alpha", "a5.jpg", "beta", "b1.png"),
        ("cross_dataset", "alpha", "a9.png", "beta", "b1.png"),
    }
    identical = {key[2] + "-" + key[4] for key, p in pairs.items() if p["identical_files"]}
    assert identical == {"a4.png-a8.png", "a9.png-b1.png"}
    assert all(p["distance"] == 0 for p in pairs.values() if p["identical_files"])
    assert all(p["distance"] <= 6 for p in pairs.values())


def test_missing_and_undecodable_images_are_counted_not_fatal(roots: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    datasets = [load_dataset(roots[n]) for n in ("alpha", "gamma")]
    with caplog.at_level(logging.WARNING, logger="rsitr"):
        result = audit_datasets(datasets, progress=False)
    alpha, gamma = (d["images"] for d in result["datasets"])
    assert (alpha["total"], alpha["hashed"], alpha["missing"], alpha["unreadable"]) == (11, 10, 0, ["broken.png"])
    assert (gamma["total"], gamma["hashed"], gamma["missing"]) == (3, 0, 3)
    assert gamma["note"].startswith("no image files found") and gamma["note"].endswith("captions only")
    decode = [r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage()]
    assert len(decode) == 1 and "broken.png" in decode[0] and "\n" not in decode[0]
    assert any("gamma" in r.getMessage() and "no image file found" in r.getMessage() for r in caplog.records)
    assert result["captions"]["cross_dataset"][0]["caption"] == "a bridge over a river"  # gamma's captions still audited


def test_audit_outputs_and_exclusion_list(audit_dir: Path, report: dict) -> None:
    assert report["format"] == "rsitr-audit-v1" and report["settings"]["threshold"] == 6
    assert [d["layout"] for d in report["datasets"]] == ["karpathy", "karpathy", "precomp"]
    excl = report["exclusions"]
    assert [(e["dataset"], e["image"], e["conflicts"]) for e in excl["images"]] == [
        ("alpha", "a4.png", ["alpha/test"]), ("alpha", "a5.jpg", ["alpha/test"]), ("beta", "b1.png", ["alpha/test"])]
    assert [(e["dataset"], e["image"], e["caption"], e["conflicts"]) for e in excl["captions"]] == [
        ("alpha", "a0.png", "a red roof near the river", ["beta/test"]),
        ("alpha", "a0.png", "two boats on the water", ["alpha/test"]),
        ("alpha", "a1.png", "a red roof near the river", ["beta/test"]),
        ("alpha", "a1.png", "green fields in rows", ["alpha/val"]),
        ("alpha", "a2.png", "the runway is long", ["alpha/test"]),
        ("alpha", "a3.png", "the runway is long", ["alpha/test"]),
        ("beta", "b0.jpg", "a quiet beach", ["alpha/test"]),
        ("beta", "b1.png", "a small lake", ["gamma/test"]),
        ("gamma", "g0.tif", "a bridge over a river", ["alpha/val"]),
    ]
    md = (audit_dir / "audit.md").read_text()
    assert md == render_markdown(report)
    assert "| alpha | train | 14 | 12 | 2 | 2 | 2 | 0 |" in md
    assert "| alpha/test – beta/train | 1 | 1 | 1 | 0 |" in md
    assert "| alpha | 2 | 1 | val 1 (25.0 %); test 2 (40.0 %) |" in md
    assert "| beta/test in alpha/train | 1 | 1 (33.3 %) | 2 |" in md
    # the drop counts are apply_exclusions' own: a0 loses both its captions, so it goes too
    assert "| alpha | 7 | 14 | 2 | 6 | 3 (42.9 %) | 10 (71.4 %) | 2 (28.6 %) | 8 (57.1 %) |" in md
    assert report["summary"]["exclusions"]["gamma"]["captions_dropped"] == 1
    assert "Undecodable image files: alpha/broken.png" in md
    assert not list(audit_dir.glob(".*.tmp"))


def _same(a: RetrievalDataset, b: RetrievalDataset) -> bool:
    return (a.image_files, a.image_splits, a.captions, a.scene_labels, a.keywords) == (
        b.image_files, b.image_splits, b.captions, b.scene_labels, b.keywords) and np.array_equal(a.caption_image, b.caption_image)


def test_apply_exclusions_drops_exactly_the_train_items(roots: dict[str, Path], audit_dir: Path) -> None:
    exclusions = read_exclusions(audit_dir / "audit.json")
    alpha = load_dataset(roots["alpha"])
    cleaned, counts = apply_exclusions(alpha, exclusions)
    assert counts == {"images_dropped": 3, "images_listed": 2, "images_emptied": 1, "captions_dropped": 10,
                      "captions_listed": 6, "entries_not_train": 0, "entries_unmatched": 0}
    train = cleaned.split("train")
    assert train.image_files == ["a1.png", "a2.png", "a3.png", "broken.png"]  # a0 lost both captions
    assert cleaned.image_files == alpha.image_files  # dropped images change split, so the feature cache stays valid
    assert sorted(cleaned.image_files[i] for i in cleaned.split_indices("excluded")) == ["a0.png", "a4.png", "a5.jpg"]
    assert [train.captions[c] for c in train.captions_of(0)] == ["a white house"]
    assert train.captions == ["a white house", "Many planes at the airport", "a school with a playground", "a broken picture"]
    for split in ("val", "test"):
        assert _same(cleaned.split(split), alpha.split(split))
    assert cleaned.name == alpha.name and cleaned.image_dir == alpha.image_dir

    beta = load_dataset(roots["beta"])
    cleaned, counts = apply_exclusions(beta, exclusions)
    assert (counts["images_dropped"], counts["captions_dropped"], counts["captions_listed"]) == (1, 2, 1)
    assert cleaned.split("train").captions == ["a road through the hills"]
    assert _same(cleaned.split("test"), beta.split("test"))

    gamma = load_dataset(roots["gamma"])
    cleaned, counts = apply_exclusions(gamma, exclusions)
    assert cleaned.split("train").captions == ["snow on the mountain", "a big airport", "a small airport"]
    assert counts["captions_dropped"] == 1 and counts["images_dropped"] == 0


def test_restricted_to_keeps_only_what_an_eval_split_shares(roots: dict[str, Path], audit_dir: Path) -> None:
    exclusions = read_exclusions(audit_dir / "audit.json").restricted_to(["alpha/test"])
    assert exclusions.images == {("alpha", "a4.png"), ("alpha", "a5.jpg"), ("beta", "b1.png")}
    assert exclusions.captions == {("alpha", "a0.png", "two boats on the water"), ("alpha", "a2.png", "the runway is long"),
                                   ("alpha", "a3.png", "the runway is long"), ("beta", "b0.jpg", "a quiet beach")}
    cleaned, counts = apply_exclusions(load_dataset(roots["alpha"]), exclusions)
    assert (counts["images_dropped"], counts["captions_dropped"]) == (2, 7)
    assert cleaned.split("train").image_files[0] == "a0.png"
    assert read_exclusions(audit_dir / "audit.json").restricted_to(["gamma"]).captions == {("beta", "b1.png", "a small lake")}


def test_hand_written_exclusions(roots: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "drop.json"
    path.write_text(json.dumps({"exclusions": {
        "images": [{"dataset": "alpha", "image": "a8.png"}],  # a test image: never dropped
        "captions": [{"dataset": "alpha", "image": "a2.png", "caption": "Many planes at the AIRPORT!"},
                     {"dataset": "alpha", "image": "a2.png", "caption": "no such caption"},
                     {"dataset": "beta", "image": "b0.jpg", "caption": "a quiet beach"}]}}))
    alpha = load_dataset(roots["alpha"])
    with caplog.at_level(logging.WARNING, logger="rsitr"):
        cleaned, counts = apply_exclusions(alpha, read_exclusions(path))
    assert counts == {"images_dropped": 0, "images_listed": 0, "images_emptied": 0, "captions_dropped": 1,
                      "captions_listed": 1, "entries_not_train": 1, "entries_unmatched": 1}
    assert cleaned.num_images == alpha.num_images and cleaned.num_captions == alpha.num_captions - 1
    assert "Many planes at the airport" not in cleaned.captions and "the runway is long" in cleaned.captions
    assert any("match no train item" in r.getMessage() for r in caplog.records)
    unchanged, counts = apply_exclusions(alpha, Exclusions())
    assert _same(unchanged, alpha) and counts["captions_dropped"] == 0


@pytest.mark.parametrize("content, problem", [
    ("{not json", "invalid JSON"),
    ('{"images": []}', "not an audit file"),
    ('{"format": "other-v9", "exclusions": {}}', "format 'other-v9'"),
    ('{"exclusions": {"images": {}}}', "exclusions.images must be a list"),
    ('{"exclusions": {"captions": [{"dataset": "a", "image": "x.png"}]}}', "exclusions.captions[0] needs a non-empty string 'caption'"),
    ('{"exclusions": {"images": [{"dataset": "a", "image": "x.png", "why": 1}]}}', "unknown key(s) why"),
    ('{"exclusions": {"drop": []}}', "exclusions has unknown key(s) drop"),
])
def test_read_exclusions_errors_name_the_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as info:
        read_exclusions(path)
    message = str(info.value)
    assert message.startswith(str(path)) and problem in message and "\n" not in message
    with pytest.raises(DatasetError, match="file not found"):
        read_exclusions(tmp_path / "none.json")


def test_close_pairs_threshold_and_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    hashes = np.array([0, 0b11, 0b1111, (1 << 64) - 1, (1 << 64) - 1 - 0b1], dtype=np.uint64)
    rows, cols, dists = audit_module._close_pairs(hashes, 2)
    assert sorted(zip(rows.tolist(), cols.tolist(), dists.tolist())) == [(0, 1, 2), (1, 2, 2), (3, 4, 1)]
    monkeypatch.setattr(audit_module, "_PAIR_BLOCK", 1)  # one row per block: the same answer
    rows, cols, dists = audit_module._close_pairs(hashes, 4)
    assert sorted(zip(rows.tolist(), cols.tolist(), dists.tolist())) == [(0, 1, 2), (0, 2, 4), (1, 2, 2), (3, 4, 1)]
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy < 2: the byte-table popcount
    rows, cols, dists = audit_module._close_pairs(hashes, 4)
    assert sorted(zip(rows.tolist(), cols.tolist(), dists.tolist())) == [(0, 1, 2), (0, 2, 4), (1, 2, 2), (3, 4, 1)]


def test_audit_arguments(roots: dict[str, Path]) -> None:
    alpha = load_dataset(roots["alpha"])
    captions_only = audit_datasets([alpha], hash_images=False, progress=False)
    assert captions_only["images"]["pairs"] == [] and captions_only["datasets"][0]["images"]["hashed"] == 0
    assert [e["image"] for e in captions_only["exclusions"]["captions"]] == ["a0.png", "a1.png", "a2.png", "a3.png"]  # cross-split only
    with pytest.raises(ConfigError, match="several datasets are named 'alpha'"):
        audit_datasets([alpha, alpha], progress=False)
    with pytest.raises(ConfigError, match="threshold"):
        audit_datasets([alpha], threshold=65, progress=False)
