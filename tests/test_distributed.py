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

import os
import socket
from pathlib import Path

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
