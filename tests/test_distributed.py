"""Data-parallel training and feature extraction: N gloo processes behave like one process with the global batch.

The processes are started by the tests with ``torch.multiprocessing`` (spawn), each with the
environment ``torchrun`` would give it; they write their results to files the test compares with
a single-process run. The CUDA path is the same code with ``device="cpu"`` and the gloo backend.

Tolerance of the loss and weight comparisons: relative 1e-4, absolute 1e-5. The distributed run
computes the same sums in another order (the gradient of a process's rows is summed over the
processes by the gather's backward, then averaged over them by DDP; each process's encoder runs on
a smaller batch), so float32 rounding differs in the last bits and a few steps carry that on. The
steps are plain SGD without clipping, whose update is proportional to the gradient: a wrong
gradient scale (a factor of N) or a loss that saw only a process's own negatives differs by
orders of magnitude more.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from helpers import random_tokens
from rsitr.distributed import World, shard_range, shard_sizes
from rsitr.models import create_model
from rsitr.models.base import take_rows

FEATURE_DIMS = {"level_channels": [8, 16, 32, 64], "region_channels": 32}
VOCAB = 50
N_IMAGES, N_CAPTIONS = 12, 36
BATCHES = [11, 11, 3, 12, 7, 11]  # odd sizes: shares of 6 + 5, 2 + 1, 4 + 3
MODELS = ("dove-s", "vsepp", "scan-t2i")
RTOL, ATOL = 1e-4, 1e-5
LR = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join(rank: int, size: int, port: int) -> None:
    """The environment torchrun gives a process, then :func:`rsitr.distributed.setup`."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(size)})
    torch.set_num_threads(1)
    from rsitr.distributed import setup

    setup("cpu")


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _inputs():
    """Image features, captions and the caption → image map of a small fake training set (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    feats = {f"level{i}": torch.randn(N_IMAGES, c, generator=g) for i, c in enumerate(FEATURE_DIMS["level_channels"], 1)}
    feats["regions"] = torch.randn(N_IMAGES, 5, FEATURE_DIMS["region_channels"], generator=g)
    feats["region_mask"] = torch.ones(N_IMAGES, 5, dtype=torch.bool)
    feats["region_mask"][::3, 3:] = False
    tokens, lengths = random_tokens(N_CAPTIONS, VOCAB, 2, 9, seed=1)
    caption_image = torch.arange(N_CAPTIONS) % N_IMAGES  # three captions per image: same-image pairs share batches
    return feats, tokens, lengths, caption_image


def run_steps(name: str, world: World) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step losses and final weights of plain SGD steps of model ``name`` on fixed global batches."""
    from rsitr_train.trainer import Stepper

    torch.manual_seed(0)
    model = create_model(name, FEATURE_DIMS, VOCAB, embed_dim=16, word_dim=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)  # not Adam: Adam's step would hide a wrong gradient scale
    stepper = Stepper(model, None, torch.device("cpu"), world, "fp32")
    feats, tokens, lengths, caption_image = _inputs()
    order = torch.Generator().manual_seed(2)
    losses = []
    for size in BATCHES:
        batch = torch.randperm(N_CAPTIONS, generator=order)[:size]
        positions, counts = stepper.share(len(batch))
        mine = batch[positions]
        width = int(lengths[batch].max())
        terms = stepper.loss_terms(take_rows(feats, caption_image[mine]), tokens[batch, :width][positions], lengths[mine],
                                   {}, caption_image[batch], batch, counts)
        stepper.backward_and_step(terms["loss"], optimizer, grad_clip=0.0)  # clipping too would hide a scale
        losses.append(float(terms["loss"].detach()))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _steps_worker(rank: int, size: int, port: int, out: str) -> None:
    _join(rank, size, port)
    from rsitr.distributed import world

    try:
        results = {name: run_steps(name, world()) for name in MODELS}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        _leave()


def test_shares_are_contiguous_near_equal_and_cover_the_range():
    for n in (0, 1, 5, 11, 12):
        for size in (1, 2, 3, 5):
            parts = [shard_range(n, r, size) for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert shard_sizes(n, size) == [len(p) for p in parts]
    assert shard_sizes(11, 2) == [6, 5]
    with pytest.raises(ValueError):
        shard_range(4, 2, 2)


def test_two_gloo_processes_take_the_same_steps_as_one_process_with_the_global_batch(tmp_path):
    single = {name: run_steps(name, World()) for name in MODELS}
    mp.spawn(_steps_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in MODELS:
        losses, weights = single[name]
        assert len(set(losses)) == len(losses)  # the steps move the model: equal losses would prove nothing
        for rank in ranks:
            got_losses, got_weights = rank[name]
            assert got_losses == pytest.approx(losses, rel=RTOL, abs=ATOL), name
            for key, value in weights.items():
                assert torch.allclose(got_weights[key], value, rtol=RTOL, atol=ATOL), (name, key)
        # both processes hold the same model after every step (DDP keeps them in step)
        for key in weights:
            assert torch.equal(ranks[0][name][1][key], ranks[1][name][1][key]), (name, key)


def test_a_loss_over_one_process_share_only_would_differ(tmp_path):
    """The check above can fail: half the batch's negatives give another loss than the global batch's."""
    from rsitr_train.trainer import Stepper

    feats, tokens, lengths, caption_image = _inputs()
    torch.manual_seed(0)
    model = create_model("vsepp", FEATURE_DIMS, VOCAB, embed_dim=16, word_dim=8)
    stepper = Stepper(model, None, torch.device("cpu"), World(), "fp32")
    batch = torch.randperm(N_CAPTIONS, generator=torch.Generator().manual_seed(2))[:11]
    whole = stepper.loss_terms(take_rows(feats, caption_image[batch]), tokens[batch], lengths[batch], {},
                               caption_image[batch], batch, [11])["loss"]
    half = batch[:6]
    share = stepper.loss_terms(take_rows(feats, caption_image[half]), tokens[half], lengths[half], {},
                               caption_image[half], half, [6])["loss"]
    assert abs(float(whole.detach()) - float(share.detach())) > 100 * ATOL


# ------------------------------------------------------------------------------- whole runs


def _tiny_config(dataset: Path, cache: Path, epochs: int = 2):
    from rsitr_train.config import load_config

    return load_config(None, [
        f"data.path={dataset}", f"features.cache_dir={cache}", "features.image_size=64", "features.precision=fp32",
        "features.batch_size=5", "model.name=dove-s", "model.params={embed_dim: 32, word_dim: 16}",
        f"train.epochs={epochs}", "train.batch_size=16", "train.lr=0.001",
    ])


def _runs_worker(rank: int, size: int, port: int, dataset: str, root: str) -> None:
    _join(rank, size, port)
    from rsitr_train.trainer import train

    try:
        top = Path(root)
        train(_tiny_config(Path(dataset), top / "cache_ddp"), top / "ddp", progress=False, device="cpu")
        # the interrupted run's config names its cache (valid, so every process reads it instead of extracting)
        train(_tiny_config(Path(dataset), top / "cache_single"), top / "resumed", progress=False, device="cpu")
    finally:
        _leave()


def _rows(path: Path) -> list[dict[str, str]]:
    import csv

    return [{k: v for k, v in row.items() if k != "train_seconds"} for row in csv.DictReader(path.open())]


def _close_rows(a: list[dict[str, str]], b: list[dict[str, str]]) -> None:
    assert [row.keys() for row in a] == [row.keys() for row in b]
    for x, y in zip(a, b):
        for key in x:
            assert float(x[key]) == pytest.approx(float(y[key]), rel=RTOL, abs=1e-3 if key.startswith("val_") else ATOL), key


# Slow (about 30-60 s on two cores): two whole training runs (feature extraction, two epochs,
# validation, checkpoints) in one process and again in two spawned gloo processes.
@pytest.mark.slow
def test_two_process_runs_match_one_process_write_once_resume_and_share_the_feature_cache(tiny_synth, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from rsitr_train import trainer as training
    from rsitr_train.trainer import train

    train(_tiny_config(tiny_synth, tmp_path / "cache_single"), tmp_path / "single", progress=False, device="cpu")
    # an interrupted single-process run (after epoch 1), to be finished by two processes
    original, calls = training._train_epoch, {"n": 0}

    def crash_on_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "_train_epoch", crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny_config(tiny_synth, tmp_path / "cache_single"), tmp_path / "resumed", progress=False, device="cpu")
    monkeypatch.undo()

    mp.spawn(_runs_worker, args=(2, _free_port(), str(tiny_synth), str(tmp_path)), nprocs=2, join=True)

    # the sharded feature cache is the single-process cache, tensor for tensor
    [single_cache] = (tmp_path / "cache_single").glob("*.safetensors")
    [ddp_cache] = (tmp_path / "cache_ddp").glob("*.safetensors")
    assert single_cache.name == ddp_cache.name
    a, b = load_file(single_cache), load_file(ddp_cache)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the same run files, written once (no leftovers of a second writer), the same losses and weights
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == names
    for run in ("ddp", "resumed"):
        _close_rows(_rows(tmp_path / run / "metrics.csv"), _rows(tmp_path / "single" / "metrics.csv"))
        want = torch.load(tmp_path / "single" / "resume.pt", weights_only=True)["model"]
        got = torch.load(tmp_path / run / "resume.pt", weights_only=True)["model"]
        for key in want:
            assert torch.allclose(got[key], want[key], rtol=RTOL, atol=ATOL), (run, key)


# ------------------------------------------------------------------------------- scene-classification pretraining


def _pretrain_config(**changes):
    """ResNet-18 at 32 px, SGD with Nesterov momentum, every batch CutMixed, colour jitter with hue.

    Batches of 11 share out as 6 + 5 (the loss weight of a share is not 1), BatchNorm recalibration
    chunks of 8 + 3 as 4 + 4 and 2 + 1.
    """
    from rsitr_train.augment import AugmentConfig
    from rsitr_train.pretrain import PretrainConfig

    values = dict(backbone="resnet18", image_size=64, epochs=4, batch_size=11, lr=0.005, warmup_epochs=0.0, cutmix=1.0,
                  label_smoothing=0.1, precision="fp32", augment=AugmentConfig(hue=0.05), seed=0, threads=1,
                  bn_images=11, eval_batch_size=8)
    values.update(changes)
    return PretrainConfig(**values)


def _pretrain_split():
    """Eleven random 40 px images of three classes, as pretraining keeps them decoded."""
    from rsitr_train.pretrain import _Split

    g = torch.Generator().manual_seed(5)
    return _Split(torch.randint(0, 256, (11, 3, 72, 72), dtype=torch.uint8, generator=g), torch.arange(11) % 3)


def pretrain_steps(world: World, global_batchnorm: bool = True) -> dict[str, Any]:
    """Four pretraining steps (one per epoch: 11 images in batches of 11), then a BatchNorm recalibration.

    Returns the initial weights, the gradients of the first step, the loss of every step and the
    final weights. ``global_batchnorm=False``: DDP over plain BatchNorm (per-process statistics),
    not recalibrated (a share of one image on a 1 x 1 map has no statistics).
    """
    from torch.nn.parallel import DistributedDataParallel

    from rsitr_train.pretrain import build_classifier, build_optimizer, data_parallel, recalibrate_batchnorm, train_epoch

    config, split = _pretrain_config(), _pretrain_split()
    model = build_classifier(config, 3)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, config)
    if global_batchnorm:
        model, stepped = data_parallel(model, torch.device("cpu"), world)
    else:
        stepped = DistributedDataParallel(model) if world.distributed else model
    losses, gradients = [], {}
    for epoch in range(config.epochs):
        losses.append(train_epoch(stepped, optimizer, split, config, epoch, 1, progress=False, world=world)["train_loss"])
        if epoch == 0:
            gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    if global_batchnorm:
        recalibrate_batchnorm(model, split, config, config.epochs - 1, world)
    return {"initial": initial, "gradients": gradients, "losses": losses,
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _pretrain_steps_worker(rank: int, size: int, port: int, out: str) -> None:
    _join(rank, size, port)
    from rsitr.distributed import world

    try:
        results = {"global": pretrain_steps(world()), "per_process": pretrain_steps(world(), global_batchnorm=False)}
        torch.save(results, Path(out) / f"pretrain{rank}.pt")
    finally:
        _leave()


def _relative(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> float:
    """Largest difference of ``got`` and ``want`` as a share of the largest magnitude of ``scale``."""
    return float((got.double() - want.double()).abs().max() / scale.double().abs().max().clamp(min=1e-30))


#: Tolerances of pretraining, measured, not guessed. BatchNorm after every convolution makes the
#: network sensitive to float32 rounding (each process sums its share, the sums are added over
#: the processes; DDP averages gradients summed in another order), and Nesterov momentum carries
#: that on. Two processes against one: the first step's gradients agree to 1e-5 of each tensor's
#: scale, the losses to 4e-6, and after four steps the weight changes to 5 % (median 1 %) of each
#: tensor's change, the recalibrated BatchNorm statistics to 0.4 % of their scale. One process
#: with two threads instead of one (only the order of the sums changes) differs from itself by as
#: much: gradients 1.2e-5, the fourth loss 2.2e-4, weight changes 5 % (median 1.5 %), statistics
#: 0.7 %. The bounds leave room above both. A defect is far beyond them: per-process BatchNorm
#: statistics move the losses by 4 % and the weight changes by 100 % (median); a wrong loss weight
#: of a share (12/11 or 10/11 instead of 1 for shares of 6 and 5) moves the first gradients by 10 %
#: of their scale.
PRETRAIN_GRADIENT, PRETRAIN_LOSS_RTOL, PRETRAIN_STEP, PRETRAIN_STATISTICS = 1e-3, 1e-3, (0.25, 0.1), 0.05


def _weight_changes(got: dict[str, Any], want: dict[str, Any]) -> tuple[list[float], float]:
    """Per weight tensor, the difference of the final weights as a share of the reference's change from
    the initial weights; and the largest difference of running statistics as a share of their scale."""
    changes, statistics = [], 0.0
    for key, value in want["weights"].items():
        if "running" in key:
            statistics = max(statistics, _relative(got["weights"][key], value, value))
        elif value.is_floating_point():
            changes.append(_relative(got["weights"][key], value, value - want["initial"][key]))
    return changes, statistics


# Slow (about 15 s on two cores): one process and two spawned gloo processes each run four ResNet-18
# steps, the processes twice (with the global BatchNorm, and with per-process statistics to show the
# comparison can fail).
@pytest.mark.slow
def test_two_gloo_processes_pretrain_like_one_process_with_the_global_batch(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run (the tolerances cover other counts too)
    try:
        single = pretrain_steps(World())
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_pretrain_steps_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"pretrain{r}.pt", weights_only=True) for r in range(2)]
    assert len(set(single["losses"])) == len(single["losses"])  # the steps move the model
    for rank in ranks:
        got = rank["global"]
        assert got["weights"].keys() == single["weights"].keys()  # the global BatchNorm keeps torchvision's keys
        for name, gradient in single["gradients"].items():
            assert _relative(got["gradients"][name], gradient, gradient) < PRETRAIN_GRADIENT, name
        assert got["losses"] == pytest.approx(single["losses"], rel=PRETRAIN_LOSS_RTOL)
        assert all(torch.equal(got["weights"][k], v) for k, v in single["weights"].items() if not v.is_floating_point())
        changes, statistics = _weight_changes(got, single)
        assert max(changes) < PRETRAIN_STEP[0] and float(torch.tensor(changes).median()) < PRETRAIN_STEP[1]
        assert statistics < PRETRAIN_STATISTICS
    for key in single["weights"]:  # the processes hold one model, running statistics included
        assert torch.equal(ranks[0]["global"]["weights"][key], ranks[1]["global"]["weights"][key]), key
    # the comparison can fail: BatchNorm over each process's share alone trains another model
    per_process = ranks[0]["per_process"]
    assert per_process["losses"][0] != pytest.approx(single["losses"][0], rel=10 * PRETRAIN_LOSS_RTOL)  # 3.6 % apart
    changes, _ = _weight_changes(per_process, single)
    assert float(torch.tensor(changes).median()) > 5 * PRETRAIN_STEP[1]


def test_augmenting_rows_of_a_batch_equals_those_rows_of_the_whole_batch_and_keeps_the_generator_in_step():
    from rsitr_train.augment import AugmentConfig, augment_batch

    config = AugmentConfig(hue=0.1)
    images = torch.randint(0, 256, (7, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    whole_rng, part_rng = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    whole = augment_batch(images, config, 16, whole_rng)
    rows = torch.tensor([1, 4, 5])
    part = augment_batch(images[rows], config, 16, part_rng, rows=rows, batch_size=7)
    assert torch.allclose(part, whole[rows], atol=1e-6)
    assert not torch.allclose(part, augment_batch(images[rows], config, 16, torch.Generator().manual_seed(4)), atol=1e-3)
    assert torch.equal(torch.rand(3, generator=whole_rng), torch.rand(3, generator=part_rng))


def _pretrain_data(root: Path):
    """Three classes of seven 40 px noise PNGs each; 15 training and 6 validation images.

    Noise, not the solid colours of tests/test_pretrain.py: on nearly uniform images the last
    stage's BatchNorm sees nearly constant channels, and one process's first gradients there move
    by 18 % when only the memory layout changes, too ill-conditioned to compare two runs.
    """
    import numpy as np
    from PIL import Image

    from rsitr.data.imagefolder import load_imagefolder

    if not root.exists():
        rng = np.random.default_rng(0)
        for name in ("a", "b", "c"):
            (root / name).mkdir(parents=True)
            for i in range(7):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return load_imagefolder(root, val_fraction=0.25, seed=0)


#: Whole runs: one step per epoch (15 training images in one batch, shares of 8 + 7), CutMix drawn for half
#: the batches. Two steps in all: the network's sensitivity to rounding (see PRETRAIN_STEP) grows with
#: every step; a one-process run in another memory layout differs from itself by a median 6 % of the
#: weight change after three steps of two per epoch.
RUN_CONFIG = dict(epochs=2, batch_size=15, cutmix=0.5, bn_images=15)
#: The validation loss goes through the recalibrated BatchNorm statistics, which amplify the rounding
#: (PRETRAIN_STATISTICS): after the second epoch two processes move it by 0.2 %, one process in another
#: memory layout by 0.1 %. Training losses agree to 5e-5 and the validation accuracy exactly.
VAL_LOSS_RTOL = 1e-2


def _no_writes(*args, **kwargs):
    raise AssertionError("a process other than rank 0 wrote a run file")


def _pretrain_runs_worker(rank: int, size: int, port: int, root: str) -> None:
    _join(rank, size, port)
    from rsitr_train import pretrain as module

    if rank != 0:  # rank 0 alone writes: any writer called elsewhere fails the run
        for name in ("write_json", "save_tensors", "save_resume", "write_history", "remove_interrupted_writes"):
            setattr(module, name, _no_writes)
    try:
        top = Path(root)
        data = _pretrain_data(top / "images")
        module.pretrain(_pretrain_config(**RUN_CONFIG), data, top / "ddp", progress=False, device="cpu")
        module.pretrain(_pretrain_config(**RUN_CONFIG), data, top / "resumed", progress=False, device="cpu")
    finally:
        _leave()


def _untimed_rows(path: Path) -> list[dict[str, float]]:
    import csv

    return [{k: float(v) for k, v in row.items() if k not in ("train_seconds", "images_per_s")}
            for row in csv.DictReader(path.open())]


# Slow (about 30-60 s on two cores): three pretraining runs of two epochs (decoding, training, BatchNorm
# recalibration, validation, checkpoints): one process, an interrupted one, and two spawned gloo processes.
@pytest.mark.slow
def test_two_process_pretraining_matches_one_process_writes_once_and_resumes(tmp_path):
    from helpers import log_lines
    from rsitr_train.pretrain import pretrain

    data = _pretrain_data(tmp_path / "images")
    pretrain(_pretrain_config(**RUN_CONFIG), data, tmp_path / "single", progress=False, device="cpu")

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), log_lines(stop_after_first_epoch):
        pretrain(_pretrain_config(**RUN_CONFIG), data, tmp_path / "resumed", progress=False, device="cpu")

    mp.spawn(_pretrain_runs_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    from rsitr_train.pretrain import build_classifier

    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    expected_rows = _untimed_rows(tmp_path / "single" / "metrics.csv")
    single = {"initial": build_classifier(_pretrain_config(**RUN_CONFIG), 3).state_dict(),
              "weights": torch.load(tmp_path / "single" / "resume.pt", weights_only=True)["model"]}
    for run in ("ddp", "resumed"):
        assert sorted(p.name for p in (tmp_path / run).iterdir()) == names  # no leftovers of a second writer
        rows = _untimed_rows(tmp_path / run / "metrics.csv")
        assert [row.keys() for row in rows] == [row.keys() for row in expected_rows]
        for got, row in zip(rows, expected_rows):
            for key, value in row.items():  # metrics.csv rounds to 5 digits; validation: see VAL_LOSS_RTOL
                rel = VAL_LOSS_RTOL if key == "val_loss" else PRETRAIN_LOSS_RTOL
                assert got[key] == pytest.approx(value, rel=rel, abs=2e-5), (run, key)
        got = {"weights": torch.load(tmp_path / run / "resume.pt", weights_only=True)["model"]}
        changes, statistics = _weight_changes(got, single)
        assert max(changes) < PRETRAIN_STEP[0] and float(torch.tensor(changes).median()) < PRETRAIN_STEP[1], run
        assert statistics < PRETRAIN_STATISTICS, run
    assert json.loads((tmp_path / "ddp" / "backbone.json").read_text())["epoch"] == json.loads(
        (tmp_path / "single" / "backbone.json").read_text())["epoch"]
