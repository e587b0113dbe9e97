"""``rsitr serve``: a search service and web page over an index (FastAPI under uvicorn).

:func:`create_app` opens the index once, read-only, in the application's lifespan
(:class:`SearchService`) and serves:

=====================================  ======================================================
``GET /``                              the page (``static/index.html``, no external resource)
``GET /api/health``                    model, first stage, tiles and files, version
``GET /api/search?q=&k=&rerank=``      text → tiles (:meth:`rsitr_serve.search.TileSearcher.search_text`;
                                       a ``rerank`` below ``k`` is raised to ``k``)
``POST /api/search/image``             an uploaded image, or ``tile_id`` (more like this) → tiles
``GET /api/tiles/{id}/thumbnail``      a tile's pixels as JPEG (cached)
``GET /api/files``                     the indexed files, by id
``GET /api/files/{id}/overview``       a whole file, decimated, as JPEG (cached)
``GET /api/files/{id}/localize?q=``    semantic localisation of a sentence in a file from its indexed tiles
                                       (:meth:`rsitr_serve.search.TileSearcher.localize_in_file`): the
                                       overview with the heat map over it, as JPEG; the hottest point
                                       (file pixels) in the ``X-Rsitr-Hottest: x,y`` header
=====================================  ======================================================

Safety, by construction rather than by filtering:

* Files and tiles are addressed by integer id, never by path; responses carry file *names*, never
  paths, so there is no path to traverse (a ``../`` anywhere is a 422 or a 404).
* Uploads are bounded in bytes (:data:`MAX_UPLOAD_BYTES`, checked on the declared length and on
  the bytes read) and in decoded pixels (:data:`MAX_UPLOAD_PIXELS`, checked from the header before
  decoding: a decompression bomb is refused with 413 before it is expanded). ``k``, ``rerank``,
  sizes and the query length are bounded.
* Every error is JSON ``{"detail": "one line"}``: a bad request is 422, an unknown id 404, a
  refused upload 413, a missing or wrong token 401, anything else 500 without a traceback (the
  traceback goes to the server's log).
* The index is opened read-only; nothing is unpickled. With a token (required by ``rsitr serve``
  for any address but localhost), every request carries ``Authorization: Bearer <token>`` or the
  cookie that ``GET /?token=<token>`` sets; tokens are compared in constant time.

Queries run one at a time on a thread of their own: a query already uses both cores (torch and
FAISS threads), the catalogue connection and shard maps are not shared across threads, and
torch's allocations stay in one malloc arena (run on the server's pool of threads, they spread
over one arena per thread and memory crept under 64 clients). Thumbnails and overviews are read
on the server's pool; a lock guards the catalogue they look tiles up in.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import io
import socket
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError

import rsitr
from rsitr.data.images import to_rgb
from rsitr.data.rasters import TileWindow
from rsitr.errors import RsitrError
from rsitr.progress import get_logger
from rsitr_serve.indexer import open_indexed
from rsitr_serve.localize import colour_overlay
from rsitr_serve.search import TileResult, TileSearcher

logger = get_logger(__name__)

MAX_UPLOAD_BYTES = 16 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000
MAX_K = 100
MAX_RERANK = 1000
MAX_QUERY_CHARS = 500
TOKEN_COOKIE = "rsitr_token"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
EMPTY_INDEX = "the index holds no tiles yet: add images with rsitr index add"
_STATIC = resources.files("rsitr_serve") / "static"


class SearchService:
    """The opened index and what every request shares: the searcher behind one lock, and image caches."""

    def __init__(self, index_dir: str | Path, model_dir: str | Path | None = None, device: str | None = None) -> None:
        self.searcher = TileSearcher(index_dir, model_dir=model_dir, device=device)
        self.lock = threading.Lock()
        # Queries run on one thread of their own: torch's allocations then stay in one malloc arena
        # instead of one per thread of the server's pool, which made memory creep under many clients.
        self.queries = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsitr-search")
        with self.lock:
            self.files = {f.id: f for f in self.searcher.catalog.files()}
            self.tile_counts = self.searcher.catalog.tiles_per_file()
            self.extents = self.searcher.catalog.file_lonlat_extents()
        self.thumbnail = functools.lru_cache(maxsize=4096)(self._thumbnail)
        self.overview = functools.lru_cache(maxsize=64)(self._overview)
        # The decimated pixels of recent overviews: a heat map is drawn over them without reading the file again.
        self.overview_pixels = functools.lru_cache(maxsize=8)(self._overview_pixels)

    def close(self) -> None:
        self.queries.shutdown(wait=True)
        self.searcher.close()

    async def run(self, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)`` on the query thread, awaited without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.queries, functools.partial(work, *args))

    def health(self) -> dict[str, Any]:
        settings = self.searcher.settings
        return {"status": "ok", "version": rsitr.__version__,
                "model": {"name": settings.model["name"], "architecture": settings.model["architecture"]},
                "first_stage": settings.first_stage["name"] if settings.first_stage else None,
                "tiles": len(self.searcher), "files": len(self.files)}

    def search_text(self, text: str, k: int, rerank: int) -> list[TileResult]:
        with self.lock:
            return self.searcher.search_text(text, k=k, rerank=rerank)

    def search_pixels(self, pixels: np.ndarray, k: int) -> list[TileResult]:
        with self.lock:
            return self.searcher.search_image(pixels, k=k)

    def tile_pixels(self, tile_id: int) -> np.ndarray:
        """The pixels of an indexed tile, read from its file as the indexer read them."""
        row = self._tile(tile_id)
        with open_indexed(row["path"], self.searcher.settings) as source:
            return source.read(_window(row))

    def _tile(self, tile_id: int) -> dict[str, Any]:
        with self.lock:
            rows = self.searcher.catalog.tiles([tile_id])
        if tile_id not in rows:
            raise HTTPException(404, f"no tile {tile_id} in the index")
        return rows[tile_id]

    def _thumbnail(self, tile_id: int, size: int) -> bytes:
        row = self._tile(tile_id)
        with open_indexed(row["path"], self.searcher.settings) as source:
            return _jpeg(source.thumbnail(_window(row), size))

    def _file(self, file_id: int) -> Any:
        record = self.files.get(file_id)
        if record is None:
            raise HTTPException(404, f"no file {file_id} in the index")
        return record

    def _overview_pixels(self, file_id: int, size: int) -> np.ndarray:
        record = self._file(file_id)
        with open_indexed(record.path, self.searcher.settings) as source:
            whole = TileWindow(1.0, 0, 0, record.width, record.height)
            return source.thumbnail(whole, min(size, max(record.width, record.height)))

    def _overview(self, file_id: int, size: int) -> bytes:
        return _jpeg(self.overview_pixels(file_id, size))

    def localize(self, file_id: int, text: str, size: int) -> tuple[bytes, tuple[int, int]]:
        """A JPEG of the file's overview with the heat map of ``text`` over it, and the hottest point (file px)."""
        record = self._file(file_id)
        pixels = self.overview_pixels(file_id, size)
        with self.lock:
            heat, hottest = self.searcher.localize_in_file(file_id, text, record.width, record.height, pixels.shape[:2])
        return _jpeg(colour_overlay(pixels, heat)), hottest


def _window(row: dict[str, Any]) -> TileWindow:
    """The pixel window of a catalogue tile row."""
    return TileWindow(row["scale"], row["x"], row["y"], row["width"], row["height"])


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def result_json(rank: int, result: TileResult) -> dict[str, Any]:
    """A result as the API gives it: the file by id and name, never by path."""
    w = result.window
    center = None
    if result.lonlat is not None:
        west, south, east, north = result.lonlat
        center = {"lon": (west + east) / 2, "lat": (south + north) / 2}
    return {"rank": rank, "tile_id": result.tile_id, "file_id": result.file_id, "file": Path(result.file).name,
            "file_width": result.file_size[0], "file_height": result.file_size[1],
            "window": {"x": w.x, "y": w.y, "width": w.width, "height": w.height}, "scale": w.scale,
            "lonlat": None if result.lonlat is None else dict(zip(("west", "south", "east", "north"), result.lonlat)),
            "center": center, "score": result.score, "first_stage_score": result.first_stage_score}


def _answer(query: dict[str, Any], k: int, rerank: int, started: float, results: list[TileResult],
            empty: bool) -> dict[str, Any]:
    return {"query": query, "k": k, "rerank": rerank, "milliseconds": 1000 * (time.perf_counter() - started),
            "message": EMPTY_INDEX if empty else None,
            "results": [result_json(rank, r) for rank, r in enumerate(results, start=1)]}


def decode_upload(data: bytes, name: str) -> np.ndarray:
    """An uploaded image as RGB pixels; 413 when it would decode to more than MAX_UPLOAD_PIXELS, 422 when not an image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise HTTPException(413, f"{name}: {width} x {height} pixels is more than the {MAX_UPLOAD_PIXELS:,} an upload may decode to")
            img.load()
            return np.asarray(to_rgb(img), dtype=np.uint8)
    except HTTPException:
        raise
    except Image.DecompressionBombError as exc:
        raise HTTPException(413, f"{name}: refused as a decompression bomb ({exc.__class__.__name__})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise HTTPException(422, f"{name}: not a readable image ({exc.__class__.__name__})") from exc


def _token_ok(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[len("Bearer "):] if header.startswith("Bearer ") else None


def create_app(index_dir: str | Path, model_dir: str | Path | None = None, token: str | None = None,
               device: str | None = None) -> FastAPI:
    """The application over the index in ``index_dir`` (opened when the app starts, closed when it stops)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = SearchService(index_dir, model_dir, device)
        try:
            yield
        finally:
            app.state.service.close()

    app = FastAPI(title="rsitr search", version=rsitr.__version__, lifespan=lifespan,
                  description="Search an rsitr index of remote-sensing imagery by sentence or by image.")
    _add_errors(app)
    if token:
        _add_token_check(app, token)
    _add_routes(app)
    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")
    return app


def _add_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
                             for e in exc.errors())
        return JSONResponse({"detail": problems or "invalid request"}, status_code=422)

    @app.exception_handler(RsitrError)
    async def bad_input(request: Request, exc: RsitrError) -> JSONResponse:
        return JSONResponse({"detail": str(exc).splitlines()[0]}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({exc.__class__.__name__}); see the server log"}, status_code=500)


def _add_token_check(app: FastAPI, token: str) -> None:
    @app.middleware("http")
    async def check_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path == "/" and "token" in request.query_params:
            if not _token_ok(request.query_params["token"], token):
                return JSONResponse({"detail": "wrong token"}, status_code=401)
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        if _token_ok(_bearer(request), token) or _token_ok(request.cookies.get(TOKEN_COOKIE), token):
            return await call_next(request)
        return JSONResponse({"detail": "this server needs a token: Authorization: Bearer <token>, or open /?token=<token>"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _add_routes(app: FastAPI) -> None:
    def service(request: Request) -> SearchService:
        return request.app.state.service

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(_STATIC / "index.html"), media_type="text/html")

    @app.get("/api/health")
    def health(request: Request) -> dict[str, Any]:
        return service(request).health()

    @app.get("/api/search")
    async def search(request: Request, q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS)],
               k: Annotated[int, Query(ge=1, le=MAX_K)] = 20,
               rerank: Annotated[int, Query(ge=0, le=MAX_RERANK)] = 100) -> dict[str, Any]:
        started = time.perf_counter()
        svc = service(request)
        if len(svc.searcher) == 0:
            return _answer({"text": q}, k, rerank, started, [], empty=True)
        results = await svc.run(svc.search_text, q, k, max(rerank, k) if rerank else 0)
        return _answer({"text": q}, k, rerank, started, results, empty=False)

    @app.post("/api/search/image")
    async def search_image(request: Request, image: Annotated[UploadFile | None, File()] = None,
                           tile_id: Annotated[int | None, Form(ge=1)] = None,
                           k: Annotated[int, Form(ge=1, le=MAX_K)] = 20) -> dict[str, Any]:
        started = time.perf_counter()
        declared = int(request.headers.get("content-length") or 0)
        if declared > MAX_UPLOAD_BYTES + 65536:
            raise HTTPException(413, f"upload of {declared:,} bytes is more than the {MAX_UPLOAD_BYTES:,} allowed")
        if (image is None) == (tile_id is None):
            raise HTTPException(422, "give either an image file (field image) or a tile id (field tile_id)")
        svc = service(request)
        if len(svc.searcher) == 0:
            return _answer({"tile_id": tile_id} if tile_id else {"upload": True}, k, 0, started, [], empty=True)
        if tile_id is not None:
            pixels = await svc.run(svc.tile_pixels, tile_id)
            query: dict[str, Any] = {"tile_id": tile_id}
        else:
            assert image is not None
            data = await image.read(MAX_UPLOAD_BYTES + 1)
            if len(data) > MAX_UPLOAD_BYTES:
                raise HTTPException(413, f"upload is more than the {MAX_UPLOAD_BYTES:,} bytes allowed")
            pixels = decode_upload(data, image.filename or "upload")
            query = {"upload": True}
        return _answer(query, k, 0, started, await svc.run(svc.search_pixels, pixels, k), empty=False)

    @app.get("/api/tiles/{tile_id}/thumbnail")
    def thumbnail(request: Request, tile_id: int, size: Annotated[int, Query(ge=32, le=512)] = 256) -> Response:
        return Response(service(request).thumbnail(tile_id, size), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/files")
    def files(request: Request) -> dict[str, Any]:
        svc = service(request)
        return {"files": [_file_json(record, svc.tile_counts.get(record.id, 0), svc.extents.get(record.id))
                          for record in svc.files.values()]}

    @app.get("/api/files/{file_id}/overview")
    def overview(request: Request, file_id: int, size: Annotated[int, Query(ge=64, le=2048)] = 1024) -> Response:
        return Response(service(request).overview(file_id, size), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/files/{file_id}/localize")
    async def localize(request: Request, file_id: int, q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS)],
                       size: Annotated[int, Query(ge=64, le=2048)] = 1024) -> Response:
        svc = service(request)
        image, (x, y) = await svc.run(svc.localize, file_id, q, size)
        return Response(image, media_type="image/jpeg", headers={"X-Rsitr-Hottest": f"{x},{y}"})


def _file_json(record: Any, tiles: int, lonlat: tuple[float, float, float, float] | None) -> dict[str, Any]:
    return {"id": record.id, "name": Path(record.path).name, "width": record.width, "height": record.height,
            "crs": record.crs, "tiles": tiles,
            "lonlat": None if lonlat is None else dict(zip(("west", "south", "east", "north"), lonlat))}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of ``host`` that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serving_in_thread(app: FastAPI, token: str | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a daemon thread on a free localhost port; yields its base URL.

    For tests and scripts that drive the page: the block starts once ``/api/health`` answers
    (with ``token`` when the app needs one); the server stops when the block ends.
    """
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="rsitr-serve", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout
    try:
        while True:
            request = urllib.request.Request(f"{url}/api/health", headers=headers)
            with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=2) as answer:
                if answer.status == 200:
                    break
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server at {url} did not answer /api/health within {timeout:.0f} s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
