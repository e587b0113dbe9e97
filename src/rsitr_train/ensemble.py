"""Ensembles of trained runs: each run scores the split as ``rsitr evaluate`` does, the z-scored matrices are averaged.

``rsitr ensemble RUN_DIR [RUN_DIR ...]`` reports every member's row and one row for the
ensemble, on one split. The members may be any mix of models and seeds trained on the same
dataset; each member's score matrix is computed by :func:`rsitr_train.trainer.evaluate_split`
exactly as :func:`rsitr_train.runs.evaluate_run` computes it (distinct captions encoded once,
fixed chunks, the run's precision), so a member's row is its ``rsitr evaluate`` row. The matrices
are combined by :func:`rsitr.ensemble.normalised_average` (a z-score per member, then a weighted
mean; the module says why). A query still carries only its own text or image: no member, and
not the combination, sees which caption belongs to which image.

The split must be one that no member trained on or chose its checkpoint on: averaging models
each selected on the split would report the selection's optimism as an ensemble gain, so such a
split is refused (``rsitr evaluate`` only marks it optimistic, for one run). By default the split
is the first member's report split (:func:`rsitr_train.runs.run_report_split`), the default of
``rsitr evaluate``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsitr.data.tokenized import SplitData
from rsitr.ensemble import ensemble_weights, normalised_average, shared_text_ids
from rsitr.errors import CheckpointError, ConfigError
from rsitr.evaluation import chance_metrics, extra_views, format_rows, recall_metrics
from rsitr.io import write_json
from rsitr.progress import get_logger
from rsitr_train.config import RunConfig, load_config
from rsitr_train.runs import score_run

logger = get_logger(__name__)


@dataclasses.dataclass
class MemberScores:
    """One member's scores of the split and what identifies the split's items."""

    run_dir: Path
    model: str
    dataset: str
    split: str
    precision: str
    selection_split: str
    sims: torch.Tensor  # (n_images, n_captions) float32, as rsitr evaluate computes it
    data: SplitData
    images: list[str]  # file names of the split's images, in row order
    captions: list[str]  # the split's captions, in column order
    result: dict[str, Any]  # metrics, metrics_reference_ties, metrics_distinct_text, seconds


def parse_weights(text: str | None, count: int) -> list[float] | None:
    """``--weights w1,w2,...`` as floats, one per run (None: equal weights); one-line ConfigError otherwise."""
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",")]
        ensemble_weights(count, values)
    except ValueError as exc:
        raise ConfigError(f"--weights {text!r}: {exc} (give {count} non-negative numbers, comma-separated)") from None
    return values


def run_config(run_dir: Path) -> RunConfig:
    """The resolved configuration of a run directory (CheckpointError when it is not one, as :func:`load_run` says)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(run_dir, "not a run directory (no config.yaml)")
    return load_config(path)


def check_split_allowed(run_dir: Path, config: RunConfig, split: str) -> None:
    """ConfigError when ``split`` trained the run or chose its checkpoint (``data.train_split`` / ``data.val_split``)."""
    data = config.data
    if split == data.val_split:
        raise ConfigError(f"{run_dir}: split {split!r} chose this run's checkpoint (data.val_split); an ensemble is "
                          "reported on a split no member trained or selected on")
    if split == data.train_split:
        raise ConfigError(f"{run_dir}: split {split!r} trained this run (data.train_split); an ensemble is "
                          "reported on a split no member trained or selected on")


def score_member(run_dir: Path, split: str | None, progress: bool = True, precision: str | None = None,
                 dataset: str | None = None, device: str | torch.device | None = None) -> MemberScores:
    """Load a run and score ``split`` (None: the run's report split) exactly as :func:`rsitr_train.runs.evaluate_run` does."""
    scores = score_run(run_dir, split, progress, precision, dataset, device,
                       guard=lambda prepared, chosen: check_split_allowed(run_dir, prepared.config, chosen))
    prepared, data = scores.prepared, scores.data
    return MemberScores(run_dir=run_dir, model=prepared.spec.name, dataset=prepared.dataset.name, split=scores.split,
                        precision=scores.precision,
                        selection_split=prepared.config.data.val_split, sims=scores.sims, data=data,
                        images=[prepared.dataset.image_files[i] for i in data.image_ids.tolist()],
                        captions=[prepared.dataset.captions[c] for c in data.caption_ids.tolist()], result=scores.views())


def check_same_split(reference: MemberScores, member: MemberScores, split: str) -> None:
    """ConfigError naming ``member``'s run when its split does not hold the same images and captions, in the same order."""
    where = f"{member.run_dir}: its {split!r} split differs from that of {reference.run_dir}"
    if member.images != reference.images:
        raise ConfigError(f"{where} (images: {len(member.images)} vs {len(reference.images)}, or another order); "
                          "ensemble members must be trained on the same dataset and splits")
    if member.captions != reference.captions or not np.array_equal(member.data.caption_local_image,
                                                                   reference.data.caption_local_image):
        raise ConfigError(f"{where} (captions: {len(member.captions)} vs {len(reference.captions)}, other texts, order "
                          "or pairing); ensemble members must be trained on the same dataset and splits")


def score_members(run_dirs: Sequence[str | Path], split: str | None = None, progress: bool = True,
                  precision: str | None = None, dataset: str | None = None,
                  device: str | torch.device | None = None) -> tuple[str, list[MemberScores]]:
    """The split and every member's scores of it, checked to be the same items; a run given twice is scored once.

    Every member's split guard is checked from its config before a model is loaded (after the
    first member when ``split`` is None: the report split needs its dataset).
    """
    if not run_dirs:
        raise ConfigError("an ensemble needs at least one run directory")
    dirs = [Path(d) for d in run_dirs]
    if split is not None:
        for run_dir in dirs:
            check_split_allowed(run_dir, run_config(run_dir), split)
    logger.info("ensemble member 1 of %d: %s", len(dirs), dirs[0])
    first = score_member(dirs[0], split, progress, precision, dataset, device)
    split = first.split
    for run_dir in dirs[1:]:
        check_split_allowed(run_dir, run_config(run_dir), split)
    scored = {dirs[0].resolve(): first}
    members = [first]
    for index, run_dir in enumerate(dirs[1:], start=2):
        key = run_dir.resolve()
        if key not in scored:
            logger.info("ensemble member %d of %d: %s", index, len(dirs), run_dir)
            scored[key] = score_member(run_dir, split, progress, precision, dataset, device)
            check_same_split(first, scored[key], split)
        members.append(dataclasses.replace(scored[key], run_dir=run_dir))
    return split, members


def evaluate_ensemble(run_dirs: Sequence[str | Path], split: str | None = None, weights: Sequence[float] | None = None,
                      json_path: str | Path | None = None, progress: bool = True, precision: str | None = None,
                      dataset: str | None = None, device: str | torch.device | None = None) -> dict[str, Any]:
    """Evaluate every run and their ensemble on ``split``; write (when ``json_path``) and return the result.

    ``split`` None is the first run's report split (test, else a val split that did not choose
    its epoch); a split any member trained or selected on is refused. ``weights``: one per run
    (rescaled to sum 1; default equal). ``precision`` and ``dataset`` are as for
    :func:`rsitr_train.runs.evaluate_run`. The result holds each member's metrics (its
    ``rsitr evaluate`` figures) and the ensemble's, each with the reference-tie and distinct-text
    views; the ensemble's distinct texts are the captions identical to every member
    (:func:`rsitr.ensemble.shared_text_ids`). :func:`ensemble_table` prints it.
    """
    if not run_dirs:
        raise ConfigError("an ensemble needs at least one run directory")
    shares = ensemble_weights(len(run_dirs), weights)  # bad weights fail before any run is loaded
    split, members = score_members(run_dirs, split, progress, precision, dataset, device)
    started = time.perf_counter()
    combined = normalised_average([m.sims for m in members], shares.tolist())
    text_ids = torch.from_numpy(shared_text_ids([m.data.text_ids for m in members]))
    data = dataclasses.replace(members[0].data, text_ids=text_ids)
    ensemble = {"metrics": recall_metrics(combined, data.caption_local_image),
                **{f"metrics_{name}": values for name, values in extra_views(combined, data).items()},
                "seconds": round(time.perf_counter() - started, 3)}
    result = {"dataset": members[0].dataset, "split": split, "n_runs": len(members),
              "n_images": len(data.image_ids), "n_captions": len(data.lengths),
              "n_distinct_texts": int(text_ids.unique().numel()),
              "normalisation": "z-score of each member's matrix over all its entries, then the weighted mean",
              "members": [{"run_dir": str(m.run_dir), "model": m.model, "weight": float(w), "precision": m.precision,
                           "selection_split": m.selection_split, **m.result} for m, w in zip(members, shares, strict=True)],
              "ensemble": ensemble, "chance": chance_metrics(len(data.image_ids), data.caption_local_image)}
    if json_path is not None:
        write_json(json_path, result)
    return result


def ensemble_table(result: dict[str, Any]) -> str:
    """The result of :func:`evaluate_ensemble`: one row per member, the ensemble's and chance, laid out like ``rsitr evaluate``."""
    members = result["members"]
    equal = len({m["weight"] for m in members}) == 1
    rows = [(f"{m['model']} {m['run_dir']}" + ("" if equal else f" (w {m['weight']:.2f})"), m["metrics"]) for m in members]
    rows += [(f"ensemble ({result['n_runs']} runs)", result["ensemble"]["metrics"]), ("chance", result["chance"])]
    title = (f"{result['n_runs']} runs and their ensemble on {result['dataset']} {result['split']}: "
             f"{result['n_images']} images, {result['n_captions']} captions (each run's scores z-scored, then averaged)")
    return format_rows(rows, title=title)
