"""Retrieval training: a run config in, a run directory out (:mod:`rsitr_train.runs` lists its files).

Training draws batches over captions (each epoch visits every training caption once), looks up the
cached features of each caption's image, and steps Adam with the paper's step decay; the epoch
skeleton (resume, best checkpoint on validation, metrics, log line) is :mod:`rsitr_train.loop`'s,
shared with backbone pretraining.

``train.precision: bf16`` runs the model's forward (``training_loss``, and validation scoring)
under reduced-precision autocast of the run's device (:mod:`rsitr.precision`: bfloat16 on the
CPU, bfloat16 or float16 on a GPU, float16 with loss scaling); master weights, gradients and the
optimiser stay float32.

Devices and processes: ``train(..., device=...)`` runs on any device :mod:`rsitr.devices`
resolves (the run's files do not depend on it, so a run may be resumed elsewhere). Under
``torchrun`` it is data-parallel (:mod:`rsitr.distributed`): every process draws the same global
batch order and encodes its contiguous share of each global batch; the encodings are gathered
with their gradients into the whole batch, and every process computes the model's loss over the
global batch (:meth:`RetrievalModel.encoding_loss`), so the ranking losses see every negative a
single process would. :class:`torch.nn.parallel.DistributedDataParallel` then averages the
gradients. No scaling of the loss is needed for that average to be the single-process gradient:
the backward of the gather sums, over the processes, the gradient every process computed for a
process's rows, so the encoders' gradient arrives N times on average-by-N, and the scoring
layers' gradient (the same on every process) once. Rank 0 alone writes the run's files;
every process validates (the same result everywhere keeps the best-epoch decisions in step).
End to end, each process's augmentation draws come from its own stream (seeded by seed, epoch
and rank), so a distributed end-to-end run is the single-process run in distribution, not bit for bit.

End-to-end training (``train.train_backbone: true``, :mod:`rsitr_train.end_to_end`) trains the
backbone with the model instead of reading cached features:

* The model's feature standardiser (``standardize``) is fitted once, on the initial backbone's
  training features (the feature cache), and kept fixed: re-fitting it as the backbone moves
  would shift the inputs of the layers that are learning to read them.
* One Adam optimiser with two parameter groups: the model at ``train.lr`` and the backbone at
  ``train.backbone_lr`` (default a tenth of ``lr``: pretrained features should move slowly
  while the heads are still random). Gradients are clipped per group; the step decay applies to
  both.
* Validation computes the validation images' features with the current backbone (eval transform,
  no gradients) each epoch; :func:`rsitr_train.runs.load_run` evaluates with the saved
  ``backbone.safetensors`` rather than the frozen cache.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rsitr.backbones import Backbone
from rsitr.data import RetrievalDataset, load_dataset
from rsitr.data.splits import apply_assignment, carve_selection, reallocate, write_assignment
from rsitr.data.tokenized import SplitData, split_data
from rsitr.devices import needs_grad_scaling, to_device
from rsitr.distributed import World, barrier, gather_encoding, setup, shard_range, shard_sizes
from rsitr.errors import CheckpointError, ConfigError
from rsitr.evaluation import evaluate_features
from rsitr.features import FeatureSpec, ImageFeatures, extract_features, feature_dims
from rsitr.io import check_writable, write_text
from rsitr.models import RetrievalModel, create_model, get_model_spec
from rsitr.models.base import Encoding, TrainingCorpus
from rsitr.models.registry import ModelSpec, build_config
from rsitr.precision import autocast
from rsitr.progress import get_logger, progress_bar
from rsitr.text import Vocabulary, load_glove
from rsitr_train.auxiliary import SCENE_TERM, SceneSupervision, identical_text_tables, scene_supervision
from rsitr_train.config import RunConfig, describes, read_config_file
from rsitr_train.end_to_end import (
    ImageStore,
    backbone_train_mode,
    build_trainable_backbone,
    compute_store_features,
    end_to_end_augment,
    load_image_store,
    store_features,
    trainable_backbone_parameters,
)
from rsitr_train.loop import (
    RESUME,
    EpochResult,
    LoopState,
    cleaned_on_failure,
    load_resume,
    patience_exhausted,
    remove_interrupted_writes,
    resumed_state,
    run_epochs,
    save_resume,
    shuffled_batches,
    write_history,
)

logger = get_logger(__name__)

#: The split of every image the run trained with (:mod:`rsitr.data.splits`), by file name.
SPLITS_FILE = "splits.json"

CURVES = "training_curves.png"


@dataclass
class Prepared:
    """Everything a run needs besides the model: dataset, vocabulary, features, model spec.

    ``features`` is the frozen-backbone cache (None when an end-to-end run is loaded for
    evaluation: its features come from ``backbone``). ``backbone`` and ``images`` are set in
    end-to-end training (the backbone being trained and the decoded train/val images) and when
    such a run is loaded (the trained backbone; images are decoded per evaluated split).
    """

    config: RunConfig
    dataset: RetrievalDataset
    vocab: Vocabulary
    features: ImageFeatures | None
    spec: ModelSpec
    feature_spec: FeatureSpec
    backbone: Backbone | None = None
    images: ImageStore | None = None


def feature_spec(config: RunConfig, spec: ModelSpec) -> FeatureSpec:
    """The feature-extraction spec of a run: the run's feature section, then what the model needs.

    The model's ``features`` (e.g. DSAN's 299 px and 8 × 8 Inception grid) override the run's
    defaults, since the model cannot run on anything else.
    """
    f = config.features
    values: dict[str, Any] = {
        "backbone": spec.backbone,
        "weights": f.backbone_weights,
        "image_size": f.image_size,
        "detections": f.detections,
        "precision": f.precision,
        "seed": f.backbone_seed,
        "bands": f.bands,
    }
    values.update(spec.features)
    return FeatureSpec(**values)


def run_dataset(config: RunConfig, splits: Path | None = None) -> RetrievalDataset:
    """The dataset of a run with the run's splits.

    ``splits`` is a stored assignment (a run's ``splits.json``), used as it is. Without one the
    config's rules apply: ``data.resplit`` reallocates, then ``data.selection_fraction`` carves the
    selection split ``data.val_split`` out of ``data.train_split`` (:mod:`rsitr.data.splits`), and
    ``data.exclude`` drops the training items an audit listed.
    """
    data = config.data
    if not data.path:
        raise ConfigError("data.path is empty: give the dataset file or folder (--dataset PATH)")
    dataset = load_dataset(data.path, layout=data.layout, image_dir=data.image_dir, name=data.name)
    if splits is not None:
        dataset = apply_assignment(dataset, splits)
    else:
        if data.resplit:
            dataset = reallocate(dataset, data.resplit, data.split_seed)
        if data.selection_fraction:
            dataset = carve_selection(dataset, float(data.selection_fraction), data.split_seed,
                                      source=data.train_split, name=data.val_split, mode=data.selection_mode)
    if data.exclude:
        dataset = _exclude(dataset, data.exclude, data.train_split, data.exclude_against)
    return dataset


def report_split(dataset: RetrievalDataset, train_split: str, selection_split: str) -> str | None:
    """The split a run's figures are reported on: test, else val, whichever neither trained nor chose the epoch.

    The rule of :func:`rsitr_train.experiments.resolve_protocol` (docs/protocol.md) for a run whose
    splits are already set: a dataset with a test split reports test; a train/val dataset with a
    selection split carved from train reports val. None when every split trained or selected (a
    train/val dataset selecting on val): its only honest figures would need a carved selection split.
    """
    for name in ("test", "val"):
        if name in dataset.splits() and name not in (train_split, selection_split):
            return name
    return None


def _exclude(dataset: RetrievalDataset, path: str, train_split: str, against: list[str]) -> RetrievalDataset:
    """``dataset`` without the training captions and images the audit file ``path`` lists.

    ``against``: keep only the entries that collide with these evaluation splits (all when empty).
    """
    from rsitr.data.audit import apply_exclusions, read_exclusions

    exclusions = read_exclusions(path)
    if against:
        exclusions = exclusions.restricted_to(against)
    dataset, dropped = apply_exclusions(dataset, exclusions, train_split=train_split)
    logger.info(f"{path}: dropped from {train_split!r}: " + ", ".join(f"{v} {k}" for k, v in dropped.items()))
    return dataset


def prepare(config: RunConfig, vocab: Vocabulary | None = None, progress: bool = True, extract: bool = True,
            splits: Path | None = None, device: str | torch.device | None = None) -> Prepared:
    """Read the dataset with the run's splits, build or load the vocabulary, and extract (or load cached) features.

    ``splits``: a stored split assignment (:func:`run_dataset`). ``extract=False`` skips the
    feature cache (``features`` is None): for an end-to-end run whose features come from its own
    trained backbone. ``device``: where the backbone extracts (None = the best available).
    """
    dataset = run_dataset(config, splits)
    for split in (config.data.train_split, config.data.val_split):
        if split not in dataset.splits():
            raise ConfigError(f"{config.data.path}: no {split!r} split (has: {', '.join(dataset.splits())})")
    if vocab is None:
        if config.text.vocab:
            vocab = Vocabulary.load(config.text.vocab)
        else:
            train = dataset.split(config.data.train_split)
            vocab = Vocabulary.build(train.captions, min_count=config.text.min_count)
    spec = get_model_spec(config.model.name).with_overrides(config.model.params, config.model.features)
    _check_model_params(config, spec)
    fspec = feature_spec(config, spec)
    features = None
    if extract:
        features = extract_features(dataset, fspec, Path(config.features.cache_dir),
                                    batch_size=config.features.batch_size, progress=progress, device=device)
    return Prepared(config=config, dataset=dataset, vocab=vocab, features=features, spec=spec, feature_spec=fspec)


def _check_model_params(config: RunConfig, spec: ModelSpec) -> None:
    """The model's parameters checked before any feature is extracted; the error names the model's config file."""
    try:
        build_config(spec.architecture, spec.params)
    except ConfigError as exc:
        name = config.model.name
        source = name if str(name).endswith((".yaml", ".yml")) else f"rsitr/models/configs/{name}.yaml"
        raise ConfigError(f"model.params of model {name!r} ({source}): {exc}") from exc


def build_model(prepared: Prepared, fit_statistics: bool = True) -> RetrievalModel:
    """Create the run's model; word vectors come from GloVe when configured.

    ``fit_statistics`` fits the feature standardiser on the training split; callers that load
    weights right after (evaluation, resuming) skip it, since the checkpoint holds the statistics.
    """
    torch.manual_seed(prepared.config.train.seed)
    dims = feature_dims(prepared.feature_spec)
    model = create_model(prepared.spec, feature_dims=dims, vocab_size=len(prepared.vocab))
    if prepared.config.text.glove:
        embedding = getattr(model, "word_embedding", None)
        if embedding is None:
            raise ConfigError(f"model {prepared.spec.name!r} has no word embedding to initialise from GloVe")
        weights, found = load_glove(prepared.config.text.glove, prepared.vocab, embedding.embedding_dim)
        embedding.weight.data.copy_(weights)
        logger.info(f"GloVe: {found}/{len(prepared.vocab) - 1} words found")
    standardizer = getattr(model, "standardize", None)
    if fit_statistics and standardizer is not None:
        if prepared.features is None:
            raise ConfigError("fitting the feature standardiser needs the cached features (prepare with extract=True)")
        train_ids = torch.tensor(prepared.dataset.split_indices(prepared.config.data.train_split))
        standardizer.fit(prepared.features.select(train_ids))
    return model


def evaluate_split(model: RetrievalModel, prepared: Prepared, split: str, progress: bool = True,
                   data: SplitData | None = None, precision: str | None = None) -> tuple[dict[str, float], Tensor, SplitData]:
    """Metrics, similarity matrix and caption data of one split.

    Args:
        data: the split already tokenised (else tokenised here).
        precision: ``"fp32"`` or ``"bf16"`` for the model (and a trained backbone); None = the
            run's ``train.precision``.

    Image features come from the cache, or in an end-to-end run from ``prepared.backbone``
    (:func:`split_image_features`).
    """
    precision = precision or prepared.config.train.precision
    if data is None:
        data = split_data(prepared.dataset, split, prepared.vocab, prepared.config.text.max_length, model.text_inputs)
    image_features = split_image_features(prepared, data.image_ids, precision, progress)
    metrics, sims = evaluate_features(model, image_features, data, precision, progress)
    return metrics, sims, data


def split_image_features(prepared: Prepared, image_ids: Tensor, precision: str, progress: bool = True) -> dict[str, Tensor]:
    """Features of ``image_ids``: from the cache, or from the run's own backbone when it has one."""
    if prepared.backbone is None:
        if prepared.features is None:
            raise ConfigError("no image features: the run has neither a feature cache nor a trained backbone")
        return prepared.features.select(image_ids)
    store = prepared.images
    if store is None or not store.holds(image_ids):
        store = load_image_store(prepared.dataset, prepared.feature_spec, image_ids.tolist(),
                                 threads=prepared.config.train.threads, progress=progress)
    return compute_store_features(prepared.backbone, store, image_ids, prepared.feature_spec, precision,
                                  prepared.config.features.batch_size, progress)


def _start_end_to_end(prepared: Prepared, train_ids: Tensor, val_ids: Tensor, progress: bool) -> None:
    """Build the trainable backbone and decode the training and validation images into ``prepared``."""
    prepared.backbone = build_trainable_backbone(prepared.feature_spec)
    ids = sorted(set(train_ids.tolist()) | set(val_ids.tolist()))
    prepared.images = load_image_store(prepared.dataset, prepared.feature_spec, ids,
                                       threads=prepared.config.train.threads, progress=progress)


def _build_optimizer(model: RetrievalModel, backbone: Backbone | None, config: RunConfig,
                     scene: SceneSupervision | None = None) -> torch.optim.Adam:
    """Adam over the model and the scene classifier (``lr``), plus a group for the backbone (``backbone_lr``) end to end."""
    heads = [p for p in model.parameters() if p.requires_grad] + (list(scene.parameters()) if scene is not None else [])
    # fused: one kernel over all parameters, about 5x faster than the default per-parameter loop on CPU; same update.
    if backbone is None:
        return torch.optim.Adam(heads, lr=config.train.lr, fused=True)
    groups: list[dict[str, Any]] = [{"params": heads},
                                    {"params": trainable_backbone_parameters(backbone), "lr": config.train.effective_backbone_lr}]
    return torch.optim.Adam(groups, lr=config.train.lr, fused=True)


def _lr_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig) -> torch.optim.lr_scheduler.StepLR:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.train.lr_decay_every, gamma=config.train.lr_decay)


def _plot(history: list[dict[str, Any]], path: Path) -> None:
    from rsitr_train.plots import plot_training_curves

    plot_training_curves(history, path)


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Caption order of an epoch: a permutation seeded by (seed, epoch), so a resumed run repeats it.

    A last batch of one caption is dropped: a one-pair batch has no negative.
    """
    return shuffled_batches(n, batch_size, torch.Generator().manual_seed(seed * 100_003 + epoch), min_last=2)


def _augment_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The augmentation draws of an epoch, seeded by (seed, epoch) apart from the batch order.

    Each process of a distributed run augments its share from its own stream (``rank``; rank 0's
    is the single-process one), so two processes never draw the same warps for different images.
    """
    return torch.Generator().manual_seed((seed * 100_003 + epoch) * 2 + 1 + rank * 1_000_000_007)


def _same_config(run_dir: Path, config: RunConfig) -> bool:
    """Whether ``run_dir/config.yaml`` (if any) describes ``config`` (:func:`rsitr_train.config.describes`)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return True
    try:
        return describes(read_config_file(path), config)
    except ConfigError:
        return False


def _restore(payload: dict[str, Any], model: RetrievalModel, backbone: Backbone | None, optimizer, scheduler,
             path: Path, scene: SceneSupervision | None = None) -> LoopState:
    """Load a resume payload into the model, backbone, scene classifier, optimiser, scheduler and the global RNG."""
    model.load_state_dict(payload["model"])
    if scene is not None:
        if "scene" not in payload:
            raise CheckpointError(path, "resume state has no scene classifier, but train.scene_loss is on")
        scene.load_state_dict(payload["scene"])
    if backbone is not None:
        if "backbone" not in payload:
            raise CheckpointError(path, "resume state has no backbone, but train.train_backbone is on")
        backbone.load_state_dict(payload["backbone"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    return resumed_state(payload, best_key="best_mR")


def train(config: RunConfig, run_dir: str | Path, progress: bool = True, device: str | torch.device | None = None) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; resumes when ``run_dir`` holds a ``resume.pt`` of the same config.

    ``device``: where to train (:func:`rsitr.devices.resolve_device`; None = the best available).
    Under ``torchrun`` every process calls this with the same arguments (see the module docstring).

    Returns a summary: best epoch, its validation metrics, seconds per epoch. A fresh run that
    fails before its first epoch is saved leaves no folder behind (:func:`cleaned_on_failure`).
    """
    run_dir = Path(run_dir)
    world, where = setup(device)
    guard = cleaned_on_failure(run_dir, keep=RESUME) if world.main else contextlib.nullcontext()
    with guard:
        return _train(config, check_writable(run_dir, "run directory"), progress and world.main, where, world)


def _read_resume(run_dir: Path, config: RunConfig, world: World) -> dict[str, Any] | None:
    """The resume payload of ``run_dir`` (None for a fresh start); rank 0 reads it first.

    Rank 0 alone may set a damaged file aside (:func:`load_resume`), so the others read after it.
    """
    resume_path = run_dir / RESUME
    payload = None
    for turn in (True, False):
        if world.main == turn and resume_path.exists():
            if not _same_config(run_dir, config):
                raise ConfigError(f"{run_dir}: holds a run with another config; choose a new --out or delete it")
            payload = load_resume(resume_path)  # None when damaged (set aside): the run starts again
        if turn:
            barrier()
    return payload


def _train(config: RunConfig, run_dir: Path, progress: bool, device: torch.device | None = None,
           world: World | None = None) -> dict[str, Any]:
    from rsitr_train.runs import BACKBONE_CHECKPOINT, CHECKPOINT, save_backbone, save_checkpoint

    device = device or torch.device("cpu")
    world = world or World()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    resume_path = run_dir / RESUME
    if world.main:
        remove_interrupted_writes(run_dir)
    payload = _read_resume(run_dir, config, world)
    vocab = Vocabulary.load(run_dir / "vocab.json") if payload is not None else None
    splits_path = run_dir / SPLITS_FILE
    prepared = prepare(config, vocab=vocab, progress=progress,
                       splits=splits_path if payload is not None and splits_path.exists() else None, device=device)
    if world.main:
        write_text(run_dir / "config.yaml", config.to_yaml())
        write_assignment(splits_path, prepared.dataset)
        prepared.vocab.save(run_dir / "vocab.json")

    model = build_model(prepared, fit_statistics=payload is None).to(device)
    train_data = split_data(prepared.dataset, config.data.train_split, prepared.vocab, config.text.max_length,
                            model.text_inputs, dataset_keywords=config.text.dataset_keywords)
    val_data = split_data(prepared.dataset, config.data.val_split, prepared.vocab, config.text.max_length, model.text_inputs)
    if config.train.train_backbone:
        _start_end_to_end(prepared, train_data.image_ids, val_data.image_ids, progress)
        prepared.backbone = prepared.backbone.to(device) if prepared.backbone is not None else None
    backbone = prepared.backbone
    scene = _scene_supervision(model, prepared, train_data, device) if config.train.scene_loss else None
    optimizer = _build_optimizer(model, backbone, config, scene)
    scheduler = _lr_scheduler(optimizer, config)
    state = LoopState()
    if payload is not None:
        state = _restore(payload, model, backbone, optimizer, scheduler, resume_path, scene)
        logger.info(f"resuming {run_dir} at epoch {state.start_epoch + 1}/{config.train.epochs}")
    stepper = Stepper(model, backbone, device, world, config.train.precision, scene)

    model.prepare_training(TrainingCorpus(
        captions=prepared.dataset.captions, caption_image=prepared.dataset.caption_image,
        train_caption_ids=train_data.caption_ids.numpy(), vocab=prepared.vocab,
    ))
    if config.train.mask_identical_captions:
        model.mask_identical_captions(*identical_text_tables(train_data, prepared.dataset.num_images,
                                                             len(prepared.dataset.captions)))
    n_params = model.num_parameters()
    n_backbone = sum(p.numel() for p in trainable_backbone_parameters(backbone)) if backbone is not None else 0
    how = (f"+ {n_backbone / 1e6:.2f} M backbone trained end to end" if backbone is not None
           else "backbone frozen, features cached")
    logger.info(f"model {prepared.spec.name}: {n_params / 1e6:.2f} M trainable parameters ({how})")

    latest: dict[str, dict[str, float]] = {}  # the validation metrics of the epoch just run

    def run_epoch(epoch: int) -> EpochResult:
        started = time.perf_counter()
        terms = _train_epoch(model, optimizer, prepared, train_data, epoch, progress, stepper)
        train_seconds = time.perf_counter() - started
        metrics, _, _ = evaluate_split(model, prepared, config.data.val_split, progress=False, data=val_data)
        lrs = {"lr": optimizer.param_groups[0]["lr"]}
        if backbone is not None:
            lrs["backbone_lr"] = optimizer.param_groups[1]["lr"]
        scheduler.step()
        row = {"epoch": epoch + 1, **lrs, **terms, "train_seconds": round(train_seconds, 3),
               **{f"val_{k}": round(v, 4) for k, v in metrics.items()}}
        latest["metrics"] = metrics
        return row, metrics["mR"]

    def save_best(epoch: int, row: dict[str, Any]) -> None:
        if not world.main:
            return
        if backbone is not None:
            save_backbone(run_dir / BACKBONE_CHECKPOINT, backbone, epoch + 1)
        save_checkpoint(run_dir / CHECKPOINT, model, prepared, epoch + 1, latest["metrics"])

    def save_state(epoch: int, current: LoopState) -> None:
        if not world.main:
            return
        extra = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if backbone is not None:
            extra["backbone"] = backbone.state_dict()
        if scene is not None:
            extra["scene"] = scene.state_dict()
        save_resume(resume_path, current, epoch, **extra)

    def describe(epoch: int, row: dict[str, Any], improved: bool) -> str:
        return (f"epoch {epoch + 1}/{config.train.epochs}  loss {row['loss']:.4f}  val mR {row['val_mR']:.2f}"
                f"  rsum {row['val_rsum']:.1f}  {row['train_seconds']:.1f}s{'  *best' if improved else ''}")

    def write_metrics(history: list[dict[str, Any]]) -> None:
        if world.main:
            write_history(run_dir, history, _plot, CURVES)

    def should_stop(history: list[dict[str, Any]]) -> bool:
        return patience_exhausted([r["val_mR"] for r in history], config.train.patience, config.train.min_epochs)

    state = run_epochs(state, config.train.epochs, run_epoch, save_best, save_state, write_metrics, describe, should_stop)
    history = state.history
    best_row = max(history, key=lambda r: r["val_mR"]) if history else {}
    summary = {"best_epoch": best_row.get("epoch"), "best_val_mR": best_row.get("val_mR"),
               "seconds_per_epoch": float(np.mean([r["train_seconds"] for r in history])) if history else 0.0,
               "parameters": n_params, "epochs": config.train.epochs, "epochs_run": len(history),
               "selection_split": config.data.val_split,
               "report_split": report_split(prepared.dataset, config.data.train_split, config.data.val_split)}
    if backbone is not None:
        summary["backbone_parameters"] = n_backbone
    return summary


def _scene_supervision(model: RetrievalModel, prepared: Prepared, train_data: SplitData,
                       device: torch.device) -> SceneSupervision:
    """The scene classifier of ``train.scene_loss`` on the training images' labels, on ``device``."""
    first = train_data.image_ids[:1]
    if prepared.backbone is not None:
        sample = _backbone_features(prepared.backbone, prepared, first, "fp32", None, None)()
    elif prepared.features is not None:
        sample = prepared.features.select(first)
    else:
        raise ConfigError("train.scene_loss needs the training features (prepare with extract=True)")
    return scene_supervision(model, prepared.dataset, train_data.image_ids, to_device(sample, device),
                             prepared.config.train.scene_loss).to(device)


def _trim(values: torch.Tensor) -> torch.Tensor:
    """Drop trailing all-padding columns of a padded token tensor (lengths are left as they are)."""
    if values.dim() != 2:
        return values
    used = (values != 0).any(dim=0).nonzero()
    return values[:, : int(used.max()) + 1] if len(used) else values[:, :1]


class LossStep(torch.nn.Module):
    """The loss of a global batch computed from this process's share of it (what DDP wraps).

    ``forward`` encodes the share, gathers both encodings with their gradients into the global
    batch (:func:`rsitr.distributed.gather_encoding`) and returns the model's loss terms over it
    (:meth:`RetrievalModel.encoding_loss`). The backbone, when it trains end to end, is a
    submodule so that DDP averages its gradients too; its features are computed inside
    ``forward`` (``features`` may be a function that makes them) for the same reason.
    """

    def __init__(self, model: RetrievalModel, backbone: Backbone | None = None, scene: SceneSupervision | None = None) -> None:
        super().__init__()
        self.model = model
        self.backbone = backbone
        self.scene = scene

    def forward(self, features: dict[str, Tensor] | Any, tokens: Tensor, lengths: Tensor, extras: dict[str, Tensor],
                image_ids: Tensor, caption_ids: Tensor, counts: list[int]) -> dict[str, Tensor]:
        if callable(features):
            features = features()
        images: Encoding = gather_encoding(self.model.encode_image(features), counts)
        texts: Encoding = gather_encoding(self.model.encode_text(tokens, lengths, **extras), counts)
        return with_scene_term(self.model.encoding_loss(images, texts, image_ids, caption_ids), self.scene, images, image_ids)


def with_scene_term(terms: dict[str, Tensor], scene: SceneSupervision | None, images: Encoding,
                    image_ids: Tensor) -> dict[str, Tensor]:
    """``terms`` with the scene classifier's weighted cross-entropy added to ``"loss"`` (and listed as ``"scene"``)."""
    if scene is None:
        return terms
    aux = scene(images, image_ids)
    return {**terms, "loss": terms["loss"] + aux, SCENE_TERM: aux.detach()}


class Stepper:
    """One optimisation step on a global batch, in one process or as one of several (``torchrun``).

    In one process the step is what it always was (``model.training_loss`` on the whole batch). In
    a distributed run this process takes its contiguous share of the batch (:func:`shard_range`;
    a process whose share is empty, when the batch is smaller than the world, encodes the batch's
    first pair as a stand-in that the gather drops) and the loss comes from :class:`LossStep`
    wrapped in DistributedDataParallel. DDP runs with ``static_graph``: the parameters a loss
    uses are the same at every step, but some configurations leave some out (e.g. ACF without
    ``global_loss``), which static_graph allows without searching the graph at every step as
    ``find_unused_parameters`` would.
    """

    def __init__(self, model: RetrievalModel, backbone: Backbone | None, device: torch.device, world: World,
                 precision: str, scene: SceneSupervision | None = None) -> None:
        self.model, self.device, self.world, self.precision, self.scene = model, device, world, precision, scene
        self.scaler = torch.amp.GradScaler(device.type) if needs_grad_scaling(device, precision) else None
        self.ddp: torch.nn.Module | None = None
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            if type(model).encoding_loss is RetrievalModel.encoding_loss:
                raise ConfigError(f"model {type(model).__name__} computes its loss in training_loss only; data-parallel "
                                  "training needs its encoding_loss (the loss from the encodings of a batch)")

            self.ddp = DistributedDataParallel(LossStep(model, backbone, scene), device_ids=[device] if device.type == "cuda" else None,
                                               static_graph=True)

    def share(self, batch_size: int) -> tuple[Tensor, list[int]]:
        """Positions in the global batch of this process's rows, and the real rows of every process."""
        counts = shard_sizes(batch_size, self.world.size)
        rows = shard_range(batch_size, self.world.rank, self.world.size)
        positions = torch.arange(rows.start, rows.stop) if len(rows) else torch.zeros(1, dtype=torch.long)
        return positions, counts

    def loss_terms(self, features: dict[str, Tensor] | Any, tokens: Tensor, lengths: Tensor, extras: dict[str, Tensor],
                   image_ids: Tensor, caption_ids: Tensor, counts: list[int]) -> dict[str, Tensor]:
        """Loss terms of the global batch (``image_ids``, ``caption_ids``) from this process's inputs."""
        d = self.device
        tokens, lengths, extras = tokens.to(d), lengths.to(d), to_device(extras, d)
        image_ids, caption_ids = image_ids.to(d), caption_ids.to(d)
        with autocast(self.precision, d):
            if self.ddp is None:
                made = to_device(features() if callable(features) else features, d)
                if self.scene is None:
                    return self.model.training_loss(made, tokens, lengths, image_ids, caption_ids=caption_ids, **extras)
                images = self.model.encode_image(made)
                terms = self.model.encoding_loss(images, self.model.encode_text(tokens, lengths, **extras), image_ids, caption_ids)
                return with_scene_term(terms, self.scene, images, image_ids)
            on_device = (lambda: to_device(features(), d)) if callable(features) else to_device(features, d)
            return self.ddp(on_device, tokens, lengths, extras, image_ids, caption_ids, counts)

    def backward_and_step(self, loss: Tensor, optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
        """Backward (DDP averages the gradients), clip per parameter group, step (with loss scaling for float16)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
        if grad_clip > 0:  # after backward, before step; per group so one cannot starve the other
            for group in optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], grad_clip)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()


def _train_epoch(model: RetrievalModel, optimizer, prepared: Prepared, data: SplitData, epoch: int, progress: bool,
                 stepper: Stepper | None = None) -> dict[str, float]:
    """One pass over the training captions; mean loss terms. End to end, the backbone steps as well.

    ``stepper``: how a step runs (device, processes); None = one process on the CPU.
    """
    config = prepared.config.train
    stepper = stepper or Stepper(model, prepared.backbone, torch.device("cpu"), World(), config.precision)
    model.train()
    backbone = prepared.backbone
    generator = None
    if backbone is not None:
        backbone_train_mode(backbone)
        generator = _augment_generator(config.seed, epoch, stepper.world.rank) if config.effective_augment else None
    augment = end_to_end_augment() if generator is not None else None
    sums: dict[str, float] = {}
    batches = _epoch_batches(len(data.lengths), config.batch_size, config.seed, epoch)
    for batch in progress_bar(batches, desc=f"epoch {epoch + 1}", enabled=progress):
        positions, counts = stepper.share(len(batch))
        lengths = data.lengths[batch]
        tokens = data.tokens[batch, : int(lengths.max())]  # the global batch's width on every process
        image_ids = data.caption_image[batch]
        mine = image_ids[positions]
        if backbone is None:
            if prepared.features is None:
                raise ConfigError("training from cached features needs them (prepare with extract=True)")
            features: Any = prepared.features.select(mine)
        else:
            features = _backbone_features(backbone, prepared, mine, config.precision, augment, generator)
        extras = {name: _trim(value[batch])[positions] for name, value in data.extras.items()}
        terms = stepper.loss_terms(features, tokens[positions], lengths[positions], extras, image_ids,
                                   data.caption_ids[batch], counts)
        stepper.backward_and_step(terms["loss"], optimizer, config.grad_clip)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
    return {name: round(total / max(1, len(batches)), 5) for name, total in sums.items()}


def _backbone_features(backbone: Backbone, prepared: Prepared, image_ids: Tensor, precision: str, augment: Any,
                       generator: torch.Generator | None) -> Callable[[], dict[str, Tensor]]:
    """A function making the features of ``image_ids`` with the training backbone (called inside the step)."""
    store = prepared.images
    if store is None:
        raise ConfigError("end-to-end training needs the decoded images (prepared.images)")
    return lambda: store_features(backbone, store, image_ids, prepared.feature_spec, precision, augment, generator)
