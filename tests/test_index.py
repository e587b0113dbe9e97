"""Indexing a user's imagery and searching it: real formats, incremental updates, interruptions, two stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import random_bundle, texture, write_geotiff
from rsitr.errors import ConfigError, DatasetError
from rsitr_cli.main import main
from rsitr_serve.catalog import CATALOG_FILE, SHARD_DIR, Catalog
from rsitr_serve.indexer import add_to_index, build_index, index_info, remove_from_index, stage_vectors_of
from rsitr_serve.search import TileSearcher
from rsitr_serve.tiling import count_tiles

pytestmark = [pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning"),
              pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")]

TILE = 48


def write_picture(path: Path, data: np.ndarray, mode: str | None = None) -> Path:
    array = np.moveaxis(data, 0, -1)
    Image.fromarray(array[..., 0] if mode == "L" else array).save(path)
    return path


@pytest.fixture(scope="module")
def imagery(tmp_path_factory) -> dict[str, Path]:
    """A folder of scenes in every supported format, and a model bundle."""
    root = tmp_path_factory.mktemp("imagery")
    scenes = root / "scenes"
    (scenes / "chips").mkdir(parents=True)
    write_geotiff(scenes / "scene_utm.tif", texture(100, 150, seed=1))
    write_geotiff(scenes / "plain.tiff", texture(60, 70, seed=2), crs=None)
    write_geotiff(scenes / "scene16.tif", texture(64, 96, seed=3, dtype=np.uint16))
    write_geotiff(scenes / "four_band.tif", texture(50, 50, seed=4, channels=4))
    write_picture(scenes / "chips" / "a.png", texture(40, 40, seed=5))
    write_picture(scenes / "chips" / "b.jpg", texture(48, 48, seed=6))
    write_picture(scenes / "chips" / "c.webp", texture(56, 44, seed=7))
    write_picture(scenes / "chips" / "gray.png", texture(30, 30, seed=8, channels=1), mode="L")
    (scenes / "notes.txt").write_text("not an image")
    model = root / "model"
    random_bundle(model, seed=0)
    other = root / "other_model"
    random_bundle(other, seed=1)
    return {"root": root, "scenes": scenes, "model": model, "other": other}


@pytest.fixture(scope="module")
def built(imagery) -> dict:
    out = imagery["root"] / "index"
    summary = build_index([imagery["scenes"]], imagery["model"], out, tile=TILE, overlap=0.5, shard_size=16,
                          progress=False)
    return {"out": out, "summary": summary}


def _files(index: Path) -> dict[str, dict]:
    with Catalog(index) as catalog:
        return {Path(f.path).name: f for f in catalog.files()}


def _tile_rows(index: Path) -> list[tuple]:
    with Catalog(index) as catalog:
        return catalog.dump()["tiles"]


def test_build_indexes_every_format_with_the_tiling_rule(imagery, built) -> None:
    files = _files(built["out"])
    assert sorted(files) == sorted(["scene_utm.tif", "plain.tiff", "scene16.tif", "four_band.tif", "a.png", "b.jpg",
                                    "c.webp", "gray.png"])
    assert all(f.complete for f in files.values())
    assert not list(built["out"].glob(f"{CATALOG_FILE}-*"))  # no write-ahead log left: opens from a read-only folder
    tiles = _tile_rows(built["out"])
    per_file = {name: sum(1 for t in tiles if t[1] == f.id) for name, f in files.items()}
    for name, record in files.items():
        assert per_file[name] == count_tiles(record.width, record.height, TILE, 0.5, (1.0,)), name
    assert per_file["gray.png"] == 1  # smaller than a tile: indexed whole
    assert built["summary"].tiles_encoded == len(tiles) and not built["summary"].skipped
    assert files["scene16.tif"].info["stretch"] is not None and files["scene_utm.tif"].info["stretch"] is None
    assert files["scene_utm.tif"].crs == "EPSG:32633" and files["plain.tiff"].crs is None


def test_tiles_carry_bounds_in_the_crs_and_in_lonlat(imagery, built) -> None:
    files = _files(built["out"])
    with TileSearcher(built["out"]) as searcher:
        rows = searcher.catalog.tiles([t[0] for t in _tile_rows(built["out"])])
    utm = [r for r in rows.values() if Path(r["path"]).name == "scene_utm.tif"]
    for row in utm:  # from_origin(500000, 5000000, 0.5, 0.5): x grows east, y grows south
        assert row["minx"] == pytest.approx(500_000 + 0.5 * row["x"])
        assert row["maxx"] == pytest.approx(500_000 + 0.5 * (row["x"] + row["width"]))
        assert row["maxy"] == pytest.approx(5_000_000 - 0.5 * row["y"])
        assert row["miny"] == pytest.approx(5_000_000 - 0.5 * (row["y"] + row["height"]))
        # UTM zone 33N, easting 500 km is its central meridian, 15° E; 5000 km north is about 45° N
        assert 14.99 < row["west"] < row["east"] < 15.01 and 45.0 < row["south"] < row["north"] < 45.2
    plain = [r for r in rows.values() if Path(r["path"]).name == "plain.tiff"]
    assert plain and all(r["minx"] is None and r["west"] is None for r in plain)
    assert files["four_band.tif"].info["bands"] == [1, 2, 3]


def test_bands_pick_source_bands_of_rasters_and_leave_pictures_rgb(imagery, tmp_path) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    data = texture(48, 48, seed=61, channels=4)
    write_geotiff(scenes / "rgbn.tif", data)
    write_geotiff(scenes / "rgb.tif", texture(48, 48, seed=62))
    write_picture(scenes / "chip.png", texture(48, 48, seed=63))
    summary = build_index([scenes], imagery["model"], tmp_path / "index", tile=TILE, bands=[4, 3, 2], progress=False)
    files = _files(tmp_path / "index")
    assert sorted(files) == ["chip.png", "rgbn.tif"]  # the 3-band file has no band 4
    assert files["rgbn.tif"].info["bands"] == [4, 3, 2]
    assert len(summary.skipped) == 1 and "rgb.tif" in summary.skipped[0]
    with TileSearcher(tmp_path / "index") as searcher:
        own = searcher.search_image(np.ascontiguousarray(np.moveaxis(data[[3, 2, 1]], 0, -1)), k=1)
    assert Path(own[0].file).name == "rgbn.tif" and own[0].score == pytest.approx(1.0, abs=1e-4)


def test_rebuilding_the_same_folder_encodes_nothing(imagery, built) -> None:
    before = _tile_rows(built["out"])
    again = build_index([imagery["scenes"]], imagery["model"], built["out"], tile=TILE, overlap=0.5, shard_size=16,
                        progress=False)
    assert again.tiles_encoded == 0 and again.files_unchanged == 8
    assert _tile_rows(built["out"]) == before


def test_an_index_refuses_another_model_or_other_settings(imagery, built) -> None:
    with pytest.raises(ConfigError, match="not the model this index was built with"):
        TileSearcher(built["out"], model_dir=imagery["other"])
    with pytest.raises(ConfigError, match="built with model"):
        build_index([imagery["scenes"]], imagery["other"], built["out"], tile=TILE, progress=False)
    with pytest.raises(ConfigError, match="tile"):
        build_index([imagery["scenes"]], imagery["model"], built["out"], tile=TILE * 2, progress=False)


def test_two_stage_equals_exhaustive_scoring_when_the_depth_covers_the_index(built) -> None:
    with TileSearcher(built["out"]) as searcher:
        n = len(searcher)
        for text in ("green trees beside a road", "many cars in a parking lot"):
            two_stage = searcher.search_text(text, k=n, rerank=n)
            exhaustive = searcher.exhaustive_text(text, k=n)
            assert [r.tile_id for r in two_stage] == [r.tile_id for r in exhaustive]
            assert np.allclose([r.score for r in two_stage], [r.score for r in exhaustive], atol=1e-6)
            shallow = searcher.search_text(text, k=5, rerank=10)
            first = searcher.search_text(text, k=10, rerank=0)
            # the shallow result re-ranks exactly the first stage's top 10
            assert {r.tile_id for r in shallow} <= {r.tile_id for r in first}
            assert [r.score for r in shallow] == sorted((r.score for r in shallow), reverse=True)


def test_image_query_finds_its_own_tile_first(imagery, built, tmp_path) -> None:
    with TileSearcher(built["out"]) as searcher:
        for name, window in (("scene_utm.tif", (48, 24)), ("b.jpg", (0, 0))):
            source_rows = [r for r in searcher.catalog.tiles([t[0] for t in _tile_rows(built["out"])]).values()
                           if Path(r["path"]).name == name and (r["x"], r["y"]) == window]
            (row,) = source_rows
            from rsitr.data.rasters import TileWindow, open_image

            with open_image(row["path"]) as source:
                pixels = source.read(TileWindow(1.0, row["x"], row["y"], row["width"], row["height"]))
            query = tmp_path / f"query_{name}.png"
            Image.fromarray(pixels).save(query)
            results = searcher.search_image(query, k=3)
            assert results[0].tile_id == row["id"]
            assert results[0].score == pytest.approx(1.0, abs=1e-4)
            assert results[1].score < results[0].score


def test_captions_are_ranked_for_an_image_by_the_full_score(imagery, built) -> None:
    captions = ["green trees beside a road", "many cars in a parking lot", "a river with bare land"]
    image = imagery["scenes"] / "chips" / "a.png"
    with TileSearcher(built["out"]) as searcher:
        ranked = searcher.rank_captions(image, captions)
        model = searcher.encoders.model
        expected = model.score(model.encode_images([image]), model.encode_texts(captions))[0]
    assert [c for c, _ in ranked] == [captions[i] for i in torch.argsort(expected, descending=True, stable=True)]


def test_a_query_without_known_words_says_so(built) -> None:
    with TileSearcher(built["out"]) as searcher, pytest.raises(ConfigError, match="no word of the query"):
        searcher.search_text("zzyzx qwerty")


def test_add_encodes_only_new_or_changed_files_and_remove_drops_them(imagery, tmp_path) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    write_geotiff(scenes / "one.tif", texture(96, 96, seed=11))
    write_picture(scenes / "two.png", texture(48, 96, seed=12))
    index = tmp_path / "index"
    build_index([scenes], imagery["model"], index, tile=TILE, progress=False)
    first = {name: f.id for name, f in _files(index).items()}
    write_picture(scenes / "three.png", texture(48, 48, seed=13))
    write_picture(scenes / "two.png", texture(48, 96, seed=14))  # changed content
    summary = add_to_index(index, [scenes], progress=False)
    assert summary.files_unchanged == 1 and summary.files_replaced == 1 and summary.files_encoded == 2
    files = _files(index)
    assert files["one.tif"].id == first["one.tif"] and files["two.png"].id != first["two.png"]
    assert summary.tiles_encoded == count_tiles(48, 96, TILE, 0.5, (1.0,)) + 1
    removed_files, removed_tiles = remove_from_index(index, [scenes / "two.png"], progress=False)
    assert removed_files == 1 and removed_tiles == count_tiles(48, 96, TILE, 0.5, (1.0,))
    gone = files["two.png"].id
    with TileSearcher(index) as searcher:
        assert len(searcher) == len(_tile_rows(index))
        hits = searcher.search_text("a road", k=len(searcher), rerank=0)
        assert len(hits) == len(searcher) and all(Path(h.file).name != "two.png" for h in hits)
    assert all(row[1] != gone for row in _tile_rows(index))
    info = index_info(index)
    assert info["ready"] and info["files"] == 2


def test_a_pairwise_model_without_a_separable_pair_takes_another_first_stage(imagery, tmp_path) -> None:
    scan = tmp_path / "scan"
    random_bundle(scan, model="scan-t2i", backbone="resnet18", embed_dim=32, word_dim=16)
    chips = imagery["scenes"] / "chips"
    with pytest.raises(ConfigError, match="no separable first stage"):
        build_index([chips], scan, tmp_path / "refused", tile=TILE, progress=False)
    index = tmp_path / "index"
    build_index([chips], scan, index, first_stage_dir=imagery["model"], tile=TILE, progress=False)
    shard = load_file(str(next((index / SHARD_DIR).glob("shard-*"))))
    assert "stage.global" in shard and any(key.startswith("enc.") for key in shard)
    with TileSearcher(index) as searcher:
        assert searcher.settings.first_stage["name"] == "dove-s"
        n = len(searcher)
        two_stage = searcher.search_text("green trees beside a road", k=n, rerank=n)
        exhaustive = searcher.exhaustive_text("green trees beside a road", k=n)
        assert [r.tile_id for r in two_stage] == [r.tile_id for r in exhaustive]
        first = searcher.search_text("green trees beside a road", k=n, rerank=0)
        dove = searcher.encoders.stage
        expected = dove.first_stage_texts(dove.encode_texts(["green trees beside a road"]))
        stored = stage_vectors_of(index, searcher.catalog, searcher.settings, np.array([first[0].tile_id]))
        assert first[0].score == pytest.approx(float(expected[0] @ torch.from_numpy(stored[0])), abs=1e-5)


def test_unreadable_files_are_skipped_with_a_warning_and_counted(imagery, tmp_path) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    write_picture(scenes / "good.png", texture(48, 48, seed=21))
    jpeg = write_picture(scenes / "cut.jpg", texture(200, 200, seed=22))
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 3])
    tiff = write_geotiff(scenes / "cut.tif", texture(200, 200, seed=23))
    tiff.write_bytes(tiff.read_bytes()[: tiff.stat().st_size // 2])
    (scenes / "empty.png").write_bytes(b"")
    index = tmp_path / "index"
    summary = build_index([scenes, tmp_path / "missing"], imagery["model"], index, tile=TILE, progress=False)
    names = sorted(Path(line.split(":")[0]).name for line in summary.skipped)
    assert names == ["cut.jpg", "cut.tif", "empty.png", "missing"]
    assert all("\n" not in line for line in summary.skipped)
    files = _files(index)
    assert sorted(files) == ["good.png"]
    assert index_info(index)["ready"]


def test_search_refuses_an_index_whose_vectors_lag_behind(imagery, tmp_path) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    write_picture(scenes / "good.png", texture(48, 48, seed=31))
    index = tmp_path / "index"
    build_index([scenes], imagery["model"], index, tile=TILE, progress=False)
    with Catalog(index, writable=True) as catalog, catalog.transaction():
        pass  # a committed change the vectors have not seen, as after a kill before the sync
    with pytest.raises(DatasetError, match="interrupted"):
        TileSearcher(index)
    build_index([scenes], imagery["model"], index, tile=TILE, progress=False)  # the same command again
    with TileSearcher(index) as searcher:
        assert len(searcher) == 1


def test_cli_build_search_json_html_info(imagery, built, tmp_path, capsys) -> None:
    out_json, out_html = tmp_path / "hits.json", tmp_path / "hits.html"
    assert main(["search", str(built["out"]), "green trees near a river", "-k", "4", "--rerank", "8",
                 "--json", str(out_json), "--html", str(out_html), "--quiet"]) == 0
    hits = json.loads(out_json.read_text())
    assert len(hits) == 4 and {"file", "window", "bounds", "score"} <= set(hits[0])
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    page = out_html.read_text()
    assert page.count("<img") == 4 and "data:image/jpeg;base64," in page
    assert main(["index", "info", str(built["out"])]) == 0
    assert "ready to search" in capsys.readouterr().out
    assert main(["search", str(built["out"]), "a road", "--model", str(imagery["other"])]) == 2
    assert "not the model this index was built with" in capsys.readouterr().err
    captions = tmp_path / "captions.txt"
    captions.write_text("green trees\nmany cars in a parking lot\n")
    assert main(["search", str(built["out"]), "--image", str(imagery["scenes"] / "chips" / "a.png"),
                 "--captions", str(captions)]) == 0


# ----------------------------------------------------------------------------------- kill -9


def _build_command(scenes: Path, model: Path, index: Path) -> list[str]:
    return [sys.executable, "-m", "rsitr_cli", "index", "build", str(scenes), "--model", str(model), "--out", str(index),
            "--tile", str(TILE), "--shard-size", "4", "--batch-size", "3", "--quiet"]


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _kill_when(command: list[str], index: Path, shards: int) -> None:
    """Start a build and kill -9 it once ``shards`` shards are committed (or at once if it is that far)."""
    process = subprocess.Popen(command, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while process.poll() is None and time.monotonic() < deadline:
            committed = len(list((index / SHARD_DIR).glob("shard-*"))) if (index / SHARD_DIR).is_dir() else 0
            if committed >= shards:
                break
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()


def _snapshot(index: Path) -> dict:
    with Catalog(index) as catalog:
        dump = catalog.dump()
    shards = {p.name: {k: v.clone() for k, v in load_file(str(p)).items()} for p in sorted((index / SHARD_DIR).glob("*"))}
    with TileSearcher(index) as searcher:
        hits = [(r.tile_id, r.score) for r in searcher.search_text("green trees beside a road", k=10, rerank=20)]
    return {"dump": dump, "shards": shards, "hits": hits}


@pytest.mark.slow  # three fresh interpreters, each importing torch and the model
def test_kill_9_at_any_moment_then_the_same_command_gives_the_same_index(imagery, tmp_path) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    write_geotiff(scenes / "big.tif", texture(160, 200, seed=41))  # more tiles than a shard: chunked alone
    for k in range(6):
        write_picture(scenes / f"chip{k}.png", texture(48 + 8 * (k % 2), 48, seed=50 + k))
    reference = tmp_path / "reference"
    subprocess.run(_build_command(scenes, imagery["model"], reference), env=_environment(), check=True,
                   stdout=subprocess.DEVNULL)
    interrupted = tmp_path / "interrupted"
    command = _build_command(scenes, imagery["model"], interrupted)
    unfinished = []
    for shards in (1, 5, 9):
        _kill_when(command, interrupted, shards)
        unfinished.append(not index_info(interrupted)["ready"])
    assert sum(unfinished) >= 2  # the kills did land part-way
    subprocess.run(command, env=_environment(), check=True, stdout=subprocess.DEVNULL)
    want, got = _snapshot(reference), _snapshot(interrupted)
    assert got["dump"] == want["dump"]
    assert got["shards"].keys() == want["shards"].keys()
    for name, tensors in want["shards"].items():
        for key, value in tensors.items():
            assert torch.equal(got["shards"][name][key], value), (name, key)
    assert got["hits"] == want["hits"]
    assert not list(interrupted.glob(".*.tmp")) and (interrupted / CATALOG_FILE).is_file()
