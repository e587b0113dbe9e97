"""The page of ``rsitr serve`` in a real browser: a text query, "more like this", an unknown word.

Runs headless Debian Chromium (``/usr/bin/chromium``, never a downloaded browser) through
Playwright against the server started in-process on a small generated index; skipped when
either is missing.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from helpers import random_bundle, texture, write_geotiff

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium)", allow_module_level=True)

from rsitr.errors import ConfigError  # noqa: E402
from rsitr_serve.indexer import build_index  # noqa: E402
from rsitr_serve.search import TileSearcher  # noqa: E402
from rsitr_serve.server import create_app, serving_in_thread  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning"),
              pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")]

TILE = 48
QUERY = "green trees beside a road"
UNKNOWN_QUERY = "zebra xylophone"
WAIT_MS = 15_000
TOKEN = "browser-test-token"  # the page then runs on the cookie that GET /?token= sets


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    """An index of a GeoTIFF scene and two PNG chips, made with a seeded random model."""
    root = tmp_path_factory.mktemp("browser")
    scenes = root / "scenes"
    scenes.mkdir()
    write_geotiff(scenes / "scene.tif", texture(96, 144, seed=11))
    Image.fromarray(np.moveaxis(texture(48, 96, seed=12), 0, -1)).save(scenes / "strip.png")
    Image.fromarray(np.moveaxis(texture(48, 48, seed=13), 0, -1)).save(scenes / "chip.png")
    random_bundle(root / "model", seed=0)
    build_index([scenes], root / "model", root / "index", tile=TILE, progress=False)
    return root / "index"


@pytest.fixture(scope="module")
def server_url(index_dir) -> Iterator[str]:
    """The address of the app serving ``index_dir`` with :data:`TOKEN` from a thread of this process."""
    with serving_in_thread(create_app(index_dir, token=TOKEN), token=TOKEN) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _card_ids(page) -> list[int]:
    return [int(i) for i in page.locator("#results .card").evaluate_all("cards => cards.map(c => c.dataset.tileId)")]


def _check_overview(page, results: list, index: int) -> None:
    """Hovering card ``index`` shows its file with one box per result in it, each where its window lies."""
    selected = results[index]
    page.locator("#results .card").nth(index).hover()
    sync_api.expect(page.locator("#overview-title")).to_have_text(Path(selected.file).name)
    page.wait_for_function("() => { const i = document.getElementById('overview-image'); return i.complete && i.naturalWidth > 0; }")
    in_file = [r for r in results if r.file == selected.file]
    sync_api.expect(page.locator("#overview .overview-box")).to_have_count(len(in_file))
    image = page.locator("#overview-image").bounding_box()
    box = page.locator("#overview .overview-box.selected").bounding_box()
    with rasterio.open(selected.file) as source:
        width, height = source.width, source.height
    w = selected.window
    sx, sy = image["width"] / width, image["height"] / height  # displayed pixels per source pixel
    assert box["x"] - image["x"] == pytest.approx(w.x * sx, abs=1.0)
    assert box["y"] - image["y"] == pytest.approx(w.y * sy, abs=1.0)
    assert box["width"] == pytest.approx(w.width * sx, abs=1.0)
    assert box["height"] == pytest.approx(w.height * sy, abs=1.0)


def test_query_more_like_this_and_an_unknown_word(index_dir, server_url, browser, tmp_path) -> None:
    chip = index_dir.parent / "scenes" / "chip.png"  # one tile: the upload of its file finds that tile first
    with TileSearcher(index_dir) as searcher:
        best = searcher.search_text(QUERY, k=20, rerank=100)
        chip_tile = searcher.search_image(chip, k=1)[0].tile_id
        with pytest.raises(ConfigError, match="is known to the model") as unknown:
            searcher.check_words(UNKNOWN_QUERY)
    expected = [r.tile_id for r in best]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(WAIT_MS)
    console_errors: list[str] = []
    failed_requests: list[str] = []
    page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: console_errors.append(f"uncaught: {error}"))
    page.on("response", lambda response: failed_requests.append(f"{response.status} {response.url}")
            if response.status >= 400 else None)

    page.goto(f"{server_url}/?token={TOKEN}")
    sync_api.expect(page.locator("#index-summary")).to_contain_text("tiles in 3 files")
    page.fill("#query", QUERY)
    page.press("#query", "Enter")
    sync_api.expect(page.locator("#results-title")).to_have_text(f"Results for “{QUERY}”")
    assert _card_ids(page) == expected
    first = page.locator("#results .card").first
    sync_api.expect(first.locator(".score")).to_have_text(f"{best[0].score:.3f}")
    inside = next(i for i, r in enumerate(best) if Path(r.file).name == "scene.tif" and r.window.x > 0 and r.window.y > 0)
    _check_overview(page, best, inside)
    toggle = page.locator("#heat-toggle")  # the heat map of the query over the file, from its indexed tiles
    sync_api.expect(toggle).to_be_visible()
    toggle.click()
    sync_api.expect(toggle).to_have_attribute("aria-pressed", "true")
    loaded = "() => { const i = document.getElementById('overview-image'); return i.complete && i.naturalWidth > 0; }"
    sync_api.expect(page.locator("#overview-image")).to_have_attribute("src", re.compile(r"/api/files/\d+/localize\?q="))
    page.wait_for_function(loaded)
    sync_api.expect(page.locator("#overview .overview-box.selected")).to_have_count(1)
    toggle.click()
    sync_api.expect(page.locator("#overview-image")).to_have_attribute("src", re.compile(r"/overview\?size="))
    page.screenshot(path=str(tmp_path / "results.png"), full_page=True)
    with Image.open(tmp_path / "results.png") as shot:
        assert shot.format == "PNG" and shot.width == 1280 and shot.height >= 900

    clicked = expected[0]
    first.click()
    sync_api.expect(page.locator("#results-title")).to_have_text(f"More like tile {clicked} ({Path(best[0].file).name})")
    assert _card_ids(page)[0] == clicked  # an image query finds its own tile first
    assert page.evaluate("() => document.activeElement.dataset.tileId") == str(clicked)  # focus follows the new results

    second = page.locator("#results .card").nth(1)  # the keyboard: focus a card, Space asks for more like it
    second_id = second.get_attribute("data-tile-id")
    second.focus()
    page.keyboard.press("Space")
    sync_api.expect(page.locator("#results-title")).to_contain_text(f"More like tile {second_id} (")
    assert _card_ids(page)[0] == int(second_id)

    page.set_input_files("#image-input", str(chip))
    sync_api.expect(page.locator("#results-title")).to_have_text("More like the image “chip.png”")
    page.locator("#results .card").first.hover()
    sync_api.expect(page.locator("#heat-toggle")).to_be_hidden()  # an image query has no sentence to localise
    assert _card_ids(page)[0] == chip_tile

    page.fill("#query", UNKNOWN_QUERY)
    page.click("#search-form button[type=submit]")
    sync_api.expect(page.locator("#message")).to_have_text(str(unknown.value))  # the server's own words
    sync_api.expect(page.locator("#message")).to_have_attribute("data-kind", "error")
    page.close()

    # the only failed request is the 422 of the unknown words, which Chromium reports on the console
    assert [f.split("?")[0] for f in failed_requests] == [f"422 {server_url}/api/search"]
    assert [e for e in console_errors if "status of 422" not in e] == []
