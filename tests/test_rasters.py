"""Tiling and windowed reading of user imagery: hand-computed windows, and every image written by the test
in its real format (GeoTIFF through rasterio, JPEG, PNG and WebP through PIL)."""

from __future__ import annotations

import json
import random
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from rsitr.data.images import read_image
from rsitr.data.rasters import TileWindow, is_supported, open_image, sample_shape
from rsitr.errors import ConfigError, ImageReadError
from rsitr_serve.tiling import check_tiling, count_tiles, iter_tile_windows, tile_windows

UTM33 = "EPSG:32633"
ORIGIN = (500_000.0, 5_000_000.0)  # easting on zone 33's central meridian (15° E), northing about 45° N
PIXEL = 10.0
NORTH_UP = Affine(PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1])


def whole(width: int, height: int) -> TileWindow:
    return TileWindow(1.0, 0, 0, width, height)


def write_tif(path: Path, bands: np.ndarray, crs: str | None = UTM33, **profile) -> Path:
    """Write (count, h, w) ``bands`` as a GeoTIFF (north-up, 10 m pixels at ORIGIN) or, with crs None, a plain TIFF."""
    count, height, width = bands.shape
    georef = {"crs": crs, "transform": NORTH_UP} if crs else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a plain TIFF on purpose
        with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count, dtype=bands.dtype,
                           **georef, **profile) as ds:
            ds.write(bands)
    return path


def random_bands(count: int, height: int, width: int, dtype=np.uint8, seed: int = 0) -> np.ndarray:
    high = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    return np.random.default_rng(seed).integers(0, high, (count, height, width), endpoint=True).astype(dtype)


# ------------------------------------------------------------------------------------------------ tiling


def test_windows_of_600_by_400_at_tile_256_overlap_half_two_scales():
    got = tile_windows(600, 400, tile=256, overlap=0.5, scales=(1, 2))
    # scale 1: side 256, stride 128; x starts 0, 128, 256 and 600-256=344; y starts 0, 128 and 400-256=144
    first = [TileWindow(1, x, y, 256, 256) for y in (0, 128, 144) for x in (0, 128, 256, 344)]
    # scale 2: side 512, stride 256; x starts 0 and 600-512=88; y is shorter than 512: one window of height 400
    second = [TileWindow(2, 0, 0, 512, 400), TileWindow(2, 88, 0, 512, 400)]
    assert got == first + second
    assert count_tiles(600, 400, 256, 0.5, (1, 2)) == 14


def test_a_short_axis_gets_one_window_spanning_it():
    assert tile_windows(300, 100, 256, 0.0, [1.0]) == [TileWindow(1.0, 0, 0, 256, 100), TileWindow(1.0, 44, 0, 256, 100)]


def test_an_image_no_larger_than_the_tile_is_one_window_and_larger_scales_do_not_repeat_it():
    assert tile_windows(200, 150, 256, 0.5, (1, 2, 4)) == [TileWindow(1, 0, 0, 200, 150)]
    assert tile_windows(256, 256, 256, 0.5, (1, 2)) == [TileWindow(1, 0, 0, 256, 256)]
    # the first scale (as given) that produces a window keeps it
    assert tile_windows(200, 150, 256, 0.5, (2, 1)) == [TileWindow(2, 0, 0, 200, 150)]


def test_scales_that_round_to_the_same_window_side_are_kept_once():
    windows = tile_windows(1000, 700, 100, 0.25, (1.0, 1.004, 2.0))  # 100 * 1.004 rounds to 100
    assert {w.scale for w in windows} == {1.0, 2.0}
    assert len(windows) == count_tiles(1000, 700, 100, 0.25, (1.0, 1.004, 2.0))


def _brute_force(width: int, height: int, tile: int, overlap: float, scales) -> list[TileWindow]:
    """The rule of the module docstring, spelled out with a set of the boxes already produced."""
    seen, out = set(), []
    for scale in scales:
        size = round(tile * scale)
        stride = max(1, round(size * (1 - overlap)))

        def starts(length: int, size: int = size, stride: int = stride) -> list[int]:
            if length <= size:
                return [0]
            positions, p = [], 0
            while p + size < length:
                positions.append(p)
                p += stride
            return sorted(set(positions + [length - size]))

        for y in starts(height):
            for x in starts(width):
                box = (x, y, min(size, width), min(size, height))
                if box not in seen:
                    seen.add(box)
                    out.append(TileWindow(scale, *box))
    return out


def test_windows_match_the_rule_cover_the_image_and_count_matches_over_random_sizes():
    rng = random.Random(7)
    for _ in range(250):
        width, height = rng.randint(1, 700), rng.randint(1, 700)
        tile = rng.choice([16, 23, 64, 100, 256])
        overlap = rng.choice([0.0, 0.1, 0.25, 0.5, 0.75] + ([0.9] if tile >= 64 else []))
        scales = rng.sample([0.5, 1.0, 1.5, 2.0, 3.0], rng.randint(1, 3))
        scales = [s for s in scales if round(tile * s) >= 16] or [1.0]
        windows = tile_windows(width, height, tile, overlap, scales)
        assert windows == _brute_force(width, height, tile, overlap, scales)
        assert count_tiles(width, height, tile, overlap, scales) == len(windows)
        assert len({w.box for w in windows}) == len(windows)
        for scale in scales:
            cover = np.zeros((height, width), dtype=bool)
            for w in windows:
                assert w.x >= 0 and w.y >= 0 and w.x + w.width <= width and w.y + w.height <= height
                if w.scale == scale:
                    assert (w.width, w.height) == (min(round(tile * scale), width), min(round(tile * scale), height))
                    cover[w.y : w.y + w.height, w.x : w.x + w.width] = True
            kept = any(w.scale == scale for w in windows)
            assert cover.all() or not kept


def test_a_huge_scene_is_counted_and_iterated_lazily():
    # 20,000 px at side 256 and stride 128: starts 0, 128, ..., 19,712 (155 of them) and 19,744: 156 per axis
    assert count_tiles(20_000, 20_000, 256, 0.5, [1.0]) == 156 * 156
    windows = iter_tile_windows(20_000, 20_000, 256, 0.5, [1.0, 2.0])
    assert next(windows) == TileWindow(1.0, 0, 0, 256, 256)
    assert next(windows) == TileWindow(1.0, 128, 0, 256, 256)


@pytest.mark.parametrize(("tile", "overlap", "scales", "message"), [
    (8, 0.5, [1.0], "at least 16"),
    (256.0, 0.5, [1.0], "integer"),
    (256, -0.1, [1.0], "overlap"),
    (256, 0.95, [1.0], "overlap"),
    (256, 1.0, [1.0], "overlap"),
    (256, float("nan"), [1.0], "overlap"),
    (256, 0.5, [], "at least one"),
    (256, 0.5, [0.0], "> 0"),
    (256, 0.5, [-1.0], "> 0"),
    (256, 0.5, [float("inf")], "finite"),
    (256, 0.5, [0.05], "13 px"),
    (256, 0.5, [1.0, 2.0, 1.0], "distinct"),
])
def test_check_tiling_refuses_bad_settings_with_one_line(tile, overlap, scales, message):
    with pytest.raises(ConfigError, match=message) as caught:
        check_tiling(tile, overlap, scales)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError):
        iter_tile_windows(500, 500, tile, overlap, scales)  # refused at the call, before any window
    with pytest.raises(ConfigError):
        count_tiles(500, 500, tile, overlap, scales)


def test_empty_images_are_refused():
    with pytest.raises(ConfigError, match="0 × 5"):
        tile_windows(0, 5, 256, 0.5, [1.0])


# ------------------------------------------------------------------------------------------------ GeoTIFF


def test_geotiff_windows_bounds_and_lonlat(tmp_path):
    data = random_bands(3, 200, 300)
    path = write_tif(tmp_path / "scene.tif", data)
    window = TileWindow(1.0, 64, 32, 128, 96)
    with open_image(path) as source:
        info = source.info
        assert (info.width, info.height, info.band_count, info.dtype) == (300, 200, 3, "uint8")
        assert info.crs == UTM33 and info.bands == (1, 2, 3) and info.stretch is None
        assert info.transform == (PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1])
        np.testing.assert_array_equal(source.read(window), data[:, 32:128, 64:192].transpose(1, 2, 0))
        # x from 500,000 + 64 * 10 to + 192 * 10; y from 5,000,000 - 128 * 10 up to - 32 * 10
        assert source.bounds(window) == (500_640.0, 4_998_720.0, 501_920.0, 4_999_680.0)
        west, south, east, north = source.lonlat_bounds(window)
        expected = transform_bounds(UTM33, "EPSG:4326", 500_640.0, 4_998_720.0, 501_920.0, 4_999_680.0)
        np.testing.assert_allclose((west, south, east, north), expected, rtol=0, atol=1e-9)
        assert 15.0 < west < east < 15.05 and 45.0 < south < north < 45.2  # just east of zone 33's meridian, ~45° N
        assert not source.is_empty(window)
    assert json.loads(json.dumps(info.to_dict()))["transform"] == list(info.transform)


def test_plain_tiff_has_no_georeferencing_and_warns_nothing(tmp_path):
    path = write_tif(tmp_path / "plain.tif", random_bands(3, 40, 50), crs=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_image(path) as source:
            assert source.info.crs is None and source.info.transform is None
            assert source.bounds(whole(50, 40)) is None and source.lonlat_bounds(whole(50, 40)) is None
            assert source.read(whole(50, 40)).shape == (40, 50, 3)


def test_a_window_outside_the_image_is_a_caller_error(tmp_path):
    path = write_tif(tmp_path / "scene.tif", random_bands(3, 40, 50))
    with open_image(path) as source, pytest.raises(ValueError, match="not inside"):
        source.read(TileWindow(1.0, 10, 0, 50, 40))


# ------------------------------------------------------------------------------------------------ bands


def _four_band(tmp_path: Path, interp: tuple[ColorInterp, ...], name: str = "four.tif") -> tuple[Path, np.ndarray]:
    data = random_bands(4, 30, 40, seed=1)
    path = write_tif(tmp_path / name, data)
    with rasterio.open(path, "r+") as ds:
        ds.colorinterp = interp
    return path, data


def test_four_band_default_and_chosen_bands(tmp_path):
    path, data = _four_band(tmp_path, (ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined))
    window = TileWindow(1.0, 5, 3, 20, 10)
    with open_image(path) as source:
        assert source.info.bands == (1, 2, 3) and source.info.band_count == 4
        np.testing.assert_array_equal(source.read(window), data[:3, 3:13, 5:25].transpose(1, 2, 0))
    with open_image(path, bands=(4, 3, 2)) as source:
        assert source.info.bands == (4, 3, 2)
        np.testing.assert_array_equal(source.read(window), data[[3, 2, 1], 3:13, 5:25].transpose(1, 2, 0))
    with open_image(path, bands=[4]) as source:
        assert source.info.bands == (4, 4, 4)
        np.testing.assert_array_equal(source.read(window), np.repeat(data[3, 3:13, 5:25, None], 3, axis=2))


def test_default_bands_follow_the_colour_interpretation(tmp_path):
    path, data = _four_band(tmp_path, (ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.nir))
    with open_image(path) as source:
        assert source.info.bands == (3, 2, 1)
        np.testing.assert_array_equal(source.read(whole(40, 30)), data[[2, 1, 0]].transpose(1, 2, 0))
    path, _ = _four_band(tmp_path, (ColorInterp.alpha, ColorInterp.undefined, ColorInterp.undefined, ColorInterp.undefined),
                         name="alpha_first.tif")
    with open_image(path) as source:
        assert source.info.bands == (2, 3, 4)  # an alpha band is never chosen by default


@pytest.mark.parametrize(("bands", "message"), [((5, 3, 2), "band 5 does not exist; the file has 4 bands"),
                                                ((0,), "band 0 does not exist"),
                                                ((1, 2), "1 or 3 band numbers"),
                                                ((1, 2, 3, 4), "1 or 3 band numbers")])
def test_bad_band_numbers_are_one_line_errors_naming_the_file(tmp_path, bands, message):
    path, _ = _four_band(tmp_path, (ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined))
    with pytest.raises(ConfigError, match=message) as caught:
        open_image(path, bands=bands)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_single_band_is_gray_and_a_palette_is_expanded(tmp_path):
    gray = random_bands(1, 20, 30, seed=2)
    with open_image(write_tif(tmp_path / "gray.tif", gray)) as source:
        assert source.info.bands == (1, 1, 1)
        np.testing.assert_array_equal(source.read(whole(30, 20)), np.repeat(gray[0, :, :, None], 3, axis=2))
    classes = (np.arange(600).reshape(1, 20, 30) % 2).astype(np.uint8)
    path = write_tif(tmp_path / "palette.tif", classes, photometric="palette")
    with rasterio.open(path, "r+") as ds:
        ds.write_colormap(1, {0: (255, 0, 0, 255), 1: (0, 0, 255, 255)})
    with open_image(path) as source:
        rgb = source.read(whole(30, 20))
    np.testing.assert_array_equal(rgb[classes[0] == 0], [[255, 0, 0]] * 300)
    np.testing.assert_array_equal(rgb[classes[0] == 1], [[0, 0, 255]] * 300)


def test_alpha_band_blackens_transparent_pixels_and_empty_windows_are_found(tmp_path):
    data = random_bands(4, 32, 32, seed=3)
    data[:3] |= 1  # no pixel is black by itself
    data[3] = 255
    data[3, :, :16] = 0  # left half transparent
    path = write_tif(tmp_path / "rgba.tif", data, photometric="rgb", alpha="yes")
    with open_image(path) as source:
        assert source.info.bands == (1, 2, 3)
        rgb = source.read(whole(32, 32))
        assert not rgb[:, :16].any()
        np.testing.assert_array_equal(rgb[:, 16:], data[:3, :, 16:].transpose(1, 2, 0))
        assert source.is_empty(TileWindow(1.0, 0, 0, 16, 32))
        assert not source.is_empty(TileWindow(1.0, 1, 0, 16, 32))


def test_nodata_in_every_chosen_band_is_black_and_empty(tmp_path):
    data = random_bands(3, 20, 20, seed=4)
    data[data == 0] = 1
    data[:, :10, :10] = 0            # nodata in every band: invalid
    data[0, 15, 15] = 0              # nodata in one band only: still a valid pixel
    path = write_tif(tmp_path / "nodata.tif", data, nodata=0)
    with open_image(path) as source:
        rgb = source.read(whole(20, 20))
        assert not rgb[:10, :10].any()
        np.testing.assert_array_equal(rgb[15, 15], data[:, 15, 15])
        assert source.is_empty(TileWindow(1.0, 0, 0, 10, 10))
        assert not source.is_empty(TileWindow(1.0, 0, 0, 11, 10))


# ------------------------------------------------------------------------------------------------ stretch


def _expected_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.rint(np.clip((values.astype(np.float64) - low) * 255.0 / (high - low), 0, 255)).astype(np.uint8)


def test_sixteen_bit_stretch_is_per_file_and_per_channel(tmp_path):
    # channel 1: 1000, 1010, ..., 1990; numpy's linear 2nd/98th percentiles of 100 values sit at ranks 1.98 and 97.02
    red = (1000 + 10 * np.arange(100, dtype=np.uint16)).reshape(10, 10)
    green = (red - 1000) * 3   # 0 ... 2970: percentiles 59.4 and 2910.6
    data = np.stack([red, green, red]).astype(np.uint16)
    path = write_tif(tmp_path / "sixteen.tif", data)
    with open_image(path) as source:
        assert source.info.dtype == "uint16"
        np.testing.assert_allclose(source.info.stretch, [(1019.8, 1970.2), (59.4, 2910.6), (1019.8, 1970.2)], atol=1e-9)
        top, bottom = TileWindow(1.0, 0, 0, 10, 5), TileWindow(1.0, 0, 5, 10, 5)
        first, second = source.read(top), source.read(bottom)
    assert first[0, 0].tolist() == [0, 0, 0] and second[-1, -1].tolist() == [255, 255, 255]
    np.testing.assert_array_equal(first[..., 0], _expected_uint8(red[:5], 1019.8, 1970.2))
    np.testing.assert_array_equal(second[..., 1], _expected_uint8(green[5:], 59.4, 2910.6))
    assert second[0, 0, 0] == round((1500 - 1019.8) * 255 / 950.4)  # 1500 in the middle of the lower tile: 129


def test_stretch_ignores_nodata_and_a_given_stretch_is_reused(tmp_path):
    values = (1000 + 10 * np.arange(100, dtype=np.uint16)).reshape(1, 10, 10)
    padded = np.zeros((1, 10, 20), dtype=np.uint16)  # left half nodata
    padded[:, :, 10:] = values
    path = write_tif(tmp_path / "padded.tif", padded, nodata=0)
    with open_image(path) as source:
        stretch = source.info.stretch
        np.testing.assert_allclose(stretch, [(1019.8, 1970.2)] * 3, atol=1e-9)
        assert source.is_empty(TileWindow(1.0, 0, 0, 10, 10)) and not source.is_empty(TileWindow(1.0, 1, 0, 10, 10))
        first = source.read(whole(20, 10))
    with open_image(path, stretch=stretch) as again:
        np.testing.assert_array_equal(again.read(whole(20, 10)), first)
    with open_image(path, stretch=[(0, 2000)] * 3) as other:  # a given stretch wins
        assert other.info.stretch == ((0.0, 2000.0),) * 3
        assert other.read(TileWindow(1.0, 10, 0, 1, 1))[0, 0, 0] == round(1000 * 255 / 2000)
    with pytest.raises(ConfigError, match="three"):
        open_image(path, stretch=[(0, 1)])
    with pytest.raises(ConfigError, match="uint8 data is used as is"):
        open_image(write_tif(tmp_path / "bytes.tif", random_bands(3, 4, 4)), stretch=[(0, 1)] * 3)


def test_float_nan_pixels_are_invalid(tmp_path):
    data = np.linspace(0.0, 1.0, 3 * 16 * 16, dtype=np.float32).reshape(3, 16, 16)
    data[:, :8, :8] = np.nan
    with open_image(write_tif(tmp_path / "float.tif", data)) as source:
        assert source.info.dtype == "float32" and all(np.isfinite(source.info.stretch).flat)
        assert not source.read(whole(16, 16))[:8, :8].any()
        assert source.is_empty(TileWindow(1.0, 0, 0, 8, 8)) and not source.is_empty(TileWindow(1.0, 0, 0, 9, 8))


def test_large_files_are_stretched_from_a_decimated_read(tmp_path):
    assert sample_shape(300, 200) == (200, 300)
    assert sample_shape(4096, 2048) == (512, 1024)
    ramp = np.broadcast_to(np.arange(4096, dtype=np.uint16) * 10, (2048, 4096))[None]
    path = tmp_path / "ramp.tif"
    with rasterio.open(path, "w", driver="GTiff", width=4096, height=2048, count=1, dtype="uint16", crs=UTM33,
                       transform=NORTH_UP, tiled=True, blockxsize=256, blockysize=256) as ds:
        for y in range(0, 2048, 512):
            ds.write(np.ascontiguousarray(ramp[:, y : y + 512]), window=Window(0, y, 4096, 512))
    tracemalloc.start()
    try:
        with open_image(path) as source:
            _, peak = tracemalloc.get_traced_memory()
            stretch = source.info.stretch
    finally:
        tracemalloc.stop()
    full = np.percentile(ramp[0, 0], [2, 98])
    np.testing.assert_allclose(stretch[0], full, atol=40)  # every fourth column of a 10-per-column ramp
    assert peak < ramp.nbytes / 4, f"opening allocated {peak} bytes for a {ramp.nbytes}-byte raster"


# ------------------------------------------------------------------------------------------------ pictures


def test_pictures_read_as_rsitr_reads_dataset_images(tmp_path):
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "chip.jpg", quality=90)
    Image.fromarray(rgb).save(tmp_path / "chip.webp", lossless=True)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    sixteen = (rng.integers(0, 4000, (24, 32)) + 100).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    for name in ("chip.jpg", "chip.webp", "gray.png", "sixteen.png"):
        with open_image(tmp_path / name) as source:
            assert (source.info.width, source.info.height, source.info.crs) == (32, 24, None)
            pixels = source.read(whole(32, 24))
            assert pixels.dtype == np.uint8 and pixels.shape == (24, 32, 3)
            np.testing.assert_array_equal(pixels, np.asarray(read_image(tmp_path / name)))
            np.testing.assert_array_equal(source.read(TileWindow(1.0, 3, 4, 10, 8)), pixels[4:12, 3:13])
    with open_image(tmp_path / "chip.webp") as source:
        np.testing.assert_array_equal(source.read(whole(32, 24)), rgb)  # lossless: the very pixels
    with open_image(tmp_path / "gray.png") as source:
        assert source.info.bands == (1, 1, 1) and source.info.band_count == 1
        np.testing.assert_array_equal(source.read(whole(32, 24)), np.repeat(rgb[..., :1], 3, axis=2))
    with open_image(tmp_path / "sixteen.png") as source:
        assert source.info.dtype == "uint16"
        assert source.info.stretch == ((float(sixteen.min()), float(sixteen.max())),) * 3


def test_transparent_png_pixels_are_black_and_empty(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, 8:, 3] = 255  # right half opaque, left half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    with open_image(tmp_path / "alpha.png") as source:
        assert source.info.band_count == 4 and source.info.bands == (1, 2, 3)
        pixels = source.read(whole(16, 16))
        assert not pixels[:, :8].any() and (pixels[:, 8:] == (200, 100, 50)).all()
        assert source.is_empty(TileWindow(1.0, 0, 0, 8, 16)) and not source.is_empty(TileWindow(1.0, 0, 0, 9, 16))


def test_bands_are_refused_for_pictures(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "chip.png")
    with pytest.raises(ConfigError, match="chip.png: band selection applies to GeoTIFF"):
        open_image(tmp_path / "chip.png", bands=(1, 2, 3))


# ------------------------------------------------------------------------------------------------ thumbnails


def test_thumbnails_keep_the_aspect_and_agree_between_back_ends(tmp_path):
    y, x = np.mgrid[0:150, 0:300]
    smooth = np.stack([x * 255 // 299, y * 255 // 149, np.full_like(x, 77)]).astype(np.uint8)
    tif = write_tif(tmp_path / "smooth.tif", smooth)
    Image.fromarray(smooth.transpose(1, 2, 0)).save(tmp_path / "smooth.png")
    window = TileWindow(1.0, 0, 0, 300, 150)
    with open_image(tif) as raster, open_image(tmp_path / "smooth.png") as picture:
        a, b = raster.thumbnail(window, 64), picture.thumbnail(window, 64)
        assert a.shape == b.shape == (32, 64, 3) and a.dtype == b.dtype == np.uint8
        assert raster.thumbnail(TileWindow(1.0, 0, 0, 50, 150), 30).shape == (30, 10, 3)
        assert picture.thumbnail(TileWindow(1.0, 0, 0, 20, 10), 40).shape == (20, 40, 3)  # enlarged to the side
    assert (a[..., 2] == 77).all() and (b[..., 2] == 77).all()
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3


# ------------------------------------------------------------------------------------------------ errors


def test_truncated_jpeg_is_an_image_read_error(tmp_path):
    Image.fromarray(random_bands(1, 64, 64)[0]).convert("RGB").save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpg: cannot decode image") as caught:
        open_image(tmp_path / "cut.jpg")
    assert "\n" not in str(caught.value)


def test_truncated_geotiff_fails_on_the_read_that_hits_the_damage(tmp_path):
    data = random_bands(3, 512, 512, seed=6)
    path = write_tif(tmp_path / "whole.tif", data, tiled=True, blockxsize=256, blockysize=256)
    raw = path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(raw[: len(raw) // 2])
    with open_image(cut) as source:
        np.testing.assert_array_equal(source.read(TileWindow(1.0, 0, 0, 256, 256)), data[:, :256, :256].transpose(1, 2, 0))
        with pytest.raises(ImageReadError, match=r"cut.tif: damaged or truncated raster: reading window \(256, 256") as caught:
            source.read(TileWindow(1.0, 256, 256, 256, 256))
    assert "\n" not in str(caught.value)
    (tmp_path / "stub.tif").write_bytes(raw[:200])
    with pytest.raises(ImageReadError, match="stub.tif: cannot open raster"):
        open_image(tmp_path / "stub.tif")


def test_missing_unsupported_and_garbage_files(tmp_path):
    with pytest.raises(ImageReadError, match="nowhere.tif: image file not found"):
        open_image(tmp_path / "nowhere.tif")
    (tmp_path / "scan.bmp").write_bytes(b"BM")
    with pytest.raises(ImageReadError, match="unsupported image type '.bmp'"):
        open_image(tmp_path / "scan.bmp")
    (tmp_path / "notes.tif").write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.tif: cannot open raster"):
        open_image(tmp_path / "notes.tif")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png: cannot decode image"):
        open_image(tmp_path / "notes.png")
    assert is_supported(Path("a/B.TIF")) and is_supported(Path("x.webp")) and not is_supported(Path("x.bmp"))


# ------------------------------------------------------------------------------------------------ memory


def test_windows_of_a_big_tiled_raster_are_read_in_bounded_memory(tmp_path):
    side, block = 8192, 1024
    path = tmp_path / "big.tif"
    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs=UTM33,
                       transform=NORTH_UP, tiled=True, blockxsize=256, blockysize=256) as ds:
        rows, cols = np.mgrid[0:block, 0:block]
        for y in range(0, side, block):
            for x in range(0, side, block):
                pattern = np.stack([(rows + y) % 251, (cols + x) % 253, (rows + cols + x + y) % 256]).astype(np.uint8)
                ds.write(pattern, window=Window(x, y, block, block))
    raw_bytes = 3 * side * side
    windows = [TileWindow(1.0, 0, 0, 256, 256), TileWindow(1.0, side - 300, side - 200, 300, 200),
               TileWindow(1.0, 3000, 5000, 512, 512)]
    tracemalloc.start()
    try:
        with open_image(path) as source:
            tiles = [source.read(w) for w in windows]
            preview = source.thumbnail(whole(side, side), 128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        path.unlink()
    assert peak < raw_bytes / 64, f"reading windows allocated {peak} bytes of a {raw_bytes}-byte raster"
    w = windows[1]
    rows, cols = np.mgrid[w.y : w.y + w.height, w.x : w.x + w.width]
    expected = np.stack([rows % 251, cols % 253, (rows + cols) % 256], axis=-1).astype(np.uint8)
    np.testing.assert_array_equal(tiles[1], expected)
    assert tiles[2].shape == (512, 512, 3) and preview.shape == (128, 128, 3)
