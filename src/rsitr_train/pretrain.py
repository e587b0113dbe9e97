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

Data-parallel (``torchrun``, :mod:`rsitr.distributed`): ``batch_size`` stays the global batch and
N processes train the model one process trains, up to float rounding (the sums run in another
order). BatchNorm networks carry rounding on and amplify it from step to step, as much as a
change of thread count or memory layout in one process does; ``tests/test_distributed.py``
compares gradients, losses and weights with bounds measured that way. The GPU path
(SyncBatchNorm, NCCL) is the same code but needs two GPUs to test. How each part is made
independent of N:

* Every process decodes all images (the memory cost is N times one process's) and draws the same
  global batch order; it trains on its contiguous share of every global batch (:func:`shard_range`).
* Augmentation: every process draws the parameters of the whole global batch from the batch's
  generator and warps only the rows it needs (:func:`rsitr_train.augment.augment_batch` with
  ``rows``), so each image gets the draw it gets in one process and the generators stay in step.
* CutMix mixes across the global batch: the donor permutation and the box are drawn for the global
  batch, and a process augments its share's donor images too (at most twice its share; no
  pixels travel between processes). A process's mixed images are then the rows of the
  single-process mixed batch.
* Loss: each process's cross-entropy is the mean over its share, multiplied by
  ``share * N / batch``; DDP averages the gradients over the N processes, so the step is the
  gradient of the mean over the global batch (``sum over processes of share sums / batch``).
* BatchNorm normalises with the statistics of the global batch. On GPUs that is
  :class:`torch.nn.SyncBatchNorm`; its forward refuses CPU tensors (torch 2.13: "SyncBatchNorm
  expected input tensor to be on GPU"), so on the CPU (gloo) :class:`GlobalBatchNorm2d` does the
  same with differentiable all-reduces of the per-channel sums. The BatchNorm recalibration shares
  each chunk out the same way, so its statistics are those of the whole chunk.
* Every process validates (the same model gives the same scores, which keeps the best-epoch
  decisions in step); rank 0 alone writes the run folder and reads ``resume.pt`` first (it may set
  a damaged one aside), so a run resumes with any number of processes.

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

import contextlib
import copy
import json
import math
import time
import warnings
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
from rsitr.devices import module_device
from rsitr.distributed import World, barrier, setup, shard_range
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
        ema_decay: 0 turns it off; otherwise an exponential moving average of the weights,
            ``θ̄ ← decay·θ̄ + (1 − decay)·θ`` after every optimiser step (:class:`WeightAverage`),
            is what is validated, selected and saved; the trained weights are still validated
            each epoch (``val_acc_raw`` in the metrics) so the two can be compared in one run.
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
    ema_decay: float = 0.0

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
                  ("eval_batch_size", self.eval_batch_size >= 0), ("bn_images", self.bn_images >= 0),
                  ("ema_decay", 0 <= self.ema_decay < 1)]
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


class WeightAverage:
    """An exponential moving average of a network's parameters (a Polyak average of the SGD iterates).

    On a few thousand images the iterates of a long schedule wander around a minimum; their
    running mean generalises better than the last one. Only the parameters are averaged: the
    BatchNorm statistics of the averaged weights are not an average of the statistics of the
    iterates, so they are recomputed for the averaged network (:func:`recalibrate_batchnorm`)
    before it is validated, exactly as the trained network's are.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ̄ ← decay·θ̄ + (1 − decay)·θ for every parameter of ``model`` (same architecture)."""
        averaged = [p for p in self.module.parameters()]
        current = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay)


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


Box = tuple[int, int, int, int]


def draw_cutmix(batch: int, height: int, width: int, generator: torch.Generator) -> tuple[Tensor, Box]:
    """The CutMix draw of a batch: every image's donor (a permutation of the batch) and the one box."""
    donor = torch.randperm(batch, generator=generator)
    return donor, cutmix_box(height, width, generator)


def paste_box(images: Tensor, donors: Tensor, box: Box) -> tuple[Tensor, float]:
    """``images`` with ``box`` of ``donors`` (row for row) pasted in, and the share of each image still its own."""
    height, width = images.shape[-2:]
    top, bottom, left, right = box
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = donors[..., top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)


def cutmix_batch(images: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, float]:
    """CutMix one batch: paste one box of a shuffled copy of the batch into every image.

    Returns the mixed images, the labels of the pasted images, and the share of each image that
    is still its own (the weight of its own label in the loss).
    """
    donor, box = draw_cutmix(len(labels), images.shape[-2], images.shape[-1], generator)
    mixed, own_share = paste_box(images, images[donor], box)
    return mixed, labels[donor], own_share


# ----------------------------------------------------------------------------------------- several processes


def _all_reduce_with_grad(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the processes; its backward sums the gradients over them too."""
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # deprecated in favour of a private API, as for the gather in rsitr.distributed
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(tensor)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training mode in a distributed run, uses the statistics of the global batch.

    The CPU stand-in for :class:`torch.nn.SyncBatchNorm` (whose forward refuses CPU tensors). The
    per-channel count and sum are summed over the processes, giving the global mean; then the
    sum of squared deviations from it, giving the global (biased) variance, as
    :func:`torch.nn.functional.batch_norm` computes it in one process (two passes rather than
    E[x^2] - E[x]^2, which loses digits). Both sums go through a differentiable all-reduce,
    whose backward sums the gradients over the processes, so the input gradient is that of the
    global batch norm. The running statistics move as BatchNorm's do (unbiased variance,
    ``momentum`` or the cumulative average when it is None). Statistics are computed in float32
    under autocast; the output has the input's dtype. Outside training, or in one process, it
    is BatchNorm2d.
    """

    def forward(self, input: Tensor) -> Tensor:
        from rsitr.distributed import world

        if not (self.training and world().distributed):
            return super().forward(input)
        x = input.float()
        dims = (0, 2, 3)
        count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
        sums = _all_reduce_with_grad(torch.cat([x.sum(dims), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        centred = x - mean.view(1, -1, 1, 1)
        var = _all_reduce_with_grad((centred * centred).sum(dims)) / total
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            self._update_running_stats(mean.detach(), var.detach() * total / (total - 1).clamp(min=1))
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        assert self.num_batches_tracked is not None and self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var, alpha=factor)


def _global_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm2d computing global-batch statistics (in place; same parameters and buffers).

    GPUs: :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`. CPU: :class:`GlobalBatchNorm2d`.
    Both keep BatchNorm2d's state-dict keys, so checkpoints are those of one process.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                twin = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                         child.track_running_stats)
                twin.weight, twin.bias = child.weight, child.bias  # the same Parameters: the optimiser's
                twin.running_mean, twin.running_var = child.running_mean, child.running_var
                twin.num_batches_tracked = child.num_batches_tracked
                twin.train(child.training)
                setattr(parent, name, twin)
    return model


def data_parallel(model: nn.Module, device: torch.device, world: World) -> tuple[nn.Module, nn.Module]:
    """``model`` and what the training steps call: itself in one process; in a distributed run
    ``model`` with global-batch BatchNorm (:func:`_global_batchnorm`) and, for the steps, that model
    in DistributedDataParallel (which averages the gradients over the processes)."""
    if not world.distributed:
        return model, model
    from torch.nn.parallel import DistributedDataParallel

    model = _global_batchnorm(model, device)
    return model, DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _share(n: int, world: World) -> Tensor:
    """Positions of this process's contiguous share of a global batch of ``n``."""
    rows = shard_range(n, world.rank, world.size)
    return torch.arange(rows.start, rows.stop)


def _sum_over_processes(values: list[float], world: World, device: torch.device) -> list[float]:
    """``values`` summed over the processes (float64; themselves in one process)."""
    if not world.distributed:
        return values
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def _augmented_share(data: _Split, batch: Tensor, config: PretrainConfig, world: World, augment_rng: torch.Generator,
                     cutmix_rng: torch.Generator) -> tuple[Tensor, Tensor, Tensor, float]:
    """This process's rows of the augmented (and maybe CutMixed) global batch ``batch``.

    Returns the images, their labels, the labels of their pasted boxes and the share of each
    image that is its own (1.0 without CutMix). The draws are made for the global batch
    (:func:`augment_batch` with ``rows``), so the rows equal those of the one-process batch.
    """
    size = len(batch)
    rows = _share(size, world)
    labels = data.labels[batch]
    mix = None
    if config.cutmix > 0 and float(torch.rand((), generator=cutmix_rng)) < config.cutmix:
        mix = draw_cutmix(size, config.image_size, config.image_size, cutmix_rng)
    needed = rows if mix is None else torch.unique(torch.cat([rows, mix[0][rows]]))  # sorted: the share and its donors
    images = augment_batch(data.images[batch[needed]], config.augment, config.image_size, augment_rng,
                           rows=needed, batch_size=size)
    if mix is None:
        return images, labels[rows], labels[rows], 1.0
    donor, box = mix
    own = images[torch.searchsorted(needed, rows)]
    mixed, own_share = paste_box(own, images[torch.searchsorted(needed, donor[rows])], box)
    return mixed, labels[rows], labels[donor[rows]], own_share


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: _Split, config: PretrainConfig,
                epoch: int, steps_per_epoch: int, progress: bool = True, world: World | None = None,
                average: WeightAverage | None = None, trained: nn.Module | None = None) -> dict[str, float]:
    """One epoch of augmented SGD steps; returns mean loss, top-1 accuracy, seconds and images/s.

    In a CutMixed batch the accuracy counts a prediction of the image's own label as correct.
    ``world``: in a distributed run ``model`` is the DistributedDataParallel module and this process
    trains on its share of every global batch (see the module docstring); the returned loss,
    accuracy and images/s are those of the global batches, the same on every process.
    ``average``: updated from ``trained`` (the unwrapped network; default ``model``) after every step.
    """
    world = world or World()
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
        images, targets, donor_targets, own_share = _augmented_share(data, batch, config, world, augment_rng, cutmix_rng)
        targets, donor_targets = targets.to(device), donor_targets.to(device)
        with autocast(config.precision, device):
            logits = model(_normalise(images, config).to(device))
        loss = own_share * F.cross_entropy(logits.float(), targets, label_smoothing=config.label_smoothing)
        if own_share < 1.0:
            loss = loss + (1.0 - own_share) * F.cross_entropy(logits.float(), donor_targets,
                                                              label_smoothing=config.label_smoothing)
        # DDP averages over the processes: share mean * share * N / batch makes that the global batch's mean
        weight = len(targets) * world.size / len(batch)
        optimizer.zero_grad(set_to_none=True)
        (loss if weight == 1.0 else loss * weight).backward()
        optimizer.step()
        if average is not None:
            average.update(trained if trained is not None else model)
        loss_sum += float(loss.detach()) * len(targets)
        correct += int((logits.detach().argmax(dim=1) == targets).sum())
        seen += len(targets)
    loss_sum, correct_sum, seen_sum = _sum_over_processes([loss_sum, correct, seen], world, device)
    seconds = time.perf_counter() - started
    return {"train_loss": loss_sum / seen_sum, "train_acc": correct_sum / seen_sum, "train_seconds": seconds,
            "images_per_s": seen_sum / seconds, "lr": lr}


def _eval_chunks(indices: Tensor, batch_size: int, minimum: int = 2) -> list[Tensor]:
    """``indices`` in batches; a last batch under ``minimum`` images joins the previous.

    BatchNorm needs two images in train mode; in a distributed run every process needs one.
    """
    chunks = list(indices.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < minimum:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: _Split, config: PretrainConfig, epoch: int,
                          world: World | None = None) -> None:
    """Recompute every BatchNorm's running mean and variance as exact averages over training images.

    Up to ``config.bn_images`` training images (a seeded draw per epoch), seen through the eval
    transform, are run in train mode with ``momentum=None`` (a cumulative average) after the
    statistics are reset. Weights are untouched; only the buffers used in eval mode change.
    In a distributed run each process runs its share of every chunk through the global-batch
    BatchNorm (:func:`_global_batchnorm`), which gives every process the chunk's statistics.
    """
    world = world or World()
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
        for chunk in _eval_chunks(chosen, config.eval_batch_size or 2 * config.batch_size, max(2, world.size)):
            images = eval_transform(data.images[chunk[_share(len(chunk), world)]], config.image_size)
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
    # a field added since the run started takes its default (what that run trained with)
    stored = {**PretrainConfig().to_dict(), **json.loads(state["config_json"])}
    if _comparable(stored) != _comparable(config.to_dict()):
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
    decoded images stay on the CPU and move batch by batch. Under ``torchrun`` every process calls
    this with the same arguments and the run is data-parallel (see the module docstring); rank 0
    alone writes ``out_dir``.

    Raises:
        ConfigError: invalid configuration, fewer than two classes, an ``out_dir`` holding
            another run, or (distributed) a global batch smaller than the number of processes.
        DatasetError: an image cannot be read (naming the file).
    """
    config.validate()
    _check_data(data)
    world, where = setup(device)
    smallest = min(config.batch_size, len(data.train_paths))
    if smallest < world.size:
        raise ConfigError(f"pretrain batches of {smallest} images cannot be shared by {world.size} processes: "
                          "use a larger batch_size or fewer processes")
    out_dir = Path(out_dir)
    guard = cleaned_on_failure(out_dir, keep=RESUME) if world.main else contextlib.nullcontext()
    with guard:
        return _pretrain(config, data, check_writable(out_dir), progress and world.main, where, world)


def _read_resume(resume_path: Path, config: PretrainConfig, data: ClassificationData, world: World) -> dict[str, Any] | None:
    """The resume payload (None for a fresh start); rank 0 reads it first, since it alone may set a damaged file aside."""
    payload = None
    for turn in (True, False):
        if world.main == turn and resume_path.exists():
            payload = _load_resume(resume_path, config, data)
        if turn:
            barrier()
    return payload


def _pretrain(config: PretrainConfig, data: ClassificationData, out_dir: Path, progress: bool,
              device: torch.device | None = None, world: World | None = None) -> dict[str, Any]:
    world = world or World()
    if config.threads:
        torch.set_num_threads(config.threads)
    resume_path = out_dir / RESUME
    if world.main:
        remove_interrupted_writes(out_dir)
    payload = _read_resume(resume_path, config, data, world)
    if world.main:
        write_json(out_dir / CONFIG_FILE, {"config": config.to_dict(), "data": data.source, "classes": list(data.classes),
                                           "num_train": len(data.train_paths), "num_val": len(data.val_paths)})
    if payload is not None and int(payload["epoch"]) + 1 >= config.epochs:
        logger.info(f"{out_dir}: all {config.epochs} epochs are done already")
        return _summary(json.loads(payload["history_json"]), data, out_dir)
    logger.info(f"pretraining {config.backbone} on {data.summary()}; {data.source}")
    train, val = _decode_splits(config, data, progress)

    device = device or torch.device("cpu")
    model: nn.Module = build_classifier(config, data.num_classes).to(device)
    optimizer = build_optimizer(model, config)
    average = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    state, step = LoopState(), 0
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if average is not None:
            average.module.load_state_dict(payload["average"])
        state, step = resumed_state(payload, best_key="best_val_acc"), int(payload["step"])
        logger.info(f"resuming {out_dir} at epoch {state.start_epoch + 1}/{config.epochs}")
    model, stepped = data_parallel(model, device, world)

    steps_per_epoch = len(epoch_batches(len(train.labels), config.batch_size, config.seed, 0))
    latest: dict[str, Any] = {}  # the validation scores of the epoch just run

    def run_epoch(epoch: int) -> EpochResult:
        nonlocal step
        terms = train_epoch(stepped, optimizer, train, config, epoch, steps_per_epoch, progress, world,
                            average=average, trained=model)
        step += steps_per_epoch
        recalibrate_batchnorm(model, train, config, epoch, world)
        scores = evaluate(model, val, config, data.num_classes) if len(val.labels) else None
        raw_acc = None if scores is None else scores["val_acc"]
        if average is not None:  # the averaged weights are the ones validated, selected and saved
            recalibrate_batchnorm(average.module, train, config, epoch, world)
            scores = evaluate(average.module, val, config, data.num_classes) if len(val.labels) else None
        latest["scores"], latest["terms"] = scores, terms
        row = {"epoch": epoch + 1, "lr": terms["lr"], "train_loss": round(terms["train_loss"], 5),
               "train_acc": round(terms["train_acc"], 5),
               "val_loss": None if scores is None else round(scores["val_loss"], 5),
               "val_acc": None if scores is None else round(scores["val_acc"], 5),
               "train_seconds": round(terms["train_seconds"], 3), "images_per_s": round(terms["images_per_s"], 2)}
        if average is not None:
            row["val_acc_raw"] = None if raw_acc is None else round(raw_acc, 5)
        return row, None if scores is None else scores["val_acc"]

    def save_best(epoch: int, row: dict[str, Any]) -> None:
        if world.main:
            save_backbone(out_dir, model if average is None else average.module, config, data, epoch + 1, latest["scores"])

    def save_state(epoch: int, current: LoopState) -> None:
        if not world.main:
            return
        extra = {} if average is None else {"average": average.module.state_dict()}
        save_resume(resume_path, current, epoch, model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                    config_json=json.dumps(config.to_dict()), data_json=json.dumps(_data_identity(data)), **extra)

    def describe(epoch: int, row: dict[str, Any], improved: bool) -> str:
        scores, terms = latest["scores"], latest["terms"]
        val_text = "" if scores is None else f"  val loss {scores['val_loss']:.4f}  val acc {scores['val_acc']:.2%}"
        if average is not None and row.get("val_acc_raw") is not None:
            val_text += f" (trained weights {row['val_acc_raw']:.2%})"
        return (f"epoch {epoch + 1}/{config.epochs}  loss {terms['train_loss']:.4f}  train acc {terms['train_acc']:.2%}"
                f"{val_text}  {terms['images_per_s']:.1f} img/s  {terms['train_seconds']:.1f}s"
                + ("  *best" if improved else ""))

    state = run_epochs(
        state, config.epochs, run_epoch,
        save_best=save_best,
        save_state=save_state,
        write_metrics=lambda history: write_history(out_dir, history, plot_pretrain_curves, CURVES) if world.main else None,
        describe=describe,
    )
    return _summary(state.history, data, out_dir)
