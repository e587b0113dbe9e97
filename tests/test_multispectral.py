"""Multispectral TIFF datasets: 4-band 8- and 16-bit chips read through the raster reader, with --bands.

The datasets here are real files in the Karpathy layout (a json beside ``imgs/``), written with
rasterio as a multispectral sensor's chips are: four bands, photometric "minisblack" (GDAL's own
default for four 8-bit bands is RGB + alpha, which is not a multispectral layout), so no band says
it is red, green or blue and the default is bands 1-3.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

from helpers import random_bundle
from rsitr.bundle import load_model
from rsitr.data import load_dataset
from rsitr.data.images import read_image, tiff_bands
from rsitr.data.rasters import needs_raster_reader
from rsitr.errors import ConfigError
from rsitr.features import FeatureSpec, extract_features
from rsitr_cli.main import build_parser, main

SIDE = 32
IMAGES = 4


def chip(seed: int, dtype: type) -> np.ndarray:
    """(4, SIDE, SIDE) seeded blocks, every band different (uint16 values spread over 300..40,000)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, SIDE // 4, SIDE // 4))
    data = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    return (data * 155 + 300).astype(np.uint16) if dtype == np.uint16 else data.astype(np.uint8)


def write_multispectral(path: Path, data: np.ndarray, crs: str | None = "EPSG:32633") -> Path:
    """(bands, h, w) ``data`` as a photometric-minisblack GeoTIFF (north-up, 10 m pixels), or with crs None a plain TIFF."""
    count, height, width = data.shape
    georef = {"crs": crs, "transform": Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0)} if crs else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a plain TIFF on purpose
        with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name,
                           photometric="MINISBLACK", **georef) as out:
            out.write(data)
    return path


def write_dataset(root: Path, dtype: type, suffix: str = ".tif") -> Path:
    """A Karpathy json and ``imgs/`` of IMAGES 4-band chips (train, val, test); returns the json."""
    (root / "imgs").mkdir(parents=True)
    entries = []
    for k in range(IMAGES):
        name = f"chip{k}{suffix}"
        write_multispectral(root / "imgs" / name, chip(k, dtype), crs="EPSG:32633" if k % 2 else None)
        sentences = [{"raw": f"field number {k} near a road", "tokens": ["field", "number", str(k), "near", "a", "road"]}]
        entries.append({"filename": name, "split": ("train", "train", "val", "test")[k], "sentences": sentences})
    path = root / "dataset_ms.json"
    path.write_text(json.dumps({"images": entries}), encoding="utf-8")
    return path


def small_spec(bands: tuple[int, ...] | None = None) -> FeatureSpec:
    return FeatureSpec(backbone="resnet18", image_size=SIDE, num_regions=4, precision="fp32", bands=bands)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_four_band_tiffs_of_a_dataset_extract_features(tmp_path: Path, dtype: type) -> None:
    dataset = load_dataset(write_dataset(tmp_path, dtype))
    path = dataset.image_path(0)
    assert needs_raster_reader(path)
    data = chip(0, dtype)
    pixels = np.asarray(read_image(path))
    assert pixels.shape == (SIDE, SIDE, 3) and pixels.dtype == np.uint8
    if dtype == np.uint8:  # used as is: bands 1-3 by default (no colour interpretation in the file)
        np.testing.assert_array_equal(pixels, data[:3].transpose(1, 2, 0))
    else:  # stretched per band: the 2nd percentile to 0 and the 98th to 255
        for channel in range(3):
            low, high = np.percentile(data[channel], (2, 98))
            assert pixels[..., channel][data[channel] <= low].max() == 0
            assert pixels[..., channel][data[channel] >= high].min() == 255
    features = extract_features(dataset, small_spec(), cache_dir=None, progress=False)
    assert features.num_images == IMAGES
    assert bool(torch.isfinite(features.level4).all()) and float(features.level4.abs().sum()) > 0


def test_the_16_bit_stretch_against_hand_computed_values(tmp_path: Path) -> None:
    """101 values 0..100: numpy's 2nd and 98th percentiles are 2 and 98, so v maps to round((v - 2) * 255 / 96)."""
    ramp = np.arange(101, dtype=np.uint16).reshape(1, 101)
    data = np.stack([ramp, ramp, ramp, ramp[:, ::-1]])
    path = write_multispectral(tmp_path / "ramp.tif", data, crs=None)
    red = np.asarray(read_image(path))[0, :, 0]
    assert [int(red[v]) for v in (0, 2, 26, 50, 98, 100)] == [0, 0, 64, 128, 255, 255]
    near_infrared = np.asarray(read_image(path, (4, 3, 2)))[0, :, 0]  # band 4 is the ramp reversed
    assert [int(near_infrared[v]) for v in (0, 50, 74, 100)] == [255, 128, 64, 0]


def test_plain_rgb_tiffs_and_pictures_keep_pil(tmp_path: Path) -> None:
    """8-bit RGB and RGBA TIFFs (UCM, RSITMD, Sydney) are read by PIL as before; so are pictures."""
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "rgb.tif")
    Image.new("RGBA", (8, 8), (1, 2, 3, 255)).save(tmp_path / "rgba.tif")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "rgb.png")
    assert not any(needs_raster_reader(tmp_path / name) for name in ("rgb.tif", "rgba.tif", "rgb.png"))
    assert needs_raster_reader(write_multispectral(tmp_path / "deep.tif", np.ones((1, 8, 8), np.uint16), crs=None))
    rgbn = chip(5, np.uint8)  # red, green, blue and an unspecified 4th band (near-infrared), as aerial RGBN products
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp_path / "rgbn.tif", "w", driver="GTiff", width=SIDE, height=SIDE, count=4, dtype="uint8",
                           photometric="RGB", alpha="UNSPECIFIED") as out:
            out.write(rgbn)
    assert needs_raster_reader(tmp_path / "rgbn.tif")  # PIL would read it as RGBX; here the same default bands 1-3
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "rgbn.tif")), rgbn[:3].transpose(1, 2, 0))
    assert tiff_bands(tmp_path / "rgb.png", [4, 3, 2]) is None and tiff_bands(tmp_path / "x.TIF", (4, 3, 2)) == [4, 3, 2]


def test_bands_change_the_features_and_the_cache_key(tmp_path: Path) -> None:
    dataset = load_dataset(write_dataset(tmp_path / "data", np.uint8))
    cache = tmp_path / "cache"
    default, natural, false_colour = small_spec(), small_spec((1, 2, 3)), small_spec((4, 3, 2))
    assert len({default.cache_key(dataset), natural.cache_key(dataset), false_colour.cache_key(dataset)}) == 3
    first = extract_features(dataset, natural, cache, progress=False)
    other = extract_features(dataset, false_colour, cache, progress=False)
    assert sorted(p.name for p in cache.glob("*.safetensors")) == sorted(
        {natural.cache_path(dataset, cache).name, false_colour.cache_path(dataset, cache).name})
    assert not torch.allclose(first.level4, other.level4)
    again = extract_features(dataset, false_colour, cache, progress=False)  # from the cache, the same features
    torch.testing.assert_close(again.level4, other.level4)
    same_pixels = extract_features(dataset, default, None, progress=False)  # no colour interpretation: 1-3
    torch.testing.assert_close(same_pixels.level4, first.level4)


def test_a_missing_band_is_one_line_naming_the_file(tmp_path: Path, capsys) -> None:
    json_path = write_dataset(tmp_path / "data", np.uint16)
    dataset = load_dataset(json_path)
    with pytest.raises(ConfigError, match=r"chip0\.tif: band 5 does not exist; the file has 4 bands"):
        read_image(dataset.image_path(0), (5, 3, 2))
    code = main(["features", str(json_path), "--bands", "5,3,2", "--backbone", "resnet18", "--image-size", str(SIDE),
                 "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "chip0.tif: band 5 does not exist" in err
    with pytest.raises(ConfigError, match=r"must be three 1-based band numbers"):
        small_spec((4, 3))


def test_bands_for_a_picture_dataset_name_the_file(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "chip.png")
    with pytest.raises(ConfigError, match=r"chip\.png: band selection applies to GeoTIFF/TIFF files only"):
        read_image(tmp_path / "chip.png", (4, 3, 2))


def test_run_config_and_cli_carry_the_bands() -> None:
    from rsitr.models import get_model_spec
    from rsitr_cli.main import _train_overrides
    from rsitr_train.config import load_config
    from rsitr_train.trainer import feature_spec

    args = build_parser().parse_args(["train", "--bands", "4,3,2", "--out", "run"])
    config = load_config(None, _train_overrides(args))
    assert config.features.bands == [4, 3, 2]
    assert feature_spec(config, get_model_spec("dove-s")).bands == (4, 3, 2)
    assert load_config(None, ["features.bands=4,3,2"]).features.bands == [4, 3, 2]
    assert load_config(None, []).features.bands is None
    for wrong in ("[0,1,2]", "[1,2]", "[1.5,2,3]", "red"):
        with pytest.raises(ConfigError, match="features.bands must be"):
            load_config(None, [f"features.bands={wrong}"])


def test_a_bundle_keeps_its_bands_and_reads_tiffs_with_them(tmp_path: Path) -> None:
    bundle = random_bundle(tmp_path / "plain", image_size=SIDE)
    bundle.feature_spec = dataclasses.replace(bundle.feature_spec, bands=(4, 3, 2))
    manifest = json.loads(bundle.save(tmp_path / "bundle").read_text(encoding="utf-8"))
    assert manifest["features"]["bands"] == [4, 3, 2] and manifest["preprocessing"]["bands"] == [4, 3, 2]
    loaded = load_model(tmp_path / "bundle")
    assert loaded.feature_spec.bands == (4, 3, 2)
    path = write_multispectral(tmp_path / "scene.tif", chip(7, np.uint16), crs=None)
    by_path = loaded.image_features([path])
    chosen = loaded.image_features([np.asarray(read_image(path, (4, 3, 2)))])
    natural = loaded.image_features([np.asarray(read_image(path))])
    torch.testing.assert_close(by_path["level4"], chosen["level4"])
    assert not torch.allclose(by_path["level4"], natural["level4"])


def test_an_index_reads_tiffs_with_the_bands_its_model_was_trained_on(tmp_path: Path) -> None:
    from rsitr_serve.indexer import build_index, index_info

    bundle = random_bundle(tmp_path / "plain", image_size=SIDE)
    bundle.feature_spec = dataclasses.replace(bundle.feature_spec, bands=(4, 3, 2))
    bundle.save(tmp_path / "bundle")
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    write_multispectral(scenes / "scene.tif", chip(3, np.uint8))
    build_index([scenes], tmp_path / "bundle", tmp_path / "index", tile=SIDE, progress=False)
    assert index_info(tmp_path / "index")["settings"]["bands"] == [4, 3, 2]
    build_index([scenes], tmp_path / "bundle", tmp_path / "given", tile=SIDE, bands=[1, 2, 3], progress=False)
    assert index_info(tmp_path / "given")["settings"]["bands"] == [1, 2, 3]  # --bands still wins
