"""Image decoding: any size and mode in, a fixed-size RGB tensor out.

Remote-sensing datasets ship TIFF (UCM, RSITMD, Sydney), JPEG (RSICD), PNG and WebP, in RGB, RGBA,
palette, 16-bit and grayscale modes. :func:`load_image` converts all of them to 8-bit RGB and
resizes to a square of the configured side (the papers use 256) with bilinear interpolation.

Multispectral TIFFs. A TIFF with more than three bands that are not alpha, or with samples other
than uint8 (16-bit, float), or any TIFF read with ``bands``, is read by the raster reader
(:mod:`rsitr.data.rasters`, the one the serving application reads a user's imagery with), so a
dataset chip and a tile of a scene become the same pixels:

* ``bands`` are three 1-based source bands that become R, G, B (e.g. ``(4, 3, 2)``, near-infrared
  as red: the usual false-colour composite), or one band read as gray. By default (None): the
  bands whose colour interpretation is red, green and blue, else the first three that are not
  alpha. A band the file lacks is a one-line :class:`~rsitr.errors.ConfigError` naming the file;
  so is ``bands`` for a JPEG, PNG or WebP picture, which has no bands to choose.
* Samples other than uint8 get one linear stretch per file: the 2nd and 98th percentiles of each
  chosen band map to 0 and 255, values outside are clipped (the raster reader's stretch). Per file,
  so a chip's contrast does not depend on the batch it is decoded in.

Other files go through PIL exactly as before (:func:`to_rgb`), so the features of 8-bit datasets
do not change. GDAL (rasterio) is loaded only when a TIFF is read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rsitr.errors import ImageReadError
from rsitr.progress import progress_bar

#: Suffixes (lower case) of the files the raster reader opens; the others are pictures read by PIL.
RASTER_SUFFIXES = (".tif", ".tiff")
#: Band numbers (1-based) that become R, G, B, or one band read as gray.
Bands = Sequence[int]


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16-bit and float images are rescaled by their range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def read_image(path: str | Path, bands: Bands | None = None) -> Image.Image:
    """Decode ``path`` as an RGB PIL image at its original size.

    ``bands`` chooses the source bands of a TIFF (see the module docstring); None is the file's
    own RGB. Multispectral and non-8-bit TIFFs go through :mod:`rsitr.data.rasters`.

    Raises:
        ImageReadError: the file is missing, is not a decodable image, or is too large to decode whole.
        ConfigError: ``bands`` is malformed, names a band the file lacks, or is given for a picture.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "image file not found")
    if bands is not None or path.suffix.lower() in RASTER_SUFFIXES:
        from rsitr.data import rasters  # here, not at the top: rasters imports this module, and GDAL only for TIFFs

        if bands is not None or rasters.needs_raster_reader(path):
            return _read_raster(path, bands)
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise _too_large(path) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"cannot decode image ({exc.__class__.__name__})") from exc


def pixel_limit() -> int | None:
    """The most pixels an image decoded whole may have: where PIL refuses a picture (twice its
    ``MAX_IMAGE_PIXELS`` warning threshold), applied to rasters too; None when PIL's limit is off."""
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def _too_large(path: Path) -> ImageReadError:
    return ImageReadError(path, f"image is larger than the {pixel_limit() or 0:,}-pixel limit for decoding an image "
                                "whole; cut it into chips, or index it as a tiled GeoTIFF with rsitr index build "
                                "(read window by window)")


def _read_raster(path: Path, bands: Bands | None) -> Image.Image:
    """The whole of a TIFF (or, for the error, a picture given ``bands``) through the raster reader."""
    from rsitr.data.rasters import TileWindow, open_image

    with open_image(path, bands) as source:
        width, height = source.info.width, source.info.height
        limit = pixel_limit()
        if limit is not None and width * height > limit:
            raise _too_large(path)
        return Image.fromarray(source.read(TileWindow(1.0, 0, 0, width, height)))


def tiff_bands(path: str | Path, bands: Bands | None) -> list[int] | None:
    """``bands`` for a TIFF, None for a picture (JPEG, PNG, WebP: read as RGB, with no bands to choose).

    For images from outside a dataset (a user's files, an index's): a model trained on chosen bands
    reads TIFFs with them and pictures as they are, where a dataset given ``bands`` must be TIFFs.
    """
    if bands is None or Path(path).suffix.lower() not in RASTER_SUFFIXES:
        return None
    return [int(b) for b in bands]


def to_rgb(image: str | Path | Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image from a path, a PIL image of any mode, or an array.

    Arrays may be (H, W) grayscale, (H, W, 3) RGB or (H, W, 4) RGBA, either uint8 or float in
    [0, 1]; other shapes and dtypes are a ValueError naming the shape.
    """
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    array = np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"an image array must be uint8 or float in [0, 1], got {array.dtype}")
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return _to_rgb(Image.fromarray(array))


def resize_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """An RGB image resized to a ``size`` square as uint8 (3, size, size); PIL's bilinear resize
    antialiases when shrinking."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def resize_rgb(img: Image.Image, size: int) -> torch.Tensor:
    """An RGB image resized (bilinear) to a ``size`` square, as float32 (3, size, size) in [0, 1]."""
    return resize_uint8(img, size).float().div_(255.0)


def load_image(path: str | Path, size: int, bands: Bands | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read ``path`` (with the TIFF ``bands`` of :func:`read_image`) and return ``(tensor, (width, height))``.

    ``tensor`` is float32 of shape (3, size, size) with values in [0, 1]; ``(width, height)`` is the
    original size, which callers need to rescale boxes given in original pixel coordinates.
    """
    img = read_image(path, bands)
    return resize_rgb(img, size), img.size


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` of a (B, 3, H, W) batch in [0, 1] (a backbone's mean and std)."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def decode_images(paths: Sequence[Path], size: int, threads: int = 0, progress: bool = True,
                  desc: str = "decoding", bands: Bands | None = None) -> torch.Tensor:
    """Decode (with the TIFF ``bands`` of :func:`read_image`) and resize every image into one
    (N, 3, size, size) uint8 tensor, in parallel.

    PIL releases the GIL while decoding and resizing, so threads scale. The first unreadable file
    stops the work and raises its :class:`~rsitr.errors.ImageReadError` (naming the file).
    """
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    if not paths:
        return out

    def work(index: int) -> None:
        out[index] = resize_uint8(read_image(paths[index], bands), size)

    workers = threads or os.cpu_count() or 1
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rsitr-decode")
    try:
        for _ in progress_bar(pool.map(work, range(len(paths))), total=len(paths), desc=desc, unit="img",
                              enabled=progress):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out
