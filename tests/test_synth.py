"""The synthetic dataset: layout on disk, determinism, true boxes and true captions."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsitr.data.dataset import SPLITS
from rsitr.data.synth import (
    CLASS_NOUNS,
    NUMBER_WORDS,
    OBJECT_CLASSES,
    PALETTES,
    SCENE_TYPES,
    generate_synthetic,
    make_scene,
)
from rsitr.errors import ConfigError
from rsitr.text import tokenize

N = 30


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("synth")
    ds = generate_synthetic(out, num_images=N, seed=0, progress=False)
    return out, ds


def _karpathy(out: Path) -> dict:
    return json.loads((out / "dataset_synth.json").read_text(encoding="utf-8"))


def test_files_and_karpathy_layout(synth):
    out, ds = synth
    data = _karpathy(out)
    assert len(data["images"]) == N
    assert {im["split"] for im in data["images"]} == set(SPLITS)
    sentids = []
    for i, im in enumerate(data["images"]):
        assert im["filename"] == f"synth_{i:05d}.png"
        assert im["imgid"] == i
        assert im["label"] in SCENE_TYPES
        assert (out / "images" / im["filename"]).is_file()
        raws = [s["raw"] for s in im["sentences"]]
        assert len(raws) == 5 and len(set(raws)) == 5
        for s in im["sentences"]:
            # The project tokenizer, and plain words only: captions never contain an apostrophe,
            # the one character where it would differ from a bare [a-z0-9]+ split.
            assert s["tokens"] == tokenize(s["raw"])
            assert all(re.fullmatch(r"[a-z0-9]+", t) for t in s["tokens"])
            sentids.append(s["sentid"])
    assert sentids == list(range(5 * N))
    # Captions are not trivially shared between images.
    all_raw = [s["raw"] for im in data["images"] for s in im["sentences"]]
    assert len(set(all_raw)) > 0.9 * len(all_raw)


def test_returned_dataset_matches_files(synth):
    out, ds = synth
    data = _karpathy(out)
    assert ds.num_images == N and ds.num_captions == 5 * N
    assert ds.image_dir == out / "images"
    assert ds.image_splits == [im["split"] for im in data["images"]]
    assert ds.scene_labels == [im["label"] for im in data["images"]]
    assert ds.captions == [s["raw"] for im in data["images"] for s in im["sentences"]]
    assert all(len(ds.captions_of(i)) == 5 for i in range(N))
    assert all(ds.split(s).num_images > 0 for s in SPLITS)
    with Image.open(ds.image_path(0)) as img:
        assert img.size == (128, 128) and img.mode == "RGB"


def test_split_fractions_and_scene_coverage(synth):
    _, ds = synth
    counts = Counter(ds.image_splits)
    assert counts["train"] == 20 and counts["val"] == 5 and counts["test"] == 5
    assert set(ds.scene_labels) == set(SCENE_TYPES)  # every block of ten images covers all types


def test_same_seed_identical_bytes_other_seed_differs(synth, tmp_path):
    out, _ = synth
    again = tmp_path / "again"
    generate_synthetic(again, num_images=N, seed=0, progress=False)
    for name in ("dataset_synth.json", "detections.json", "images/synth_00000.png", "images/synth_00017.png"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    other = tmp_path / "other"
    generate_synthetic(other, num_images=N, seed=1, progress=False)
    assert (other / "dataset_synth.json").read_bytes() != (out / "dataset_synth.json").read_bytes()
    assert (other / "images/synth_00000.png").read_bytes() != (out / "images/synth_00000.png").read_bytes()


def test_image_does_not_depend_on_dataset_size(synth, tmp_path):
    out, _ = synth
    small = tmp_path / "small"
    generate_synthetic(small, num_images=10, seed=0, progress=False)
    for i in (0, 4, 9):
        name = f"images/synth_{i:05d}.png"
        assert (small / name).read_bytes() == (out / name).read_bytes()
    big = _karpathy(out)["images"][:10]
    for a, b in zip(_karpathy(small)["images"], big):
        assert [s["raw"] for s in a["sentences"]] == [s["raw"] for s in b["sentences"]]


def test_detections_are_true_boxes(synth):
    out, _ = synth
    det = json.loads((out / "detections.json").read_text(encoding="utf-8"))
    assert det["format"] == "rsitr-detections-v1"
    assert len(det["images"]) == N
    for i in range(N):
        entry = det["images"][f"synth_{i:05d}.png"]
        scene = make_scene(0, i, 128)
        assert len(entry["boxes"]) == len(entry["scores"]) == len(entry["labels"]) == len(scene.objects) > 0
        assert Counter(entry["labels"]) == Counter(o.cls for o in scene.objects)
        assert sorted(map(tuple, entry["boxes"])) == sorted(o.box for o in scene.objects)
        assert set(entry["labels"]) <= set(OBJECT_CLASSES)
        for x1, y1, x2, y2 in entry["boxes"]:
            assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
        scores = entry["scores"]
        assert all(0.9 < s <= 1.0 for s in scores)
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)


def test_object_boxes_contain_drawn_objects(synth):
    """Inside every storage-tank and plane box the pixels clearly differ from the free background."""
    out, _ = synth
    det = json.loads((out / "detections.json").read_text(encoding="utf-8"))
    checked = 0
    for i in range(N):
        name = f"synth_{i:05d}.png"
        arr = np.asarray(Image.open(out / "images" / name), dtype=np.float64)
        free = np.ones(arr.shape[:2], dtype=bool)
        for x1, y1, x2, y2 in det["images"][name]["boxes"]:
            free[y1:y2, x1:x2] = False
        if free.sum() < 500:
            continue
        background = arr[free].mean(axis=0)
        # Mean distance to the background colour: texture alone gives the baseline, an object
        # (body and shadow, one lighter and one darker) must add clearly more.
        distance = np.linalg.norm(arr - background, axis=2)
        baseline = distance[free].mean()
        for (x1, y1, x2, y2), label in zip(det["images"][name]["boxes"], det["images"][name]["labels"]):
            if label in ("storage_tank", "plane"):
                inside = distance[y1:y2, x1:x2].mean()
                assert inside > baseline + 15, (name, label, inside, baseline)
                checked += 1
    assert checked >= 5


def _count_claims(caption: str) -> list[tuple[int, str | None, str | None, str]]:
    """(count, size word, colour, class) for every "three large white planes"-style phrase."""
    numbers = {w: n for n, w in NUMBER_WORDS.items()}
    nouns = {pl: cls for cls, forms in CLASS_NOUNS.items() for _, pl in forms}
    colours = sorted({c for pal in PALETTES.values() for c in pal if " " not in c})
    pattern = re.compile(
        r"\b(" + "|".join(numbers) + r") (?:(large|big|small|little) )?(?:(" + "|".join(colours) + r") )?("
        + "|".join(sorted(nouns, key=len, reverse=True)) + r")\b"
    )
    size_of = {"large": "large", "big": "large", "small": "small", "little": "small"}
    return [
        (numbers[m.group(1)], size_of.get(m.group(2) or ""), m.group(3), nouns[m.group(4)])
        for m in pattern.finditer(caption.lower())
    ]


def test_caption_counts_match_scene(synth):
    out, _ = synth
    data = _karpathy(out)
    claims = 0
    for i, im in enumerate(data["images"]):
        scene = make_scene(0, i, 128)
        assert im["label"] == scene.scene_type
        for s in im["sentences"]:
            for n, size, colour, cls in _count_claims(s["raw"]):
                if cls == "road":
                    continue
                assert scene.count(cls, colour=colour, size=size) == n, (s["raw"], cls, colour, size)
                claims += 1
    assert claims >= 20


def test_single_object_mentions_exist(synth):
    """Every "a red ship"-style mention names a class and colour that is in the scene."""
    out, _ = synth
    data = _karpathy(out)
    nouns = {sg: cls for cls, forms in CLASS_NOUNS.items() for sg, _ in forms}
    colours = sorted({c for pal in PALETTES.values() for c in pal if " " not in c})
    pattern = re.compile(
        r"\ban? (?:single )?(?:(?:large|big|small|little) )?(" + "|".join(colours) + r") ("
        + "|".join(sorted(nouns, key=len, reverse=True)) + r")\b"
    )
    mentions = 0
    for i, im in enumerate(data["images"]):
        scene = make_scene(0, i, 128)
        for s in im["sentences"]:
            for m in pattern.finditer(s["raw"].lower()):
                assert scene.count(nouns[m.group(2)], colour=m.group(1)) > 0, s["raw"]
                mentions += 1
    assert mentions >= 5


def test_bad_arguments_raise():
    with pytest.raises(ConfigError):
        generate_synthetic("unused", num_images=2, progress=False)
    with pytest.raises(ConfigError):
        generate_synthetic("unused", num_images=10, split_fractions=(0.5, 0.5, 0.0), progress=False)
