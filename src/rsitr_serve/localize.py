"""Semantic localisation: where in a large image a sentence is true, as a heat map.

The procedure is SeLo's (Yuan et al., "Learning to evaluate performance of multi-modal semantic
localization", 2022; the reference prediction procedure, v1), vectorised:

1. **Windows** (:func:`selo_windows`). For each window side ``s`` in ``sizes`` (default 128, 256,
   512 — the scale set at which AMFMN's published SeLo score is highest), two grids of ``s × s``
   windows with stride ``s``: one starting at 0, one at ``s // 2``. A window that would stick out of
   the image is shifted back to end at the border (so every window is full size and none is padded),
   and an axis shorter than ``s`` is spanned whole. A window that occurs twice (the shifted last
   window of one grid can coincide with a window of the other) is kept once: it carries no new
   evidence, and counting it twice would weight it double in the mean of step 3.
2. **Scores.** Each window is read at source resolution (:mod:`rsitr.data.rasters`: GeoTIFFs window
   by window through GDAL, pictures decoded once), resized to the model's input side with the model's
   own preprocessing (so a window is seen exactly as a dataset image of that size would be; SeLo
   resizes bicubically to its model's 256 px), encoded, and scored against each sentence with the
   model's full score (:meth:`rsitr.bundle.RetrievalBundle.score`; pairwise for DOVE). Windows with
   no valid pixel (nodata margins of a GeoTIFF) are not scored.
3. **Fusion** (:func:`fuse_window_scores`). The heat of a pixel is the mean score of all windows, of
   all sizes, that cover it. Windows are axis-aligned rectangles, so the heat is constant on the cells
   between consecutive window edges: the sums and counts are accumulated on that compressed grid with
   a 2-D difference array and two cumulative sums (a few hundred cells per axis, whatever the image
   size), then expanded to pixels by indexing. This replaces SeLo's per-window Python loops over full
   images, which its authors report as most of the cost at large window sizes. A pixel no scored
   window covers gets the lowest heat.
4. **Normalisation and smoothing** (:func:`normalise_and_smooth`): min–max to 0..255 (rounded to the
   nearest integer; SeLo truncates), then a median blur of ``blur`` px (default 251, SeLo's; OpenCV's
   constant-time median for uint8). A constant heat map (every window scored the same) is all 0: it
   says nothing about where the sentence is.

Outputs (:func:`write_localization`): the heat map as a single-band PNG at the image's resolution
(the probability map of the SeLo metrics is this image / 255), a JET colour overlay
``0.7 · image + 0.3 · heat`` as a JPEG (quality 90) at the image's resolution up to
``OVERLAY_MAX_SIDE`` px on the long side (a larger scene's overlay is a decimated read, so memory
stays bounded), and, for a georeferenced input, the heat map as a single-band uint8 GeoTIFF with the
input's CRS and transform (tiled, deflate).

Each run records the time spent reading (and resizing), encoding images, encoding the sentences,
scoring, fusing (with smoothing) and writing, so a user can see where time goes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rasterio
from rasterio.transform import Affine

from rsitr.bundle import RetrievalBundle
from rsitr.data.images import tiff_bands
from rsitr.data.rasters import ImageSource, TileWindow, bounded_reading, open_image
from rsitr.errors import ConfigError
from rsitr.features import ImageBatch, features_of_images, image_batch
from rsitr.io import atomic_path, check_writable, save_image, write_json
from rsitr.models.base import Encoding, concat_encodings
from rsitr.progress import progress_bar
from rsitr_serve.tiling import MIN_TILE

#: Window sides (px) of ``rsitr localize`` when none are given.
DEFAULT_SIZES = (128, 256, 512)
#: SeLo's median-blur kernel (px).
DEFAULT_BLUR = 251
#: TileWindow.scale of a localisation window is its side over this (SeLo's model input side).
SCALE_BASE = 256
#: The colour overlay is at most this many pixels on its long side.
OVERLAY_MAX_SIDE = 8192
#: Weight of the image in the overlay (SeLo: 0.7 image + 0.3 heat).
OVERLAY_IMAGE_WEIGHT = 0.7
STAGES = ("reading", "image encoding", "text encoding", "scoring", "fusion", "writing")


# ----------------------------------------------------------------------------------- windows


def check_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    """``sizes`` as a tuple of distinct integers of at least 16 px; ConfigError otherwise."""
    if len(sizes) == 0:
        raise ConfigError("at least one window size is needed, got none")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_TILE:
            raise ConfigError(f"window sizes must be integers of at least {MIN_TILE} px, got {size!r}")
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"window sizes must be distinct, got {', '.join(map(str, sizes))}")
    return tuple(int(s) for s in sizes)


def _grid_starts(length: int, size: int, offset: int) -> list[int]:
    """Starts ``offset, offset + size, …`` below ``length``, each shifted back to fit; ``[0]`` if the axis fits."""
    if length <= size:
        return [0]
    return list(dict.fromkeys(min(start, length - size) for start in range(offset, length, size)))


def selo_windows(width: int, height: int, sizes: Sequence[int]) -> list[TileWindow]:
    """The windows of step 1 of the module docstring, by size as given, then grid, then row-major.

    ``TileWindow.scale`` is ``size / 256``, so a window equals the tile of
    :func:`rsitr_serve.tiling.iter_tile_windows` at tile 256 and that scale wherever both exist.
    """
    sizes = check_sizes(sizes)
    if width < 1 or height < 1:
        raise ConfigError(f"an image to localise in must be at least 1 × 1 pixel, got {width} × {height}")
    windows: dict[tuple[int, int, int, int], TileWindow] = {}
    for size in sizes:
        w, h = min(size, width), min(size, height)
        for offset in (0, size // 2):
            for y in _grid_starts(height, size, offset):
                for x in _grid_starts(width, size, offset):
                    windows.setdefault((x, y, w, h), TileWindow(size / SCALE_BASE, x, y, w, h))
    return list(windows.values())


# ----------------------------------------------------------------------------------- fusion


def _edges(starts: np.ndarray, stops: np.ndarray, length: int) -> np.ndarray:
    return np.unique(np.concatenate([[0, length], starts, stops]))


def cell_means(windows: Sequence[TileWindow], scores: np.ndarray, width: int,
               height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mean window score on the compressed grid of step 3: (cell heat, x edges, y edges).

    Cell ``(i, j)`` spans rows ``y_edges[i]:y_edges[i+1]`` and columns ``x_edges[j]:x_edges[j+1]``;
    a cell no window covers is NaN.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(windows) != len(scores):
        raise ValueError(f"{len(windows)} windows but {len(scores)} scores")
    x0 = np.array([w.x for w in windows], dtype=np.int64)
    y0 = np.array([w.y for w in windows], dtype=np.int64)
    x1 = x0 + np.array([w.width for w in windows], dtype=np.int64)
    y1 = y0 + np.array([w.height for w in windows], dtype=np.int64)
    if len(windows) and (x0.min() < 0 or y0.min() < 0 or x1.max() > width or y1.max() > height):
        raise ValueError("a window sticks out of the image")
    xs, ys = _edges(x0, x1, width), _edges(y0, y1, height)
    ix0, ix1 = np.searchsorted(xs, x0), np.searchsorted(xs, x1)
    iy0, iy1 = np.searchsorted(ys, y0), np.searchsorted(ys, y1)
    sums = np.zeros((len(ys), len(xs)))
    counts = np.zeros((len(ys), len(xs)))
    for target, values in ((sums, scores), (counts, np.ones_like(scores))):
        np.add.at(target, (iy0, ix0), values)
        np.add.at(target, (iy0, ix1), -values)
        np.add.at(target, (iy1, ix0), -values)
        np.add.at(target, (iy1, ix1), values)
    sums = sums.cumsum(0).cumsum(1)[:-1, :-1]
    counts = np.rint(counts.cumsum(0).cumsum(1)[:-1, :-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return means, xs, ys


def _pixel_cells(edges: np.ndarray, length: int, out_length: int) -> np.ndarray:
    """Cell index of each output pixel along one axis (output pixel centres mapped onto the source)."""
    centres = (np.arange(out_length) + 0.5) * (length / out_length)
    return np.clip(np.searchsorted(edges, centres, side="right") - 1, 0, len(edges) - 2)


def fuse_window_scores(windows: Sequence[TileWindow], scores: np.ndarray, width: int, height: int,
                       out_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Per-pixel mean score of the covering windows, (height, width) float32 (step 3).

    ``out_shape`` = (rows, cols) samples the same map at another resolution (each output pixel takes
    the cell under its centre), for previews of scenes too large to hold at full resolution.
    Pixels no window covers get the lowest mean.
    """
    means, xs, ys = cell_means(windows, scores, width, height)
    if np.isnan(means).all():
        means = np.zeros_like(means)
    means = np.where(np.isnan(means), np.nanmin(means), means)
    rows, cols = out_shape or (height, width)
    return means[np.ix_(_pixel_cells(ys, height, rows), _pixel_cells(xs, width, cols))].astype(np.float32)


def odd_kernel(size: float) -> int:
    """The nearest odd integer ≥ 1 to ``size`` (median blur kernels are odd)."""
    k = max(1, round(size))
    return k if k % 2 else k + 1


def normalise_and_smooth(heat: np.ndarray, blur: int = DEFAULT_BLUR) -> np.ndarray:
    """Min–max to 0..255 uint8, rounded, then a ``blur`` px median blur (step 4); ``blur`` 1 or 0 = none."""
    low, high = float(np.min(heat)), float(np.max(heat))
    scaled: np.ndarray
    if high <= low:
        scaled = np.zeros(heat.shape, dtype=np.uint8)
    else:
        scaled = np.rint((heat - low) * (255.0 / (high - low))).astype(np.uint8)
    if blur > 1:
        scaled = cv2.medianBlur(scaled, odd_kernel(blur))
    return scaled


# ----------------------------------------------------------------------------------- scoring


@dataclass
class StageTimes:
    """Seconds spent in each stage of a localisation (see ``STAGES``)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def add(self, other: StageTimes) -> None:
        for name, value in other.seconds.items():
            self.seconds[name] += value

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def line(self) -> str:
        parts = ", ".join(f"{name} {value:.1f} s" for name, value in self.seconds.items())
        return f"{self.total:.1f} s ({parts})"


def _read_batch(source: ImageSource, windows: Sequence[TileWindow], bundle: RetrievalBundle) -> tuple[ImageBatch, float]:
    start = time.perf_counter()
    batch = image_batch([source.read(w) for w in windows], bundle.feature_spec)
    return batch, time.perf_counter() - start


def encode_windows(bundle: RetrievalBundle, source: ImageSource, windows: Sequence[TileWindow], times: StageTimes,
                   batch_size: int = 64, progress: bool = True) -> Encoding:
    """Encodings of ``windows`` of ``source``, the next batch read in a thread while this one encodes.

    The reading thread's time is recorded as ``reading`` (it overlaps encoding, so the stages can sum
    to more than the wall time).
    """
    if not windows:
        raise ValueError("no windows to encode")
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    parts = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsitr-localize") as pool:
        pending: Future[tuple[ImageBatch, float]] = pool.submit(_read_in_env, source, batches[0], bundle)
        for k in progress_bar(range(len(batches)), desc="windows", unit="batch", enabled=progress):
            batch, seconds = pending.result()
            times.seconds["reading"] += seconds
            if k + 1 < len(batches):
                pending = pool.submit(_read_in_env, source, batches[k + 1], bundle)
            with times.stage("image encoding"):
                features = features_of_images(bundle.backbone, batch, bundle.feature_spec)
                parts.append(bundle.encode_features(features))
    return concat_encodings(parts)


def _read_in_env(source: ImageSource, windows: Sequence[TileWindow], bundle: RetrievalBundle) -> tuple[ImageBatch, float]:
    with bounded_reading():
        return _read_batch(source, windows, bundle)


@dataclass
class Localization:
    """The heat maps of one image for some sentences, with what produced them.

    Attributes:
        heat: per sentence, the (height, width) uint8 heat map (step 4).
        windows: the windows scored (empty ones left out), in scoring order.
        scores: (n_windows, n_sentences) float32 window scores.
    """

    path: Path
    width: int
    height: int
    sentences: list[str]
    sizes: tuple[int, ...]
    blur: int
    windows: list[TileWindow]
    scores: np.ndarray
    heat: list[np.ndarray]
    times: StageTimes
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    bands: list[int] | None = None  # the source bands read as R, G, B (None: the file's default, or a picture)

    def hottest(self, k: int) -> tuple[int, int]:
        """(x, y) of the hottest pixel of sentence ``k``'s heat map (the first in row-major order)."""
        row, col = np.unravel_index(int(np.argmax(self.heat[k])), self.heat[k].shape)
        return int(col), int(row)

    def summary(self, k: int) -> dict[str, Any]:
        """JSON-able record of sentence ``k``: settings, hottest pixel and window, times."""
        best = int(np.argmax(self.scores[:, k]))
        window = self.windows[best]
        return {"image": str(self.path), "width": self.width, "height": self.height, "sentence": self.sentences[k],
                "sizes": list(self.sizes), "blur": self.blur, "windows": len(self.windows),
                "hottest_pixel": list(self.hottest(k)),
                "best_window": {"x": window.x, "y": window.y, "width": window.width, "height": window.height,
                                "score": float(self.scores[best, k])},
                "seconds": {name: round(value, 3) for name, value in self.times.seconds.items()}}


def localize(bundle: RetrievalBundle, image: str | Path, sentences: Sequence[str], sizes: Sequence[int] = DEFAULT_SIZES,
             blur: int = DEFAULT_BLUR, batch_size: int = 64, bands: Sequence[int] | None = None,
             progress: bool = True) -> Localization:
    """Heat maps of ``sentences`` over ``image`` (steps 1–4 of the module docstring).

    ``bands``: the source bands of a TIFF that become R, G, B; None = the bands the model was trained
    on (its feature spec), else the file's default. Pictures are read as RGB.
    """
    if not sentences:
        raise ConfigError("localisation needs at least one sentence")
    bands = tiff_bands(image, bands if bands is not None else bundle.feature_spec.bands)
    times = StageTimes()
    with bounded_reading(), open_image(image, bands) as source:
        info = source.info
        with times.stage("reading"):
            windows = [w for w in selo_windows(info.width, info.height, sizes) if not source.is_empty(w)]
        if not windows:
            raise ConfigError(f"{image}: no window of the image has a valid pixel")
        encoded = encode_windows(bundle, source, windows, times, batch_size, progress)
    with times.stage("text encoding"):
        texts = bundle.encode_texts(list(sentences))
    with times.stage("scoring"):
        scores = bundle.score(encoded, texts).numpy().astype(np.float32)
    heat = []
    with times.stage("fusion"):
        for k in range(len(sentences)):
            fused = fuse_window_scores(windows, scores[:, k], info.width, info.height)
            heat.append(normalise_and_smooth(fused, blur))
    return Localization(Path(image), info.width, info.height, list(sentences), check_sizes(sizes), blur, windows, scores,
                        heat, times, info.crs, info.transform, bands)


# ----------------------------------------------------------------------------------- outputs


def colour_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``0.7 · image + 0.3 · JET(heat)`` as (h, w, 3) uint8 RGB; ``heat`` is resized to the image if needed."""
    if heat.shape != image.shape[:2]:
        heat = cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    colour = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, OVERLAY_IMAGE_WEIGHT, colour, 1 - OVERLAY_IMAGE_WEIGHT, 0)


def _overview(path: Path, bands: Sequence[int] | None, width: int, height: int) -> np.ndarray:
    """The image at full resolution up to OVERLAY_MAX_SIDE on the long side, else a decimated read."""
    with bounded_reading(), open_image(path, bands) as source:
        whole = TileWindow(1.0, 0, 0, width, height)
        if max(width, height) <= OVERLAY_MAX_SIDE:
            return source.read(whole)
        return source.thumbnail(whole, OVERLAY_MAX_SIDE)


def _save_geotiff(path: Path, heat: np.ndarray, crs: str | None, transform: tuple[float, ...]) -> None:
    """The heat map as a single-band uint8 GeoTIFF with the input's CRS and transform, atomically."""
    profile = {"driver": "GTiff", "width": heat.shape[1], "height": heat.shape[0], "count": 1, "dtype": "uint8",
               "transform": Affine(*transform[:6]), "compress": "deflate"}
    if crs is not None:
        profile["crs"] = crs
    if heat.shape[0] >= 256 and heat.shape[1] >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as out:
        out.write(heat, 1)


def output_stem(result: Localization, k: int) -> str:
    """File stem of sentence ``k``'s outputs: the image's stem, with ``-K`` when there are several sentences."""
    return result.path.stem if len(result.sentences) == 1 else f"{result.path.stem}-{k}"


def write_localization(result: Localization, out_dir: str | Path, overlay: bool = True) -> list[Path]:
    """Heat map PNG, colour overlay JPEG and (georeferenced input) GeoTIFF, plus a JSON record, per sentence."""
    out = check_writable(out_dir, "localisation output folder")
    outputs: list[list[Path]] = []
    with result.times.stage("writing"):
        picture = _overview(result.path, result.bands, result.width, result.height) if overlay else None
        for k, heat in enumerate(result.heat):
            stem = output_stem(result, k)
            files = [out / f"{stem}.heat.png"]
            save_image(files[-1], heat)
            if picture is not None:
                files.append(out / f"{stem}.overlay.jpg")
                save_image(files[-1], colour_overlay(picture, heat), "JPEG", quality=90)
            if result.transform is not None:
                files.append(out / f"{stem}.heat.tif")
                _save_geotiff(files[-1], heat, result.crs, result.transform)
            outputs.append(files)
    written: list[Path] = []
    for k, files in enumerate(outputs):  # after the writing stage, so each record holds its whole time
        record = out / f"{output_stem(result, k)}.json"
        write_json(record, {**result.summary(k), "outputs": [p.name for p in files]})
        written += [*files, record]
    return written

