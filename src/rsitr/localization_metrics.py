"""Semantic-localisation (SeLo) annotations and metrics: Rsu, Ras, Rda and Rmi.

Semantic localisation asks where, in a large remote-sensing image, the area a sentence describes
lies. A method answers with a heat map; ``prob`` is that map scaled to [0, 1] (the uint8 heat map
divided by 255, :func:`prob_from_heat`). The ground truth is one or more polygons per sentence,
stored in the public test set's ``anno.json``: a JSON list of ``{"caption", "jpg_name", "points"}``
where ``points`` is a list of polygons, each a list of ``[x, y]`` pixel coordinates (floats).

The metrics are those of Yuan et al., "Learning to evaluate performance of multi-modal semantic
localization" (2022), as summarised in the project's notes on that paper:

* **Rsu** (higher is better): how much of the heat lies inside the ground-truth mask, normalised
  by the mask's share of the image (:func:`rsu`);
* **Ras** (lower is better): how far the predicted hot spots lie from the regions' centres
  (:func:`predicted_centres`, :func:`region_centre_radius`, :func:`ras`);
* **Rda** (higher is better): whether the hot spots inside a region concentrate (:func:`rda`);
* **Rmi** = 0.4·Rsu + 0.35·(1 − Ras) + 0.25·Rda (:func:`rmi`).

Each is computed per sample (:func:`selo_metrics`) and averaged over the samples
(:func:`average_metrics`). Where the published summary leaves a detail open, the choice made here
is written in the docstring of the function that makes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from rsitr.errors import DatasetError
from rsitr.io import read_json, write_json

ANNOTATION_KEYS = ("caption", "jpg_name", "points")
RSU_GAIN = 0.707
RSU_EPS = 1e-7
RADIUS_SCALE = 1.5
RAS_SHARPNESS = 3.0
RMI_WEIGHTS = (0.4, 0.35, 0.25)
BOX_SIZE = 50
BOX_PASSES = 5
MAX_FILTER_SIZE = 1000
CENTRE_THRESHOLD = 0.5
PLATEAU_TOLERANCE = 1e-5
METRIC_NAMES = ("rsu", "ras", "rda", "rmi", "n_centres")


@dataclass(eq=False)
class LocalizationSample:
    """One SeLo query: a sentence, the image it is about, and the ground-truth polygons.

    ``polygons`` holds one ``(k, 2)`` float64 array of ``(x, y)`` pixel vertices per region,
    ``k >= 3``. ``caption`` is kept exactly as stored (the public file ends one caption with a
    newline), so reading and writing a file changes nothing.
    """

    caption: str
    image: str
    polygons: list[np.ndarray] = field(default_factory=list)


# ---------------------------------------------------------------- annotations


def _parse_polygon(raw: Any, where: str) -> np.ndarray:
    """A ``(k, 2)`` float64 array from a JSON polygon; ValueError (message without the file) otherwise."""
    if not isinstance(raw, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
        for p in raw
    ):
        raise ValueError(f"{where} must be a list of [x, y] number pairs")
    if len(raw) < 3:
        raise ValueError(f"{where} has {len(raw)} point(s), a polygon needs at least 3")
    points = np.asarray(raw, dtype=np.float64).reshape(len(raw), 2)
    if not np.isfinite(points).all():
        raise ValueError(f"{where} has a non-finite coordinate")
    return points


def _parse_sample(raw: Any, index: int) -> LocalizationSample:
    """One annotation entry as a :class:`LocalizationSample`; ValueError naming the sample otherwise."""
    where = f"sample {index}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is a {type(raw).__name__}, expected an object with keys {', '.join(ANNOTATION_KEYS)}")
    missing = [key for key in ANNOTATION_KEYS if key not in raw]
    if missing:
        raise ValueError(f"{where} lacks key(s) {', '.join(missing)}")
    caption, image, points = raw["caption"], raw["jpg_name"], raw["points"]
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where} has an empty caption")
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"{where} has an empty jpg_name")
    if not isinstance(points, list) or not points:
        raise ValueError(f"{where}: points must be a non-empty list of polygons")
    polygons = [_parse_polygon(poly, f"{where} polygon {j}") for j, poly in enumerate(points)]
    return LocalizationSample(caption=caption, image=image, polygons=polygons)


def read_annotations(path: str | Path) -> list[LocalizationSample]:
    """Read a SeLo ``anno.json``; a one-line :class:`DatasetError` naming the file and sample on bad input.

    Refused: a file that is not a JSON list, an entry without ``caption``, ``jpg_name`` or
    ``points``, an empty caption or image name, a sample without polygons, a polygon that is not a
    list of ``[x, y]`` numbers, a polygon with fewer than 3 points, and non-finite coordinates.
    """
    data = read_json(path)
    if not isinstance(data, list):
        raise DatasetError(path, f"a SeLo annotation file must be a JSON list of samples, got {type(data).__name__}")
    try:
        return [_parse_sample(raw, i) for i, raw in enumerate(data)]
    except ValueError as exc:
        raise DatasetError(path, str(exc)) from exc


def write_annotations(path: str | Path, samples: Sequence[LocalizationSample]) -> None:
    """Write ``samples`` in the ``anno.json`` layout, atomically.

    The samples are checked with the same rules :func:`read_annotations` applies (a
    :class:`DatasetError` naming ``path`` and the sample), so that a file this writes is always
    one it can read back; nothing is written when a sample is refused.
    """
    records = [
        {"caption": s.caption, "jpg_name": s.image, "points": [np.asarray(p, dtype=np.float64).tolist() for p in s.polygons]}
        for s in samples
    ]
    try:
        for i, record in enumerate(records):
            _parse_sample(record, i)
    except ValueError as exc:
        raise DatasetError(path, str(exc)) from exc
    write_json(path, records)


# ---------------------------------------------------------------- inputs


def prob_from_heat(heat: np.ndarray) -> np.ndarray:
    """The probability map of a uint8 heat map: ``heat / 255`` as float64 (the metrics' input)."""
    heat = np.asarray(heat)
    if heat.dtype != np.uint8 or heat.ndim != 2:
        raise ValueError(f"a heat map must be a 2-D uint8 array (0-255), got {heat.ndim}-D {heat.dtype}")
    return heat.astype(np.float64) / 255.0


def _check_prob(prob: np.ndarray) -> np.ndarray:
    """``prob`` itself when it is a 2-D float array with values in [0, 1]; a one-line ValueError otherwise.

    uint8 heat maps are refused rather than guessed at: 255 and 1.0 would both look like "hot",
    and a map already divided by 255 would silently pass a second division. Convert with
    :func:`prob_from_heat`.
    """
    if not isinstance(prob, np.ndarray) or prob.ndim != 2 or not np.issubdtype(prob.dtype, np.floating):
        got = f"{prob.ndim}-D {prob.dtype}" if isinstance(prob, np.ndarray) else type(prob).__name__
        raise ValueError(f"prob must be a 2-D float array in [0, 1] (use prob_from_heat for uint8 heat maps), got {got}")
    if prob.size == 0 or not np.isfinite(prob).all():
        raise ValueError("prob must be non-empty and finite")
    low, high = float(prob.min()), float(prob.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"prob must lie in [0, 1], got values in [{low:g}, {high:g}] (use prob_from_heat for 0-255 maps)")
    return prob


def polygon_mask(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """The ``height × width`` bool mask of the union of the filled ``polygons``.

    Vertices are rounded to the nearest pixel (``np.rint``: halves to even) and filled with
    ``cv2.fillPoly``, which includes the boundary pixels: the square with corners (10, 10) and
    (20, 20) covers 11 × 11 pixels. Each polygon is filled on its own, so two overlapping regions
    give their union (filling them in one call would apply the even-odd rule and cut a hole where
    they overlap). Parts outside the image are clipped.
    """
    mask = np.zeros((int(height), int(width)), dtype=np.uint8)
    for polygon in polygons:
        vertices = np.rint(np.asarray(polygon, dtype=np.float64)).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(mask, [vertices], 1)
    return mask.astype(bool)


# ---------------------------------------------------------------- Rsu


def rsu(prob: np.ndarray, mask: np.ndarray) -> float:
    """Rsu, the share of the heat inside the mask, normalised by the mask's share of the image (higher is better).

    Rsu = 1 − exp(−0.707 · [Σ prob·mask / (Σ prob − Σ prob·mask + 1e−7)] · [(H·W − |mask|) / |mask|])

    A uniform map scores 1 − e^{−0.707} ≈ 0.507 whatever the mask (the two brackets cancel), a map
    that is zero inside the mask scores 0, and a map that is zero outside it scores ≈ 1. A mask
    that covers the whole image gives 0 (the second bracket is 0). Sums are taken in float64.
    """
    prob = _check_prob(prob)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != prob.shape:
        raise ValueError(f"mask shape {mask.shape} differs from prob shape {prob.shape}")
    area = int(mask.sum())
    if area == 0:
        raise ValueError("the ground-truth mask is empty (every polygon lies outside the image)")
    inside = float(prob[mask].sum(dtype=np.float64))
    total = float(prob.sum(dtype=np.float64))
    concentration = inside / (total - inside + RSU_EPS)
    rarity = (prob.size - area) / area
    return 1.0 - math.exp(-RSU_GAIN * concentration * rarity)


# ---------------------------------------------------------------- predicted centres


def _smooth(prob: np.ndarray, box_size: int, passes: int) -> np.ndarray:
    """``prob`` after ``passes`` box filters of ``box_size × box_size`` (mean, reflected border), float32.

    An even box has no centre pixel: OpenCV's window then reaches one pixel further on one side,
    which moves a peak by half a pixel per pass. The anchor alternates between the two middle
    pixels from pass to pass, so the shifts cancel in pairs and five passes move a peak by at most
    half a pixel instead of two and a half. float32 keeps a 10k × 10k map at 400 MB a copy.
    """
    smooth: np.ndarray = prob.astype(np.float32)
    for i in range(passes):
        anchor = box_size // 2 if i % 2 == 0 else (box_size - 1) // 2
        smooth = cv2.boxFilter(smooth, -1, (box_size, box_size), anchor=(anchor, anchor), normalize=True,
                               borderType=cv2.BORDER_REFLECT_101)
    return smooth


def predicted_centres(prob: np.ndarray, box_size: int = BOX_SIZE, box_passes: int = BOX_PASSES,
                      max_filter_size: int = MAX_FILTER_SIZE, threshold: float = CENTRE_THRESHOLD) -> np.ndarray:
    """The ``(n, 2)`` float64 array of ``(x, y)`` hot-spot centres of a probability map (SeLo's Ras/Rda input).

    1. Smooth ``prob`` with a ``box_size × box_size`` mean filter applied ``box_passes`` times
       (defaults 50 and 5; see :func:`_smooth` for the even-size anchor).
    2. Local maxima: pixels whose smoothed value equals the ``max_filter_size`` (default 1000)
       maximum filter's value and is > 0. The maximum window is clipped to the image. "Equal"
       allows 1e−5 (values are in [0, 1]) so that float rounding in the box filter cannot break a
       flat plateau into specks.
    3. Centres: the centroids (``scipy.ndimage.center_of_mass``) of the 8-connected components of
       those maxima, so a plateau gives one centre, not one per pixel.
    4. Keep a centre when the ORIGINAL ``prob`` at its rounded pixel (``np.rint``, clipped to the
       image) is ≥ ``threshold`` (default 0.5). The summary does not say which map is
       thresholded; the original map is the one a user sees and the one 0.5 refers to, whereas
       five 50-px box filters lower every narrow peak by an amount that depends on its width.

    Returns the centres in label order (row-major order of each component's first pixel).
    """
    prob = _check_prob(prob)
    if box_size < 1 or box_passes < 0 or max_filter_size < 1:
        raise ValueError(f"filter sizes must be positive (box_size={box_size}, box_passes={box_passes}, "
                         f"max_filter_size={max_filter_size})")
    smooth = _smooth(prob, box_size, box_passes)
    peak = ndimage.maximum_filter(smooth, size=max_filter_size, mode="nearest")
    maxima = (smooth >= peak - PLATEAU_TOLERANCE) & (smooth > 0)
    labels, count = ndimage.label(maxima, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros((0, 2), dtype=np.float64)
    rows_cols = np.asarray(ndimage.center_of_mass(maxima, labels, np.arange(1, count + 1)), dtype=np.float64)
    centres = rows_cols[:, ::-1].copy()  # (row, col) -> (x, y)
    height, width = prob.shape
    xs = np.clip(np.rint(centres[:, 0]).astype(np.int64), 0, width - 1)
    ys = np.clip(np.rint(centres[:, 1]).astype(np.int64), 0, height - 1)
    return centres[prob[ys, xs] >= threshold]


# ---------------------------------------------------------------- Ras, Rda, Rmi


def region_centre_radius(polygon: np.ndarray) -> tuple[np.ndarray, float]:
    """A ground-truth region's centre ``c`` (mean of its vertices) and radius ``r`` = 1.5 × mean vertex distance from c.

    A last vertex equal to the first only closes the ring (one polygon of the public file does
    this) and is dropped, so that it does not count twice in the means.
    """
    vertices = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    if len(vertices) > 1 and np.array_equal(vertices[0], vertices[-1]):
        vertices = vertices[:-1]
    centre = vertices.mean(axis=0)
    radius = RADIUS_SCALE * float(np.linalg.norm(vertices - centre, axis=1).mean())
    if radius <= 0.0:
        raise ValueError(f"a polygon has all its vertices at one point {centre.tolist()}; its radius is 0")
    return centre, radius


def _in_region(centres: np.ndarray, centre: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """The predicted centres within ``radius`` of ``centre`` (inclusive: d ≤ r) and their distances from it."""
    points = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    distances = np.linalg.norm(points - centre, axis=1)
    keep = distances <= radius
    return points[keep], distances[keep]


def ras(centres: np.ndarray, polygons: Sequence[np.ndarray]) -> float:
    """Ras, how far the predicted centres lie from the regions' centres (lower is better; 0 best, 1 worst).

    Per region (centre c, radius r from :func:`region_centre_radius`): the mean distance from c
    of the predicted centres within r, or r when there is none, divided by r. x is the mean of
    that over the regions and Ras = (e^{3x} − 1) / (e^{3} − 1). "Within r" is inclusive (d ≤ r), so
    a centre exactly on the circle counts and scores 1, the same as no centre.
    """
    if not polygons:
        raise ValueError("Ras needs at least one ground-truth polygon")
    scores = []
    for polygon in polygons:
        centre, radius = region_centre_radius(polygon)
        _, distances = _in_region(centres, centre, radius)
        scores.append((float(distances.mean()) if len(distances) else radius) / radius)
    x = float(np.mean(scores))
    return (math.exp(RAS_SHARPNESS * x) - 1.0) / (math.exp(RAS_SHARPNESS) - 1.0)


def rda(centres: np.ndarray, polygons: Sequence[np.ndarray]) -> float:
    """Rda, whether the predicted centres inside each region concentrate (higher is better, at most 1).

    Per region with n predicted centres within r (d ≤ r, as in :func:`ras`): n when n ≤ 1 (0 or
    1); otherwise 0.5 · (1 − m / r) + e^{−0.5(n+2)}, where m is the mean distance of those n
    centres to their own centroid. Rda is the mean over the regions. Two or more centres thus
    always score below one (at most 0.5 + e^{−2} ≈ 0.635): a single hot spot per region is best.
    """
    if not polygons:
        raise ValueError("Rda needs at least one ground-truth polygon")
    scores = []
    for polygon in polygons:
        centre, radius = region_centre_radius(polygon)
        inside, _ = _in_region(centres, centre, radius)
        n = len(inside)
        if n <= 1:
            scores.append(float(n))
            continue
        spread = float(np.linalg.norm(inside - inside.mean(axis=0), axis=1).mean())
        scores.append(0.5 * (1.0 - spread / radius) + math.exp(-0.5 * (n + 2)))
    return float(np.mean(scores))


def rmi(rsu_value: float, ras_value: float, rda_value: float) -> float:
    """Rmi, SeLo's overall score: 0.4 · Rsu + 0.35 · (1 − Ras) + 0.25 · Rda (higher is better)."""
    w_su, w_as, w_da = RMI_WEIGHTS
    return w_su * rsu_value + w_as * (1.0 - ras_value) + w_da * rda_value


def selo_metrics(prob: np.ndarray, polygons: Sequence[np.ndarray], box_size: int = BOX_SIZE, box_passes: int = BOX_PASSES,
                 max_filter_size: int = MAX_FILTER_SIZE, threshold: float = CENTRE_THRESHOLD) -> dict[str, float]:
    """Rsu, Ras, Rda, Rmi and the number of predicted centres of one sample's probability map.

    ``prob`` is the ``H × W`` map in [0, 1] over the whole image; ``polygons`` are the sample's
    ground-truth regions in the same pixel frame. The filter settings go to
    :func:`predicted_centres`.
    """
    prob = _check_prob(prob)
    if not polygons:
        raise ValueError("a sample needs at least one ground-truth polygon")
    mask = polygon_mask(polygons, *prob.shape)
    centres = predicted_centres(prob, box_size=box_size, box_passes=box_passes, max_filter_size=max_filter_size,
                                threshold=threshold)
    su, as_, da = rsu(prob, mask), ras(centres, polygons), rda(centres, polygons)
    return {"rsu": su, "ras": as_, "rda": da, "rmi": rmi(su, as_, da), "n_centres": float(len(centres))}


def average_metrics(per_sample: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The mean of each metric over the samples, with ``<name>_std`` beside it and ``n_samples``.

    The standard deviation is the population one (ddof = 0): it describes the spread of these
    samples, not an estimate for a larger set. Every sample must carry the same metric names.
    """
    if not per_sample:
        raise ValueError("average_metrics needs at least one sample")
    names = list(per_sample[0])
    for i, sample in enumerate(per_sample):
        if set(sample) != set(names):
            raise ValueError(f"sample {i} has metrics {sorted(sample)}, sample 0 has {sorted(names)}")
    summary: dict[str, float] = {}
    for name in names:
        values = np.asarray([float(sample[name]) for sample in per_sample], dtype=np.float64)
        summary[name] = float(values.mean())
        summary[f"{name}_std"] = float(values.std())
    summary["n_samples"] = float(len(per_sample))
    return summary
