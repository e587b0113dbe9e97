"""Scene-classification pretraining of an image backbone, for use as a frozen feature extractor.

Retrieval models here encode images with a frozen backbone; the papers use a ResNet-50 trained on
the AID scene dataset, whose weights are not downloadable. :func:`pretrain` trains such a backbone
on labelled images the user has (an ImageFolder tree or a retrieval dataset's scene labels, see
:mod:`rsitr.data.imagefolder`) and saves it in the form ``--backbone-weights`` /
:func:`rsitr.backbones.create_backbone` loads.

How it trains, and why:

* All images are decoded once, by a thread pool, into one uint8 tensor in memory at
  ``decode_size = round(image_size * decode_scale)`` (8/7 by default: 256 px for 224 px crops),
  so epochs cost no decoding. That is 3 * 256 * 256 bytes = 192 KiB per image (about 2 GiB for
  AID's 10 000 images).
* Each batch is augmented in one resampling call (:func:`rsitr_train.augment.augment_batch`: random
  resized crop, flips, 90-degree rotations, colour jitter), normalised with the ImageNet statistics
  feature extraction uses, and run in ``channels_last`` layout under CPU bfloat16 autocast
  (``precision="bf16"``): on CPUs with bf16 instructions a training step is about twice as fast
  as in float32 (see ``benchmarks/pretrain_speed.py``). Master weights, the loss and the
  optimiser stay in float32.
* The classifier is the backbone's own ``fc``, resized to the number of classes, so the saved
  state dict has torchvision's keys; the weight loader ignores ``fc.*``.
* SGD with Nesterov momentum; no weight decay on biases and BatchNorm parameters (the usual
  practice: decay would only shrink the BatchNorm scales, which the next layer undoes). The
  learning rate warms up linearly over ``warmup_epochs`` and then follows a cosine from ``lr``
  to 0, updated every step. The rate is a function of the global step, so the
  schedule needs no state of its own.
* After each epoch the BatchNorm statistics are recomputed exactly over (up to ``bn_images``)
  training images before validation and saving: the running averages trail the weights, and the
  frozen backbone's features are computed with these statistics.
* Shuffling and augmentation draw from generators seeded by ``(seed, epoch)``, so an interrupted
  run resumed from ``resume.pt`` repeats exactly the batches the uninterrupted run would have seen.

Files written into ``out_dir``::

    backbone.safetensors   weights of the epoch with the best validation top-1 (torchvision keys)
    backbone.json          classes, backbone name, epoch, val accuracy (overall and per class),
                           image size and normalisation of that checkpoint
    pretrain_config.json   the configuration and data summary of the run
    resume.pt              last epoch's model, optimiser, step, RNG state and history
    metrics.csv            loss, accuracy, learning rate and images/s per epoch
    pretrain_curves.png    the same, plotted
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsitr.backbones import Backbone, backbone_info, create_backbone
from rsitr.data.imagefolder import ClassificationData
from rsitr.data.images import decode_images, normalize
from rsitr.devices import module_device, resolve_device
from rsitr.distributed import env_world
from rsitr.errors import ConfigError
from rsitr.io import check_keys, check_writable, save_tensors, write_json
from rsitr.precision import autocast, check_precision
from rsitr.progress import get_logger, progress_bar
from rsitr_train.augment import AugmentConfig, augment_batch, eval_transform
from rsitr_train.loop import (
    RESUME,
    EpochResult,
    LoopState,
    cleaned_on_failure,
    load_resume,
    remove_interrupted_writes,
    resumed_state,
    run_epochs,
    save_resume,
    shuffled_batches,
    write_history,
)
from rsitr_train.plots import plot_pretrain_curves

logger = get_logger(__name__)

BACKBONE_FILE = "backbone.safetensors"
BACKBONE_JSON = "backbone.json"
CONFIG_FILE = "pretrain_config.json"
CURVES = "pretrain_curves.png"

#: Config fields that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = ("threads",)


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run (the data aside).

    Attributes:
        backbone: registered backbone with an ``fc`` classifier (``resnet18``, ``resnet50``).
        image_size: side of the square training and validation inputs.
        epochs: passes over the training images.
        batch_size: training images per step (the last, smaller batch of an epoch is dropped).
        lr: peak learning rate, reached after warm-up. 0.05 suits batch 64 from scratch; use
            about a tenth when starting from ``init_weights``.
        momentum: SGD (Nesterov) momentum.
        weight_decay: L2 penalty on convolution and linear weights (not biases, not BatchNorm).
        label_smoothing: cross-entropy label smoothing.
        cutmix: probability that a batch is CutMixed (:func:`cutmix_batch`): a random box of each
            image is replaced by the same box of another image of the batch, and the loss weighs
            both labels by area. 0 turns it off. A regulariser for long schedules on few images,
            where the network otherwise learns the training set by heart.
        warmup_epochs: epochs of linear learning-rate warm-up before the cosine decay.
        seed: seeds the classifier init, the random init of the backbone, shuffling and
            augmentation.
        precision: ``"bf16"`` (CPU autocast to bfloat16) or ``"fp32"``.
        channels_last: run in channels_last memory layout (oneDNN's fast CPU convolutions).
        augment: training augmentation parameters.
        init_weights: optional weights file to start from (e.g. ImageNet torchvision weights);
            its classifier is ignored.
        threads: torch threads (set process-wide) and decoding threads; 0 keeps torch's setting
            and decodes with one thread per CPU. On a machine shared with other jobs, fewer
            threads than cores can be much faster.
        decode_scale: images are stored at ``round(image_size * decode_scale)`` pixels.
        eval_batch_size: images per validation batch; 0 means twice ``batch_size``.
        bn_images: training images (eval transform) over which the BatchNorm statistics are
            recomputed after each epoch, before validation; 0 keeps the running averages. The
            running averages lag behind the weights (badly in short runs), and a frozen backbone's
            features are computed with these statistics, so they should describe the final weights.
    """

    backbone: str = "resnet50"
    image_size: int = 224
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    cutmix: float = 0.0
    warmup_epochs: float = 1.0
    seed: int = 0
    precision: str = "bf16"
    channels_last: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    init_weights: str | None = None
    threads: int = 0
    decode_scale: float = 8 / 7
    eval_batch_size: int = 0
    bn_images: int = 2048

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig.from_dict(self.augment)
        if self.init_weights is not None:
            self.init_weights = str(self.init_weights)

    @property
    def decode_size(self) -> int:
        """Side at which images are decoded and kept in memory."""
        return max(self.image_size, round(self.image_size * self.decode_scale))

    def validate(self) -> None:
        """Raise :class:`~rsitr.errors.ConfigError` naming the first invalid value."""
        backbone_info(self.backbone)  # ConfigError listing the registered names
        positive = {"image_size": self.image_size, "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"pretrain {name} must be > 0, got {value}")
        if self.image_size < 32:
            raise ConfigError(f"pretrain image_size must be >= 32 (the network downsamples by 32), "
                              f"got {self.image_size}")
        checks = [("momentum", 0 <= self.momentum < 1), ("weight_decay", self.weight_decay >= 0),
                  ("label_smoothing", 0 <= self.label_smoothing < 1), ("cutmix", 0 <= self.cutmix <= 1),
                  ("warmup_epochs", self.warmup_epochs >= 0),
                  ("threads", self.threads >= 0), ("decode_scale", self.decode_scale >= 1),
                  ("eval_batch_size", self.eval_batch_size >= 0), ("bn_images", self.bn_images >= 0)]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"pretrain {name} is out of range: {getattr(self, name)}")
        check_precision(self.precision, "pretrain precision")
        self.augment.validate()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able values, the augmentation nested."""
        values = asdict(self)
        values["augment"] = self.augment.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a ConfigError."""
        check_keys(values, cls.__dataclass_fields__, "pretrain config", "pretrain parameter")
        return cls(**values)


def load_pretrain_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """A :class:`PretrainConfig` from a YAML mapping file, with ``overrides`` (non-None values) on top.

    Errors (missing file, invalid YAML, unknown or invalid fields) are one-line ConfigErrors that
    name the file.
    """
    from rsitr_train.config import read_config_file

    values = read_config_file(path)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        config = PretrainConfig.from_dict(values)
        config.validate()
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return config


# ----------------------------------------------------------------------------------------- model


def build_classifier(config: PretrainConfig, num_classes: int) -> Backbone:
    """The backbone (random init from ``seed``, or ``init_weights``) with ``fc`` sized to ``num_classes``."""
    model = create_backbone(config.backbone, weights=config.init_weights, seed=config.seed)
    head = getattr(model, "fc", None)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"backbone {config.backbone!r} has no 'fc' classifier to pretrain")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        model.fc = nn.Linear(head.in_features, num_classes)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and kernels only; biases and BatchNorm scales are exempt."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    exempt = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(_parameter_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum,
                           nesterov=config.momentum > 0)


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _normalise(images: Tensor, config: PretrainConfig) -> Tensor:
    """The backbone's mean/std normalisation of a [0, 1] batch, in the configured memory layout."""
    info = backbone_info(config.backbone)
    out = normalize(images, info.mean, info.std)
    return out.contiguous(memory_format=torch.channels_last) if config.channels_last else out.contiguous()


# ----------------------------------------------------------------------------------------- epochs


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A generator for one purpose (``stream``) of one epoch; independent of everything before it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 8 + stream)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """Image order of an epoch, cut into batches; a short last batch is dropped unless it is the only one."""
    return shuffled_batches(n, batch_size, _generator(seed, epoch, 0), min_last=batch_size)


@dataclass
class _Split:
    """Decoded images of one split and their labels."""

    images: Tensor  # (N, 3, S, S) uint8
    labels: Tensor  # (N,) int64


def cutmix_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A CutMix box ``(top, bottom, left, right)`` whose area share is drawn uniformly from [0, 1].

    The side ratio is ``sqrt(area share)``; the centre is uniform over the image and the box is
    clipped at the borders, so the realised share can be smaller than the draw (the loss uses the
    realised share).
    """
    share = float(torch.rand((), generator=generator))
    cut_h, cut_w = round(height * math.sqrt(share)), round(width * math.sqrt(share))
    cy = int(torch.randint(height, (), generator=generator))
    cx = int(torch.randint(width, (), generator=generator))
    top, bottom = max(0, cy - cut_h // 2), min(height, cy + cut_h - cut_h // 2)
    left, right = max(0, cx - cut_w // 2), min(width, cx + cut_w - cut_w // 2)
    return top, bottom, left, right


def cutmix_batch(images: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, float]:
    """CutMix one batch: paste one box of a shuffled copy of the batch into every image.

    Returns the mixed images, the labels of the pasted images, and the share of each image that
    is still its own (the weight of its own label in the loss).
    """
    height, width = images.shape[-2:]
    donor = torch.randperm(len(labels), generator=generator)
    top, bottom, left, right = cutmix_box(height, width, generator)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images[donor][..., top:bottom, left:right]
    own_share = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, labels[donor], own_share


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: _Split, config: PretrainConfig,
                epoch: int, steps_per_epoch: int, progress: bool = True) -> dict[str, float]:
    """One epoch of augmented SGD steps; returns mean loss, top-1 accuracy, seconds and images/s.

    In a CutMixed batch the accuracy counts a prediction of the image's own label as correct.
    """
    model.train()
    device = module_device(model)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    augment_rng = _generator(config.seed, epoch, 1)
    cutmix_rng = _generator(config.seed, epoch, 2)
    loss_sum, correct, seen = 0.0, 0, 0
    started = time.perf_counter()
    batches = epoch_batches(len(data.labels), config.batch_size, config.seed, epoch)
    for i, batch in enumerate(progress_bar(batches, desc=f"epoch {epoch + 1}", enabled=progress)):
        lr = learning_rate(epoch * steps_per_epoch + i, total_steps, warmup_steps, config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = augment_batch(data.images[batch], config.augment, config.image_size, augment_rng)
        targets = data.labels[batch]
        donor_targets, own_share = targets, 1.0
        if config.cutmix > 0 and float(torch.rand((), generator=cutmix_rng)) < config.cutmix:
            images, donor_targets, own_share = cutmix_batch(images, targets, cutmix_rng)
        targets, donor_targets = targets.to(device), donor_targets.to(device)
        with autocast(config.precision, device):
            logits = model(_normalise(images, config).to(device))
        loss = own_share * F.cross_entropy(logits.float(), targets, label_smoothing=config.label_smoothing)
        if own_share < 1.0:
            loss = loss + (1.0 - own_share) * F.cross_entropy(logits.float(), donor_targets,
                                                              label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(batch)
        correct += int((logits.detach().argmax(dim=1) == targets).sum())
        seen += len(batch)
    seconds = time.perf_counter() - started
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen, "train_seconds": seconds,
            "images_per_s": seen / seconds, "lr": lr}


def _eval_chunks(indices: Tensor, batch_size: int) -> list[Tensor]:
    """``indices`` in batches; a last batch of one image joins the previous (BatchNorm needs two in train mode)."""
    chunks = list(indices.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: _Split, config: PretrainConfig, epoch: int) -> None:
    """Recompute every BatchNorm's running mean and variance as exact averages over training images.

    Up to ``config.bn_images`` training images (a seeded draw per epoch), seen through the eval
    transform, are run in train mode with ``momentum=None`` (a cumulative average) after the
    statistics are reset. Weights are untouched; only the buffers used in eval mode change.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or config.bn_images == 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    device = module_device(model)
    chosen = torch.randperm(len(data.labels), generator=_generator(config.seed, epoch, 2))[:config.bn_images]
    try:
        for chunk in _eval_chunks(chosen, config.eval_batch_size or 2 * config.batch_size):
            images = eval_transform(data.images[chunk], config.image_size)
            with autocast(config.precision, device):
                model(_normalise(images, config).to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


@torch.inference_mode()
def evaluate(model: nn.Module, data: _Split, config: PretrainConfig, num_classes: int) -> dict[str, Any]:
    """Validation loss (without label smoothing), top-1 accuracy and per-class accuracy (None: no images)."""
    model.eval()
    device = module_device(model)
    batch_size = config.eval_batch_size or 2 * config.batch_size
    loss_sum, predictions = 0.0, []
    for start in range(0, len(data.labels), batch_size):
        images = eval_transform(data.images[start:start + batch_size], config.image_size)
        with autocast(config.precision, device):
            logits = model(_normalise(images, config).to(device)).float()
        loss_sum += float(F.cross_entropy(logits, data.labels[start:start + batch_size].to(device), reduction="sum"))
        predictions.append(logits.argmax(dim=1).cpu())
    predicted = torch.cat(predictions)
    hits = (predicted == data.labels).double()
    totals = torch.bincount(data.labels, minlength=num_classes)
    per_class_hits = torch.bincount(data.labels, weights=hits, minlength=num_classes)
    per_class = [None if int(t) == 0 else float(h) / int(t) for h, t in zip(per_class_hits, totals)]
    return {"val_loss": loss_sum / len(data.labels), "val_acc": float(hits.mean()), "per_class": per_class}


# ----------------------------------------------------------------------------------------- files


def save_backbone(out_dir: Path, model: nn.Module, config: PretrainConfig, data: ClassificationData, epoch: int,
                  val: dict[str, Any] | None) -> Path:
    """Write ``backbone.safetensors`` (torchvision keys, float32, contiguous) and ``backbone.json``."""
    path = out_dir / BACKBONE_FILE
    description = {
        "backbone": config.backbone,
        "classes": list(data.classes),
        "epoch": epoch,
        "val_accuracy": None if val is None else val["val_acc"],
        "val_per_class_accuracy": None if val is None else dict(zip(data.classes, val["per_class"])),
        "image_size": config.image_size,
        "normalization": {"mean": list(backbone_info(config.backbone).mean), "std": list(backbone_info(config.backbone).std),
                          "input_range": [0, 1]},
        "data": data.source,
        "num_train_images": len(data.train_paths),
        "num_val_images": len(data.val_paths),
        "usage": f"--backbone-weights {BACKBONE_FILE} with backbone {config.backbone} (the fc classifier is ignored)",
    }
    metadata = {"rsitr_backbone": config.backbone, "classes": json.dumps(list(data.classes)), "epoch": str(epoch)}
    save_tensors(path, {k: v.float() for k, v in model.state_dict().items()}, metadata=metadata)
    write_json(out_dir / BACKBONE_JSON, description)
    return path


def _comparable(config_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config_dict.items() if k not in _RESUMABLE_CHANGES}


def _data_identity(data: ClassificationData) -> dict[str, Any]:
    """What must match for a run to resume on ``data``: the classes and the images per class and split."""
    return {"classes": list(data.classes), "train": data.counts("train"), "val": data.counts("val")}


def _load_resume(path: Path, config: PretrainConfig, data: ClassificationData) -> dict[str, Any] | None:
    """Read ``resume.pt`` (None when damaged: start again); ConfigError when it belongs to another configuration or other data."""
    state = load_resume(path)
    if state is None:
        return None
    if _comparable(json.loads(state["config_json"])) != _comparable(config.to_dict()):
        raise ConfigError(f"{path.parent}: holds a pretraining run with another configuration; "
                          "choose a new output folder or delete it")
    if json.loads(state["data_json"]) != _data_identity(data):
        raise ConfigError(f"{path.parent}: holds a pretraining run on other classes or images; "
                          "choose a new output folder or delete it")
    return state


# ----------------------------------------------------------------------------------------- driver


def _check_data(data: ClassificationData) -> None:
    if data.num_classes < 2:
        raise ConfigError(f"scene classification needs at least 2 classes, got {data.num_classes} ({data.source})")
    if not data.train_paths:
        raise ConfigError(f"no training images ({data.source})")


def _decode_splits(config: PretrainConfig, data: ClassificationData, progress: bool) -> tuple[_Split, _Split]:
    size = config.decode_size
    train = _Split(decode_images(data.train_paths, size, config.threads, progress, "decoding train"),
                   torch.tensor(data.train_labels, dtype=torch.int64))
    val = _Split(decode_images(data.val_paths, size, config.threads, progress, "decoding val"),
                 torch.tensor(data.val_labels, dtype=torch.int64))
    return train, val


def _summary(history: list[dict[str, Any]], data: ClassificationData, out_dir: Path) -> dict[str, Any]:
    scored = [row for row in history if row["val_acc"] is not None]
    best = max(scored, key=lambda r: r["val_acc"]) if scored else (history[-1] if history else {})
    return {
        "best_epoch": best.get("epoch"),
        "best_val_acc": best.get("val_acc"),
        "final_val_acc": history[-1]["val_acc"] if history else None,
        "epochs": len(history),
        "classes": list(data.classes),
        "num_train": len(data.train_paths),
        "num_val": len(data.val_paths),
        "images_per_s": float(np.mean([r["images_per_s"] for r in history])) if history else 0.0,
        "seconds_per_epoch": float(np.mean([r["train_seconds"] for r in history])) if history else 0.0,
        "checkpoint": str(out_dir / BACKBONE_FILE),
    }


def pretrain(config: PretrainConfig, data: ClassificationData, out_dir: str | Path, progress: bool = True,
             device: str | torch.device | None = None) -> dict[str, Any]:
    """Train ``config.backbone`` to classify ``data`` and save its best-on-validation weights in ``out_dir``.

    Resumes when ``out_dir`` holds a ``resume.pt`` of the same configuration (only ``threads`` may
    differ) and the same classes and image counts: the result is then identical to an
    uninterrupted run. One line per epoch is logged, after that epoch's files are written.

    Returns:
        A summary: best epoch and its validation top-1, final top-1, epochs run, classes, image
        counts, mean training images/s and seconds per epoch, and the checkpoint path.

    ``device``: where to train (:func:`rsitr.devices.resolve_device`; None = the best available);
    decoded images stay on the CPU and move batch by batch. Pretraining does not run
    data-parallel: under ``torchrun`` with several processes it stops with a ConfigError (its
    BatchNorm statistics and augmentation draws would need their own synchronisation).

    Raises:
        ConfigError: invalid configuration, fewer than two classes, or an ``out_dir`` holding
            another run.
        DatasetError: an image cannot be read (naming the file).
    """
    config.validate()
    _check_data(data)
    if env_world().distributed:
        raise ConfigError("rsitr pretrain runs in one process: start it without torchrun (or with --nproc-per-node 1)")
    where = resolve_device(device)
    out_dir = Path(out_dir)
    with cleaned_on_failure(out_dir, keep=RESUME):
        return _pretrain(config, data, check_writable(out_dir), progress, where)


def _pretrain(config: PretrainConfig, data: ClassificationData, out_dir: Path, progress: bool,
              device: torch.device | None = None) -> dict[str, Any]:
    if config.threads:
        torch.set_num_threads(config.threads)
    resume_path = out_dir / RESUME
    remove_interrupted_writes(out_dir)
    payload = _load_resume(resume_path, config, data) if resume_path.exists() else None
    write_json(out_dir / CONFIG_FILE, {"config": config.to_dict(), "data": data.source, "classes": list(data.classes),
                                       "num_train": len(data.train_paths), "num_val": len(data.val_paths)})
    if payload is not None and int(payload["epoch"]) + 1 >= config.epochs:
        logger.info(f"{out_dir}: all {config.epochs} epochs are done already")
        return _summary(json.loads(payload["history_json"]), data, out_dir)
    logger.info(f"pretraining {config.backbone} on {data.summary()}; {data.source}")
    train, val = _decode_splits(config, data, progress)

    model = build_classifier(config, data.num_classes).to(device or torch.device("cpu"))
    optimizer = build_optimizer(model, config)
    state, step = LoopState(), 0
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        state, step = resumed_state(payload, best_key="best_val_acc"), int(payload["step"])
        logger.info(f"resuming {out_dir} at epoch {state.start_epoch + 1}/{config.epochs}")

    steps_per_epoch = len(epoch_batches(len(train.labels), config.batch_size, config.seed, 0))
    latest: dict[str, Any] = {}  # the validation scores of the epoch just run

    def run_epoch(epoch: int) -> EpochResult:
        nonlocal step
        terms = train_epoch(model, optimizer, train, config, epoch, steps_per_epoch, progress)
        step += steps_per_epoch
        recalibrate_batchnorm(model, train, config, epoch)
        scores = evaluate(model, val, config, data.num_classes) if len(val.labels) else None
        latest["scores"], latest["terms"] = scores, terms
        row = {"epoch": epoch + 1, "lr": terms["lr"], "train_loss": round(terms["train_loss"], 5),
               "train_acc": round(terms["train_acc"], 5),
               "val_loss": None if scores is None else round(scores["val_loss"], 5),
               "val_acc": None if scores is None else round(scores["val_acc"], 5),
               "train_seconds": round(terms["train_seconds"], 3), "images_per_s": round(terms["images_per_s"], 2)}
        return row, None if scores is None else scores["val_acc"]

    def save_state(epoch: int, current: LoopState) -> None:
        save_resume(resume_path, current, epoch, model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                    config_json=json.dumps(config.to_dict()), data_json=json.dumps(_data_identity(data)))

    def describe(epoch: int, row: dict[str, Any], improved: bool) -> str:
        scores, terms = latest["scores"], latest["terms"]
        val_text = "" if scores is None else f"  val loss {scores['val_loss']:.4f}  val acc {scores['val_acc']:.2%}"
        return (f"epoch {epoch + 1}/{config.epochs}  loss {terms['train_loss']:.4f}  train acc {terms['train_acc']:.2%}"
                f"{val_text}  {terms['images_per_s']:.1f} img/s  {terms['train_seconds']:.1f}s"
                + ("  *best" if improved else ""))

    state = run_epochs(
        state, config.epochs, run_epoch,
        save_best=lambda epoch, row: save_backbone(out_dir, model, config, data, epoch + 1, latest["scores"]),
        save_state=save_state,
        write_metrics=lambda history: write_history(out_dir, history, plot_pretrain_curves, CURVES),
        describe=describe,
    )
    return _summary(state.history, data, out_dir)
