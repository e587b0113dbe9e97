"""Feature extraction and the feature cache on a tiny dataset of PNGs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import rsitr.features.compute as features_mod
from rsitr.backbones import create_backbone
from rsitr.data.dataset import RetrievalDataset
from rsitr.errors import CheckpointError, ConfigError, ImageReadError
from rsitr.features import (
    FeatureSpec,
    ImageFeatures,
    extract_features,
    feature_dims,
    load_features,
    save_features,
)
from rsitr.features.roi import default_boxes

SIZES = [(80, 60), (64, 64), (50, 90), (70, 70)]


def _dataset(root, name: str = "tiny") -> RetrievalDataset:
    rng = np.random.default_rng(0)
    files = []
    for i, (w, h) in enumerate(SIZES):
        image_file = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / image_file)
        files.append(image_file)
    return RetrievalDataset(
        name=name, image_dir=root, image_files=files, image_splits=["train", "train", "val", "test"],
        captions=[f"caption {i}" for i in range(8)], caption_image=np.repeat(np.arange(4), 2),
    )


@pytest.fixture()
def dataset(tmp_path) -> RetrievalDataset:
    (tmp_path / "images").mkdir()
    return _dataset(tmp_path / "images")


SPEC = FeatureSpec(backbone="resnet18", image_size=64)


class _CountingFactory:
    """Wraps ``create_backbone`` to count calls (monkeypatched into ``rsitr.features.compute``)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return create_backbone(*args, **kwargs)


def _no_backbone(*args, **kwargs):
    raise AssertionError("backbone must not run when the cache is valid")


def test_extract_shapes_dtypes_and_cache_file(dataset, tmp_path) -> None:
    feats = extract_features(dataset, SPEC, tmp_path / "cache", batch_size=3, progress=False)
    n = dataset.num_images
    assert feats.num_images == n and feats.image_files == dataset.image_files
    for key, c in zip(("level1", "level2", "level3", "level4"), (64, 128, 256, 512)):
        t = getattr(feats, key)
        assert t.shape == (n, c) and t.dtype == torch.float32
    assert feats.regions.shape == (n, 36, 256) and feats.regions.dtype == torch.float16
    assert feats.region_mask.shape == (n, 36) and feats.region_mask.dtype == torch.bool and feats.region_mask.all()
    assert feats.region_boxes.shape == (n, 36, 4)
    assert torch.equal(feats.region_boxes[2], default_boxes(64))
    key = SPEC.cache_key(dataset)
    files = list((tmp_path / "cache").iterdir())
    assert [f.name for f in files] == [f"tiny-resnet18-{key[:16]}.safetensors"]
    # At 64 px the layer3 map is 4x4 and the whole-image box's 4x4 samples hit every cell centre,
    # so region 0 equals the global average pool of layer3 (up to float16 storage).
    torch.testing.assert_close(feats.regions[:, 0].float(), feats.level3, rtol=2e-3, atol=2e-3)


def test_second_run_loads_from_cache(dataset, tmp_path, monkeypatch) -> None:
    first = extract_features(dataset, SPEC, tmp_path, progress=False)
    monkeypatch.setattr(features_mod, "create_backbone", _no_backbone)
    second = extract_features(dataset, SPEC, tmp_path, progress=False)
    for k, v in first.tensors().items():
        assert torch.equal(v, second.tensors()[k]), k
    assert second.spec == SPEC and second.image_files == dataset.image_files
    again = load_features(SPEC.cache_path(dataset, tmp_path))
    assert torch.equal(again.level4, first.level4)


def test_cache_key_changes_with_what_changes_features(dataset, tmp_path) -> None:
    base = SPEC.cache_key(dataset)
    assert SPEC.cache_key(dataset) == base and len(base) == 64
    assert replace(SPEC, image_size=96).cache_key(dataset) != base
    assert replace(SPEC, precision="bf16").cache_key(dataset) != base
    assert replace(SPEC, seed=1).cache_key(dataset) != base
    assert replace(SPEC, region_level="layer4").cache_key(dataset) != base
    assert SPEC.cache_key(dataset.subset([1, 0, 2, 3])) != base

    weights = tmp_path / "w.pth"
    torch.save(create_backbone("resnet18", seed=3).state_dict(), weights)
    with_weights = replace(SPEC, weights=weights).cache_key(dataset)
    assert with_weights != base
    moved = tmp_path / "moved.pth"
    moved.write_bytes(weights.read_bytes())
    assert replace(SPEC, weights=moved).cache_key(dataset) == with_weights  # content, not path
    torch.save(create_backbone("resnet18", seed=4).state_dict(), weights)
    assert replace(SPEC, weights=weights).cache_key(dataset) != with_weights

    det = tmp_path / "det.json"
    det.write_text(json.dumps({"format": "rsitr-detections-v1", "images": {}}))
    with_det = replace(SPEC, detections=det).cache_key(dataset)
    assert with_det != base
    det.write_text(json.dumps({"format": "rsitr-detections-v1", "images": {"img0.png": {"boxes": [], "scores": []}}}))
    assert replace(SPEC, detections=det).cache_key(dataset) != with_det


def test_stale_image_list_is_recomputed(dataset, tmp_path, monkeypatch) -> None:
    feats = extract_features(dataset, SPEC, tmp_path, progress=False)
    path = SPEC.cache_path(dataset, tmp_path)
    wrong = ImageFeatures(**feats.tensors(), image_files=["x.png", "y.png", "z.png", "w.png"], spec=SPEC,
                          cache_key=feats.cache_key)
    save_features(path, wrong)
    counter = _CountingFactory()
    monkeypatch.setattr(features_mod, "create_backbone", counter)
    again = extract_features(dataset, SPEC, tmp_path, progress=False)
    assert counter.calls == 1 and again.image_files == dataset.image_files
    assert load_features(path).image_files == dataset.image_files
    path.write_bytes(b"garbage")  # unreadable cache: recomputed as well
    extract_features(dataset, SPEC, tmp_path, progress=False)
    assert counter.calls == 2
    with pytest.raises(CheckpointError, match="none.safetensors"):
        load_features(tmp_path / "none.safetensors")


def test_batch_size_does_not_change_features(dataset) -> None:
    one = extract_features(dataset, SPEC, None, batch_size=1, progress=False)
    three = extract_features(dataset, SPEC, None, batch_size=3, progress=False)
    for k, v in one.tensors().items():
        torch.testing.assert_close(three.tensors()[k], v, rtol=2e-3, atol=1e-5, msg=k)


def test_bf16_close_to_fp32(dataset) -> None:
    fp32 = extract_features(dataset, SPEC, None, progress=False)
    bf16 = extract_features(dataset, replace(SPEC, precision="bf16"), None, progress=False)
    for k in ("level1", "level2", "level3", "level4", "regions"):
        a, b = getattr(bf16, k).float(), getattr(fp32, k).float()
        assert (a - b).norm() / b.norm() < 0.05, k


def test_detections_drive_regions(dataset, tmp_path) -> None:
    det = tmp_path / "det.json"
    det.write_text(json.dumps({"format": "rsitr-detections-v1", "images": {
        "img0.png": {"boxes": [[0, 0, 40, 30], [40, 30, 80, 60]], "scores": [0.2, 0.8]}}}))
    spec = replace(SPEC, detections=det, num_regions=4)
    feats = extract_features(dataset, spec, tmp_path / "cache", progress=False)
    assert feats.region_mask[0].tolist() == [True, True, False, False]
    assert feats.region_boxes[0, :2].tolist() == [[32.0, 32.0, 64.0, 64.0], [0.0, 0.0, 32.0, 32.0]]
    assert torch.all(feats.regions[0, 2:] == 0)
    assert feats.region_mask[1:].all()  # no entry: the first 4 default boxes
    assert torch.equal(feats.region_boxes[1], default_boxes(64)[:4])


def test_select_subset_and_dims(dataset) -> None:
    feats = extract_features(dataset, SPEC, None, progress=False)
    batch = feats.select([2, 0])
    assert batch["regions"].dtype == torch.float32 and batch["regions"].shape == (2, 36, 256)
    assert torch.equal(batch["level2"], feats.level2[[2, 0]])
    sub = feats.subset(np.array([3, 1]))
    assert sub.num_images == 2 and sub.image_files == ["img3.png", "img1.png"]
    assert torch.equal(sub.region_mask, feats.region_mask[[3, 1]])
    assert feature_dims(SPEC) == {"level_channels": (64, 128, 256, 512), "region_channels": 256,
                                  "num_levels": 4, "num_regions": 36, "maps": {}}
    assert feature_dims(FeatureSpec())["region_channels"] == 1024


def test_spec_validation() -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        FeatureSpec(backbone="vgg16")
    with pytest.raises(ConfigError, match="precision"):
        FeatureSpec(backbone="resnet18", precision="fp16")
    with pytest.raises(ConfigError, match="region_level"):
        FeatureSpec(backbone="resnet18", region_level="layer5")
    spec = FeatureSpec(backbone="resnet18", weights="w.pth")
    assert FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_spatial_maps_and_no_regions(dataset, tmp_path) -> None:
    """Maps are the level outputs pooled to size × size: their spatial mean is the pooled level."""
    spec = replace(SPEC, maps=("layer4:2", "layer2:4"), num_regions=0)
    feats = extract_features(dataset, spec, tmp_path, batch_size=3, progress=False)
    n = dataset.num_images
    assert feats.maps["map_layer4"].shape == (n, 512, 2, 2) and feats.maps["map_layer4"].dtype == torch.float16
    assert feats.maps["map_layer2"].shape == (n, 128, 4, 4)
    # at 64 px layer2 is 8x8: pooling to 4x4 averages 2x2 blocks, so the overall mean is unchanged
    for level, pooled in (("layer2", "level2"), ("layer4", "level4")):
        torch.testing.assert_close(feats.maps[f"map_{level}"].float().mean(dim=(2, 3)), getattr(feats, pooled),
                                   rtol=3e-3, atol=3e-3)
    assert feats.regions.shape == (n, 0, 256)
    batch = feats.select([1])
    assert batch["map_layer2"].dtype == torch.float32 and batch["map_layer2"].shape == (1, 128, 4, 4)
    assert feature_dims(spec)["maps"] == {"layer4": (512, 2), "layer2": (128, 4)}
    assert spec.cache_key(dataset) != SPEC.cache_key(dataset)
    again = load_features(spec.cache_path(dataset, tmp_path))
    assert torch.equal(again.maps["map_layer2"], feats.maps["map_layer2"]) and again.spec.maps == spec.maps
    sub = feats.subset([2, 0])
    assert torch.equal(sub.maps["map_layer4"], feats.maps["map_layer4"][[2, 0]])


@pytest.mark.parametrize("maps, message", [
    (("layer4",), "level:size"), (("layer9:2",), "no level 'layer9'"), (("layer4:0",), "size >= 1"),
    (("layer4:2", "layer4:4"), "twice"),
])
def test_bad_map_entries(maps, message) -> None:
    with pytest.raises(ConfigError, match=message):
        FeatureSpec(backbone="resnet18", maps=maps)


def test_cache_follows_the_images_content(tmp_path) -> None:
    """Image replaced, image deleted, image folder moved, two datasets of the same name and file names."""
    (tmp_path / "a").mkdir()
    first = _dataset(tmp_path / "a")
    cache = tmp_path / "cache"
    original = extract_features(first, SPEC, cache, progress=False)
    key = SPEC.cache_key(first)
    # replaced: same name, same size, other pixels -> another key, features computed afresh
    path = first.image_path(1)
    pixels = np.asarray(Image.open(path)).copy()
    pixels[:8] = 255 - pixels[:8]
    Image.fromarray(pixels).save(path)
    replaced_key = SPEC.cache_key(first)
    assert replaced_key != key
    replaced = extract_features(first, SPEC, cache, progress=False)
    assert not torch.equal(replaced.levels[3][1], original.levels[3][1])
    assert torch.equal(replaced.levels[3][0], original.levels[3][0])
    # the same name and file names with other images elsewhere: never the other one's cache
    (tmp_path / "b").mkdir()
    second = _dataset(tmp_path / "b")
    Image.fromarray(np.zeros((60, 80, 3), dtype=np.uint8)).save(second.image_path(0))
    assert SPEC.cache_path(second, cache) != SPEC.cache_path(first, cache)
    # moved with its images: the same content, the same cache
    moved = tmp_path / "moved"
    (tmp_path / "a").rename(moved)
    relocated = RetrievalDataset(name=first.name, image_dir=moved, image_files=first.image_files,
                                 image_splits=first.image_splits, captions=first.captions,
                                 caption_image=first.caption_image)
    assert SPEC.cache_key(relocated) == replaced_key
    assert SPEC.cache_path(relocated, cache).is_file()
    # the folder gone (or one image deleted): a one-line error naming the file
    with pytest.raises(ImageReadError, match="img0.png: image file not found"):
        SPEC.cache_key(first)
    relocated.image_path(2).unlink()
    with pytest.raises(ImageReadError, match="img2.png"):
        extract_features(relocated, SPEC, cache, progress=False)
