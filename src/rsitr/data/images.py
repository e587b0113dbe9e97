"""Image decoding: any size and mode in, a fixed-size RGB tensor out.

Remote-sensing datasets ship TIFF (UCM, RSITMD, Sydney), JPEG (RSICD), PNG and WebP, in RGB, RGBA,
palette, 16-bit and grayscale modes. :func:`load_image` converts all of them to 8-bit RGB and
resizes to a square of the configured side (the papers use 256) with bilinear interpolation.
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


def read_image(path: str | Path) -> Image.Image:
    """Decode ``path`` as an RGB PIL image at its original size.

    Raises:
        ImageReadError: the file is missing or is not a decodable image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "image file not found")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"image is larger than the {Image.MAX_IMAGE_PIXELS:,}-pixel limit for decoding a picture "
                                   "whole; cut it into chips, or index it as a tiled GeoTIFF with rsitr index build "
                                   "(read window by window)") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"cannot decode image ({exc.__class__.__name__})") from exc


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


def load_image(path: str | Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read ``path`` and return ``(tensor, (width, height))``.

    ``tensor`` is float32 of shape (3, size, size) with values in [0, 1]; ``(width, height)`` is the
    original size, which callers need to rescale boxes given in original pixel coordinates.
    """
    img = read_image(path)
    return resize_rgb(img, size), img.size


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` of a (B, 3, H, W) batch in [0, 1] (a backbone's mean and std)."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def decode_images(paths: Sequence[Path], size: int, threads: int = 0, progress: bool = True,
                  desc: str = "decoding") -> torch.Tensor:
    """Decode and resize every image into one (N, 3, size, size) uint8 tensor, in parallel.

    PIL releases the GIL while decoding and resizing, so threads scale. The first unreadable file
    stops the work and raises its :class:`~rsitr.errors.ImageReadError` (naming the file).
    """
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    if not paths:
        return out

    def work(index: int) -> None:
        out[index] = resize_uint8(read_image(paths[index]), size)

    workers = threads or os.cpu_count() or 1
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rsitr-decode")
    try:
        for _ in progress_bar(pool.map(work, range(len(paths))), total=len(paths), desc=desc, unit="img",
                              enabled=progress):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out
