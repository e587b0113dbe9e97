"""Run directories: the files ``rsitr train`` writes, and loading and evaluating a finished run.

A run directory holds everything needed to evaluate or resume a run::

    config.yaml          the resolved run configuration
    vocab.json           the vocabulary (AMFMN layout)
    model.safetensors    weights of the epoch with the best validation mR (never chosen on test)
    model.json           its model spec, feature spec, vocabulary digest, epoch and val metrics
    backbone.safetensors the backbone of that epoch (end-to-end runs only; torchvision keys, so
                         ``--backbone-weights`` and :func:`rsitr.backbones.create_backbone` load it)
    resume.pt            last epoch's model, optimiser, scheduler and RNG state (for resuming),
                         and the backbone in end-to-end runs; about 3x model.safetensors (the
                         weights and Adam's two moments of each), read by resuming only
    splits.json          the split of every image it trained with (selection split included)
    metrics.csv          loss terms and validation metrics per epoch
    training_curves.png  the same, plotted

The model of a run loads without its dataset through the library (:func:`rsitr.load_model`), and
``rsitr export`` turns it into a self-contained bundle; evaluating a split needs the dataset.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rsitr.backbones import Backbone
from rsitr.bundle import BACKBONE_FILE, MODEL_FILE, RUN_MODEL_JSON, load_model, vocab_digest
from rsitr.data.tokenized import SplitData
from rsitr.devices import resolve_device
from rsitr.errors import CheckpointError, ConfigError
from rsitr.evaluation import chance_metrics, extra_views, format_table
from rsitr.features import feature_dims, file_sha256
from rsitr.io import save_tensors, write_json
from rsitr.models import RetrievalModel
from rsitr.progress import get_logger
from rsitr.text import Vocabulary
from rsitr_train.config import load_config
from rsitr_train.trainer import SPLITS_FILE, Prepared, evaluate_split, prepare, report_split

logger = get_logger(__name__)

CHECKPOINT = MODEL_FILE
BACKBONE_CHECKPOINT = BACKBONE_FILE


def save_checkpoint(path: Path, model: RetrievalModel, prepared: Prepared, epoch: int, metrics: dict[str, float]) -> None:
    """Weights as safetensors; model spec, feature dims and vocabulary digest in its metadata and in ``model.json``."""
    metadata = {
        "rsitr_model": json.dumps(prepared.spec.to_dict()),
        "feature_dims": json.dumps(feature_dims(prepared.feature_spec)),
        "vocab_sha": vocab_digest(prepared.vocab),
        "vocab_size": str(len(prepared.vocab)),
        "epoch": str(epoch),
        "val_metrics": json.dumps(metrics),
    }
    description: dict[str, Any] = {
        "model": prepared.spec.to_dict(),
        "features": prepared.feature_spec.to_dict(),
        "feature_dims": feature_dims(prepared.feature_spec),
        "vocab_size": len(prepared.vocab),
        "vocab_sha": vocab_digest(prepared.vocab),
        "epoch": epoch,
        "val_metrics": metrics,
        "max_length": prepared.config.text.max_length,
        "precision": prepared.config.train.precision,
    }
    if prepared.feature_spec.weights is not None:
        description["backbone_sha256"] = file_sha256(prepared.feature_spec.weights)
    if prepared.backbone is not None:  # end to end: the features come from this file, not the cache
        metadata["trained_backbone"] = description["trained_backbone"] = BACKBONE_CHECKPOINT
    save_tensors(path, model.state_dict(), metadata=metadata)
    write_json(path.parent / RUN_MODEL_JSON, description)


def save_backbone(path: Path, backbone: Backbone, epoch: int) -> None:
    """The backbone's state dict with torchvision keys (loadable by ``--backbone-weights``), atomically."""
    metadata = {"rsitr_backbone": backbone.name, "epoch": str(epoch)}
    save_tensors(path, backbone.state_dict(), metadata=metadata)


def load_run(run_dir: str | Path, progress: bool = True, dataset: str | Path | None = None,
             device: str | torch.device | None = None) -> tuple[RetrievalModel, Prepared]:
    """The model of a run directory with its best weights, and its dataset, ready to evaluate.

    The model comes from :func:`rsitr.load_model` (no dataset needed); the dataset — the run
    config's ``data.path``, or ``dataset`` when the data has moved — and for a frozen backbone its
    feature cache, come from the run's config. For an end-to-end run the trained backbone is
    attached (``prepared.backbone``) and :func:`evaluate_split` computes the split's features with it.
    ``device``: where the model (and backbone) are put (:func:`rsitr.devices.resolve_device`; None = the best available).
    """
    where = resolve_device(device)
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise CheckpointError(run_dir, "not a run directory (no config.yaml)")
    config = load_config(config_path)
    if dataset is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(dataset)))
    bundle = load_model(run_dir)
    end_to_end = config.train.train_backbone
    splits = run_dir / SPLITS_FILE
    prepared = prepare(config, vocab=bundle.vocab, progress=progress, extract=not end_to_end,
                       splits=splits if splits.is_file() else None, device=where)
    if end_to_end:
        prepared.backbone = bundle.backbone.to(where) if bundle.backbone is not None else None
    return bundle.model.to(where), prepared


def run_report_split(run_dir: str | Path, prepared: Prepared) -> str:
    """The split ``rsitr evaluate`` reports by default: :func:`rsitr_train.trainer.report_split` of the run.

    One-line ConfigError when every split trained or chose the checkpoint, naming the flag that
    shows the selection split's (optimistic) figures anyway.
    """
    data = prepared.config.data
    split = report_split(prepared.dataset, data.train_split, data.val_split)
    if split is None:
        raise ConfigError(f"{run_dir}: every split of {prepared.dataset.name} ({', '.join(prepared.dataset.splits())}) "
                          f"trained or chose the checkpoint; give --split {data.val_split} for the selection split's "
                          "(optimistic) figures")
    return split


def warn_unknown_captions(data: SplitData, vocab: Vocabulary, split: str, source: str | Path) -> int:
    """Log one line when captions of ``split`` have no word of the run's vocabulary; returns how many.

    Such a caption is read as ``<unk>`` tokens only (:meth:`rsitr.text.Vocabulary.encode`), so every
    one of them gets the same text encoding and the same ranks: legitimate input, but a sign of a
    dataset the model was not trained for. Padding (0) is not a word.
    """
    words = (data.tokens != vocab.unk_index) & (data.tokens != 0)
    unknown = int((~words.any(dim=1)).sum())
    if unknown:
        logger.warning("%s: %d of %d %s caption(s) have no word of the run's vocabulary; each reads as <unk> only",
                       source, unknown, len(data.lengths), split)
    return unknown


@dataclasses.dataclass
class RunScores:
    """A run's scores of one split, as ``rsitr evaluate`` computes them (:func:`score_run`)."""

    prepared: Prepared
    split: str
    precision: str
    metrics: dict[str, float]
    sims: torch.Tensor  # (n_images, n_captions) float32
    data: SplitData
    seconds: float

    def views(self) -> dict[str, Any]:
        """The headline metrics, the reference-tie and distinct-text views and the scoring seconds."""
        return {"metrics": self.metrics, **{f"metrics_{name}": values for name, values in extra_views(self.sims, self.data).items()},
                "seconds": round(self.seconds, 3)}


def score_run(run_dir: str | Path, split: str | None = None, progress: bool = True, precision: str | None = None,
              dataset: str | None = None, device: str | torch.device | None = None,
              guard: Callable[[Prepared, str], None] | None = None) -> RunScores:
    """Load a run and score ``split`` (None: its report split) in ``precision`` (None: the run's own).

    ``guard(prepared, split)`` runs after the run is loaded and before anything is scored (the
    ensemble's refusal of a split a member chose on). Unknown words of the split are warned about.
    """
    model, prepared = load_run(run_dir, progress=progress, dataset=dataset, device=device)
    split = split or run_report_split(run_dir, prepared)
    if guard is not None:
        guard(prepared, split)
    precision = precision or prepared.config.train.precision
    started = time.perf_counter()
    metrics, sims, data = evaluate_split(model, prepared, split, progress=progress, precision=precision)
    seconds = time.perf_counter() - started
    warn_unknown_captions(data, prepared.vocab, split, prepared.config.data.path)
    return RunScores(prepared, split, precision, metrics, sims, data, seconds)


def evaluate_run(run_dir: str | Path, split: str | None = None, json_path: str | Path | None = None,
                 progress: bool = True, precision: str | None = None, dataset: str | None = None,
                 device: str | torch.device | None = None) -> dict[str, Any]:
    """Evaluate a run directory on ``split``; write and return the result (:func:`result_table` prints it).

    ``split`` None is the run's report split (:func:`run_report_split`: test, else a val split
    that did not choose the epoch), the split ``rsitr train`` and ``rsitr benchmark`` report.
    ``precision`` (``"fp32"`` or ``"bf16"``) overrides the run's ``train.precision``; ``dataset``
    evaluates on another copy of the data than the one the run's config names. The result says
    which split chose the checkpoint (``selection_split``) and, when ``split`` is that split,
    that its figures are optimistic. It also holds the reference code's tie order
    (``metrics_reference_ties``) and the distinct-text view (``metrics_distinct_text``).
    """
    scores = score_run(run_dir, split, progress, precision, dataset, device)
    prepared, data, split = scores.prepared, scores.data, scores.split
    selection = prepared.config.data.val_split
    views = scores.views()
    result = {"model": prepared.spec.name, "dataset": prepared.dataset.name, "split": split,
              "selection_split": selection, "optimistic": split == selection,
              "n_images": len(data.image_ids), "n_captions": len(data.lengths),
              "n_distinct_texts": int(data.text_ids.unique().numel()), "metrics": views["metrics"],
              **{k: v for k, v in views.items() if k.startswith("metrics_")},
              "chance": chance_metrics(len(data.image_ids), data.caption_local_image),
              "precision": scores.precision, "seconds": views["seconds"]}
    write_json(json_path or Path(run_dir) / f"eval_{split}.json", result)
    return result


def result_table(result: dict[str, Any]) -> str:
    """The result of :func:`evaluate_run` as a table laid out like DOVE's Table I, chance beside it."""
    optimistic = " (selection split: optimistic)" if result.get("optimistic") else ""
    title = (f"{result['model']} on {result['dataset']} {result['split']}{optimistic}: "
             f"{result['n_images']} images, {result['n_captions']} captions")
    pairs = result["n_images"] * result["n_captions"]
    return (format_table(result["metrics"], result["chance"], title=title)
            + f"\nscored {pairs:,} pairs in {result['seconds']:.2f} s")
