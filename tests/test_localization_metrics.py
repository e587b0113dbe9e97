"""SeLo annotations (anno.json) and the Rsu / Ras / Rda / Rmi metrics, against hand-computed cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rsitr.errors import DatasetError
from rsitr.localization_metrics import (
    LocalizationSample,
    average_metrics,
    polygon_mask,
    predicted_centres,
    prob_from_heat,
    ras,
    rda,
    read_annotations,
    region_centre_radius,
    rmi,
    rsu,
    selo_metrics,
    write_annotations,
)

REAL_ANNOTATIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "semantic_localization" / "anno.json"
SIDE = 300
# The square region [100, 200]²: centre (150, 150), every vertex 50·√2 away, so r = 1.5 · 50·√2.
SQUARE = np.array([[100.0, 100.0], [200.0, 100.0], [200.0, 200.0], [100.0, 200.0]])
SQUARE_R = 1.5 * 50.0 * math.sqrt(2.0)
E3 = math.exp(3.0) - 1.0


def diamond(cx: float, cy: float, half: float) -> np.ndarray:
    """A diamond whose four vertices all lie exactly ``half`` from (cx, cy): centre (cx, cy), r = 1.5 · half."""
    return np.array([[cx + half, cy], [cx, cy + half], [cx - half, cy], [cx, cy - half]])


def blob(prob: np.ndarray, x: int, y: int, half: int, value: float = 1.0) -> np.ndarray:
    """Set the (2·half + 1)² square centred on pixel (x, y) to ``value``; returns ``prob``."""
    prob[y - half:y + half + 1, x - half:x + half + 1] = value
    return prob


# ---------------------------------------------------------------- annotations


def _samples() -> list[LocalizationSample]:
    return [
        LocalizationSample("there is a green pond next to the gray road.\n", "0.jpg",
                           [np.array([[1882.26806640625, 203.692886352539], [1743.04565429688, 1729.76953125], [20.5, 30.25]])]),
        LocalizationSample("two white buildings", "7.jpg", [SQUARE.copy(), diamond(50.0, 60.0, 10.0) + 0.1]),
    ]


def test_annotations_round_trip_keeps_layout_and_values(tmp_path):
    path = tmp_path / "anno.json"
    samples = _samples()
    write_annotations(path, samples)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(raw, list) and [sorted(r) for r in raw] == [["caption", "jpg_name", "points"]] * 2
    assert raw[1]["points"][0][2] == [200.0, 200.0]
    back = read_annotations(path)
    assert [(s.caption, s.image) for s in back] == [(s.caption, s.image) for s in samples]
    for got, want in zip(back, samples):
        assert len(got.polygons) == len(want.polygons)
        for a, b in zip(got.polygons, want.polygons):
            assert a.dtype == np.float64 and a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize(("content", "fragment"), [
    ('{"caption": "a"}', "must be a JSON list"),
    ('[{"caption": "a", "jpg_name": "0.jpg", "points": [[[0, 0], [1, 0], [0, 1]]]}, {"caption": "b", "points": []}]',
     "sample 1 lacks key(s) jpg_name"),
    ('[{"caption": "a", "jpg_name": "0.jpg", "points": [[[0, 0], [1, 0], [0, 1]]]},'
     ' {"caption": "b", "jpg_name": "1.jpg", "points": [[[0, 0], [1, 0], [0, 1]], [[0, 0], [5, 5]]]}]',
     "sample 1 polygon 1 has 2 point(s)"),
    ('[{"caption": "a", "jpg_name": "0.jpg", "points": [[[0, 0], [1, NaN], [0, 1]]]}]', "sample 0 polygon 0 has a non-finite"),
    ('[{"caption": " \\n", "jpg_name": "0.jpg", "points": [[[0, 0], [1, 0], [0, 1]]]}]', "sample 0 has an empty caption"),
    ('[{"caption": "a", "jpg_name": "0.jpg", "points": [[[0, 0], [1, "x"], [0, 1]]]}]', "sample 0 polygon 0 must be a list"),
    ('[{"caption": "a", "jpg_name": "0.jpg", "points": []}]', "sample 0: points must be a non-empty list"),
])
def test_bad_annotations_give_one_line_errors_naming_file_and_sample(tmp_path, content, fragment):
    path = tmp_path / "anno.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        read_annotations(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_write_refuses_a_bad_sample_and_writes_nothing(tmp_path):
    path = tmp_path / "anno.json"
    bad = _samples() + [LocalizationSample("ok", "2.jpg", [np.array([[0.0, 0.0], [1.0, 1.0]])])]
    with pytest.raises(DatasetError, match="sample 2 polygon 0 has 2 point"):
        write_annotations(path, bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not REAL_ANNOTATIONS.is_file(), reason="the public SeLo anno.json is not present beside the repository")
def test_real_annotation_file_reads_as_59_samples_over_22_images():
    samples = read_annotations(REAL_ANNOTATIONS)
    assert len(samples) == 59
    assert len({s.image for s in samples}) == 22
    counts = [len(s.polygons) for s in samples]
    assert min(counts) == 1 and max(counts) == 8
    assert all(p.shape[1] == 2 and len(p) >= 3 for s in samples for p in s.polygons)


# ---------------------------------------------------------------- mask and Rsu


def test_polygon_mask_fills_inclusive_rounded_union():
    mask = polygon_mask([SQUARE], SIDE, SIDE)
    assert mask.dtype == bool and mask.sum() == 101 * 101  # boundary pixels 100 and 200 both included
    assert mask[100, 100] and mask[200, 200] and not mask[99, 150] and not mask[150, 201]
    # vertices are rounded: 9.6 -> 10, 20.4 -> 20 gives the same 11 × 11 square
    assert polygon_mask([np.array([[9.6, 9.6], [20.4, 9.6], [20.4, 20.4], [9.6, 20.4]])], 40, 40).sum() == 121
    # two overlapping squares give their union, without an even-odd hole
    other = SQUARE + 50.0
    both = polygon_mask([SQUARE, other], SIDE, SIDE)
    assert both.sum() == 2 * 101 * 101 - 51 * 51 and both[175, 175]


def test_rsu_closed_forms():
    mask = polygon_mask([SQUARE], SIDE, SIDE)
    assert rsu(np.full((SIDE, SIDE), 0.4), mask) == pytest.approx(1.0 - math.exp(-0.707), rel=1e-9)
    assert rsu(mask.astype(np.float64), mask) == pytest.approx(1.0, abs=1e-12)
    assert rsu(np.where(mask, 0.0, 1.0), mask) == 0.0
    # a inside and b outside: the brackets reduce to a / b (up to the 1e-7 guard)
    two_level = np.where(mask, 0.8, 0.2)
    assert rsu(two_level, mask) == pytest.approx(1.0 - math.exp(-0.707 * 0.8 / 0.2), rel=1e-9)
    # a mask covering the whole image has nothing to be concentrated against
    assert rsu(np.full((10, 10), 0.5), np.ones((10, 10), dtype=bool)) == 0.0


def test_inputs_are_checked():
    mask = polygon_mask([SQUARE], SIDE, SIDE)
    with pytest.raises(ValueError, match="prob_from_heat"):
        rsu(np.zeros((SIDE, SIDE), dtype=np.uint8), mask)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        rsu(np.full((SIDE, SIDE), 2.0), mask)
    with pytest.raises(ValueError, match="empty"):
        rsu(np.zeros((SIDE, SIDE)), np.zeros((SIDE, SIDE), dtype=bool))
    with pytest.raises(ValueError, match="2-D uint8"):
        prob_from_heat(np.zeros((4, 4)))
    assert np.array_equal(prob_from_heat(np.array([[0, 255, 51]], dtype=np.uint8)), np.array([[0.0, 1.0, 0.2]]))


# ---------------------------------------------------------------- centres


def test_one_blob_on_the_region_centre_gives_ras_0_and_rda_1():
    prob = blob(np.zeros((SIDE, SIDE)), 150, 150, 5)
    centres = predicted_centres(prob, box_size=21, max_filter_size=101)
    assert np.allclose(centres, [[150.0, 150.0]], atol=1e-6)
    metrics = selo_metrics(prob, [SQUARE], box_size=21, max_filter_size=101)
    assert metrics["n_centres"] == 1 and metrics["ras"] == pytest.approx(0.0, abs=1e-7) and metrics["rda"] == 1.0
    assert metrics["rmi"] == pytest.approx(0.4 * metrics["rsu"] + 0.35 + 0.25)


def test_a_blob_at_distance_d_within_r():
    prob = blob(np.zeros((SIDE, SIDE)), 210, 150, 5)
    centres = predicted_centres(prob, box_size=21, max_filter_size=101)
    assert np.allclose(centres, [[210.0, 150.0]], atol=1e-6)
    assert ras(centres, [SQUARE]) == pytest.approx((math.exp(3 * 60 / SQUARE_R) - 1) / E3, rel=1e-6)
    assert rda(centres, [SQUARE]) == 1.0


def test_defaults_find_one_centre_within_half_a_pixel():
    """At the defaults (50-px box five times, 1000-px maximum) the even box moves a peak by half a pixel at most."""
    prob = blob(np.zeros((SIDE, SIDE)), 150, 150, 5)
    blob(prob, 60, 240, 5, value=0.8)  # lower peak: not a maximum of a 1000-px window
    centres = predicted_centres(prob)
    assert centres.shape == (1, 2) and np.abs(centres - 150.0).max() <= 0.5
    metrics = selo_metrics(prob, [SQUARE])
    assert metrics["rda"] == 1.0 and metrics["ras"] <= (math.exp(3 * math.sqrt(0.5) / SQUARE_R) - 1) / E3


def test_centre_threshold_reads_the_original_map_and_small_filters_split_peaks():
    prob = blob(np.zeros((SIDE, SIDE)), 100, 100, 2)
    blob(prob, 200, 180, 2, value=0.4)  # a separate peak, but below 0.5
    assert np.allclose(predicted_centres(prob, box_size=5, box_passes=1, max_filter_size=31), [[100.0, 100.0]])
    blob(prob, 200, 180, 2, value=1.0)
    assert np.allclose(predicted_centres(prob, box_size=5, box_passes=1, max_filter_size=31), [[100.0, 100.0], [200.0, 180.0]])
    # a narrow 0.6 spot is kept although five 50-px box filters bring its smoothed value far below 0.5
    narrow = blob(np.zeros((SIDE, SIDE)), 150, 150, 2, value=0.6)
    assert len(predicted_centres(narrow)) == 1


def test_no_centre_gives_ras_1_and_rda_0():
    assert len(predicted_centres(np.zeros((SIDE, SIDE)))) == 0
    flat = np.full((SIDE, SIDE), 0.3)  # one plateau, one candidate centre, below 0.5
    assert len(predicted_centres(flat)) == 0
    assert len(predicted_centres(np.full((SIDE, SIDE), 0.7))) == 1  # the same plateau above 0.5 is one centre
    metrics = selo_metrics(np.zeros((SIDE, SIDE)), [SQUARE])
    assert metrics == {"rsu": 0.0, "ras": 1.0, "rda": 0.0, "rmi": 0.0, "n_centres": 0.0}


# ---------------------------------------------------------------- Ras, Rda, Rmi on given centres


def test_within_r_is_inclusive():
    region = diamond(50.0, 50.0, 2.0)  # r = 3 exactly
    assert region_centre_radius(region)[1] == 3.0
    on_circle = np.array([[53.0, 50.0]])
    assert ras(on_circle, [region]) == 1.0 and rda(on_circle, [region]) == 1.0
    outside = np.array([[53.001, 50.0]])
    assert ras(outside, [region]) == 1.0 and rda(outside, [region]) == 0.0


def test_two_centres_in_one_region():
    region = diamond(150.0, 150.0, 40.0)  # r = 60
    centres = np.array([[140.0, 150.0], [160.0, 150.0], [290.0, 10.0]])  # the third is outside
    assert rda(centres, [region]) == pytest.approx(0.5 * (1 - 10 / 60) + math.exp(-2.0), rel=1e-12)
    assert ras(centres, [region]) == pytest.approx((math.exp(3 * 10 / 60) - 1) / E3, rel=1e-12)


def test_two_regions_average():
    first, second = diamond(60.0, 60.0, 20.0), diamond(220.0, 220.0, 20.0)
    centres = np.array([[60.0, 60.0]])  # on the first region's centre; none in the second
    assert ras(centres, [first, second]) == pytest.approx((math.exp(1.5) - 1) / E3, rel=1e-12)
    assert rda(centres, [first, second]) == 0.5


def test_closing_vertex_is_not_counted_twice():
    closed = np.vstack([SQUARE, SQUARE[:1]])
    centre, radius = region_centre_radius(closed)
    assert np.array_equal(centre, [150.0, 150.0]) and radius == pytest.approx(SQUARE_R)
    with pytest.raises(ValueError, match="radius is 0"):
        region_centre_radius(np.array([[5.0, 5.0]] * 3))


def test_rmi_and_average():
    assert rmi(0.6, 0.2, 0.5) == pytest.approx(0.4 * 0.6 + 0.35 * 0.8 + 0.25 * 0.5)
    summary = average_metrics([{"rsu": 1.0, "ras": 0.0}, {"rsu": 3.0, "ras": 0.5}])
    assert summary == {"rsu": 2.0, "rsu_std": 1.0, "ras": 0.25, "ras_std": 0.25, "n_samples": 2.0}
    with pytest.raises(ValueError, match="sample 1"):
        average_metrics([{"rsu": 1.0}, {"ras": 1.0}])
    with pytest.raises(ValueError):
        average_metrics([])
