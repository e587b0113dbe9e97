"""Contact sheets: search results as one self-contained HTML page of tile thumbnails.

``rsitr search ... --html OUT.html`` writes a page a user can open anywhere: each hit's thumbnail
(read from the source file, window by window, and embedded as a JPEG data URI, so the page needs
no other file), its rank, score, file, pixel window and, for georeferenced files, its centre in
longitude/latitude. A file that can no longer be read gets an empty frame and the reason, not a
failed page.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from rsitr.errors import RsitrError
from rsitr.io import write_text
from rsitr_serve.catalog import IndexSettings
from rsitr_serve.indexer import open_indexed
from rsitr_serve.search import TileResult

THUMBNAIL = 192

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.2rem; font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 14px; }
figure { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 8px; background: #fafafa; }
figure img, figure .missing { width: 192px; height: 192px; object-fit: contain; background: #eee; display: block; }
figcaption { font-size: 0.78rem; line-height: 1.35; margin-top: 6px; word-break: break-all; }
.score { font-weight: 600; }
"""


def thumbnail_uri(result: TileResult, settings: IndexSettings, size: int = THUMBNAIL) -> str:
    """The tile's thumbnail as a ``data:image/jpeg`` URI (RsitrError when the file cannot be read)."""
    with open_indexed(result.file, settings) as source:  # the index's bands, as the tile was encoded
        pixels = source.thumbnail(result.window, size)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(rank: int, result: TileResult, settings: IndexSettings, size: int) -> str:
    w = result.window
    lines = [f'<span class="score">#{rank} · {result.score:.4f}</span>', html.escape(Path(result.file).name),
             f"x {w.x}, y {w.y}, {w.width} × {w.height} px" + (f" (scale {w.scale:g})" if w.scale != 1 else "")]
    if result.lonlat is not None:
        west, south, east, north = result.lonlat
        lines.append(f"lon {(west + east) / 2:.5f}, lat {(south + north) / 2:.5f}")
    try:
        picture = f'<img alt="tile {result.tile_id}" src="{thumbnail_uri(result, settings, size)}">'
    except RsitrError as exc:
        picture = '<div class="missing"></div>'
        lines.append(html.escape(f"not readable: {exc}"))
    return f"<figure>{picture}<figcaption>{'<br>'.join(lines)}</figcaption></figure>"


def write_contact_sheet(results: Sequence[TileResult], path: str | Path, query: str, settings: IndexSettings,
                        size: int = THUMBNAIL) -> Path:
    """Write the contact sheet of ``results`` for ``query`` to ``path`` (atomically); returns the path."""
    figures = "\n".join(_figure(rank, result, settings, size) for rank, result in enumerate(results, start=1))
    page = (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>rsitr: {html.escape(query)}</title>"
            f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(query)} — {len(results)} tiles</h1>\n"
            f"<div class=\"grid\">\n{figures}\n</div>\n</body></html>\n")
    write_text(path, page)
    return Path(path)
