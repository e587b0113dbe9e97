"""Dihedral (D4) feature averaging: invariance, equality with the explicit average, cache key, config and bundle."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

import rsitr.features.spec as spec_mod
from rsitr.bundle import MANIFEST, RetrievalBundle, load_model
from rsitr.data.dataset import RetrievalDataset
from rsitr.errors import ConfigError
from rsitr.features import FeatureSpec, backbone_features, feature_dims, load_backbone
from rsitr.models import create_model
from rsitr.models.registry import get_model_spec
from rsitr.text import Vocabulary
from rsitr_train.config import load_config
from rsitr_train.trainer import feature_spec

SIDE = 64
SPEC = FeatureSpec(backbone="resnet18", image_size=SIDE, precision="fp32", num_regions=2, maps=("layer3:4",))
ON = replace(SPEC, dihedral=True)
#: The whole image and its top-left quadrant, in image pixels.
BOXES = [[0.0, 0.0, SIDE, SIDE], [0.0, 0.0, SIDE / 2, SIDE / 2]]


def _image(seed: int = 0) -> torch.Tensor:
    """(1, 3, S, S): smooth random blobs plus a ramp along x, so orientation shows in the features."""
    g = torch.Generator().manual_seed(seed)
    blobs = F.interpolate(torch.randn(1, 3, 8, 8, generator=g), size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return blobs + torch.linspace(-1.5, 1.5, SIDE).view(1, 1, 1, SIDE)


def _turn(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """The test's own D4 element: quarter turns k over (H, W), then a left-right mirror."""
    y = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(y, dims=(-1,)) if flip else y


def _turn_box(box: list[float], k: int, flip: bool) -> list[float]:
    """Where an integer box lands under ``_turn``: the bounding box of its turned indicator image."""
    mask = torch.zeros(SIDE, SIDE)
    x1, y1, x2, y2 = (int(v) for v in box)
    mask[y1:y2, x1:x2] = 1
    ys, xs = torch.nonzero(_turn(mask, k, flip), as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 summation order (the copies are summed in another order)."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def _features(model, image: torch.Tensor, spec: FeatureSpec, boxes: list[list[float]] = BOXES) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return backbone_features(model, image, torch.tensor([boxes]), torch.ones(1, len(boxes), dtype=torch.bool), spec)


@pytest.fixture(scope="module")
def model():
    return load_backbone(SPEC)  # seeded random resnet18 (seed 0)


@pytest.mark.parametrize(("k", "flip"), [(1, False), (0, True), (3, True)])
def test_dihedral_features_do_not_change_when_the_image_turns_or_mirrors(model, k: int, flip: bool) -> None:
    image = _image()
    turned = _turn(image, k, flip)
    a, b = _features(model, image, ON), _features(model, turned, ON, [_turn_box(box, k, flip) for box in BOXES])
    for key in ("level1", "level2", "level3", "level4", "regions"):
        assert _close(a[key], b[key]), key  # the quadrant's region is that of its turned box
    # The averaged maps are aligned with the image: the turned image's map is the turned map.
    assert _close(_turn(a["map_layer3"], k, flip), b["map_layer3"])
    plain_a, plain_b = _features(model, image, SPEC), _features(model, turned, SPEC)
    for key in ("level1", "level4"):
        assert not torch.allclose(plain_a[key], plain_b[key], rtol=1e-3, atol=1e-3), key


def test_dihedral_features_are_the_mean_over_the_eight_copies(model) -> None:
    image = _image(1)
    copies = [(k, flip) for k in range(4) for flip in (False, True)]
    level4 = torch.zeros(1, 512)
    quadrant = torch.zeros(1, 256)
    for k, flip in copies:
        plain = _features(model, _turn(image, k, flip), SPEC, [_turn_box(box, k, flip) for box in BOXES])
        level4 += plain["level4"] / len(copies)
        quadrant += plain["regions"][:, 1] / len(copies)
    averaged = _features(model, image, ON)
    assert _close(averaged["level4"], level4)
    assert _close(averaged["regions"][:, 1], quadrant)
    assert not torch.allclose(_features(model, image, SPEC)["level4"], level4, rtol=1e-3, atol=1e-3)


def test_dihedral_needs_square_images_and_keeps_gradients(model) -> None:
    with pytest.raises(ConfigError, match="square"):
        _features(model, torch.zeros(1, 3, SIDE, SIDE + 32), ON)
    trainable = load_backbone(SPEC).requires_grad_(True)
    image = _image(2)[..., ::2, ::2].contiguous().requires_grad_(True)  # 32 px: the gradient, not the values, matters here
    boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 16.0, 16.0]]])
    out = backbone_features(trainable, image, boxes, torch.ones(1, 2, dtype=torch.bool), ON)
    (out["level4"].sum() + out["regions"].sum()).backward()
    weight = trainable.state_dict(keep_vars=True)["conv1.weight"]
    assert image.grad is not None and bool(image.grad.abs().sum() > 0)
    assert weight.grad is not None and bool(torch.isfinite(weight.grad).all()) and bool(weight.grad.abs().sum() > 0)


def _dataset(root) -> RetrievalDataset:
    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        files.append(f"img{i}.png")
    return RetrievalDataset(name="d4", image_dir=root, image_files=files, image_splits=["train", "test"],
                            captions=["a", "b"], caption_image=np.arange(2))


def test_cache_key_changes_only_when_dihedral_is_on(tmp_path, monkeypatch) -> None:
    dataset = _dataset(tmp_path)
    hashed: list[dict] = []
    dumps = spec_mod.json.dumps

    def recording(obj, **kwargs):
        hashed.append(obj)
        return dumps(obj, **kwargs)

    monkeypatch.setattr(spec_mod.json, "dumps", recording)
    off, on = SPEC.cache_key(dataset), ON.cache_key(dataset)
    parts_off, parts_on = hashed
    assert off != on and SPEC.cache_path(dataset, tmp_path) != ON.cache_path(dataset, tmp_path)
    assert "dihedral" not in parts_off  # caches written before the field existed keep their keys
    assert {k: v for k, v in parts_on.items() if k != "dihedral"} == parts_off
    with pytest.raises(ConfigError, match="dihedral"):
        FeatureSpec(backbone="resnet18", dihedral="yes")  # type: ignore[arg-type]
    assert FeatureSpec(backbone="resnet18", dihedral=np.bool_(True)).dihedral is True  # type: ignore[arg-type]


def test_dihedral_travels_from_the_run_config_through_the_bundle(model, tmp_path) -> None:
    config = load_config(None, ["model.name=dove-s", "model.features.dihedral=true", "features.precision=fp32"])
    spec = get_model_spec("dove-s").with_overrides({"embed_dim": 32, "word_dim": 16}, config.model.features)
    fspec = replace(feature_spec(config, spec), backbone="resnet18", image_size=SIDE)
    assert fspec.dihedral is True
    assert feature_spec(load_config(None, ["model.name=dove-s"]), get_model_spec("dove-s")).dihedral is False
    assert FeatureSpec.from_dict(json.loads(json.dumps(ON.to_dict()))) == ON
    assert FeatureSpec.from_dict(json.loads(json.dumps(SPEC.to_dict()))) == SPEC
    spec = replace(spec, backbone="resnet18")
    vocab = Vocabulary.build(["a plane near a runway"])
    torch.manual_seed(0)
    network = create_model(spec, feature_dims(fspec), len(vocab)).eval()
    RetrievalBundle(model=network, backbone=load_backbone(fspec), vocab=vocab, spec=spec, feature_spec=fspec).save(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert manifest["features"]["dihedral"] is True and manifest["preprocessing"]["dihedral"] is True
    loaded = load_model(tmp_path / "b")
    assert loaded.feature_spec.dihedral is True
    picture = (_image(3)[0].permute(1, 2, 0).sigmoid().numpy() * 255).astype(np.uint8)
    feats = loaded.image_features([picture, np.ascontiguousarray(np.rot90(picture))])
    assert torch.allclose(feats["level4"][0], feats["level4"][1], rtol=1e-4, atol=1e-4)
    del manifest["features"]["dihedral"]  # a manifest written before the field existed
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(manifest))
    assert load_model(tmp_path / "b").feature_spec.dihedral is False
