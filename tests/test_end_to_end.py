"""End-to-end backbone training and bf16 precision, on the tiny synthetic dataset (ResNet-18, 64 px)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from rsitr.backbones import create_backbone
from rsitr.data import load_dataset
from rsitr.errors import ConfigError
from rsitr.evaluation import compute_similarity
from rsitr.features import FeatureSpec, extract_features
from rsitr_cli.main import main
from rsitr_train import trainer as training
from rsitr_train.augment import AugmentConfig, sample_geometry, warp
from rsitr_train.config import load_config
from rsitr_train.end_to_end import compute_store_features, load_image_store, transform_boxes
from rsitr_train.loop import RESUME
from rsitr_train.runs import BACKBONE_CHECKPOINT, CHECKPOINT, evaluate_run, load_run
from rsitr_train.trainer import evaluate_split, train

QUIET = {"progress": False}


def e2e_overrides(dataset, cache, epochs: int = 1, **extra) -> list[str]:
    overrides = [
        f"data.path={dataset}", f"features.cache_dir={cache}", "features.image_size=64", "features.precision=fp32",
        "features.batch_size=8", "model.name=dove-s", "model.params={embed_dim: 32, word_dim: 16}",
        f"train.epochs={epochs}", "train.batch_size=20", "train.lr=0.001", "train.threads=1",
    ]
    return overrides + [f"{k}={v}" for k, v in extra.items()]


def e2e_config(dataset, cache, epochs: int = 1, **extra):
    return load_config(None, e2e_overrides(dataset, cache, epochs, **{"train.train_backbone": "true", **extra}))


def test_differentiable_features_equal_the_cache(tiny_synth) -> None:
    """Eval mode, no augmentation: the trainable path gives the cached features (detections, regions, maps)."""
    dataset = load_dataset(tiny_synth)
    spec = FeatureSpec(backbone="resnet18", image_size=64, precision="fp32", maps=("layer4:2",),
                       detections=tiny_synth.parent / "detections.json")
    ids = torch.arange(dataset.num_images)
    cached = extract_features(dataset, spec, None, batch_size=8, progress=False).select(ids)
    store = load_image_store(dataset, spec, ids.tolist(), threads=1, progress=False)
    backbone = create_backbone("resnet18", seed=spec.seed).to(memory_format=torch.channels_last)
    computed = compute_store_features(backbone, store, ids, spec, "fp32", batch_size=5, progress=False)
    assert set(computed) == set(cached)
    assert torch.equal(computed["region_mask"], cached["region_mask"])
    assert torch.equal(computed["region_boxes"], cached["region_boxes"])
    for key in ("level1", "level2", "level3", "level4"):
        torch.testing.assert_close(computed[key], cached[key], rtol=1e-4, atol=1e-5)
    for key in ("regions", "map_layer4"):  # the cache stores these as float16
        torch.testing.assert_close(computed[key], cached[key], rtol=2e-3, atol=2e-3)

    features = training.store_features(backbone, store, ids[:3].repeat(2), spec, "fp32")  # with gradients
    features["regions"].sum().backward()
    assert backbone.conv1.weight.grad is not None and backbone.conv1.weight.grad.abs().sum() > 0


def test_boxes_follow_the_augmented_image() -> None:
    """A white square stays inside its box through crop, flips and 90-degree turns."""
    images = torch.zeros(16, 3, 64, 64)
    images[:, :, 8:24, 36:60] = 1.0  # x 36..60, y 8..24
    boxes = torch.tensor([[36.0, 8.0, 60.0, 24.0]]).expand(16, 1, 4)
    config = AugmentConfig(scale=(0.6, 1.0), brightness=0.0, contrast=0.0, saturation=0.0)
    geometry = sample_geometry(16, 64, 64, config, torch.Generator().manual_seed(0))
    warped = warp(images, geometry, 48)
    moved = transform_boxes(boxes, geometry, 64, 48)
    assert geometry.quarter.unique().numel() > 1 and geometry.hflip.any()
    for image, box in zip(warped, moved[:, 0]):
        x1, y1, x2, y2 = box.round().int().tolist()
        inside = torch.zeros(48, 48, dtype=torch.bool)
        inside[y1:y2, x1:x2] = True
        bright = image[0] > 0.5
        assert not (bright & ~inside).any()  # nothing bright outside the moved box
        if inside.any():
            assert image[0][inside].mean() > 0.8


def test_end_to_end_run_trains_saves_and_evaluates(tiny_synth, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    args = ["--quiet", "train", "--out", str(run), "--train-backbone"]
    for item in e2e_overrides(tiny_synth, tmp_path / "cache"):
        args += ["--set", item]
    assert main(args) == 0
    for name in (BACKBONE_CHECKPOINT, CHECKPOINT, "model.json", RESUME, "metrics.csv"):
        assert (run / name).is_file(), name
    init = create_backbone("resnet18", seed=0)
    trained = create_backbone("resnet18", weights=run / BACKBONE_CHECKPOINT)
    assert not torch.equal(trained.conv1.weight, init.conv1.weight)
    assert not torch.equal(trained.layer4[1].conv2.weight, init.layer4[1].conv2.weight)
    assert torch.equal(trained.bn1.running_mean, init.bn1.running_mean)  # BatchNorm statistics stay frozen
    resume = torch.load(run / RESUME, weights_only=True)
    assert len(resume["optimizer"]["param_groups"]) == 2
    assert not torch.equal(resume["backbone"]["conv1.weight"], init.conv1.weight)
    assert json.loads((run / "model.json").read_text())["trained_backbone"] == BACKBONE_CHECKPOINT
    row = next(csv.DictReader((run / "metrics.csv").open()))
    assert float(row["backbone_lr"]) == pytest.approx(0.1 * float(row["lr"]))
    capsys.readouterr()

    results = []
    for k in range(2):
        assert main(["--quiet", "evaluate", str(run), "--split", "test", "--json", str(tmp_path / f"e{k}.json")]) == 0
        results.append(json.loads((tmp_path / f"e{k}.json").read_text()))
    assert results[0]["metrics"] == results[1]["metrics"]
    assert all(math.isfinite(v) for v in results[0]["metrics"].values())
    assert "i2t R@1" in capsys.readouterr().out

    model, prepared = load_run(run, progress=False)
    assert prepared.features is None and prepared.backbone is not None  # not the frozen cache
    frozen_config = load_config(None, e2e_overrides(tiny_synth, tmp_path / "cache"))
    frozen = training.prepare(frozen_config, vocab=prepared.vocab, progress=False)
    test_ids = torch.tensor(prepared.dataset.split_indices("test"))
    own = training.split_image_features(prepared, test_ids, "fp32", progress=False)
    assert not torch.allclose(own["level4"], frozen.features.select(test_ids)["level4"])


def test_interrupted_end_to_end_run_resumes_to_the_same_weights(tiny_synth, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    steps = {"n": 0}
    original = training.autocast

    def counting(precision, *device):
        steps["n"] += 1
        return original(precision, *device)

    monkeypatch.setattr(training, "autocast", counting)  # one call per training step
    train(e2e_config(tiny_synth, cache, epochs=2), tmp_path / "straight", **QUIET)
    per_epoch = steps["n"] // 2

    def crash_in_second_epoch(precision, *device):
        steps["n"] += 1
        if steps["n"] == per_epoch + 2:
            raise KeyboardInterrupt
        return original(precision, *device)

    steps["n"] = 0
    monkeypatch.setattr(training, "autocast", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(e2e_config(tiny_synth, cache, epochs=2), tmp_path / "resumed", **QUIET)
    assert torch.load(tmp_path / "resumed" / RESUME, weights_only=True)["epoch"] == 0
    monkeypatch.setattr(training, "autocast", original)
    train(e2e_config(tiny_synth, cache, epochs=2), tmp_path / "resumed", **QUIET)

    a = torch.load(tmp_path / "straight" / RESUME, weights_only=True)
    b = torch.load(tmp_path / "resumed" / RESUME, weights_only=True)
    for part in ("model", "backbone"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=1e-6, msg=f"{part} {key}")

    def rows(path):
        return [{k: v for k, v in row.items() if k != "train_seconds"} for row in csv.DictReader(path.open())]

    assert rows(tmp_path / "resumed" / "metrics.csv") == rows(tmp_path / "straight" / "metrics.csv")


def test_frozen_runs_are_unchanged(tiny_synth, tmp_path) -> None:
    run = tmp_path / "run"
    train(load_config(None, e2e_overrides(tiny_synth, tmp_path / "cache")), run, **QUIET)
    assert not (run / BACKBONE_CHECKPOINT).exists()
    assert "backbone" not in torch.load(run / RESUME, weights_only=True)
    assert "trained_backbone" not in json.loads((run / "model.json").read_text())
    assert "backbone_lr" not in (run / "metrics.csv").read_text().splitlines()[0]
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert {k: saved[k] for k in ("precision", "train_backbone", "backbone_lr", "augment")} == {
        "precision": "fp32", "train_backbone": False, "backbone_lr": None, "augment": None}


@pytest.mark.parametrize("train_backbone", [False, True])
def test_bf16_run_trains_and_evaluates(tiny_synth, tmp_path, train_backbone) -> None:
    run = tmp_path / "run"
    overrides = e2e_overrides(tiny_synth, tmp_path / "cache", **{"train.precision": "bf16",
                                                                   "train.train_backbone": str(train_backbone).lower()})
    train(load_config(None, overrides), run, **QUIET)
    row = next(csv.DictReader((run / "metrics.csv").open()))
    assert math.isfinite(float(row["loss"])) and math.isfinite(float(row["val_mR"]))
    result = evaluate_run(run, "val", tmp_path / "eval.json", progress=False)
    assert result["precision"] == "bf16" and all(math.isfinite(v) for v in result["metrics"].values())


def test_bf16_similarity_is_close_to_fp32(tiny_synth, tmp_path) -> None:
    config = load_config(None, e2e_overrides(tiny_synth, tmp_path / "cache"))
    prepared = training.prepare(config, progress=False)
    model = training.build_model(prepared)
    data = training.split_data(prepared.dataset, "val", prepared.vocab, config.text.max_length, model.text_inputs)
    features = prepared.features.select(data.image_ids)
    sims = {p: compute_similarity(model, features, data.tokens, data.lengths, progress=False,
                                  text_extras=data.extras, precision=p) for p in ("fp32", "bf16")}
    assert sims["bf16"].dtype == torch.float32 and sims["bf16"].shape == sims["fp32"].shape
    correlation = np.corrcoef(sims["fp32"].flatten().numpy(), sims["bf16"].flatten().numpy())[0, 1]
    assert correlation > 0.99
    metrics, _, _ = evaluate_split(model, prepared, "val", progress=False, data=data, precision="bf16")
    assert all(math.isfinite(v) for v in metrics.values())


def test_bad_settings_are_one_line_config_errors(tiny_synth, tmp_path, monkeypatch) -> None:
    for override, match in (("train.augment=true", "train.augment needs train.train_backbone"),
                            ("train.precision=fp16", "train.precision"),
                            ("train.backbone_lr=0", "train.backbone_lr")):
        with pytest.raises(ConfigError, match=match) as error:
            load_config(None, [override])
        assert "\n" not in str(error.value)

    def frozen_backbone(*args, **kwargs):
        return create_backbone(*args, **kwargs).requires_grad_(False)

    monkeypatch.setattr("rsitr_train.end_to_end.create_backbone", frozen_backbone)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train(e2e_config(tiny_synth, tmp_path / "cache"), tmp_path / "run", **QUIET)
