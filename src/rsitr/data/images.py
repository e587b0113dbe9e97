"""Image decoding: any size and mode in, a fixed-size RGB tensor out.

Remote-sensing datasets ship TIFF (UCM, RSITMD, Sydney), JPEG (RSICD), PNG and WebP, in RGB, RGBA,
palette, 16-bit and grayscale modes. :func:`load_image` converts all of them to 8-bit RGB and
resizes to a square of the configured side (the papers use 256) with bilinear interpolation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rsitr.errors import ImageReadError

#: ImageNet statistics, the normalisation every torchvision-style backbone expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError(path, f"cannot decode image ({exc.__class__.__name__})") from exc


def load_image(path: str | Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read ``path`` and return ``(tensor, (width, height))``.

    ``tensor`` is float32 of shape (3, size, size) with values in [0, 1]; ``(width, height)`` is the
    original size, which callers need to rescale boxes given in original pixel coordinates.
    """
    img = read_image(path)
    original_size = img.size
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    return tensor, original_size


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Apply ImageNet mean/std normalisation to a (B, 3, H, W) batch in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std
