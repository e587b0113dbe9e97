"""Opening an image file and reading pixel windows of it as 8-bit RGB, never the whole of a large raster.

:func:`open_image` returns an :class:`ImageSource` (a context manager) whose :meth:`~ImageSource.read`
gives one :class:`TileWindow` as a (height, width, 3) uint8 array at source resolution. The serving
application reads a user's imagery through it (index, search, localisation), and dataset images
that PIL cannot read as RGB (multispectral and 16-bit TIFFs, :func:`needs_raster_reader`, or any
TIFF given ``bands``) come through it too (:func:`rsitr.data.images.read_image`), so a model sees
the same pixels in training and in serving. Two back ends, chosen by the file suffix (case-insensitive):

* **GeoTIFF and plain TIFF** (``RASTER_SUFFIXES``) go through rasterio (GDAL), window by window:
  each read asks GDAL for that window only, so memory per read is bounded by the window, whatever
  the size of the file. The only other memory is GDAL's block cache (``GDAL_CACHEMAX``, by default
  5 % of RAM), which GDAL bounds and evicts itself. A file without georeferencing has ``crs`` and
  ``transform`` None (rasterio's NotGeoreferencedWarning is silenced); a file with a transform but
  no CRS keeps its transform (bounds in its own unnamed units, no lon/lat). Georeferencing by GCPs
  or RPCs only is not used. A rasterio dataset is not thread-safe: use one source per thread.
* **JPEG, PNG and WebP** (``PICTURE_SUFFIXES``) go through PIL, decoded once on open (these are
  chips) and converted exactly as :func:`rsitr.data.images.to_rgb` converts dataset images (RGBA
  and palette composited over black, gray repeated, 16-bit and float rescaled by their min and max),
  so reading the whole of a picture gives the pixels training saw. A picture too large for PIL's
  decompression-bomb limit is refused: convert it to a tiled GeoTIFF. ``bands`` is refused for
  pictures (they are read as RGB): band selection is for multi-band rasters.

Bands (rasters). ``bands`` are 1-based source band numbers, one (gray, repeated to three channels)
or three (R, G, B), e.g. ``(4, 3, 2)`` for a false-colour composite; another count or a band that does
not exist is a one-line ConfigError naming the file. By default: the bands whose GDAL colour
interpretation is red, green and blue when all three exist; otherwise the first three bands that are
not alpha; a file with fewer than three such bands is gray from the first one. A single-band uint8
file with a colour table (colour interpretation palette) is expanded through its table, as PIL expands
palette images. An alpha band is never chosen by default.

Validity. A pixel is invalid where GDAL's mask of every chosen band says so: alpha 0 (an alpha band
or an internal mask), or the pixel equals the file's nodata value in every chosen band; in float
data a NaN or infinite value is invalid too. Invalid pixels are black, as PIL's RGBA path makes
transparent pixels (for rasters alpha is a yes/no: partly transparent pixels are not blended).
:meth:`~ImageSource.is_empty` says whether a window has no valid pixel at all, from the window's
mask only (plus its data for float files), so the indexer can skip tiles of nodata margin.

Stretch. uint8 data is used as is (``info.stretch`` None). Any other data type (uint16, int16,
float32, …) gets one linear stretch per file, computed on open from a decimated read of the whole
file (nearest neighbour, long side at most 1024 px, so bounded memory; GDAL reads overviews when the
file has them, which makes opening a big file fast): per output channel, the 2nd and 98th
percentiles (numpy's linear interpolation) of the valid pixels map to 0 and 255, values outside are
clipped, and the result is rounded to the nearest integer. Per file, not per tile, so tiles of one
scene are comparable. A channel whose two percentiles are equal (a flat band) maps values up to
them to 0 and values above to 255.

Geography. :meth:`~ImageSource.bounds` is the (minx, miny, maxx, maxy) of a window's four corners
in the file's CRS (for the usual north-up transform, ``rasterio.windows.bounds``);
:meth:`~ImageSource.lonlat_bounds` is that box in EPSG:4326, (west, south, east, north), through
``rasterio.warp.transform_bounds`` (densified edges). Both are None without georeferencing.

Thumbnails (contact sheets): rasters read the window with GDAL's ``out_shape`` decimation (average
resampling, masks by nearest neighbour), so a huge window costs only the thumbnail's memory;
pictures crop and resize with PIL's bilinear filter (antialiased when shrinking). The long side of
a thumbnail is exactly ``size``.

Errors: a missing, unsupported, unreadable or truncated file raises
:class:`rsitr.errors.ImageReadError` naming the file, on open, or (a TIFF whose strips or tiles are
cut off) on the first read that reaches the damage.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from PIL import Image, UnidentifiedImageError
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from rsitr.data.images import RASTER_SUFFIXES, to_rgb
from rsitr.errors import ConfigError, ImageReadError

PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SUPPORTED_SUFFIXES = RASTER_SUFFIXES + PICTURE_SUFFIXES

#: The long side of the decimated read the per-file stretch is computed from.
STRETCH_SAMPLE_SIDE = 1024
STRETCH_PERCENTILES = (2.0, 98.0)

Bounds = tuple[float, float, float, float]


@dataclass(frozen=True, order=True)
class TileWindow:
    """A pixel window (x, y, width, height) of a source image, cut at size multiplier ``scale``.

    ``scale`` is the size multiplier of the tiling that cut it (the serving application's tiles);
    a window read whole, not cut by a tiler, has scale 1.0. Windows compare field by field
    (scale, x, y, width, height).
    """

    scale: float
    x: int
    y: int
    width: int
    height: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The window as (x, y, width, height), without its scale: what identifies its pixels."""
        return (self.x, self.y, self.width, self.height)
#: Per output channel, the (low, high) source values mapped to 0 and 255.
Stretch = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class RasterInfo:
    """What :func:`open_image` found in a file, and how its pixels become 8-bit RGB."""

    path: Path
    width: int
    height: int
    band_count: int
    dtype: str                 # "uint8", "uint16", "float32", ...
    bands: tuple[int, ...]     # the 1-based source bands that become R, G, B (length 3; a gray image repeats one)
    crs: str | None            # "EPSG:32633" when the CRS has an EPSG code, else WKT; None if not georeferenced
    transform: tuple[float, float, float, float, float, float] | None   # affine a, b, c, d, e, f; None if not georeferenced
    stretch: Stretch | None   # per output channel (low, high) mapped to 0..255; None for uint8 data

    def to_dict(self) -> dict[str, Any]:
        """The info as JSON-able values (path as a string, tuples as lists)."""
        return {"path": str(self.path), "width": self.width, "height": self.height, "band_count": self.band_count,
                "dtype": self.dtype, "bands": list(self.bands), "crs": self.crs,
                "transform": None if self.transform is None else list(self.transform),
                "stretch": None if self.stretch is None else [list(pair) for pair in self.stretch]}


def is_supported(path: Path) -> bool:
    """Whether ``path`` has a suffix :func:`open_image` reads (case-insensitive)."""
    return Path(path).suffix.lower() in SUPPORTED_SUFFIXES


def open_image(path: str | Path, bands: Sequence[int] | None = None,
               stretch: Sequence[tuple[float, float]] | None = None) -> ImageSource:
    """Open ``path`` for windowed reading, with the source ``bands`` (1-based) that become R, G, B.

    ``stretch`` reuses the ``info.stretch`` of an earlier open of the same file (three (low, high)
    pairs), so that reopening a large 16-bit or float raster, once per chunk of an index job, skips
    the decimated read that computes it and gives the same pixels; for uint8 data and for pictures it
    must be None or equal to what the file gives.

    Raises:
        ImageReadError: the file is missing, of an unsupported type, or cannot be decoded.
        ConfigError: ``bands`` has the wrong count, names a band the file lacks, or is given for a
            picture; ``stretch`` is malformed or does not apply to the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ImageReadError(path, f"unsupported image type {suffix or '(no suffix)'!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}")
    if not path.is_file():
        raise ImageReadError(path, "image file not found")
    given = _checked_stretch(path, stretch)
    if suffix in RASTER_SUFFIXES:
        return RasterioSource(path, bands, given)
    if bands is not None:
        raise ConfigError(f"{path}: band selection applies to GeoTIFF/TIFF files only; a {suffix} picture is read as RGB")
    source = PictureSource(path)
    _check_same_stretch(source, given)
    return source


#: GDAL's block cache while a job reads rasters, in MiB. GDAL's default is 5 % of the machine's RAM,
#: a cache that grows with the machine rather than with the work; reading tiles row by row needs
#: the blocks of about two block rows of a scene (a 20,000-pixel-wide RGB scene in 512-pixel blocks:
#: 60 MiB).
GDAL_CACHE_MB = 128


def bounded_reading(cache_mb: int = GDAL_CACHE_MB) -> rasterio.Env:
    """A context in which GDAL caches at most ``cache_mb`` MiB of raster blocks (enter it in the reading thread)."""
    return rasterio.Env(GDAL_CACHEMAX=cache_mb)


def probe_image(path: str | Path, bands: Sequence[int] | None = None) -> RasterInfo:
    """What :func:`open_image` would report about ``path``, without decoding a picture's pixels.

    Rasters are opened (their header, and for non-uint8 data the decimated read of the stretch);
    pictures are read up to their header only, so planning a job over thousands of chips does not
    decode each one twice. A picture's ``stretch`` (16-bit and float pictures only) is known once it
    is decoded, so here it is None; a damaged picture body is found by the first :func:`open_image`.

    Raises:
        ImageReadError, ConfigError: as :func:`open_image`, for what the header shows.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in RASTER_SUFFIXES or suffix not in SUPPORTED_SUFFIXES or not path.is_file():
        with open_image(path, bands) as source:
            return source.info
    if bands is not None:
        raise ConfigError(f"{path}: band selection applies to GeoTIFF/TIFF files only; a {suffix} picture is read as RGB")
    try:
        with Image.open(path) as img:
            mode, (width, height) = img.mode, img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"cannot decode image ({exc.__class__.__name__})") from exc
    gray = mode not in _COLOUR_BANDS
    return RasterInfo(path=path, width=width, height=height, band_count=_COLOUR_BANDS.get(mode, 2 if mode == "LA" else 1),
                      dtype=_picture_dtype(mode), bands=(1, 1, 1) if gray else (1, 2, 3), crs=None, transform=None,
                      stretch=None)


def needs_raster_reader(path: str | Path) -> bool:
    """Whether a TIFF must be read here to become RGB as :func:`open_image` makes it by default.

    True for samples other than uint8 (16-bit, float) and for more than three bands that are not
    alpha (a multispectral layout): PIL refuses most such files as undecodable, and would read the
    others without the per-file stretch or band choice. Only the header is read. False for
    pictures, for 8-bit gray, palette, RGB and RGBA TIFFs (which PIL reads as before), and for a
    file GDAL cannot open, so that PIL's error names it as it always has.
    """
    path = Path(path)
    if path.suffix.lower() not in RASTER_SUFFIXES:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                dtypes, colorinterp = list(ds.dtypes), list(ds.colorinterp)
    except RasterioError:
        return False
    colour_bands = [c for c in colorinterp if c != ColorInterp.alpha]
    return any(dtype != "uint8" for dtype in dtypes) or len(colour_bands) > 3


def _checked_stretch(path: Path, stretch: Sequence[tuple[float, float]] | None) -> Stretch | None:
    """``stretch`` as a tuple of three (low, high) float pairs; ConfigError naming the file otherwise."""
    if stretch is None:
        return None
    try:
        pairs = tuple((float(low), float(high)) for low, high in stretch)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: a stretch must be three (low, high) pairs, got {stretch!r}") from exc
    if len(pairs) != 3 or not all(np.isfinite(pairs).flat):
        raise ConfigError(f"{path}: a stretch must be three finite (low, high) pairs, got {stretch!r}")
    return pairs


def _check_same_stretch(source: ImageSource, given: Stretch | None) -> None:
    """ConfigError (and the source closed) when a stretch was given for a file whose own stretch is another."""
    if given is not None and given != source.info.stretch:
        source.close()
        what = "uint8 data is used as is" if source.info.stretch is None else f"its own is {source.info.stretch}"
        raise ConfigError(f"{source.info.path}: the given stretch {given} does not apply to this file ({what})")


class ImageSource:
    """An open image file: its :class:`RasterInfo` and reads of pixel windows as uint8 RGB.

    Use as a context manager (or call :meth:`close`). Windows must lie inside the image.
    """

    info: RasterInfo

    def read(self, window: TileWindow) -> np.ndarray:
        """The window at source resolution, (height, width, 3) uint8; invalid pixels are black."""
        raise NotImplementedError

    def is_empty(self, window: TileWindow) -> bool:
        """Whether the window has no valid pixel (all nodata, alpha 0, or non-finite)."""
        raise NotImplementedError

    def thumbnail(self, window: TileWindow, size: int) -> np.ndarray:
        """A small (h, w, 3) uint8 preview of the window whose long side is ``size``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file (a raster's reads fail afterwards)."""

    def bounds(self, window: TileWindow) -> Bounds | None:
        """(minx, miny, maxx, maxy) of the window's corners in ``info.crs``; None without a transform."""
        if self.info.transform is None:
            return None
        self._check_window(window)
        transform = Affine(*self.info.transform)
        corners = [transform @ (col, row) for col in (window.x, window.x + window.width)
                   for row in (window.y, window.y + window.height)]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        return (min(xs), min(ys), max(xs), max(ys))

    def lonlat_bounds(self, window: TileWindow) -> Bounds | None:
        """(west, south, east, north) of the window in EPSG:4326; None without a CRS."""
        box = self.bounds(window)
        if box is None or self.info.crs is None:
            return None
        return tuple(float(v) for v in transform_bounds(CRS.from_user_input(self.info.crs), "EPSG:4326", *box))  # type: ignore[return-value]

    def _check_window(self, window: TileWindow) -> None:
        """ValueError when ``window`` is empty or sticks out of the image: a caller's mistake, not bad input."""
        if (window.width < 1 or window.height < 1 or window.x < 0 or window.y < 0
                or window.x + window.width > self.info.width or window.y + window.height > self.info.height):
            raise ValueError(f"{self.info.path}: window {window.box} is not inside the {self.info.width} × {self.info.height} image")

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()


def thumbnail_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(height, width) of a ``size`` thumbnail of a ``width`` × ``height`` window: long side ``size``, aspect kept."""
    if size < 1:
        raise ValueError(f"a thumbnail side must be at least 1 pixel, got {size}")
    if width >= height:
        return max(1, round(height * size / width)), size
    return size, max(1, round(width * size / height))


# ---------------------------------------------------------------------------------------------------------------------
# Rasters through rasterio


def _gdal_problem(error: BaseException, path: Path) -> str:
    """The most specific line of a rasterio error chain (GDAL's own message), without a leading file name."""
    messages: list[str] = []
    current: BaseException | None = error
    while current is not None and len(messages) < 10:
        messages.append(str(current).strip())
        current = current.__cause__ or current.__context__
    useful = [m for m in messages if m and "see previous exception" not in m.lower()]
    message = useful[-1].splitlines()[0] if useful else error.__class__.__name__
    for prefix in (f"{path}: ", f"{path.name}: "):
        message = message.removeprefix(prefix)
    return message


def default_bands(colorinterp: Sequence[ColorInterp]) -> tuple[int, int, int]:
    """The bands that become R, G, B by default, from the bands' colour interpretations (see the module docstring)."""
    order = list(colorinterp)
    if all(c in order for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
        return (order.index(ColorInterp.red) + 1, order.index(ColorInterp.green) + 1, order.index(ColorInterp.blue) + 1)
    candidates = [k + 1 for k, c in enumerate(order) if c != ColorInterp.alpha] or [1]
    if len(candidates) >= 3:
        return (candidates[0], candidates[1], candidates[2])
    return (candidates[0],) * 3


def chosen_bands(path: Path, requested: Sequence[int] | None, colorinterp: Sequence[ColorInterp]) -> tuple[int, int, int]:
    """``requested`` checked against the file's band count (one band repeated), or :func:`default_bands`."""
    if requested is None:
        return default_bands(colorinterp)
    count = len(colorinterp)
    bands = tuple(requested)
    if len(bands) not in (1, 3):
        raise ConfigError(f"{path}: bands must be 1 or 3 band numbers (1-based), got {len(bands)}: {list(bands)}")
    for band in bands:
        if isinstance(band, bool) or not isinstance(band, (int, np.integer)) or not 1 <= band <= count:
            raise ConfigError(f"{path}: band {band!r} does not exist; the file has {count} band{'s' if count > 1 else ''} "
                              f"(1-{count})")
    picked = tuple(int(b) for b in bands)
    return (picked[0],) * 3 if len(picked) == 1 else (picked[0], picked[1], picked[2])


def sample_shape(width: int, height: int, side: int = STRETCH_SAMPLE_SIDE) -> tuple[int, int]:
    """(height, width) of the decimated read for the stretch: the image itself if its long side is at most ``side``."""
    long_side = max(width, height)
    if long_side <= side:
        return height, width
    return max(1, round(height * side / long_side)), max(1, round(width * side / long_side))


def percentile_stretch(bands: np.ndarray, valid: np.ndarray) -> Stretch:
    """Per band of (B, H, W) data, the 2nd and 98th percentiles of its valid, finite values; (0, 0) if none."""
    pairs = []
    everywhere = bool(valid.all())
    for band in bands:
        values = band.ravel() if everywhere else band[valid]
        if np.issubdtype(values.dtype, np.floating):
            values = values[np.isfinite(values)]
        if values.size == 0:
            pairs.append((0.0, 0.0))
            continue
        low, high = np.percentile(values, STRETCH_PERCENTILES)
        pairs.append((float(low), float(high)))
    return tuple(pairs)


def apply_stretch(channels: np.ndarray, stretch: Sequence[tuple[float, float]]) -> np.ndarray:
    """(C, H, W) data to uint8: ``round(clip((v - low) * 255 / (high - low), 0, 255))`` per channel; NaN to 0."""
    out = np.empty(channels.shape, dtype=np.uint8)
    for k, (channel, (low, high)) in enumerate(zip(channels, stretch)):
        values = channel.astype(np.float64)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else (values > low) * 255.0
        out[k] = np.rint(np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 255.0))
    return out


class RasterioSource(ImageSource):
    """A TIFF or GeoTIFF read window by window through rasterio."""

    def __init__(self, path: Path, bands: Sequence[int] | None, stretch: Stretch | None = None) -> None:
        self._dataset = self._open(path)
        try:
            self._setup(path, bands, stretch)
        except BaseException:
            self._dataset.close()
            raise

    @staticmethod
    def _open(path: Path) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                return rasterio.open(path)
        except RasterioError as exc:
            raise ImageReadError(path, f"cannot open raster ({_gdal_problem(exc, path)})") from exc

    def _setup(self, path: Path, bands: Sequence[int] | None, stretch: Stretch | None) -> None:
        ds = self._dataset
        chosen = chosen_bands(path, bands, ds.colorinterp)
        self._unique = sorted(set(chosen))
        self._channel_rows = [self._unique.index(b) for b in chosen]
        dtypes = {ds.dtypes[b - 1] for b in self._unique}
        dtype = np.result_type(*dtypes)
        if np.issubdtype(dtype, np.complexfloating):
            raise ImageReadError(path, f"complex-valued bands ({dtype}) are not supported")
        self._dtype = dtype
        self._palette = self._palette_table(chosen, bands)
        self._all_valid = all(list(ds.mask_flag_enums[b - 1]) == [MaskFlags.all_valid] for b in self._unique)
        self.info = RasterInfo(path=path, width=ds.width, height=ds.height, band_count=ds.count, dtype=str(dtype),
                               bands=chosen, crs=self._crs_text(), transform=self._transform_tuple(), stretch=None)
        if dtype == np.uint8:
            _check_same_stretch(self, stretch)
        else:
            self.info = dataclasses.replace(self.info, stretch=stretch or self._compute_stretch())

    def _palette_table(self, chosen: tuple[int, int, int], requested: Sequence[int] | None) -> np.ndarray | None:
        """A (256, 3) uint8 lookup table for a single-band uint8 palette file read by default, else None."""
        ds = self._dataset
        band = chosen[0]
        if requested is not None or ds.count != 1 or ds.dtypes[0] != "uint8" or ds.colorinterp[0] != ColorInterp.palette:
            return None
        try:
            colormap = ds.colormap(band)
        except ValueError:  # no colour table after all
            return None
        table = np.zeros((256, 3), dtype=np.uint8)
        for index, rgba in colormap.items():
            if 0 <= index < 256:
                table[index] = rgba[:3] if len(rgba) < 4 or rgba[3] > 0 else (0, 0, 0)
        return table

    def _crs_text(self) -> str | None:
        crs = self._dataset.crs
        if crs is None:
            return None
        epsg = crs.to_epsg()
        return f"EPSG:{epsg}" if epsg is not None else crs.to_wkt()

    def _transform_tuple(self) -> tuple[float, float, float, float, float, float] | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            transform = self._dataset.transform
        if self._dataset.crs is None and transform.is_identity:
            return None
        return (transform.a, transform.b, transform.c, transform.d, transform.e, transform.f)

    def _compute_stretch(self) -> Stretch:
        """The per-file stretch from a decimated read of the whole file (see the module docstring)."""
        out_height, out_width = sample_shape(self.info.width, self.info.height)
        data, valid = self._read_raw(None, (out_height, out_width), Resampling.nearest, Resampling.nearest)
        per_band = percentile_stretch(data, valid)
        return tuple(per_band[row] for row in self._channel_rows)

    def _read_raw(self, window: TileWindow | None, out_shape: tuple[int, int] | None, resampling: Resampling,
                  mask_resampling: Resampling) -> tuple[np.ndarray, np.ndarray]:
        """(unique bands, h, w) data and the (h, w) bool validity of a window (None: the whole file)."""
        ds = self._dataset
        if ds.closed:
            raise ValueError(f"{self.info.path}: the image source is closed")
        gdal_window = None if window is None else Window(window.x, window.y, window.width, window.height)
        shape = None if out_shape is None else (len(self._unique), *out_shape)
        try:
            data = ds.read(indexes=self._unique, window=gdal_window, out_shape=shape, resampling=resampling,
                           out_dtype=self._dtype)
            valid = self._valid(gdal_window, shape, mask_resampling, data.shape[1:])
        except RasterioError as exc:
            where = "the whole file" if window is None else f"window {window.box}"
            raise self._damaged(where, exc) from exc
        return data, valid

    def _valid(self, gdal_window: Window | None, shape: tuple[int, ...] | None, resampling: Resampling,
               plane: tuple[int, ...]) -> np.ndarray:
        if self._all_valid:
            return np.ones(plane, dtype=bool)
        masks = self._dataset.read_masks(indexes=self._unique, window=gdal_window, out_shape=shape, resampling=resampling)
        return np.any(masks > 0, axis=0)

    def _to_rgb(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(unique bands, h, w) raw data to (h, w, 3) uint8 RGB, invalid pixels black."""
        if self._palette is not None:
            rgb = self._palette[data[0]]
        else:
            channels = data[self._channel_rows]
            planes = channels if self.info.stretch is None else apply_stretch(channels, self.info.stretch)
            rgb = np.moveaxis(planes, 0, -1)
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        if not valid.all():
            rgb[~valid] = 0
        return rgb

    def read(self, window: TileWindow) -> np.ndarray:
        self._check_window(window)
        data, valid = self._read_raw(window, None, Resampling.nearest, Resampling.nearest)
        return self._to_rgb(data, valid)

    def is_empty(self, window: TileWindow) -> bool:
        self._check_window(window)
        floating = np.issubdtype(self._dtype, np.floating)
        if self._all_valid and not floating:
            return False
        gdal_window = Window(window.x, window.y, window.width, window.height)
        try:
            valid = self._valid(gdal_window, None, Resampling.nearest, (window.height, window.width))
            if floating and valid.any():
                data = self._dataset.read(indexes=self._unique, window=gdal_window, out_dtype=self._dtype)
                valid &= np.isfinite(data).any(axis=0)
        except RasterioError as exc:
            raise self._damaged(f"window {window.box}", exc) from exc
        return not valid.any()

    def _damaged(self, where: str, error: RasterioError) -> ImageReadError:
        problem = _gdal_problem(error, self.info.path)
        return ImageReadError(self.info.path, f"damaged or truncated raster: reading {where} failed ({problem})")

    def thumbnail(self, window: TileWindow, size: int) -> np.ndarray:
        self._check_window(window)
        shape = thumbnail_shape(window.width, window.height, size)
        resampling = Resampling.nearest if self._palette is not None else Resampling.average
        data, valid = self._read_raw(window, shape, resampling, Resampling.nearest)
        return self._to_rgb(data, valid)

    def close(self) -> None:
        self._dataset.close()


# ---------------------------------------------------------------------------------------------------------------------
# Pictures through PIL

_COLOUR_BANDS = {"RGB": 3, "RGBA": 4, "P": 3, "PA": 4, "CMYK": 4, "YCbCr": 3, "LAB": 3, "HSV": 3}
_ALPHA_MODES = ("RGBA", "LA", "P", "PA")  # the modes rsitr.data.images composites over black


class PictureSource(ImageSource):
    """A JPEG, PNG or WebP chip, decoded once on open and cropped per window."""

    def __init__(self, path: Path) -> None:
        try:
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                alpha = self._alpha(img)
                stretch = self._minmax_stretch(img)
                rgb = to_rgb(img)
        except Image.DecompressionBombError as exc:
            raise ImageReadError(path, "picture too large to decode whole; convert it to a tiled GeoTIFF") from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise ImageReadError(path, f"cannot decode image ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                                 ) from exc
        self._rgb = np.asarray(rgb, dtype=np.uint8)
        self._alpha_plane = alpha
        gray = mode not in _COLOUR_BANDS
        band_count = _COLOUR_BANDS.get(mode, 2 if mode == "LA" else 1)
        self.info = RasterInfo(path=path, width=rgb.width, height=rgb.height, band_count=band_count,
                               dtype=_picture_dtype(mode), bands=(1, 1, 1) if gray else (1, 2, 3), crs=None,
                               transform=None, stretch=stretch)

    @staticmethod
    def _alpha(img: Image.Image) -> np.ndarray | None:
        """The (h, w) alpha plane of a picture that has transparency, else None."""
        if img.mode not in _ALPHA_MODES:
            return None
        alpha = np.asarray(img.convert("RGBA").getchannel("A"), dtype=np.uint8)
        return None if alpha.min() == 255 else alpha

    @staticmethod
    def _minmax_stretch(img: Image.Image) -> Stretch | None:
        """The (min, max) range :func:`rsitr.data.images.to_rgb` maps to 0..255 for 16-bit, 32-bit and float pictures."""
        if img.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
            return None
        values = np.asarray(img)
        return ((float(values.min()), float(values.max())),) * 3

    def read(self, window: TileWindow) -> np.ndarray:
        self._check_window(window)
        return self._rgb[window.y : window.y + window.height, window.x : window.x + window.width].copy()

    def is_empty(self, window: TileWindow) -> bool:
        self._check_window(window)
        if self._alpha_plane is None:
            return False
        return not self._alpha_plane[window.y : window.y + window.height, window.x : window.x + window.width].any()

    def thumbnail(self, window: TileWindow, size: int) -> np.ndarray:
        height, width = thumbnail_shape(window.width, window.height, size)
        crop = Image.fromarray(self.read(window))
        return np.asarray(crop.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8).copy()

    def close(self) -> None:
        """Nothing to release: the picture was decoded on open."""


def _picture_dtype(mode: str) -> str:
    """The numpy name of a PIL mode's sample type."""
    if mode.startswith("I;16"):
        return "uint16"
    return {"I": "int32", "F": "float32", "1": "bool"}.get(mode, "uint8")
