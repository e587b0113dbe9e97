"""Batched image augmentation on tensors, for training classifiers on remote-sensing scenes.

Everything works on a whole batch at once and draws its randomness from an explicit
:class:`torch.Generator`, so a seed reproduces a batch exactly (which is what makes an interrupted
pretraining run resume bit for bit) and the global RNG is never touched.

The geometric part is one resampling: a random resized crop, horizontal and vertical flips and a
rotation by a multiple of 90 degrees are composed into a single 2 x 3 affine matrix per sample,
and the batch is warped with one :func:`torch.nn.functional.affine_grid` +
:func:`torch.nn.functional.grid_sample` call straight from the stored size (uint8 or float, any
H x W) to the output size. Aerial images have no canonical "up", so flips and 90-degree rotations
are label-preserving, unlike for ordinary photos.

Coordinates follow ``grid_sample`` with ``align_corners=False``: ``-1`` and ``+1`` are the outer
edges of the first and last pixel. A crop covering a fraction ``fx`` of the width, centred at
``cx``, maps output x in [-1, 1] to input ``cx + fx * x``; a flip negates an output axis and a
rotation by 90 degrees swaps them, so flips and rotations of a full-frame crop move pixel centres
onto pixel centres and are exact.

Colour jitter (brightness, contrast, saturation, hue) runs after the warp, on the smaller output.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rsitr.errors import ConfigError
from rsitr.io import check_keys

#: ITU-R BT.601 luma weights, used for the grey level of contrast and saturation jitter.
LUMA = (0.299, 0.587, 0.114)

# RGB -> YIQ; the hue jitter rotates the (I, Q) chroma plane and converts back.
_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.595716, -0.274453, -0.321263),
    (0.211456, -0.522591, 0.311135),
)


@dataclass
class AugmentConfig:
    """Parameters of :func:`augment_batch`.

    Attributes:
        scale: range of the crop area as a fraction of the image area (uniform draw).
        ratio: range of the crop aspect ratio width / height (log-uniform draw).
        hflip: probability of a horizontal (left-right) flip.
        vflip: probability of a vertical (top-bottom) flip.
        rotate90: rotate by 0, 90, 180 or 270 degrees, uniformly.
        brightness: multiply by a factor drawn from ``[1 - brightness, 1 + brightness]``.
        contrast: scale the deviation from the image's mean grey by ``[1 - c, 1 + c]``.
        saturation: scale each pixel's deviation from its grey by ``[1 - s, 1 + s]``.
        hue: rotate the chroma plane by up to ``hue`` turns (0.5 = 180 degrees) either way.
            Off by default: colour often tells remote-sensing classes apart (water, fields, sand).
    """

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.5
    rotate90: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0

    def __post_init__(self) -> None:
        self.scale = (float(self.scale[0]), float(self.scale[1]))
        self.ratio = (float(self.ratio[0]), float(self.ratio[1]))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~rsitr.errors.ConfigError` naming the first out-of-range parameter."""
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"augment scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ConfigError(f"augment ratio must satisfy 0 < min <= max, got {self.ratio}")
        for name in ("hflip", "vflip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"augment {name} is a probability in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ConfigError(f"augment hue must be in [0, 0.5], got {self.hue}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a ConfigError."""
        check_keys(values, cls.__dataclass_fields__, "augment config", "augment parameter")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass
class Geometry:
    """The geometric draw of a batch, all tensors of length B.

    ``width``/``height`` are the crop extent as a fraction of the input width/height, ``cx``/``cy``
    its centre in normalised coordinates ([-1, 1]), ``hflip``/``vflip`` booleans and ``quarter``
    the number of 90-degree turns (0..3), as :func:`torch.rot90` counts them.
    """

    width: Tensor
    height: Tensor
    cx: Tensor
    cy: Tensor
    hflip: Tensor
    vflip: Tensor
    quarter: Tensor

    def take(self, rows: Tensor) -> Geometry:
        """The draws of samples ``rows`` only, in that order."""
        return Geometry(*(getattr(self, f)[rows] for f in ("width", "height", "cx", "cy", "hflip", "vflip", "quarter")))


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def sample_geometry(batch: int, in_height: int, in_width: int, config: AugmentConfig,
                    generator: torch.Generator) -> Geometry:
    """Draw crop box, flips and rotation of each of ``batch`` samples.

    The crop has area ``s * H * W`` with ``s`` uniform in ``config.scale`` and aspect ratio ``r``
    log-uniform in ``config.ratio``; a side that would exceed the image is clipped to it (instead
    of redrawing, which cannot be vectorised), and the position is uniform over where it fits.
    The number of values drawn does not depend on the configuration's switches, so changing one
    option does not reshuffle the others.
    """
    area = _uniform(batch, *config.scale, generator)
    log_ratio = _uniform(batch, math.log(config.ratio[0]), math.log(config.ratio[1]), generator)
    ratio = torch.exp(log_ratio)
    aspect = in_height / in_width
    width = torch.sqrt(area * ratio * aspect).clamp(max=1.0)
    height = torch.sqrt(area / ratio / aspect).clamp(max=1.0)
    cx = (2 * torch.rand(batch, generator=generator, dtype=torch.float64) - 1) * (1 - width)
    cy = (2 * torch.rand(batch, generator=generator, dtype=torch.float64) - 1) * (1 - height)
    hflip = torch.rand(batch, generator=generator) < config.hflip
    vflip = torch.rand(batch, generator=generator) < config.vflip
    quarter = torch.randint(0, 4, (batch,), generator=generator)
    if not config.rotate90:
        quarter = torch.zeros_like(quarter)
    return Geometry(width, height, cx, cy, hflip, vflip, quarter)


def identity_geometry(batch: int) -> Geometry:
    """The full frame, unflipped and unrotated (a plain resize when warped)."""
    ones, zeros = torch.ones(batch, dtype=torch.float64), torch.zeros(batch, dtype=torch.float64)
    no = torch.zeros(batch, dtype=torch.bool)
    return Geometry(ones, ones.clone(), zeros, zeros.clone(), no, no.clone(), torch.zeros(batch, dtype=torch.int64))


def affine_matrices(geometry: Geometry) -> Tensor:
    """One (B, 2, 3) float32 matrix per sample: input = crop(rotate(flip(output))).

    For output coordinates ``p``, the flip ``F = diag(+-1, +-1)`` acts first, then the rotation
    ``R^k`` with ``R = [[0, -1], [1, 0]]`` (which samples the image the way ``torch.rot90(k=1,
    dims=(-2, -1))`` arranges it), then the crop scales by its extent and shifts to its centre.
    """
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64)[geometry.quarter]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64)[geometry.quarter]
    fx = 1.0 - 2.0 * geometry.hflip.double()
    fy = 1.0 - 2.0 * geometry.vflip.double()
    theta = torch.zeros(len(cos), 2, 3, dtype=torch.float64)
    # R^k @ diag(fx, fy) = [[cos*fx, -sin*fy], [sin*fx, cos*fy]], then rows scaled by the crop extent.
    theta[:, 0, 0] = geometry.width * cos * fx
    theta[:, 0, 1] = -geometry.width * sin * fy
    theta[:, 1, 0] = geometry.height * sin * fx
    theta[:, 1, 1] = geometry.height * cos * fy
    theta[:, 0, 2] = geometry.cx
    theta[:, 1, 2] = geometry.cy
    return theta.float()


def to_float(images: Tensor) -> Tensor:
    """uint8 (0..255) or floating (0..1) images as float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float()


def warp(images: Tensor, geometry: Geometry, size: int) -> Tensor:
    """Resample a (B, C, H, W) batch through ``geometry`` to (B, C, size, size) float32, bilinear."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    theta = affine_matrices(geometry)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    # "reflection" only matters for float rounding at the crop border: crops lie inside the image.
    return F.grid_sample(to_float(images), grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _factors(n: int, strength: float, generator: torch.Generator) -> Tensor:
    """Per-sample factors uniform in ``[max(0, 1 - strength), 1 + strength]``, shaped (B, 1, 1, 1)."""
    return _uniform(n, max(0.0, 1.0 - strength), 1.0 + strength, generator).float().view(n, 1, 1, 1)


def _grey(images: Tensor) -> Tensor:
    """Luma of a (B, 3, H, W) batch, (B, 1, H, W)."""
    weights = torch.tensor(LUMA, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _hue_matrices(turns: Tensor) -> Tensor:
    """(B, 3, 3) RGB -> RGB matrices rotating the YIQ chroma plane by ``turns`` full turns."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
    angle = 2 * math.pi * turns
    rotation = torch.zeros(len(turns), 3, 3, dtype=torch.float64)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1] = torch.cos(angle)
    rotation[:, 1, 2] = -torch.sin(angle)
    rotation[:, 2, 1] = torch.sin(angle)
    rotation[:, 2, 2] = torch.cos(angle)
    return (torch.linalg.inv(to_yiq) @ rotation @ to_yiq).float()


def _drawn_size(images: Tensor, rows: Tensor | None, batch_size: int | None) -> int:
    """How many samples to draw for: the batch ``images`` belongs to (``batch_size`` when ``rows`` picks part of it)."""
    if rows is None:
        return images.shape[0]
    if batch_size is None or len(rows) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images as rows {len(rows)} of a batch of {batch_size}")
    return batch_size


def _pick(values: Tensor, rows: Tensor | None) -> Tensor:
    return values if rows is None else values[rows]


def color_jitter(images: Tensor, config: AugmentConfig, generator: torch.Generator, rows: Tensor | None = None,
                 batch_size: int | None = None) -> Tensor:
    """Brightness, contrast, saturation, then hue jitter of a float (B, 3, H, W) batch in [0, 1].

    Each factor is drawn per sample. Values are clamped to [0, 1] once, at the end, and a
    transform whose strength is 0 is skipped, so a configuration without jitter returns the
    input unchanged. ``rows`` / ``batch_size``: ``images`` are these rows of a batch of
    ``batch_size``; the factors are drawn for the whole batch and these rows' are applied
    (see :func:`augment_batch`).
    """
    n = _drawn_size(images, rows, batch_size)
    out = images
    if config.brightness > 0:
        out = out * _pick(_factors(n, config.brightness, generator), rows)
    if config.contrast > 0:
        mean = _grey(out).mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * _pick(_factors(n, config.contrast, generator), rows) + mean
    if config.saturation > 0:
        grey = _grey(out)
        out = (out - grey) * _pick(_factors(n, config.saturation, generator), rows) + grey
    if config.hue > 0:
        turns = _pick(_uniform(n, -config.hue, config.hue, generator), rows)
        out = torch.einsum("bij,bjhw->bihw", _hue_matrices(turns), out)
    if out is images:
        return images
    return out.clamp_(0.0, 1.0)


def augment_batch(images: Tensor, config: AugmentConfig, size: int, generator: torch.Generator,
                  rows: Tensor | None = None, batch_size: int | None = None) -> Tensor:
    """Training augmentation: random geometry (one warp), then colour jitter.

    Args:
        images: (B, 3, H, W) uint8 (0..255) or float (0..1), any H and W.
        config: the augmentation parameters.
        size: side of the square output.
        generator: source of all randomness; the same state gives the same batch.
        rows, batch_size: ``images`` are rows ``rows`` (positions) of a batch of ``batch_size``
            images. Every draw is made for the whole batch and only these rows' draws are
            applied, so a sample's augmentation and the generator's state afterwards do not depend
            on which rows one process augments (data-parallel pretraining: each process
            augments its share of the global batch, drawing parameters, not pixels, for all of it).

    Returns:
        (len(images), 3, size, size) float32 in [0, 1], not yet normalised.
    """
    n = _drawn_size(images, rows, batch_size)
    geometry = sample_geometry(n, images.shape[-2], images.shape[-1], config, generator)
    if rows is not None:
        geometry = geometry.take(rows)
    return color_jitter(warp(images, geometry, size), config, generator, rows, batch_size)


def eval_transform(images: Tensor, size: int) -> Tensor:
    """Evaluation transform: resize the whole image to ``size`` x ``size`` (bilinear), no crop.

    Remote-sensing scenes have their evidence anywhere in the frame, so validation sees all of it
    rather than a centre crop. Downscaling is antialiased. Returns float32 in [0, 1].
    """
    out = to_float(images)
    if out.shape[-2:] != (size, size):
        out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out = out.clamp_(0.0, 1.0)
    return out
