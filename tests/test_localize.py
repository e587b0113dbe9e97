"""Semantic localisation: the SeLo window grid, the fused heat map against a brute-force loop, and the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from helpers import random_bundle, texture, write_geotiff
from rsitr.data.rasters import TileWindow
from rsitr.errors import ConfigError
from rsitr_cli.main import main
from rsitr_serve.localize import (
    fuse_window_scores,
    localize,
    normalise_and_smooth,
    selo_windows,
    write_localization,
)
from rsitr_serve.tiling import iter_tile_windows


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("localize") / "model"
    return {"dir": folder, "bundle": random_bundle(folder, seed=0, image_size=32)}


def _covered(windows: list[TileWindow], width: int, height: int) -> np.ndarray:
    counts = np.zeros((height, width), dtype=np.int64)
    for w in windows:
        counts[w.y : w.y + w.height, w.x : w.x + w.width] += 1
    return counts


def test_windows_of_a_size_are_two_grids_clamped_at_the_border() -> None:
    windows = selo_windows(600, 600, [256])
    starts = sorted({(w.x, w.y) for w in windows})
    # grid at 0: 0, 256, 512 -> 344 (shifted to end at 600); grid at 128: 128, 384 -> 344.
    grid0 = {(x, y) for x in (0, 256, 344) for y in (0, 256, 344)}
    grid1 = {(x, y) for x in (128, 344) for y in (128, 344)}
    assert set(starts) == grid0 | grid1
    assert len(windows) == len(grid0 | grid1) == 12  # (344, 344) is in both grids and kept once
    assert all((w.width, w.height) == (256, 256) and w.x + 256 <= 600 and w.y + 256 <= 600 for w in windows)
    assert all(w.scale == 1.0 for w in windows)


@pytest.mark.parametrize(("width", "height", "sizes"), [(1000, 700, (128, 256, 512)), (300, 90, (128, 256)), (50, 40, (64,))])
def test_every_pixel_is_covered_by_each_size_and_no_window_sticks_out(width, height, sizes) -> None:
    windows = selo_windows(width, height, sizes)
    for size in sizes:
        of_size = [w for w in windows if w.scale == size / 256]
        assert (_covered(of_size, width, height) >= 1).all()
        assert all(w.width == min(size, width) and w.height == min(size, height) for w in of_size)
    assert all(w.x >= 0 and w.y >= 0 and w.x + w.width <= width and w.y + w.height <= height for w in windows)
    assert len({w.box for w in windows}) == len(windows)


def test_the_offset_zero_grid_is_the_index_tiling_at_that_scale() -> None:
    tiles = set(iter_tile_windows(900, 700, 256, 0.0, [1.0]))
    assert tiles <= set(selo_windows(900, 700, [256]))


def test_window_sizes_are_checked() -> None:
    for sizes in ([], [8], [128, 128], [1.5]):
        with pytest.raises(ConfigError):
            selo_windows(100, 100, sizes)


def test_fused_heat_is_the_mean_score_of_the_covering_windows() -> None:
    rng = np.random.default_rng(0)
    width, height = 97, 61
    windows = []
    for _ in range(40):
        w, h = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        windows.append(TileWindow(1.0, int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h))
    scores = rng.normal(size=len(windows))
    sums = np.zeros((height, width))
    counts = _covered(windows, width, height)
    for w, s in zip(windows, scores):
        sums[w.y : w.y + w.height, w.x : w.x + w.width] += s
    expected = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    expected[counts == 0] = np.nanmin(expected)  # uncovered pixels take the lowest heat
    fused = fuse_window_scores(windows, scores, width, height)
    assert fused.shape == (height, width) and fused.dtype == np.float32
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-6)


def test_a_reduced_map_samples_the_cell_under_each_pixel_centre() -> None:
    windows = [TileWindow(1.0, 0, 0, 50, 100), TileWindow(1.0, 50, 0, 50, 100)]
    small = fuse_window_scores(windows, np.array([1.0, 3.0]), 100, 100, out_shape=(4, 4))
    assert small.tolist() == [[1, 1, 3, 3]] * 4


def test_normalisation_maps_min_to_0_and_max_to_255_and_a_constant_map_to_0() -> None:
    heat = np.array([[0.5, 1.0], [2.5, 1.5]], dtype=np.float32)
    assert normalise_and_smooth(heat, blur=1).tolist() == [[0, 64], [255, 128]]  # (v - 0.5) * 127.5, rounded
    assert not normalise_and_smooth(np.full((5, 5), 0.3), blur=3).any()
    spike = np.zeros((9, 9))
    spike[4, 4] = 1.0
    assert not normalise_and_smooth(spike, blur=3).any()  # a median of 3 x 3 removes a one-pixel spike


def test_localisation_equals_scoring_each_window_alone(model, tmp_path) -> None:
    path = tmp_path / "scene.png"
    Image.fromarray(texture(150, 200, seed=3).transpose(1, 2, 0)).save(path)
    bundle = model["bundle"]
    sentence = "many cars in a parking lot"
    result = localize(bundle, path, [sentence], sizes=(64, 128), blur=1, batch_size=5, progress=False)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    crops = [pixels[w.y : w.y + w.height, w.x : w.x + w.width] for w in result.windows]
    alone = bundle.score(bundle.encode_images(crops, batch_size=64), bundle.encode_texts([sentence])).numpy()[:, 0]
    np.testing.assert_allclose(result.scores[:, 0], alone, rtol=1e-4, atol=1e-5)  # batch size does not matter
    expected = normalise_and_smooth(fuse_window_scores(result.windows, alone, 200, 150), blur=1)
    assert np.abs(result.heat[0].astype(int) - expected.astype(int)).max() <= 1
    assert result.heat[0].shape == (150, 200) and result.heat[0].max() == 255 and result.heat[0].min() == 0
    assert set(result.times.seconds) >= {"reading", "image encoding", "scoring", "fusion"}


def test_outputs_are_a_png_an_overlay_and_a_georeferenced_heat_map(model, tmp_path) -> None:
    scene = write_geotiff(tmp_path / "scene.tif", texture(140, 180, seed=4))
    result = localize(model["bundle"], scene, ["a road", "green trees"], sizes=(64,), blur=5, progress=False)
    written = write_localization(result, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == sorted(f"scene-{k}.{kind}" for k in (0, 1) for kind in ("heat.png", "overlay.jpg", "heat.tif", "json"))
    heat = np.asarray(Image.open(tmp_path / "out" / "scene-1.heat.png"))
    assert heat.shape == (140, 180) and np.array_equal(heat, result.heat[1])
    assert Image.open(tmp_path / "out" / "scene-0.overlay.jpg").size == (180, 140)
    with rasterio.open(scene) as src, rasterio.open(tmp_path / "out" / "scene-0.heat.tif") as out:
        assert out.crs == src.crs and out.transform == src.transform and out.count == 1
        assert np.array_equal(out.read(1), result.heat[0])
    record = json.loads((tmp_path / "out" / "scene-0.json").read_text())
    assert record["sentence"] == "a road" and record["windows"] == len(result.windows)
    assert record["outputs"] == ["scene-0.heat.png", "scene-0.overlay.jpg", "scene-0.heat.tif"]
    assert not list((tmp_path / "out").glob("*.tmp*"))


def test_cli_localises_and_bad_input_is_one_line(model, tmp_path, capsys) -> None:
    path = tmp_path / "chip.png"
    Image.fromarray(texture(100, 120, seed=5).transpose(1, 2, 0)).save(path)
    out = tmp_path / "maps"
    assert main(["--quiet", "localize", str(model["dir"]), str(path), "a small house", "--scales", "64,96",
                 "--blur", "3", "--out", str(out)]) == 0
    assert (out / "chip.heat.png").is_file() and (out / "chip.overlay.jpg").is_file()
    assert "hottest at" in capsys.readouterr().out
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["--quiet", "localize", str(model["dir"]), str(broken), "a road", "--out", str(out)]) == 2
    assert main(["--quiet", "localize", str(model["dir"]), str(path), "a road", "--scales", "8", "--out", str(out)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and str(broken) in errors[0] and "16 px" in errors[1]


def test_a_raster_with_nodata_margin_scores_only_windows_with_valid_pixels(model, tmp_path: Path) -> None:
    data = texture(128, 256, seed=6)
    data[:, :, 128:] = 0
    scene = write_geotiff(tmp_path / "margin.tif", data)
    with rasterio.open(scene, "r+") as raster:
        raster.nodata = 0
    result = localize(model["bundle"], scene, ["a river"], sizes=(64,), blur=1, progress=False)
    assert result.windows and all(w.x < 128 for w in result.windows)
    assert (result.heat[0][:, 160:] == 0).all()  # pixels no scored window covers take the lowest heat


def _annotated(tmp_path: Path) -> Path:
    from rsitr.localization_metrics import LocalizationSample, write_annotations

    images = tmp_path / "images"
    images.mkdir()
    for k, seed in enumerate((7, 8)):
        Image.fromarray(texture(128, 160, seed=seed).transpose(1, 2, 0)).save(images / f"{k}.jpg", quality=95)
    square = np.array([[10.0, 10.0], [70.0, 10.0], [70.0, 70.0], [10.0, 70.0]])
    samples = [LocalizationSample("a road beside the river", "0.jpg", [square]),
               LocalizationSample("many cars", "1.jpg", [square + 40, square + [80, 0]]),
               LocalizationSample("green trees", "0.jpg", [square + [60, 30]])]
    write_annotations(tmp_path / "anno.json", samples)
    return tmp_path


def test_localize_eval_scores_each_sample_with_the_selo_metrics(model, tmp_path, capsys) -> None:
    from rsitr.localization_metrics import prob_from_heat, read_annotations, selo_metrics

    root = _annotated(tmp_path)
    report_path = root / "report.json"
    assert main(["--quiet", "localize-eval", str(model["dir"]), str(root / "anno.json"), str(root / "images"),
                 "--scales", "64,96", "--blur", "5", "--maps", str(root / "maps"), "--json", str(report_path)]) == 0
    assert "| Rsu ↑ |" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["images"] == 2 and [row["index"] for row in report["samples"]] == [0, 1, 2]
    samples = read_annotations(root / "anno.json")
    for row, sample in zip(report["samples"], samples):
        heat = np.asarray(Image.open(root / "maps" / f"{row['index']:03d}_{Path(sample.image).stem}.heat.png"))
        expected = selo_metrics(prob_from_heat(heat), sample.polygons)
        assert all(row[key] == pytest.approx(expected[key]) for key in ("rsu", "ras", "rda", "rmi"))
    assert report["mean"]["rmi"] == pytest.approx(np.mean([row["rmi"] for row in report["samples"]]))
    assert set(report["seconds"]) >= {"reading", "image encoding", "scoring", "fusion", "metrics", "total"}


def test_localize_eval_names_the_first_missing_image(model, tmp_path, capsys) -> None:
    root = _annotated(tmp_path)
    (root / "images" / "1.jpg").unlink()
    assert main(["--quiet", "localize-eval", str(model["dir"]), str(root / "anno.json"), str(root / "images")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "1.jpg" in error and "1 of 2" in error


@pytest.mark.slow  # trains the demo model (about two and a half minutes on 2 cores), then five 2,600-px scenes
def test_the_parking_lot_is_the_hottest_block_for_its_caption_with_a_trained_demo_model(tmp_path) -> None:
    """Four 1,024-px blocks of the usual kinds (a parking lot beside a road, a residential block, a
    storage-tank farm, farmland) on grass, in five seeded drawings; the query is the parking block's own caption.

    The demo model (a seeded random ResNet-18 under trained heads, mR 40 on its chips) is not always right:
    run alone it put the parking block hottest in 5 of 6 drawings (seed 2: the residential block). The test
    asks for 4 of 5, and for the SeLo score of the parking lot to beat what uniform random window scores get.
    """
    from rsitr.bundle import load_model
    from rsitr.data.synth.large_scenes import compose_large_scene
    from rsitr.localization_metrics import prob_from_heat, selo_metrics
    from rsitr_train.demo import run_demo

    run_demo(tmp_path / "demo", progress=False)  # `rsitr demo` as it ships: 1,000 chips, 12 epochs
    bundle = load_model(tmp_path / "demo" / "run")
    plans = [("parking", 100, 100, 1024), ("residential", 1400, 100, 1024), ("storage", 100, 1400, 1024),
             ("farmland", 1400, 1400, 1024)]
    hottest, rmi, chance = [], [], []
    for seed in range(5):
        scene, pixels = compose_large_scene(seed, 2600, 2600, plans)
        path = tmp_path / f"scene{seed}.png"
        Image.fromarray(pixels).save(path)
        parking = scene.blocks[0]
        heat = localize(bundle, path, [parking.captions[0]], progress=False).heat[0]
        means = {b.scene_type: heat[b.y : b.y + b.side, b.x : b.x + b.side].mean() for b in scene.blocks}
        hottest.append(max(means, key=means.get) == "parking")
        rmi.append(selo_metrics(prob_from_heat(heat), [parking.polygon])["rmi"])
        windows = selo_windows(2600, 2600, (128, 256, 512))
        scores = np.random.default_rng(seed).random(len(windows))
        noise = normalise_and_smooth(fuse_window_scores(windows, scores, 2600, 2600))
        chance.append(selo_metrics(prob_from_heat(noise), [parking.polygon])["rmi"])
    assert sum(hottest) >= 4, hottest
    assert np.mean(rmi) > np.mean(chance) + 0.1, (rmi, chance)


def test_a_model_trained_on_chosen_bands_localises_a_tiff_with_them(model, tmp_path) -> None:
    import dataclasses

    scene = write_geotiff(tmp_path / "four.tif", texture(96, 96, seed=9, channels=4))
    plain = model["bundle"]
    chosen = dataclasses.replace(plain, feature_spec=dataclasses.replace(plain.feature_spec, bands=(4, 3, 2)))
    by_spec = localize(chosen, scene, ["a road"], sizes=(64,), blur=1, progress=False)
    given = localize(plain, scene, ["a road"], sizes=(64,), blur=1, bands=[4, 3, 2], progress=False)
    default = localize(plain, scene, ["a road"], sizes=(64,), blur=1, progress=False)
    assert by_spec.bands == [4, 3, 2] and default.bands is None
    np.testing.assert_array_equal(by_spec.scores, given.scores)
    assert not np.array_equal(by_spec.scores, default.scores)
    assert (tmp_path / "out" / "four.overlay.jpg") in write_localization(by_spec, tmp_path / "out")
