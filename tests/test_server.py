"""The search service: every endpoint and every bad input, through FastAPI's test client."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from helpers import random_bundle, texture, write_geotiff
from rsitr_cli.main import main
from rsitr_serve.indexer import build_index
from rsitr_serve.search import TileSearcher
from rsitr_serve.server import MAX_K, MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS, create_app

pytestmark = [pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")]
QUERY = "green trees beside a road"


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(texture(height, width, seed), 0, -1))


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    scenes = root / "scenes"
    scenes.mkdir()
    write_geotiff(scenes / "scene.tif", texture(96, 120, 1))
    for k in range(3):
        Image.fromarray(_texture(48, 48, 10 + k)).save(scenes / f"chip{k}.png")
    random_bundle(root / "model")
    build_index([scenes], root / "model", root / "index", tile=48, progress=False)
    return {"root": root, "index": root / "index", "model": root / "model"}


@pytest.fixture(scope="module")
def client(index):
    with TestClient(create_app(index["index"])) as test_client:
        yield test_client


def test_health_and_files(client, index) -> None:
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["model"]["name"] == "dove-s" and health["files"] == 4
    with TileSearcher(index["index"]) as searcher:
        assert health["tiles"] == len(searcher)
    files = client.get("/api/files").json()["files"]
    assert sorted(f["name"] for f in files) == ["chip0.png", "chip1.png", "chip2.png", "scene.tif"]
    scene = next(f for f in files if f["name"] == "scene.tif")
    assert scene["crs"] == "EPSG:32633" and 14.99 < scene["lonlat"]["west"] < scene["lonlat"]["east"] < 15.01
    assert all("/" not in f["name"] for f in files)


def test_search_returns_the_searchers_ranking_without_paths(client, index) -> None:
    answer = client.get("/api/search", params={"q": QUERY, "k": 5, "rerank": 10}).json()
    with TileSearcher(index["index"]) as searcher:
        expected = searcher.search_text(QUERY, k=5, rerank=10)
    assert [r["tile_id"] for r in answer["results"]] == [r.tile_id for r in expected]
    assert [r["rank"] for r in answer["results"]] == [1, 2, 3, 4, 5]
    first = answer["results"][0]
    assert {"file", "file_id", "window", "lonlat", "score"} <= set(first) and "/" not in first["file"]
    assert str(index["root"]) not in str(answer)


def test_more_like_a_tile_and_an_uploaded_image_find_that_tile_first(client, index) -> None:
    answer = client.get("/api/search", params={"q": QUERY, "k": 3}).json()
    tile = answer["results"][0]
    like = client.post("/api/search/image", data={"tile_id": str(tile["tile_id"]), "k": "3"}).json()
    assert like["results"][0]["tile_id"] == tile["tile_id"] and like["results"][0]["score"] == pytest.approx(1, abs=1e-4)
    chip = _texture(48, 48, 11)
    upload = client.post("/api/search/image", files={"image": ("q.png", _png(chip), "image/png")}).json()
    assert upload["results"][0]["file"] == "chip1.png"


def test_thumbnails_and_overviews_are_jpeg_of_the_right_size(client) -> None:
    files = {f["name"]: f for f in client.get("/api/files").json()["files"]}
    overview = client.get(f"/api/files/{files['scene.tif']['id']}/overview", params={"size": 64})
    assert overview.status_code == 200 and overview.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(overview.content)).size == (64, 51)  # 120 x 96 scaled to a long side of 64
    tile_id = client.get("/api/search", params={"q": QUERY, "k": 1}).json()["results"][0]["tile_id"]
    thumb = client.get(f"/api/tiles/{tile_id}/thumbnail", params={"size": 40})
    assert Image.open(io.BytesIO(thumb.content)).size == (40, 40)


@pytest.mark.parametrize("path", [
    "/api/tiles/../../etc/passwd/thumbnail", "/api/tiles/%2e%2e%2fetc%2fpasswd/thumbnail", "/api/tiles//etc/passwd/thumbnail",
    "/api/files/..%2f..%2fetc%2fpasswd/overview", "/api/files/%2Fetc%2Fpasswd/overview", "/api/files/-1/overview",
    "/api/tiles/999999/thumbnail", "/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd",
])
def test_no_path_reaches_the_file_system(client, path) -> None:
    response = client.get(path)
    assert response.status_code in (404, 422)
    assert "root:" not in response.text


@pytest.mark.parametrize("params, status", [
    ({"q": QUERY, "k": 0}, 422), ({"q": QUERY, "k": MAX_K + 1}, 422), ({"q": QUERY, "rerank": -1}, 422),
    ({"q": QUERY, "rerank": 5000}, 422), ({"q": ""}, 422), ({"q": "x" * 600}, 422), ({"k": 3}, 422),
    ({"q": QUERY, "k": "../../etc"}, 422), ({"q": "zzyzx qwerty"}, 422),
])
def test_bad_search_requests_are_422_with_a_message(client, params, status) -> None:
    response = client.get("/api/search", params=params)
    assert response.status_code == status
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "Traceback" not in detail and "\n" not in detail


def test_unknown_words_say_so(client) -> None:
    assert "no word of the query" in client.get("/api/search", params={"q": "zzyzx qwerty"}).json()["detail"]


def test_uploads_are_bounded_in_bytes_and_pixels(client) -> None:
    big = client.post("/api/search/image", files={"image": ("big.png", b"\0" * (MAX_UPLOAD_BYTES + 10), "image/png")})
    assert big.status_code == 413
    side = int(MAX_UPLOAD_PIXELS**0.5) + 10  # a 1-bit PNG of this size compresses to a few kB: a decompression bomb
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < MAX_UPLOAD_BYTES
    bomb = client.post("/api/search/image", files={"image": ("bomb.png", buffer.getvalue(), "image/png")})
    assert bomb.status_code == 413 and "pixels" in bomb.json()["detail"]
    junk = client.post("/api/search/image", files={"image": ("junk.png", b"not an image", "image/png")})
    assert junk.status_code == 422 and "not a readable image" in junk.json()["detail"]
    neither = client.post("/api/search/image", data={"k": "3"})
    assert neither.status_code == 422
    both = client.post("/api/search/image", data={"tile_id": "1"}, files={"image": ("q.png", _png(_texture(48, 48, 1)), "image/png")})
    assert both.status_code == 422
    traversal = client.post("/api/search/image", data={"tile_id": "../../etc/passwd"})
    assert traversal.status_code == 422
    unknown = client.post("/api/search/image", data={"tile_id": "999999"})
    assert unknown.status_code == 404


def test_the_page_and_its_assets_are_served_locally(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing from the internet
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/search", "/api/health", "/api/search/image"}


def test_a_token_guards_every_request(index) -> None:
    with TestClient(create_app(index["index"], token="s3cret")) as guarded:
        assert guarded.get("/api/health").status_code == 401
        assert guarded.get("/api/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert guarded.get("/api/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert guarded.get("/", params={"token": "nope"}).status_code == 401
        login = guarded.get("/", params={"token": "s3cret"}, follow_redirects=False)
        assert login.status_code == 303 and "rsitr_token" in login.headers["set-cookie"]
        guarded.cookies.set("rsitr_token", "s3cret")
        assert guarded.get("/api/health").status_code == 200


def test_an_empty_index_answers_with_a_message(index, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    build_index([empty], index["model"], tmp_path / "index", tile=48, progress=False)
    with TestClient(create_app(tmp_path / "index")) as client:
        answer = client.get("/api/search", params={"q": QUERY}).json()
        assert answer["results"] == [] and "no tiles" in answer["message"]


def test_serve_refuses_other_addresses_without_a_token(index, capsys) -> None:
    assert main(["serve", str(index["index"]), "--host", "0.0.0.0"]) == 2
    assert "--token" in capsys.readouterr().err


def test_localize_fuses_the_files_indexed_tiles_into_a_heat_overlay(client, index) -> None:
    from rsitr_serve.localize import fuse_window_scores, normalise_and_smooth, odd_kernel

    scene = next(f for f in client.get("/api/files").json()["files"] if f["name"] == "scene.tif")
    answer = client.get(f"/api/files/{scene['id']}/localize", params={"q": QUERY, "size": 64})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(answer.content)).size == (64, 51)  # the overview's size: 120 x 96 to a long side of 64
    with TileSearcher(index["index"]) as searcher:
        ids, windows = searcher.catalog.file_tiles(scene["id"])
        assert len(ids) == scene["tiles"]
        scores = searcher._full_scores(ids, searcher.encoders.model.encode_texts([QUERY]))
        heat, hottest = searcher.localize_in_file(scene["id"], QUERY, 120, 96, (51, 64))
    expected = normalise_and_smooth(fuse_window_scores(windows, scores, 120, 96, out_shape=(51, 64)), odd_kernel(251 * 64 / 120))
    assert np.array_equal(heat, expected)
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert hottest == (int((col + 0.5) * 120 / 64), int((row + 0.5) * 96 / 51))
    assert answer.headers["x-rsitr-hottest"] == f"{hottest[0]},{hottest[1]}"  # the same map as the page's
    assert client.get("/api/files/999/localize", params={"q": QUERY}).status_code == 404
    assert client.get(f"/api/files/{scene['id']}/localize", params={"q": "zzz qqq"}).status_code == 422
    assert client.get(f"/api/files/{scene['id']}/localize").status_code == 422
