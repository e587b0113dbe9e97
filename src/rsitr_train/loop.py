"""The epoch skeleton shared by retrieval training and backbone pretraining.

Both trainers run the same loop: resume from ``resume.pt`` if it is there, then per epoch train,
validate, keep the checkpoint of the best validation score, write the metrics table and its plot,
save the resume state, and log one line — in that order, so that a run killed at any moment
resumes from the last completed epoch and ends exactly as an uninterrupted one. What differs (the
step, the score, the files of a best epoch) is passed in.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rsitr.io import atomic_path, remove_partial_writes, write_text
from rsitr.progress import get_logger

logger = get_logger(__name__)

RESUME = "resume.pt"
METRICS = "metrics.csv"

#: One epoch's results: the metrics row, and the validation score (higher is better; None when
#: there is nothing to validate on, which makes every epoch the best so the last one is kept).
EpochResult = tuple[dict[str, Any], float | None]


@dataclass
class LoopState:
    """Where a run stands: the next epoch, the best validation score so far and the rows written."""

    start_epoch: int = 0
    best: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, min_last: int) -> list[Tensor]:
    """A permutation of ``range(n)`` cut into batches; a last batch under ``min_last`` items is dropped
    unless it is the only one (a seeded generator makes a resumed epoch repeat its order)."""
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < min_last:
        batches.pop()
    return batches


@contextlib.contextmanager
def cleaned_on_failure(folder: Path, keep: str) -> Iterator[None]:
    """Remove ``folder`` when the block fails, if it was absent or empty before and holds no ``keep`` file.

    A fresh job that fails before it saved anything to resume from (``resume.pt``) then leaves no
    half-made folder (a ``config.yaml`` and a ``vocab.json`` with nothing else) behind; a job with
    progress to resume keeps it, and a folder that held something before is never touched.
    """
    fresh = not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))
    try:
        yield
    except BaseException:
        if fresh and folder.is_dir() and not (folder / keep).exists():
            shutil.rmtree(folder, ignore_errors=True)
        raise


def remove_interrupted_writes(folder: Path) -> None:
    """Delete the temporary files a job killed mid-write left in its own folder, with one line if there were any.

    Those files (:func:`rsitr.io.atomic_path`'s ``.<name>.*.tmp``) are never read as the files
    they were to become; the epoch that was writing them runs again and writes them whole.
    """
    removed = remove_partial_writes(folder)
    if removed:
        logger.warning("%s: removed %d partial file(s) an interrupted run left (%s); their epoch runs again",
                       folder, len(removed), ", ".join(removed))


def save_resume(path: Path, state: LoopState, last_epoch: int, **extra: Any) -> None:
    """Write ``resume.pt`` atomically: ``extra`` (state dicts, counters) plus the loop state and the RNG.

    torch writes through a Python file, so that a refused write (a full disk) reaches
    :func:`rsitr.io.atomic_path` as the system's OSError; given a path, torch's own writer reports
    only an unexpected stream position.
    """
    payload = {**extra, "epoch": last_epoch, "best": state.best, "history_json": json.dumps(state.history),
               "torch_rng": torch.get_rng_state()}
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        torch.save(payload, handle)


def load_resume(path: Path) -> dict[str, Any] | None:
    """The payload of :func:`save_resume` (tensors only, read with ``weights_only=True``); None when damaged.

    ``resume.pt`` is written by temp-then-rename, so a damaged one was damaged from outside (a
    truncated copy, a disk error). It is not trusted: a warning names it, it is moved aside to
    ``resume.pt.damaged`` and the run starts again from its first epoch, which under the same seed
    ends as the uninterrupted run would have.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or not {"epoch", "best", "history_json", "torch_rng"} <= set(payload):
            raise ValueError("not a resume state")
        return payload
    except Exception as exc:  # torch raises several types for truncated or foreign files
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        logger.warning("%s is damaged (%s); moved to %s, starting the run again from its first epoch",
                       path, exc.__class__.__name__, aside.name)
        return None


def resumed_state(payload: dict[str, Any], best_key: str = "best") -> LoopState:
    """The :class:`LoopState` after the epoch a resume payload was written at; restores the RNG."""
    torch.set_rng_state(payload["torch_rng"])
    best = payload[best_key] if best_key in payload else payload["best"]
    return LoopState(int(payload["epoch"]) + 1, float(best), json.loads(payload["history_json"]))


def write_history(out_dir: Path, history: list[dict[str, Any]], plot: Callable[[list[dict[str, Any]], Path], None],
                  plot_name: str) -> None:
    """``metrics.csv`` (one row per epoch) and its plot, both written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0].keys()))
    writer.writeheader()
    writer.writerows(history)
    write_text(out_dir / METRICS, buffer.getvalue())
    plot(history, out_dir / plot_name)


def patience_exhausted(scores: list[float], patience: int, min_epochs: int = 0) -> bool:
    """Whether a run should stop: ``patience`` epochs have passed since its best score, and ``min_epochs`` are done.

    ``patience`` 0 never stops. The best is the first epoch reaching the maximum, as the
    checkpoint rule keeps it. ``min_epochs`` keeps a run going through the first epochs, whose
    selection scores rise and fall with the learning rate's warm start rather than with
    overfitting: a run that peaks at epoch 2 by chance would otherwise stop before it has learnt.
    """
    if patience <= 0 or len(scores) < max(1, min_epochs):
        return False
    best = max(range(len(scores)), key=lambda k: (scores[k], -k))
    return len(scores) - 1 - best >= patience


def run_epochs(state: LoopState, epochs: int, run_epoch: Callable[[int], EpochResult],
               save_best: Callable[[int, dict[str, Any]], None], save_state: Callable[[int, LoopState], None],
               write_metrics: Callable[[list[dict[str, Any]]], None],
               describe: Callable[[int, dict[str, Any], bool], str],
               should_stop: Callable[[list[dict[str, Any]]], bool] | None = None) -> LoopState:
    """Epochs ``state.start_epoch`` .. ``epochs - 1`` of the shared skeleton; returns the final state.

    Args:
        run_epoch: trains and validates epoch ``e`` (0-based), returns its row and score.
        save_best: writes the checkpoint of epoch ``e`` when it is the best so far.
        save_state: writes the resume state after epoch ``e``.
        write_metrics: writes the metrics of every epoch so far.
        describe: the log line of epoch ``e`` (its row; whether it was the best).
        should_stop: given the rows so far, whether to stop before ``epochs`` (early stopping;
            checked after every epoch and before the first, so a resumed run that had stopped stays stopped).
    """
    for epoch in range(state.start_epoch, epochs):
        if should_stop is not None and state.history and should_stop(state.history):
            logger.info(f"stopping after epoch {epoch}: no better selection score in the last epochs")
            break
        row, score = run_epoch(epoch)
        state.history.append(row)
        improved = score is None or score > state.best
        if improved:
            state.best = -math.inf if score is None else score
            save_best(epoch, row)
        write_metrics(state.history)
        state.start_epoch = epoch + 1
        save_state(epoch, state)
        logger.info(describe(epoch, row, improved))
    return state
