"""Activation region proposals: hand-made maps, the box source of a feature spec, detections, cache, bundle."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from rsitr.bundle import MANIFEST, RetrievalBundle, load_model
from rsitr.data.dataset import RetrievalDataset
from rsitr.errors import ConfigError
from rsitr.features import FeatureSpec, extract_features, feature_dims, features_of_images, image_batch, load_backbone
from rsitr.features.proposals import (
    SIDES,
    activation_boxes,
    box_scores,
    energy_map,
    proposal_levels,
    saliency_map,
    select_proposals,
)
from rsitr.features.roi import default_boxes
from rsitr.models import create_model
from rsitr.models.registry import get_model_spec
from rsitr.text import Vocabulary
from rsitr_train.config import load_config
from rsitr_train.trainer import feature_spec

SPEC = FeatureSpec(backbone="resnet18", image_size=64, precision="fp32", boxes="activation")


def _two_peaks() -> torch.Tensor:
    """An 8 x 8 one-channel map (128 px image, stride 16): peak A = 1 at row 2, column 5; B = 0.5 at row 6, column 1."""
    level = torch.zeros(1, 1, 8, 8)
    level[0, 0, 2, 5] = 1.0
    level[0, 0, 6, 1] = 0.5
    return level


def _index_of(boxes: torch.Tensor, box: list[float]) -> int:
    hits = torch.nonzero((boxes - torch.tensor(box, dtype=boxes.dtype)).abs().max(dim=1).values < 1e-6).flatten()
    assert len(hits) >= 1, box
    return int(hits[0])


def test_energy_is_the_rms_over_channels_and_a_constant_map_adds_nothing() -> None:
    level = torch.zeros(1, 2, 3, 3)
    level[0, 0, 1, 2], level[0, 1, 1, 2] = 3.0, 4.0
    assert energy_map(level)[0, 1, 2].item() == pytest.approx(math.sqrt((9 + 16) / 2))
    single = saliency_map([_two_peaks()])
    assert single[0, 2, 5] == 1.0 and single[0, 6, 1] == 0.5 and single.sum() == 1.5  # min-max: 0 stays 0
    flat_deeper = torch.full((1, 4, 4, 4), 7.0)  # constant: normalised to 0, so it halves the saliency
    assert torch.equal(saliency_map([_two_peaks(), flat_deeper]), single / 2)
    assert proposal_levels(("layer1", "layer2", "layer3", "layer4"), "layer3") == [2, 3]
    assert proposal_levels(("layer1", "layer2", "layer3", "layer4"), "layer4") == [3]


def test_boxes_of_a_hand_made_map_land_on_its_peaks() -> None:
    boxes, scores = box_scores(saliency_map([_two_peaks()]), 16, 128)
    assert boxes.shape == (4 * 3 * 64, 4)  # 4 sides x 3 ratios x 64 cells
    # The 16-px square (side 1/8) on peak A: all of A inside, nothing in its ring -> 1 - 0 = 1.
    cell_a = _index_of(boxes, [80, 32, 96, 48])
    assert scores[0, cell_a].item() == pytest.approx(1.0)
    # The 2:1 box of side 1/8 on A: 22.6 x 11.3 px, 1.414 x 0.707 cells; A's cell is covered over
    # its full width and 0.707 of its height: mean inside 0.707 (area 1 cell). Its surround is
    # 2.83 x 1.41 cells and holds all of A: ring mean (1 - 0.707) / (4 - 1) = 0.0976.
    w, h = 16 * math.sqrt(2), 16 / math.sqrt(2)
    wide_a = _index_of(boxes, [88 - w / 2, 40 - h / 2, 88 + w / 2, 40 + h / 2])
    inside = 1 / math.sqrt(2)
    assert scores[0, wide_a].item() == pytest.approx(inside - (1 - inside) / 3)
    # The 32-px square on A holds A in 4 cells (mean 0.25), its ring nothing: 0.25.
    square_a = _index_of(boxes, [72, 24, 104, 56])
    assert scores[0, square_a].item() == pytest.approx(0.25)
    # NMS: first A's cell (score 1); the 2:1 box (0.61) overlaps it by IoU 0.707 / 1.293 = 0.547 > 0.5
    # and is suppressed, so B's cell (score 0.5) comes second; everything else scores at most 0.25.
    chosen = select_proposals(boxes, scores, 36)[0]
    assert boxes[chosen[0]].tolist() == [80.0, 32.0, 96.0, 48.0]
    assert boxes[chosen[1]].tolist() == [16.0, 96.0, 32.0, 112.0]
    assert wide_a not in chosen.tolist()
    assert scores[0, chosen[2:]].max().item() <= 0.25 + 1e-9
    assert len(set(chosen.tolist())) == 36


def test_boxes_near_the_border_are_shifted_inside() -> None:
    level = torch.zeros(1, 1, 8, 8)
    level[0, 0, 0, 7] = 1.0  # the top-right corner cell
    boxes = activation_boxes([level], 16, 128, 36)[0]
    assert boxes[0].tolist() == [112.0, 0.0, 128.0, 16.0]
    assert (boxes >= 0).all() and (boxes <= 128).all()
    sides = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1).sqrt() / 128  # sides keep their size when shifted
    assert all(min(abs(f - side) for side in SIDES) < 1e-5 for f in sides.tolist())


def test_fewer_candidates_than_regions_repeat_and_a_constant_map_is_deterministic() -> None:
    tiny = torch.rand(2, 3, 1, 1, generator=torch.Generator().manual_seed(0))  # 1 cell: 12 candidates
    boxes = activation_boxes([tiny], 32, 32, 30)
    assert boxes.shape == (2, 30, 4)
    assert torch.equal(boxes[:, 12:24], boxes[:, :12]) and torch.equal(boxes[:, 24:], boxes[:, :6])
    flat = torch.ones(1, 4, 8, 8)
    assert torch.equal(activation_boxes([flat], 16, 128, 36), activation_boxes([flat], 16, 128, 36))


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(70, 90), (64, 64), (120, 50), (80, 80)]
    return [rng.integers(0, 256, (*shapes[k % 4], 3), dtype=np.uint8) for k in range(n)]


def test_backbone_boxes_are_inside_exactly_nr_deterministic_and_per_image() -> None:
    backbone = load_backbone(SPEC)
    images = _images(2)
    first = features_of_images(backbone, image_batch(images, SPEC), SPEC)
    again = features_of_images(backbone, image_batch(images, SPEC), SPEC)
    boxes = first["region_boxes"]
    assert boxes.shape == (2, 36, 4) and first["region_mask"].all()
    assert (boxes >= 0).all() and (boxes <= 64).all()
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    assert torch.equal(boxes, again["region_boxes"]) and torch.equal(first["regions"], again["regions"])
    assert not torch.equal(boxes[0], boxes[1])
    grid = features_of_images(backbone, image_batch(images, replace(SPEC, boxes="grid")), replace(SPEC, boxes="grid"))
    assert torch.equal(grid["region_boxes"][0], default_boxes(64))
    assert torch.equal(grid["level3"], first["level3"])  # the same forward pass, only the boxes differ
    assert not torch.equal(grid["regions"], first["regions"])
    # A caller's boxes win; the other image of the batch still gets its proposals.
    own = np.array([[0.0, 0.0, 45.0, 35.0]])
    mixed = features_of_images(backbone, image_batch(images, SPEC, boxes=[own, None]), SPEC)
    assert mixed["region_mask"][0].tolist() == [True] + [False] * 35
    assert mixed["region_boxes"][0, 0].tolist() == pytest.approx([0.0, 0.0, 32.0, 32.0])
    assert torch.equal(mixed["region_boxes"][1], boxes[1])


def _dataset(root) -> RetrievalDataset:
    files = []
    for i, image in enumerate(_images(3, seed=1)):
        Image.fromarray(image).save(root / f"img{i}.png")
        files.append(f"img{i}.png")
    return RetrievalDataset(name="tiny", image_dir=root, image_files=files, image_splits=["train", "val", "test"],
                            captions=[f"caption {i}" for i in range(3)], caption_image=np.arange(3))


def test_detections_win_and_the_cache_keeps_box_sources_apart(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    dataset = _dataset(tmp_path / "images")
    grid_spec = replace(SPEC, boxes="grid")
    assert SPEC.cache_key(dataset) != grid_spec.cache_key(dataset)
    assert SPEC.cache_path(dataset, tmp_path) != grid_spec.cache_path(dataset, tmp_path)
    activation = extract_features(dataset, SPEC, tmp_path / "cache", progress=False)
    grid = extract_features(dataset, grid_spec, tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert torch.equal(grid.region_boxes[0], default_boxes(64))
    assert not torch.equal(activation.region_boxes[0], default_boxes(64))
    assert torch.equal(extract_features(dataset, SPEC, tmp_path / "cache", progress=False).region_boxes,
                       activation.region_boxes)  # read back from its own cache file
    # img0 (90 x 70 px) has detections; img1 an entry with no usable box; img2 none.
    det = tmp_path / "det.json"
    det.write_text(json.dumps({"format": "rsitr-detections-v1", "images": {
        "img0.png": {"boxes": [[0, 0, 45, 35], [45, 35, 90, 70]], "scores": [0.2, 0.8]},
        "img1.png": {"boxes": [[500, 500, 600, 600]], "scores": [1.0]}}}))
    for spec in (replace(SPEC, detections=det), replace(grid_spec, detections=det)):
        feats = extract_features(dataset, spec, tmp_path / "cache", progress=False)
        assert feats.region_mask[0].tolist() == [True, True] + [False] * 34
        assert feats.region_boxes[0, :2].tolist() == [[32.0, 32.0, 64.0, 64.0], [0.0, 0.0, 32.0, 32.0]]
        expected = activation if spec.boxes == "activation" else grid
        assert torch.equal(feats.region_boxes[1:], expected.region_boxes[1:])
        assert feats.region_mask[1:].all()


def test_the_box_source_is_a_model_feature_need_and_is_checked() -> None:
    config = load_config(None, ["model.name=dove-s", "model.features.boxes=activation"])
    spec = get_model_spec("dove-s").with_overrides(config.model.params, config.model.features)
    assert feature_spec(config, spec).boxes == "activation"
    assert FeatureSpec(backbone="resnet18").boxes == "grid"
    with pytest.raises(ConfigError, match="boxes"):
        FeatureSpec(backbone="resnet18", boxes="detector")
    assert FeatureSpec.from_dict(SPEC.to_dict()) == SPEC


def test_bundle_round_trip_recomputes_the_boxes_of_any_image(tmp_path) -> None:
    spec = get_model_spec("dove-s").with_overrides({"embed_dim": 32, "word_dim": 16})
    vocab = Vocabulary.build(["a plane near a runway", "two ships in a harbour"])
    torch.manual_seed(0)
    model = create_model(spec, feature_dims(SPEC), len(vocab)).eval()
    bundle = RetrievalBundle(model=model, backbone=load_backbone(SPEC), vocab=vocab, spec=spec, feature_spec=SPEC)
    bundle.save(tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / MANIFEST).read_text())
    assert manifest["features"]["boxes"] == "activation"
    loaded = load_model(tmp_path / "bundle")
    assert loaded.feature_spec.boxes == "activation"
    picture = _images(3, seed=2)[2]  # 50 x 120 px, not the bundle's size
    before, after = bundle.image_features([picture]), loaded.image_features([picture])
    assert torch.equal(before["region_boxes"], after["region_boxes"])
    assert not torch.equal(after["region_boxes"][0], default_boxes(64))
    a, b = bundle.encode_images([picture]), loaded.encode_images([picture])
    assert all(torch.equal(a[key], b[key]) for key in a)
    # A manifest written before the field existed means the grid.
    del manifest["features"]["boxes"]
    (tmp_path / "bundle" / MANIFEST).write_text(json.dumps(manifest))
    old = load_model(tmp_path / "bundle")
    assert old.feature_spec.boxes == "grid"
    assert torch.equal(old.image_features([picture])["region_boxes"][0], default_boxes(64))
