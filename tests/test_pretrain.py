"""Scene-classification pretraining: it learns, saves loadable torchvision-keyed weights, resumes exactly."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import log_lines
from rsitr.backbones import create_backbone
from rsitr.data.imagefolder import ClassificationData, load_imagefolder
from rsitr.errors import ConfigError
from rsitr.io import load_tensors
from rsitr_train.augment import AugmentConfig
from rsitr_train.loop import METRICS, RESUME
from rsitr_train.pretrain import (
    BACKBONE_FILE,
    BACKBONE_JSON,
    CURVES,
    PretrainConfig,
    WeightAverage,
    _Split,
    build_classifier,
    cutmix_batch,
    cutmix_box,
    epoch_batches,
    learning_rate,
    load_pretrain_config,
    pretrain,
    recalibrate_batchnorm,
)

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 200)}

#: A run small enough for a test: ResNet-18 at 64 px, 36 training and 12 validation images. One
#: thread: such small convolutions gain nothing from two, and lose a lot when the cores are busy.
TINY = PretrainConfig(backbone="resnet18", image_size=64, epochs=2, batch_size=4, lr=0.01, warmup_epochs=0.5,
                      precision="fp32", augment=AugmentConfig(hue=0.0), seed=0, threads=1)


class Interrupt(Exception):
    """Raised from the log callback to stop a run after its first epoch."""


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> ClassificationData:
    """Three easily separated classes: noisy solid red, green and blue images (48 px PNGs)."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir()
        for i in range(16):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:02d}.png")
    return load_imagefolder(root, val_fraction=0.25, seed=0)


@pytest.fixture(scope="module")
def fp32_run(colour_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fp32")
    return out, pretrain(TINY, colour_data, out, progress=False)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_tiny_run_learns_the_classes(fp32_run, colour_data) -> None:
    out, summary = fp32_run
    assert summary["epochs"] == 2 and summary["num_val"] == 12 and summary["classes"] == ["blue", "green", "red"]
    assert summary["best_val_acc"] >= 0.75  # chance is 1/3
    description = json.loads((out / BACKBONE_JSON).read_text())
    assert description["classes"] == colour_data.classes and description["backbone"] == "resnet18"
    assert description["epoch"] == summary["best_epoch"]
    assert description["val_accuracy"] == pytest.approx(summary["best_val_acc"], abs=1e-5)
    assert set(description["val_per_class_accuracy"]) == set(colour_data.classes)
    per_class = list(description["val_per_class_accuracy"].values())
    assert np.mean(per_class) == pytest.approx(description["val_accuracy"])  # 4 val images per class
    assert description["image_size"] == 64 and len(description["normalization"]["mean"]) == 3


def test_metrics_csv_and_curves(fp32_run) -> None:
    out, summary = fp32_run
    rows = list(csv.DictReader((out / METRICS).open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert float(row["images_per_s"]) > 0 and math.isfinite(float(row["train_loss"]))
        assert 0 <= float(row["val_acc"]) <= 1
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # cosine decay
    assert (out / CURVES).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_saved_backbone_loads_with_the_trained_weights(fp32_run) -> None:
    out, summary = fp32_run
    path = out / BACKBONE_FILE
    saved = load_tensors(path)
    assert saved["fc.weight"].shape == (3, 512)  # the classifier is the backbone's own fc, resized
    loaded = create_backbone("resnet18", weights=path)
    fresh = create_backbone("resnet18", seed=TINY.seed)
    for key in ("conv1.weight", "layer3.1.conv2.weight", "bn1.running_mean", "layer4.1.bn2.weight"):
        assert torch.equal(loaded.state_dict()[key], saved[key])
        assert not torch.equal(loaded.state_dict()[key], fresh.state_dict()[key])  # training moved it
    if summary["best_epoch"] == TINY.epochs:  # the best epoch was the last: same weights as resume.pt
        last = _state(out / RESUME)
        assert torch.equal(loaded.state_dict()["layer2.0.conv1.weight"], last["layer2.0.conv1.weight"])


def test_interrupted_run_resumes_to_the_same_weights(fp32_run, colour_data, tmp_path: Path) -> None:
    reference, _ = fp32_run

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise Interrupt

    with pytest.raises(Interrupt), log_lines(stop_after_first_epoch):
        pretrain(TINY, colour_data, tmp_path, progress=False)
    assert torch.load(tmp_path / RESUME, weights_only=True)["epoch"] == 0
    lines: list[str] = []
    with log_lines(lines.append):
        pretrain(TINY, colour_data, tmp_path, progress=False)
    assert any(line.startswith("resuming") for line in lines)
    assert sum(line.startswith("epoch ") for line in lines) == 1
    expected, resumed = _state(reference / RESUME), _state(tmp_path / RESUME)
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key
    best_weights = [load_tensors(d / BACKBONE_FILE)["conv1.weight"] for d in (reference, tmp_path)]
    assert torch.equal(*best_weights)
    untimed = ("train_seconds", "images_per_s")
    rows = [[{k: v for k, v in r.items() if k not in untimed} for r in csv.DictReader((d / METRICS).open())]
            for d in (reference, tmp_path)]
    assert rows[0] == rows[1]


def test_resume_refuses_another_configuration(fp32_run, colour_data) -> None:
    out, _ = fp32_run
    with pytest.raises(ConfigError, match="another configuration"):
        pretrain(replace(TINY, lr=0.02), colour_data, out, progress=False)
    # a finished run with the same config has nothing left to do and reports its summary
    summary = pretrain(replace(TINY, threads=2), colour_data, out, progress=False)  # threads may differ
    assert summary["epochs"] == 2


def test_bf16_run_trains_and_differs_from_fp32(fp32_run, colour_data, tmp_path: Path) -> None:
    reference, _ = fp32_run
    summary = pretrain(replace(TINY, precision="bf16"), colour_data, tmp_path, progress=False)
    assert summary["epochs"] == 2 and summary["best_val_acc"] >= 0.75
    bf16, fp32 = _state(tmp_path / RESUME), _state(reference / RESUME)
    assert all(torch.isfinite(v).all() for v in bf16.values() if v.is_floating_point())
    assert not torch.equal(bf16["conv1.weight"], fp32["conv1.weight"])  # autocast really changed the arithmetic
    loaded = create_backbone("resnet18", weights=tmp_path / BACKBONE_FILE)
    assert torch.equal(loaded.conv1.weight, load_tensors(tmp_path / BACKBONE_FILE)["conv1.weight"])


def test_batchnorm_recalibration_gives_exact_statistics() -> None:
    config = replace(TINY, image_size=32, bn_images=6, eval_batch_size=8, channels_last=False)
    model = build_classifier(config, num_classes=3)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    recalibrate_batchnorm(model, _Split(images, torch.zeros(6, dtype=torch.int64)), config, epoch=0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        conv = model.conv1((images.float() / 255 - mean) / std)
    torch.testing.assert_close(model.bn1.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.bn1.running_var, conv.var(dim=(0, 2, 3), unbiased=True), atol=1e-3, rtol=1e-4)
    assert model.bn1.momentum == 0.1  # restored after the cumulative average


def test_schedule_and_batches() -> None:
    assert learning_rate(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert learning_rate(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert learning_rate(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert learning_rate(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert learning_rate(99, 100, 10, 1.0) < 0.01
    batches = epoch_batches(10, 4, seed=1, epoch=0)
    assert [len(b) for b in batches] == [4, 4]  # the short last batch is dropped
    assert [b.tolist() for b in batches] == [b.tolist() for b in epoch_batches(10, 4, seed=1, epoch=0)]
    assert [b.tolist() for b in batches] != [b.tolist() for b in epoch_batches(10, 4, seed=1, epoch=1)]
    assert [len(b) for b in epoch_batches(3, 4, seed=1, epoch=0)] == [3]


@pytest.mark.parametrize("bad", [dict(backbone="vgg16"), dict(precision="fp16"), dict(epochs=0), dict(image_size=16),
                                 dict(label_smoothing=1.0), dict(cutmix=1.5)])
def test_invalid_configuration_is_a_config_error(bad: dict, colour_data, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        pretrain(replace(TINY, **bad), colour_data, tmp_path, progress=False)


def test_config_round_trips_through_a_dict() -> None:
    config = replace(TINY, init_weights="weights.pth", augment=AugmentConfig(scale=(0.5, 1.0)))
    assert PretrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_cutmix_pastes_one_box_and_weighs_labels_by_area() -> None:
    generator = torch.Generator().manual_seed(3)
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 20, 20).clone()
    labels = torch.arange(6) * 10
    mixed, donor_labels, own_share = cutmix_batch(images, labels, generator)
    foreign = mixed[:, 0] != images[:, 0]  # (6, 20, 20): pixels taken from another image
    donor = donor_labels // 10
    for i in range(6):
        pasted = mixed[i, :, foreign[i]]
        assert torch.all(pasted == float(donor[i]))  # the box holds the donor's pixels, all channels
    assert not torch.equal(donor, torch.arange(6))  # this seed moves images, so the box is visible
    moved = int(torch.nonzero(donor != torch.arange(6))[0])
    rows, cols = torch.nonzero(foreign[moved], as_tuple=True)
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert int(foreign[moved].sum()) == int(area)  # one rectangle
    assert own_share == pytest.approx(1 - int(area) / 400)
    assert torch.equal(images[:, 0, 0, 0], torch.arange(6, dtype=torch.float32))  # the input is untouched


def test_cutmix_box_stays_inside_and_covers_the_drawn_share_on_average() -> None:
    generator = torch.Generator().manual_seed(0)
    shares = []
    for _ in range(400):
        top, bottom, left, right = cutmix_box(32, 48, generator)
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 48
        shares.append((bottom - top) * (right - left) / (32 * 48))
    # a uniform draw has mean 1/2; clipping at the borders only removes area
    assert 0.2 < float(np.mean(shares)) < 0.5


def test_cutmix_run_trains(colour_data, tmp_path: Path) -> None:
    summary = pretrain(replace(TINY, cutmix=1.0), colour_data, tmp_path, progress=False)
    assert summary["epochs"] == 2 and math.isfinite(summary["best_val_acc"])
    history = list(csv.DictReader((tmp_path / METRICS).read_text().splitlines()))
    assert all(math.isfinite(float(row["train_loss"])) for row in history)


def test_weight_average_follows_the_exponential_recursion() -> None:
    net = torch.nn.Linear(3, 2)
    average = WeightAverage(net, decay=0.75)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(4.0)
    average.update(net)  # 0.75 * start + 0.25 * (start + 4) = start + 1
    torch.testing.assert_close(average.module.weight, start + 1.0)
    average.update(net)  # 0.75 * (start + 1) + 0.25 * (start + 4) = start + 1.75
    torch.testing.assert_close(average.module.weight, start + 1.75)
    assert not average.module.weight.requires_grad


def test_averaged_run_saves_the_average_and_resumes_to_it(colour_data, tmp_path: Path) -> None:
    config = replace(TINY, ema_decay=0.9)
    reference = tmp_path / "whole"
    summary = pretrain(config, colour_data, reference, progress=False)
    history = list(csv.DictReader((reference / METRICS).open()))
    assert summary["epochs"] == 2 and all(row["val_acc_raw"] != "" for row in history)
    payload = torch.load(reference / RESUME, weights_only=True)
    one_epoch = tmp_path / "one"  # its only epoch is its best: the saved weights are the average's, not the network's
    pretrain(replace(config, epochs=1), colour_data, one_epoch, progress=False)
    saved = load_tensors(one_epoch / BACKBONE_FILE)
    last = torch.load(one_epoch / RESUME, weights_only=True)
    assert torch.equal(saved["conv1.weight"], last["average"]["conv1.weight"])
    assert not torch.equal(saved["conv1.weight"], last["model"]["conv1.weight"])

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise Interrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupt), log_lines(stop_after_first_epoch):
        pretrain(config, colour_data, resumed, progress=False)
    pretrain(config, colour_data, resumed, progress=False)
    again = torch.load(resumed / RESUME, weights_only=True)
    for key, value in payload["average"].items():
        assert torch.equal(value, again["average"][key]), key


def test_yaml_config_loads_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("backbone: resnet18\nimage_size: 96\ncutmix: 0.5\naugment:\n  scale: [0.5, 1.0]\n")
    config = load_pretrain_config(path, {"epochs": 7, "image_size": None})
    assert (config.backbone, config.image_size, config.epochs, config.cutmix) == ("resnet18", 96, 7, 0.5)
    assert config.augment.scale == (0.5, 1.0)


def test_shipped_recipe_is_valid() -> None:
    config = load_pretrain_config("pretrain_ucm_r18")  # shipped recipes load by name
    assert config.backbone == "resnet18" and config.cutmix > 0


@pytest.mark.parametrize("text, message", [("epochs: [1, 2\n", "not valid YAML"), ("- 1\n", "mapping"),
                                           ("epoch: 3\n", "unknown pretrain parameter"), ("cutmix: 2\n", "cutmix")])
def test_bad_yaml_config_is_a_one_line_error_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_pretrain_config(path)
    assert str(path) in str(error.value) and message in str(error.value) and "\n" not in str(error.value)
