"""RoIAlign against hand-computed values and a naive loop; default and selected boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rsitr.errors import DatasetError
from rsitr.features.detections import read_detections, select_boxes
from rsitr.features.roi import default_boxes, roi_align


def _bilinear(fmap: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """The documented sampling rule: 0 outside [-1, size], else clamp then interpolate."""
    _, h, w = fmap.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(fmap.shape[0], dtype=torch.float64)
    y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    ly, lx = y - y0, x - x0
    f = fmap.double()
    return ((1 - ly) * (1 - lx) * f[:, y0, x0] + (1 - ly) * lx * f[:, y0, x1]
            + ly * (1 - lx) * f[:, y1, x0] + ly * lx * f[:, y1, x1])


def _naive_roi_align(features, boxes, scale, out, ratio):
    b, c = features.shape[:2]
    n = boxes.shape[1]
    result = torch.zeros(b, n, c, out, out, dtype=torch.float64)
    for i in range(b):
        for j in range(n):
            x1, y1, x2, y2 = (boxes[i, j].double() * scale - 0.5).tolist()
            bw, bh = (x2 - x1) / out, (y2 - y1) / out
            for ph in range(out):
                for pw in range(out):
                    acc = torch.zeros(c, dtype=torch.float64)
                    for iy in range(ratio):
                        for ix in range(ratio):
                            y = y1 + ph * bh + (iy + 0.5) * bh / ratio
                            x = x1 + pw * bw + (ix + 0.5) * bw / ratio
                            acc += _bilinear(features[i], y, x)
                    result[i, j, :, ph, pw] = acc / ratio**2
    return result


def test_constant_map_gives_constant() -> None:
    features = torch.full((1, 3, 8, 8), 2.5)
    boxes = torch.tensor([[[0.0, 0.0, 64.0, 64.0], [10.0, 20.0, 30.0, 25.0], [3.0, 3.0, 4.0, 4.0]]])
    out = roi_align(features, boxes, spatial_scale=1 / 8, output_size=2)
    assert out.shape == (1, 3, 3, 2, 2)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))


def test_linear_ramp_gives_value_at_box_centre() -> None:
    a, b = 0.7, -1.3
    h = w = 16
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    features = (a * xs + b * ys).expand(1, 2, h, w).contiguous()
    scale = 1 / 4  # image pixels -> feature cells; the map covers a 64x64 image
    boxes = torch.tensor([[[8.0, 8.0, 40.0, 24.0], [20.0, 12.0, 52.0, 50.0], [30.0, 30.0, 34.0, 34.0]]])
    pooled = roi_align(features, boxes, spatial_scale=scale, output_size=2).mean(dim=(3, 4))
    for j, (x1, y1, x2, y2) in enumerate(boxes[0].tolist()):
        cx, cy = (x1 + x2) / 2 * scale - 0.5, (y1 + y2) / 2 * scale - 0.5
        torch.testing.assert_close(pooled[0, j], torch.full((2,), a * cx + b * cy), atol=1e-5, rtol=1e-5)


def test_box_covering_one_pixel_cell() -> None:
    features = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    # With aligned=True, cell (row 2, col 1) spans [1, 2) x [2, 3) in image pixels at scale 1, i.e.
    # continuous feature coords [0.5, 1.5) x [1.5, 2.5): its samples straddle four cell centres.
    out = roi_align(features, torch.tensor([[[1.0, 2.0, 2.0, 3.0]]]), spatial_scale=1.0, output_size=1,
                    sampling_ratio=2)
    # samples at x in {0.75, 1.25}, y in {1.75, 2.25}; f(x, y) = 4y + x is linear -> centre value.
    assert out.item() == pytest.approx(4 * 2.0 + 1.0)
    # A one-cell box at the scale of the map, one sample: exactly the cell value at that centre.
    out = roi_align(features, torch.tensor([[[8.0, 4.0, 12.0, 8.0]]]), spatial_scale=0.25, output_size=1,
                    sampling_ratio=1)
    assert out.item() == pytest.approx(features[0, 0, 1, 2].item())


def test_matches_naive_loop_on_random_input() -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 5, 7, generator=g)
    xy1 = torch.rand(2, 4, 2, generator=g) * 60 - 10  # some boxes start outside the image
    wh = torch.rand(2, 4, 2, generator=g) * 40 + 0.5
    boxes = torch.cat([xy1, xy1 + wh], dim=-1)
    boxes[0, 0] = torch.tensor([-40.0, -40.0, -20.0, -10.0])  # fully outside: all zeros
    for out_size, ratio in ((2, 2), (3, 1), (1, 3)):
        got = roi_align(features, boxes, spatial_scale=1 / 8, output_size=out_size, sampling_ratio=ratio)
        want = _naive_roi_align(features, boxes, 1 / 8, out_size, ratio)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.all(roi_align(features, boxes, 1 / 8)[0, 0] == 0)


def test_single_pixel_map_and_bad_shapes() -> None:
    features = torch.randn(1, 4, 1, 1)
    out = roi_align(features, torch.tensor([[[0.0, 0.0, 32.0, 32.0]]]), spatial_scale=1 / 32)
    torch.testing.assert_close(out[0, 0], features[0].expand(4, 2, 2))
    with pytest.raises(ValueError):
        roi_align(features, torch.zeros(1, 4), 1.0)


def test_default_boxes_count_and_containment() -> None:
    boxes = default_boxes(256)
    assert boxes.shape == (36, 4) and boxes.dtype == torch.float32
    assert torch.all(boxes >= 0) and torch.all(boxes <= 256)
    assert torch.all(boxes[:, 2] > boxes[:, 0]) and torch.all(boxes[:, 3] > boxes[:, 1])
    assert boxes[0].tolist() == [0.0, 0.0, 256.0, 256.0]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # each tiling covers the image exactly once: 1, 2x2, 3x3, 4x4, 3x2
    for start, count in ((0, 1), (1, 4), (5, 9), (14, 16), (30, 6)):
        assert areas[start:start + count].sum().item() == pytest.approx(256.0 * 256.0)
    assert boxes[30:].tolist()[0] == pytest.approx([0.0, 0.0, 256 / 3, 128.0])


def test_select_boxes_topk_rescale_and_padding() -> None:
    boxes = np.array([[0, 0, 100, 50], [50, 50, 150, 100], [10, 10, 20, 20], [0, 0, 200, 100]], dtype=np.float32)
    scores = np.array([0.5, 0.9, 0.5, 0.1], dtype=np.float32)
    out, mask = select_boxes(boxes, scores, original_size=(200, 100), image_size=64, num_regions=3)
    assert out.shape == (3, 4) and mask.tolist() == [True, True, True]
    # top-3 by score, ties (0.5) by index; x scaled by 64/200, y by 64/100
    torch.testing.assert_close(out, torch.tensor([[16.0, 32.0, 48.0, 64.0], [0.0, 0.0, 32.0, 32.0],
                                                  [3.2, 6.4, 6.4, 12.8]]))
    out, mask = select_boxes(boxes, scores, original_size=(200, 100), image_size=64, num_regions=6)
    assert mask.tolist() == [True] * 4 + [False] * 2
    assert torch.all(out[4:] == 0)


def test_select_boxes_clips_and_falls_back() -> None:
    boxes = np.array([[-10, -10, 50, 300], [500, 0, 600, 10]], dtype=np.float32)  # 2nd is outside
    out, mask = select_boxes(boxes, np.array([0.2, 0.9], np.float32), (100, 100), 32, num_regions=4)
    assert mask.tolist() == [True, False, False, False]
    assert out[0].tolist() == pytest.approx([0.0, 0.0, 16.0, 32.0])
    for empty in (None, np.zeros((0, 4), np.float32)):
        out, mask = select_boxes(empty, None if empty is None else np.zeros(0, np.float32), (10, 10), 64)
        assert mask.all() and torch.equal(out, default_boxes(64))
    out, mask = select_boxes(boxes[1:], np.array([1.0], np.float32), (100, 100), 64, num_regions=36)
    assert mask.all() and torch.equal(out, default_boxes(64))


def _write(path, doc) -> None:
    path.write_text(json.dumps(doc), encoding="utf-8")


def test_read_detections_and_validation(tmp_path) -> None:
    path = tmp_path / "det.json"
    _write(path, {"format": "rsitr-detections-v1", "images": {
        "a.png": {"boxes": [[0, 0, 10, 10], [1, 2, 3, 4]], "scores": [0.5, 0.25], "labels": ["x", "y"]},
        "b.png": {"boxes": [], "scores": []}}})
    det = read_detections(path)
    assert det["a.png"][0].shape == (2, 4) and det["a.png"][0].dtype == np.float32
    assert det["a.png"][1].tolist() == [0.5, 0.25]
    assert det["b.png"][0].shape == (0, 4)
    bad_cases = {
        "inverted": ({"boxes": [[10, 0, 5, 10]], "scores": [1]}, "x2 <= x1"),
        "count": ({"boxes": [[0, 0, 5, 10]], "scores": [1, 2]}, "scores"),
        "shape": ({"boxes": [[0, 0, 5]], "scores": [1]}, "boxes must be"),
    }
    for name, (entry, problem) in bad_cases.items():
        _write(path, {"format": "rsitr-detections-v1", "images": {f"{name}.png": entry}})
        with pytest.raises(DatasetError, match=rf"det\.json.*{name}\.png.*{problem}"):
            read_detections(path)
    _write(path, {"images": {}})
    with pytest.raises(DatasetError, match="det.json"):
        read_detections(path)
