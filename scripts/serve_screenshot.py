"""A screenshot of the ``rsitr serve`` page answering a query: the picture in the docs.

Starts the server in this process on a free port of 127.0.0.1, opens the page in headless Debian
Chromium (``chromium`` on PATH; Playwright drives it, no browser is downloaded), runs the text
query, waits until the results, their thumbnails and the scene overview have loaded, saves a
full-page PNG (written to a temporary file, then renamed) and stops the server.

Usage::

    python scripts/serve_screenshot.py --index runs/index-ucm --query "many cars in a parking lot" \\
        --out docs/serve.jpg [--width 1280 --height 900] [--model MODEL_DIR]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

from rsitr.io import atomic_path
from rsitr_serve.server import create_app, serving_in_thread

#: Seconds to wait for the server to answer, and for the page to show its results.
START_TIMEOUT_S = 60.0
PAGE_TIMEOUT_MS = 60_000

RESULTS_OR_ERROR = """() => document.querySelector('#results .card') !== null
    || document.getElementById('message').dataset.kind === 'error'"""
IMAGES_LOADED = """() => [document.getElementById('overview-image'), ...document.querySelectorAll('#results .card img')]
    .every(img => img.complete && img.naturalWidth > 0)"""


def capture(url: str, query: str, out: Path, width: int, height: int) -> None:
    """Load the page, run ``query``, wait for every image of the answer and save a full-page screenshot to ``out``."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(url)
            page.fill("#query", query)
            page.press("#query", "Enter")
            page.wait_for_function(RESULTS_OR_ERROR)
            if page.locator("#message").get_attribute("data-kind") == "error":
                raise SystemExit(f"the query failed: {page.locator('#message').inner_text()}")
            page.mouse.move(0, 0)  # no card under the pointer: the first result stays the selected one
            # Thumbnails load lazily; a full-page picture needs those below the fold too.
            page.evaluate("() => document.querySelectorAll('#results .card img').forEach(img => { img.loading = 'eager'; })")
            page.wait_for_function(IMAGES_LOADED)
            with atomic_path(out) as partial:
                if out.suffix.lower() in (".jpg", ".jpeg"):  # a JPEG is a quarter of the PNG for a page of photos
                    page.screenshot(path=str(partial), full_page=True, type="jpeg", quality=85)
                else:
                    page.screenshot(path=str(partial), full_page=True, type="png")
        finally:
            browser.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, required=True, help="index folder (rsitr index build)")
    parser.add_argument("--query", required=True, help="the sentence to search for")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--model", type=Path, default=None, help="model bundle (default: the one the index records)")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    parser.add_argument("--height", type=int, default=900, help="viewport height in CSS pixels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with serving_in_thread(create_app(args.index, args.model), timeout=START_TIMEOUT_S) as url:
        capture(url, args.query, args.out, args.width, args.height)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
