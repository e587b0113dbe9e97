"""Localisation benchmarks with ground truth: large synthetic scenes and mosaics of dataset images.

Scenes are generated at a few hundred pixels (through the size arguments) so the module runs in
seconds; the real UCM-Captions validation split is used when ``../shared/data/ucm_captions`` exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsitr.data import load_dataset
from rsitr.data.images import read_image
from rsitr.data.mosaics import build_mosaics
from rsitr.data.synth import SCENE_TYPES, generate_large_scenes, render_scene
from rsitr.data.synth.large_scenes import (
    _BLOCK_CAPTIONS,
    _BLOCK_RENDER,
    _BLOCK_SCENE,
    _ramp,
    _stream,
    block_captions,
    block_scene,
    names_scene,
    plan_blocks,
    render_background,
)
from rsitr.data.synth.scene import SceneDescription
from rsitr.errors import ConfigError, DatasetError
from rsitr.localization_metrics import polygon_mask, read_annotations
from rsitr_cli.main import main

UCM = Path(__file__).resolve().parents[2] / "shared" / "data" / "ucm_captions"

#: Small scenes: 3 images of 420-520 px with blocks of 96-150 px on 128-px background tiles.
SMALL = {"size_range": (420, 520), "block_range": (96, 150), "blocks_per_scene": (3, 5), "block_gap": 12,
         "background_tile": 128, "progress": False}
SEED = 5


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    generate_large_scenes(out, num_scenes=3, seed=SEED, **SMALL)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _scenes_json(folder: Path) -> dict:
    return json.loads((folder / "scenes.json").read_text())


def _box_mask(box: list[int], height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[box[1]:box[3], box[0]:box[2]] = True
    return mask


# -- large synthetic scenes ------------------------------------------------------------------------


def test_scenes_same_seed_identical_bytes_other_seed_differs(scenes_dir, tmp_path):
    generate_large_scenes(tmp_path / "again", num_scenes=3, seed=SEED, **SMALL)
    assert _files(tmp_path / "again") == _files(scenes_dir)
    generate_large_scenes(tmp_path / "one", num_scenes=1, seed=SEED, **SMALL)  # scene 0 does not depend on the count
    assert (tmp_path / "one/images/scene_00000.png").read_bytes() == (scenes_dir / "images/scene_00000.png").read_bytes()
    generate_large_scenes(tmp_path / "other", num_scenes=1, seed=SEED + 1, **SMALL)
    assert (tmp_path / "other/images/scene_00000.png").read_bytes() != (scenes_dir / "images/scene_00000.png").read_bytes()


def test_blocks_inside_image_apart_and_of_distinct_types(scenes_dir):
    meta = _scenes_json(scenes_dir)
    assert meta["seed"] == SEED and len(meta["scenes"]) == 3
    for scene in meta["scenes"]:
        w, h = scene["width"], scene["height"]
        assert 420 <= w <= 520 and 420 <= h <= 520
        assert Image.open(scenes_dir / "images" / scene["image"]).size == (w, h)
        boxes = [b["box"] for b in scene["blocks"]]
        assert len(boxes) >= 1
        types = [b["scene_type"] for b in scene["blocks"]]
        assert len(set(types)) == len(types) and set(types) <= set(SCENE_TYPES)
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and 96 <= x2 - x1 == y2 - y1 <= 150
        for i, a in enumerate(boxes):  # at least block_gap pixels between any two blocks
            for b in boxes[i + 1:]:
                apart_x = a[2] + 12 <= b[0] or b[2] + 12 <= a[0]
                apart_y = a[3] + 12 <= b[1] or b[3] + 12 <= a[1]
                assert apart_x or apart_y


def test_plan_blocks_invariants_over_many_seeds():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        plans = plan_blocks(rng, 900, 700, (100, 300), (1, 10), gap=20)
        assert 1 <= len(plans) <= 10
        assert len({t for t, *_ in plans}) == len(plans)
        for i, (_, x, y, s) in enumerate(plans):
            assert 0 <= x <= 900 - s and 0 <= y <= 700 - s and 100 <= s <= 300
            for _, x2, y2, s2 in plans[i + 1:]:
                assert x + s + 20 <= x2 or x2 + s2 + 20 <= x or y + s + 20 <= y2 or y2 + s2 + 20 <= y


def test_block_pixels_are_their_scene_and_background_elsewhere(scenes_dir):
    """Each block's pixels are exactly the render of a scene of its stated type; outside the blocks, the canvas cover."""
    for index, scene in enumerate(_scenes_json(scenes_dir)["scenes"]):
        pixels = np.asarray(Image.open(scenes_dir / "images" / scene["image"]))
        h, w = pixels.shape[:2]
        background = render_background(SEED, index, scene["background"], w, h, tile=128)
        outside = np.ones((h, w), dtype=bool)
        for b, block in enumerate(scene["blocks"]):
            x1, y1, x2, y2 = block["box"]
            described = block_scene(_stream(SEED, index, _BLOCK_SCENE, b), block["scene_type"], x2 - x1, scene["background"])
            assert described.scene_type == block["scene_type"] and described.background == block["background"]
            rendered = np.asarray(render_scene(described, _stream(SEED, index, _BLOCK_RENDER, b)))
            np.testing.assert_array_equal(pixels[y1:y2, x1:x2], rendered)
            assert block["captions"] == block_captions(described, _stream(SEED, index, _BLOCK_CAPTIONS, b), 2)
            diff = np.abs(pixels[y1:y2, x1:x2].astype(int) - background[y1:y2, x1:x2].astype(int)).mean()
            assert diff > 8, f"{block['scene_type']} block looks like the background (mean |diff| {diff:.1f})"
            outside &= ~_box_mask(block["box"], h, w)
        np.testing.assert_array_equal(pixels[outside], background[outside])


def test_captions_name_their_block_type(scenes_dir):
    named = total = 0
    for scene in _scenes_json(scenes_dir)["scenes"]:
        for block in scene["blocks"]:
            assert len(block["captions"]) == 2 and len(set(block["captions"])) == 2
            for caption in block["captions"]:
                total += 1
                named += names_scene(caption, block["scene_type"])
                others = [t for t in SCENE_TYPES if t != block["scene_type"] and names_scene(caption, t)]
                assert not others, f"{caption!r} ({block['scene_type']}) also names {others}"
    assert named == total  # a pool of 12 always had two naming the scene here


def test_anno_json_is_selo_layout_and_polygons_fill_exactly_the_blocks(scenes_dir):
    raw = json.loads((scenes_dir / "anno.json").read_text())
    assert all(set(entry) == {"caption", "jpg_name", "points"} for entry in raw)
    samples = read_annotations(scenes_dir / "anno.json")
    scenes = {s["image"]: s for s in _scenes_json(scenes_dir)["scenes"]}
    expected = [(s["image"], c, b["box"]) for s in scenes.values() for b in s["blocks"] for c in b["captions"]]
    assert len(samples) == len(expected)
    for sample, (image, caption, box) in zip(samples, expected):
        assert (sample.image, sample.caption) == (image, caption) and len(sample.polygons) == 1
        h, w = scenes[image]["height"], scenes[image]["width"]
        poly = sample.polygons[0]
        assert poly.min() >= 0 and poly[:, 0].max() <= w - 1 and poly[:, 1].max() <= h - 1
        np.testing.assert_array_equal(polygon_mask(sample.polygons, h, w), _box_mask(box, h, w))


def test_background_tiles_and_ramp():
    np.testing.assert_allclose(_ramp(8, 2), [0.25, 0.75, 1, 1, 1, 1, 0.75, 0.25])
    # One tile covers the canvas: the background is that tile's render, cropped, unchanged by the blending.
    single = render_background(2, 0, "soil", 100, 90, tile=128)
    tile = np.asarray(render_scene(SceneDescription("background", "soil", 128), _stream(2, 0, 1, 0)))
    np.testing.assert_array_equal(single, tile[:90, :100])
    # Several tiles: no seam, neighbouring columns differ no more across tile borders than inside a tile.
    wide = render_background(2, 0, "grass", 400, 64, tile=128).astype(float).mean(axis=(0, 2))
    steps = np.abs(np.diff(wide))
    assert steps.max() < 4 * np.median(steps) + 2


def test_bad_scene_arguments():
    with pytest.raises(ConfigError, match="block_range"):
        generate_large_scenes("unused", num_scenes=1, size_range=(300, 400), block_range=(200, 350), progress=False)
    with pytest.raises(ConfigError, match="num_scenes"):
        generate_large_scenes("unused", num_scenes=0, progress=False)
    with pytest.raises(ConfigError, match="blocks_per_scene"):
        generate_large_scenes("unused", num_scenes=1, blocks_per_scene=(2, 11), progress=False)
    assert not Path("unused").exists()


def test_cli_scenes(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "scenes", "--out", str(out), "--count", "1", "--seed", "3", "--min-size", "300", "--max-size", "320",
                 "--min-block", "80", "--max-block", "100", "--captions", "1", "--quiet"]) == 0
    meta = _scenes_json(out)
    assert len(read_annotations(out / "anno.json")) == len(meta["scenes"][0]["blocks"])
    assert "1 scenes" in capsys.readouterr().out


# -- mosaics ----------------------------------------------------------------------------------------


def _check_mosaics(out: Path, dataset_path: Path, split: str, rows: int, cols: int) -> dict:
    """Cells hold the right images pixel-exactly, classes are distinct, queries are the cells' captions."""
    meta = json.loads((out / "mosaics.json").read_text())
    dataset = load_dataset(dataset_path)
    by_file = {f: i for i, f in enumerate(dataset.image_files)}
    side = meta["cell_size"]
    samples = read_annotations(out / "anno.json")
    queries = [(m["image"], q) for m in meta["mosaics"] for q in m["queries"]]
    assert len(samples) == len(queries)
    for m in meta["mosaics"]:
        pixels = np.asarray(Image.open(out / "images" / m["image"]))
        assert pixels.shape == (rows * side, cols * side, 3)
        labels = [c["label"] for c in m["cells"]]
        assert len(labels) == rows * cols and len(set(labels)) == rows * cols
        for k, cell in enumerate(m["cells"]):
            assert (cell["row"], cell["col"]) == divmod(k, cols)
            i = by_file[cell["image"]]
            assert dataset.image_splits[i] == split and dataset.scene_labels[i] == cell["label"]
            x1, y1, x2, y2 = cell["box"]
            assert (x1, y1, x2 - x1, y2 - y1) == (cell["col"] * side, cell["row"] * side, side, side)
            if not cell["resized"]:
                np.testing.assert_array_equal(pixels[y1:y2, x1:x2], np.asarray(read_image(dataset.image_path(i))))
    for sample, (image, query) in zip(samples, queries):
        cell = next(m for m in meta["mosaics"] if m["image"] == image)["cells"][query["cell"]]
        i = by_file[cell["image"]]
        assert sample.image == image and sample.caption == query["caption"]
        assert query["caption"] in [dataset.captions[c] for c in dataset.captions_of(i)]
        h, w = rows * side, cols * side
        np.testing.assert_array_equal(polygon_mask(sample.polygons, h, w), _box_mask(cell["box"], h, w))
    return meta


def test_mosaics_on_tiny_synth(tiny_synth, tmp_path):
    out = tmp_path / "m"
    mosaics = build_mosaics(tiny_synth, out, split="train", rows=2, cols=3, count=3, queries_per_mosaic=2, seed=1,
                            progress=False)
    meta = _check_mosaics(out, tiny_synth, "train", 2, 3)
    assert meta["cell_size"] == 64 and len(mosaics) == 3
    assert all(len(m["queries"]) == 2 and len({q["cell"] for q in m["queries"]}) == 2 for m in meta["mosaics"])
    assert not any(c["resized"] for m in meta["mosaics"] for c in m["cells"])
    build_mosaics(tiny_synth, tmp_path / "again", split="train", rows=2, cols=3, count=3, queries_per_mosaic=2, seed=1,
                  progress=False)
    assert _files(tmp_path / "again") == _files(out)
    build_mosaics(tiny_synth, tmp_path / "other", split="train", rows=2, cols=3, count=3, queries_per_mosaic=2, seed=2,
                  progress=False)
    assert _files(tmp_path / "other") != _files(out)


def test_mosaics_resize_and_jpg(tiny_synth, tmp_path):
    build_mosaics(tiny_synth, tmp_path, split="train", rows=1, cols=2, count=1, queries_per_mosaic=1, cell_size=80,
                  image_format="jpg", progress=False)
    meta = json.loads((tmp_path / "mosaics.json").read_text())
    image = tmp_path / "images" / meta["mosaics"][0]["image"]
    assert image.suffix == ".jpg" and Image.open(image).format == "JPEG" and Image.open(image).size == (160, 80)
    assert all(c["resized"] for c in meta["mosaics"][0]["cells"])


def test_mosaics_refuse_too_few_classes(tiny_synth, tmp_path):
    classes = len(set(load_dataset(tiny_synth).split("train").scene_labels or []))
    with pytest.raises(DatasetError, match=f"has {classes} scene classes, fewer than the {classes + 1} cells"):
        build_mosaics(tiny_synth, tmp_path, split="train", rows=1, cols=classes + 1, progress=False)
    with pytest.raises(ConfigError, match="queries_per_mosaic"):
        build_mosaics(tiny_synth, tmp_path, rows=2, cols=2, queries_per_mosaic=5, progress=False)
    assert not (tmp_path / "anno.json").exists()


def test_cli_mosaics(tiny_synth, tmp_path, capsys):
    assert main(["data", "mosaics", str(tiny_synth), "--out", str(tmp_path), "--split", "train", "--rows", "2", "--cols", "2",
                 "--count", "1", "--queries", "1", "--quiet"]) == 0
    assert len(read_annotations(tmp_path / "anno.json")) == 1
    assert "1 mosaics" in capsys.readouterr().out
    assert main(["data", "mosaics", str(tiny_synth), "--out", str(tmp_path), "--split", "train", "--rows", "5", "--cols", "5",
                 "--quiet"]) == 2
    assert "fewer than the 25 cells" in capsys.readouterr().err


@pytest.mark.skipif(not (UCM / "dataset_ucm.json").is_file() or not (UCM / "imgs").is_dir(),
                    reason="UCM-Captions not in ../shared/data/ucm_captions")
def test_mosaics_on_real_ucm_val(tmp_path):
    build_mosaics(UCM, tmp_path, split="val", rows=4, cols=5, count=2, queries_per_mosaic=3, seed=0, progress=False)
    meta = _check_mosaics(tmp_path, UCM, "val", 4, 5)
    assert meta["cell_size"] == 256 and len(meta["mosaics"]) == 2
    with pytest.raises(DatasetError, match="fewer than the 25 cells"):  # UCM val has 21 classes
        build_mosaics(UCM, tmp_path / "none", split="val", rows=5, cols=5, progress=False)


def test_a_composed_scene_puts_the_given_blocks_where_asked_and_refuses_bad_layouts() -> None:
    from rsitr.data.synth.large_scenes import compose_large_scene, render_background

    plans = [("parking", 20, 30, 200), ("storage", 300, 300, 256)]
    scene, pixels = compose_large_scene(3, 600, 580, plans)
    assert pixels.shape == (580, 600, 3) and [(b.scene_type, b.x, b.y, b.side) for b in scene.blocks] == plans
    background = render_background(3, 0, "grass", 600, 580)
    outside = np.ones((580, 600), dtype=bool)
    for b in scene.blocks:
        outside[b.y : b.y + b.side, b.x : b.x + b.side] = False
        assert np.abs(pixels[b.y : b.y + b.side, b.x : b.x + b.side].astype(int)
                      - background[b.y : b.y + b.side, b.x : b.x + b.side]).mean() > 8
    assert np.array_equal(pixels[outside], background[outside])
    for bad in ([("parking", 500, 0, 200)], [("parking", 0, 0, 200), ("storage", 100, 100, 200)], [("volcano", 0, 0, 100)]):
        with pytest.raises(ConfigError):
            compose_large_scene(3, 600, 580, bad)
