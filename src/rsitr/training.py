"""Training and checkpointing.

A run directory holds everything needed to evaluate or resume a run::

    config.yaml          the resolved run configuration
    vocab.json           the vocabulary (AMFMN layout)
    model.safetensors    weights of the epoch with the best validation mR (never chosen on test)
    model.json           its model spec, feature spec, vocabulary digest, epoch and val metrics
    resume.pt            last epoch's model, optimiser, scheduler and RNG state (for resuming)
    metrics.csv          loss terms and validation metrics per epoch
    training_curves.png  the same, plotted

Training draws batches over captions (each epoch visits every training caption once), looks up the
cached features of each caption's image, and steps Adam with the paper's step decay.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from rsitr.config import RunConfig, config_from_dict
from rsitr.data import RetrievalDataset, load_dataset
from rsitr.errors import CheckpointError, ConfigError
from rsitr.evaluation import compute_similarity, recall_metrics
from rsitr.features import FeatureSpec, ImageFeatures, extract_features, feature_dims
from rsitr.io import atomic_path, save_tensors, write_json, write_text
from rsitr.models import RetrievalModel, create_model, get_model_spec
from rsitr.models.base import TrainingCorpus
from rsitr.models.registry import ModelSpec
from rsitr.text import Vocabulary, encode_batch, keyword_inputs, load_glove

CHECKPOINT = "model.safetensors"
RESUME = "resume.pt"
METRICS = "metrics.csv"


@dataclass
class SplitData:
    """Captions of one split as token tensors, with the (full-dataset) image id of each."""

    image_ids: torch.Tensor  # (n_images,) full-dataset ids of the split's images
    tokens: torch.Tensor  # (n_captions, L)
    lengths: torch.Tensor  # (n_captions,)
    caption_image: torch.Tensor  # (n_captions,) full-dataset image id of each caption
    caption_local_image: np.ndarray  # (n_captions,) index into image_ids of each caption
    caption_ids: torch.Tensor  # (n_captions,) full-dataset caption id of each caption
    extras: dict[str, torch.Tensor]  # the model's text_inputs, row-aligned with tokens (e.g. keyword_tokens)


@dataclass
class Prepared:
    """Everything a run needs besides the model: dataset, vocabulary, features, model spec."""

    config: RunConfig
    dataset: RetrievalDataset
    vocab: Vocabulary
    features: ImageFeatures
    spec: ModelSpec


def vocab_digest(vocab: Vocabulary) -> str:
    return hashlib.sha256("\n".join(vocab.idx2word).encode("utf-8")).hexdigest()[:16]


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
    }
    values.update(spec.features)
    if "maps" in values:
        values["maps"] = tuple(values["maps"] or ())
    return FeatureSpec(**values)


def text_extras(dataset: RetrievalDataset, caption_ids: list[int], vocab: Vocabulary,
                text_inputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The extra text inputs a model declares (``RetrievalModel.text_inputs``) for these captions."""
    extras: dict[str, torch.Tensor] = {}
    for name in text_inputs:
        if name != "keywords":
            raise ConfigError(f"unknown text input {name!r} (known: keywords)")
        keywords = None if dataset.keywords is None else [dataset.keywords[c] for c in caption_ids]
        tokens, lengths = keyword_inputs(vocab, [dataset.captions[c] for c in caption_ids], keywords)
        extras["keyword_tokens"], extras["keyword_lengths"] = tokens, lengths
    return extras


def split_data(dataset: RetrievalDataset, split: str, vocab: Vocabulary, max_length: int,
               text_inputs: tuple[str, ...] = ()) -> SplitData:
    """Tokenise the captions of ``split``; image and caption ids stay those of the full dataset."""
    image_ids = dataset.split_indices(split)
    local = {img: k for k, img in enumerate(image_ids)}
    caption_ids = [c for c, img in enumerate(dataset.caption_image.tolist()) if img in local]
    tokens, lengths = encode_batch(vocab, [dataset.captions[c] for c in caption_ids], max_length)
    caption_image = dataset.caption_image[caption_ids]
    return SplitData(
        image_ids=torch.tensor(image_ids, dtype=torch.int64),
        tokens=tokens,
        lengths=lengths,
        caption_image=torch.from_numpy(caption_image),
        caption_local_image=np.array([local[int(i)] for i in caption_image], dtype=np.int64),
        caption_ids=torch.tensor(caption_ids, dtype=torch.int64),
        extras=text_extras(dataset, caption_ids, vocab, text_inputs),
    )


def prepare(config: RunConfig, vocab: Vocabulary | None = None, progress: bool = True) -> Prepared:
    """Read the dataset, build or load the vocabulary, and extract (or load cached) features."""
    if not config.data.path:
        raise ConfigError("data.path is empty: give the dataset file or folder (--dataset PATH)")
    dataset = load_dataset(config.data.path, layout=config.data.layout, image_dir=config.data.image_dir, name=config.data.name)
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
    features = extract_features(
        dataset, feature_spec(config, spec), Path(config.features.cache_dir),
        batch_size=config.features.batch_size, progress=progress,
    )
    return Prepared(config=config, dataset=dataset, vocab=vocab, features=features, spec=spec)


def build_model(prepared: Prepared, fit_statistics: bool = True) -> RetrievalModel:
    """Create the run's model; word vectors come from GloVe when configured.

    ``fit_statistics`` fits the feature standardiser on the training split; callers that load
    weights right after (evaluation, resuming) skip it, since the checkpoint holds the statistics.
    """
    torch.manual_seed(prepared.config.train.seed)
    dims = feature_dims(prepared.features.spec)
    model = create_model(prepared.spec, feature_dims=dims, vocab_size=len(prepared.vocab))
    if prepared.config.text.glove:
        embedding = getattr(model, "word_embedding", None)
        if embedding is None:
            raise ConfigError(f"model {prepared.spec.name!r} has no word embedding to initialise from GloVe")
        weights, found = load_glove(prepared.config.text.glove, prepared.vocab, embedding.embedding_dim)
        embedding.weight.data.copy_(weights)
        print(f"GloVe: {found}/{len(prepared.vocab) - 1} words found")
    standardizer = getattr(model, "standardize", None)
    if fit_statistics and standardizer is not None:
        train_ids = torch.tensor(prepared.dataset.split_indices(prepared.config.data.train_split))
        standardizer.fit(prepared.features.select(train_ids))
    return model


def evaluate_split(model: RetrievalModel, prepared: Prepared, split: str, batch_size: int, progress: bool = True,
                   data: SplitData | None = None) -> tuple[dict[str, float], torch.Tensor, SplitData]:
    """Metrics, similarity matrix and caption data of one split (``data``: the split already tokenised)."""
    if data is None:
        data = split_data(prepared.dataset, split, prepared.vocab, prepared.config.text.max_length, model.text_inputs)
    image_features = prepared.features.select(data.image_ids)
    sims = compute_similarity(model, image_features, data.tokens, data.lengths, batch_size=batch_size, progress=progress,
                              text_extras=data.extras)
    return recall_metrics(sims, data.caption_local_image), sims, data


# ----------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model: RetrievalModel, prepared: Prepared, epoch: int, metrics: dict[str, float]) -> None:
    """Weights as safetensors; model spec, feature dims and vocabulary digest in its metadata."""
    metadata = {
        "rsitr_model": json.dumps(prepared.spec.to_dict()),
        "feature_dims": json.dumps(feature_dims(prepared.features.spec)),
        "vocab_sha": vocab_digest(prepared.vocab),
        "vocab_size": str(len(prepared.vocab)),
        "epoch": str(epoch),
        "val_metrics": json.dumps(metrics),
    }
    save_tensors(path, model.state_dict(), metadata=metadata)
    write_json(path.with_suffix(".json"), {
        "model": prepared.spec.to_dict(),
        "features": prepared.features.spec.to_dict(),
        "feature_dims": feature_dims(prepared.features.spec),
        "vocab_size": len(prepared.vocab),
        "vocab_sha": vocab_digest(prepared.vocab),
        "epoch": epoch,
        "val_metrics": metrics,
    })


def read_checkpoint_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(path, f"not a readable safetensors file ({exc.__class__.__name__})") from exc


def load_model_weights(path: Path, model: RetrievalModel, spec: ModelSpec, vocab: Vocabulary) -> dict[str, str]:
    """Load ``path`` into ``model`` after checking it was saved for this model and vocabulary."""
    meta = read_checkpoint_metadata(path)
    if "rsitr_model" not in meta:
        raise CheckpointError(path, "not an rsitr checkpoint (no model metadata)")
    saved = ModelSpec.from_dict(json.loads(meta["rsitr_model"]))
    if saved.architecture != spec.architecture or saved.params != spec.params:
        raise CheckpointError(path, f"checkpoint is of model {saved.architecture} {saved.params}, not {spec.architecture} {spec.params}")
    if meta.get("vocab_sha") != vocab_digest(vocab):
        raise CheckpointError(path, "checkpoint was trained with another vocabulary")
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(path, f"weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return meta


def load_run(run_dir: str | Path, progress: bool = True) -> tuple[RetrievalModel, Prepared]:
    """Rebuild the model of a run directory with its best weights, ready to evaluate."""
    import yaml

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise CheckpointError(run_dir, "not a run directory (no config.yaml)")
    config = config_from_dict(yaml.safe_load(config_path.read_text(encoding="utf-8")), str(config_path))
    vocab = Vocabulary.load(run_dir / "vocab.json")
    prepared = prepare(config, vocab=vocab, progress=progress)
    model = build_model(prepared, fit_statistics=False)
    load_model_weights(run_dir / CHECKPOINT, model, prepared.spec, vocab)
    return model.eval(), prepared


# ----------------------------------------------------------------------------------------- training


def _lr_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig) -> torch.optim.lr_scheduler.StepLR:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.train.lr_decay_every, gamma=config.train.lr_decay)


def _save_resume(path: Path, model, optimizer, scheduler, epoch: int, best: float, history: list[dict]) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "best_mR": best,
        "history_json": json.dumps(history),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0].keys()))
    writer.writeheader()
    writer.writerows(history)
    write_text(run_dir / METRICS, buffer.getvalue())
    from rsitr.plots import plot_training_curves

    plot_training_curves(history, run_dir / "training_curves.png")


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Caption order of an epoch: a permutation seeded by (seed, epoch), so a resumed run repeats it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()  # a one-pair batch has no negative
    return batches


def train(config: RunConfig, run_dir: str | Path, progress: bool = True, log=print) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; resumes when ``run_dir`` holds a ``resume.pt`` of the same config.

    Returns a summary: best epoch, its validation metrics, seconds per epoch.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    resume_path = run_dir / RESUME
    if resume_path.exists():
        saved = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").exists() else ""
        if saved and saved != config.to_yaml():
            raise ConfigError(f"{run_dir}: holds a run with another config; choose a new --out or delete it")
        vocab = Vocabulary.load(run_dir / "vocab.json")
    else:
        vocab = None
    prepared = prepare(config, vocab=vocab, progress=progress)
    write_text(run_dir / "config.yaml", config.to_yaml())
    prepared.vocab.save(run_dir / "vocab.json")

    model = build_model(prepared, fit_statistics=not resume_path.exists())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.train.lr)
    scheduler = _lr_scheduler(optimizer, config)
    start_epoch, best, history = 0, -math.inf, []
    if resume_path.exists():
        state = torch.load(resume_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best, history = int(state["epoch"]) + 1, float(state["best_mR"]), json.loads(state["history_json"])
        log(f"resuming {run_dir} at epoch {start_epoch + 1}/{config.train.epochs}")

    train_data = split_data(prepared.dataset, config.data.train_split, prepared.vocab, config.text.max_length, model.text_inputs)
    val_data = split_data(prepared.dataset, config.data.val_split, prepared.vocab, config.text.max_length, model.text_inputs)
    model.prepare_training(TrainingCorpus(
        captions=prepared.dataset.captions, caption_image=prepared.dataset.caption_image,
        train_caption_ids=train_data.caption_ids.numpy(), keywords=prepared.dataset.keywords, vocab=prepared.vocab,
    ))
    n_params = model.num_parameters()
    log(f"model {prepared.spec.name}: {n_params / 1e6:.2f} M trainable parameters (backbone frozen, features cached)")
    for epoch in range(start_epoch, config.train.epochs):
        started = time.perf_counter()
        terms = _train_epoch(model, optimizer, prepared, train_data, epoch, progress)
        train_seconds = time.perf_counter() - started
        metrics, _, _ = evaluate_split(model, prepared, config.data.val_split, config.train.eval_batch_size, progress=False, data=val_data)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **terms, "train_seconds": round(train_seconds, 3),
               **{f"val_{k}": round(v, 4) for k, v in metrics.items()}}
        scheduler.step()
        history.append(row)
        improved = metrics["mR"] > best
        if improved:
            best = metrics["mR"]
            save_checkpoint(run_dir / CHECKPOINT, model, prepared, epoch + 1, metrics)
        _write_metrics(run_dir, history)
        _save_resume(resume_path, model, optimizer, scheduler, epoch, best, history)
        log(f"epoch {epoch + 1}/{config.train.epochs}  loss {terms['loss']:.4f}  val mR {metrics['mR']:.2f}"
            f"  rsum {metrics['rsum']:.1f}  {train_seconds:.1f}s{'  *best' if improved else ''}")
    best_row = max(history, key=lambda r: r["val_mR"]) if history else {}
    return {"best_epoch": best_row.get("epoch"), "best_val_mR": best_row.get("val_mR"),
            "seconds_per_epoch": float(np.mean([r["train_seconds"] for r in history])) if history else 0.0,
            "parameters": n_params}


def _trim(values: torch.Tensor) -> torch.Tensor:
    """Drop trailing all-padding columns of a padded token tensor (lengths are left as they are)."""
    if values.dim() != 2:
        return values
    used = (values != 0).any(dim=0).nonzero()
    return values[:, : int(used.max()) + 1] if len(used) else values[:, :1]


def _train_epoch(model: RetrievalModel, optimizer, prepared: Prepared, data: SplitData, epoch: int, progress: bool) -> dict[str, float]:
    config = prepared.config.train
    model.train()
    sums: dict[str, float] = {}
    batches = _epoch_batches(len(data.lengths), config.batch_size, config.seed, epoch)
    for batch in tqdm(batches, desc=f"epoch {epoch + 1}", disable=not progress, leave=False):
        lengths = data.lengths[batch]
        tokens = data.tokens[batch, : int(lengths.max())]
        image_ids = data.caption_image[batch]
        features = prepared.features.select(image_ids)
        extras = {name: _trim(value[batch]) for name, value in data.extras.items()}
        terms = model.training_loss(features, tokens, lengths, image_ids, caption_ids=data.caption_ids[batch], **extras)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)  # after backward, before step
        optimizer.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
    return {name: round(total / max(1, len(batches)), 5) for name, total in sums.items()}
