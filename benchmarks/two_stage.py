"""The accuracy cost of two-stage retrieval against exhaustive pairwise scoring, on trained runs.

Per run directory of ``rsitr train`` (one per seed), on ``--split``: the exhaustive full score
matrix (exactly as ``rsitr evaluate`` computes it: each image and each distinct caption input
encoded once, in the evaluation's fixed chunks) and, from the *same* encodings, the first-stage
matrix: inner products of the unit embeddings of :meth:`rsitr.bundle.RetrievalBundle.first_stage`
(for DOVE the global pair V_M / T_G). Then the metrics of :mod:`rsitr_serve.two_stage` per depth:
the first stage alone (depth 0: no re-ranking), the first ``depth`` candidates re-scored by the
full score, and exhaustive scoring; mean ± sample std over the runs of each metric and of its
difference to exhaustive (per run, then averaged).

Ties (``--ties``): ``strict`` (default) scores the two-stage result under the strict tie rule of
the headline metrics, so depth ≥ the number of items is exactly the exhaustive result even on
caption sets whose captions repeat; ``order`` scores the exact order a search returns, ties
broken by index (see :mod:`rsitr_serve.two_stage`).

Honesty: ``--split`` must not be a run's selection split (its config's ``data.val_split``, on
which its checkpoint was chosen); the script refuses it.

    python benchmarks/two_stage.py --runs runs/testscore-ucm/cos_V_MR_T_RG/seed0 \
        runs/testscore-ucm/cos_V_MR_T_RG/seed1 runs/testscore-ucm/cos_V_MR_T_RG/seed2 --split val \
        --out runs/two-stage/ucm.md
    python benchmarks/two_stage.py --runs runs/bench-synth/dove-s/seed0 runs/bench-synth/dove-s/seed1 --split test
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rsitr.bundle import load_model
from rsitr.data.tokenized import SplitData, split_data
from rsitr.errors import CheckpointError, ConfigError, DatasetError
from rsitr.evaluation import encode_image_chunks, encode_text_chunks, recall_metrics, score_encodings
from rsitr.io import write_json, write_text
from rsitr.progress import progress_bar
from rsitr.text import distinct_rows
from rsitr_serve.two_stage import TIE_VIEWS, two_stage_metrics
from rsitr_train.runs import load_run
from rsitr_train.trainer import split_image_features

DEFAULT_DEPTHS = (0, 20, 50, 100, 200)
#: Reported metrics: key → column heading.
COLUMNS = {"mR": "mR", "t2i_r1": "t2i R@1", "t2i_r5": "t2i R@5", "t2i_r10": "t2i R@10", "i2t_r10": "i2t R@10"}
EXHAUSTIVE = "exhaustive"


@dataclass
class RunScores:
    """The two score matrices of one run on one split, (n_images, n_captions) each."""

    run: str
    selection_split: str
    first: torch.Tensor
    full: torch.Tensor
    image_of_caption: Any  # (n_captions,) np.ndarray: index into the split's images


def score_matrices(run_dir: str, split: str, dataset: str | None = None) -> RunScores:
    """First-stage and exhaustive full scores of a run on ``split``, from one encoding of each side.

    The full matrix is :func:`rsitr.evaluation.compute_similarity`'s, with the encodings kept so
    the first stage reuses them: features are read (or computed) once.
    """
    model, prepared = load_run(run_dir, progress=False, dataset=dataset)
    selection = prepared.config.data.val_split
    if split == selection:
        raise ConfigError(f"{run_dir}: the checkpoint was selected on split {split!r} (data.val_split in its config.yaml); "
                          "report another split")
    precision = prepared.config.train.precision
    data = split_data(prepared.dataset, split, prepared.vocab, prepared.config.text.max_length, model.text_inputs)
    images = encode_image_chunks(model, split_image_features(prepared, data.image_ids, precision, progress=False), precision)
    texts, inverse = _distinct_text_encodings(model, data, precision)
    full = score_encodings(model, images, texts, precision)[:, inverse]
    image_keys, text_keys = load_model(run_dir).first_stage(images, texts)  # the bundle's rule, not a copy of it
    first = (image_keys @ text_keys.T)[:, inverse]
    return RunScores(run=str(run_dir), selection_split=selection, first=first, full=full,
                     image_of_caption=data.caption_local_image)


def _distinct_text_encodings(model: Any, data: SplitData, precision: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Encodings of each distinct caption input once, and the map from captions to them."""
    first_rows, inverse = distinct_rows(data.tokens, data.lengths, data.extras)
    extras = {name: value[first_rows] for name, value in data.extras.items()}
    return encode_text_chunks(model, data.tokens[first_rows], data.lengths[first_rows], extras, precision), inverse


def depth_label(depth: int) -> str:
    """Row name of a depth: 0 is the first stage alone."""
    return "first stage only" if depth == 0 else f"re-rank top {depth}"


def run_metrics(scores: RunScores, depths: list[int], ties: str) -> dict[str, dict[str, float]]:
    """Metrics of one run per depth label, plus the exhaustive full score."""
    out = {EXHAUSTIVE: recall_metrics(scores.full, scores.image_of_caption)}
    for depth in depths:
        out[depth_label(depth)] = (recall_metrics(scores.first, scores.image_of_caption) if depth == 0 else
                                   two_stage_metrics(scores.first, scores.full, scores.image_of_caption, depth, ties))
    return out


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std) over runs, or the single value."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summary_table(per_run: list[dict[str, dict[str, float]]], rows: list[str]) -> str:
    """Markdown table: per row each metric and its difference to exhaustive, mean ± std over runs."""
    head = "| | " + " | ".join(f"{name} | Δ {name}" for name in COLUMNS.values()) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(COLUMNS))]
    for row in rows:
        cells = []
        for key in COLUMNS:
            values = [run[row][key] for run in per_run]
            cells += [mean_std(values), mean_std([run[row][key] - run[EXHAUSTIVE][key] for run in per_run])]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(all_scores: list[RunScores], per_run: list[dict[str, dict[str, float]]], split: str, depths: list[int],
           ties: str) -> str:
    """The Markdown report: what was measured, then the table."""
    n_images, n_captions = all_scores[0].full.shape
    saturated = [d for d in depths if d >= n_images]
    note = (f" Depth ≥ {n_images} re-ranks every image, so t2i at depth {', '.join(map(str, saturated))} is exhaustive."
            if saturated else "")
    note += f" A t2i query ranks {n_images} images, an i2t query {n_captions} captions."
    header = (f"Two-stage retrieval vs exhaustive scoring on split `{split}` ({n_images} images, {n_captions} captions), "
              f"{len(all_scores)} run(s), selected on `{all_scores[0].selection_split}`; tie view `{ties}`. "
              f"Δ = two-stage − exhaustive per run; mean ± sample std over runs.{note}")
    runs = "Runs: " + ", ".join(f"`{s.run}`" for s in all_scores)
    rows = [depth_label(d) for d in depths] + [EXHAUSTIVE]
    return "\n\n".join([header, runs, summary_table(per_run, rows)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run directories of rsitr train (one per seed)")
    parser.add_argument("--split", required=True, help="the split to report: never the runs' selection split")
    parser.add_argument("--depths", nargs="+", type=int, default=list(DEFAULT_DEPTHS),
                        help="candidates re-scored per query; 0 = the first stage alone")
    parser.add_argument("--ties", choices=TIE_VIEWS, default="strict")
    parser.add_argument("--dataset", default=None, help="the dataset's path when it has moved since training")
    parser.add_argument("--out", type=Path, default=None, help="write the table to this .md file and the numbers beside it (.json)")
    args = parser.parse_args()
    if any(depth < 0 for depth in args.depths):
        parser.error("depths must be 0 (first stage only) or positive")
    torch.set_num_threads(1)
    try:
        all_scores = [score_matrices(run_dir, args.split, args.dataset)
                      for run_dir in progress_bar(args.runs, desc="runs", unit="run")]
    except (ConfigError, CheckpointError, DatasetError) as exc:
        parser.exit(2, f"error: {exc}\n")
    shapes = {tuple(s.full.shape) for s in all_scores}
    if len(shapes) > 1:
        parser.exit(2, f"error: the runs' {args.split!r} splits differ in size ({sorted(shapes)}): average runs of one split only\n")
    per_run = [run_metrics(scores, args.depths, args.ties) for scores in all_scores]
    text = report(all_scores, per_run, args.split, args.depths, args.ties)
    print(text)
    if args.out is not None:
        write_text(args.out, text)
        write_json(args.out.with_suffix(".json"), {
            "split": args.split, "depths": args.depths, "ties": args.ties,
            "n_images": int(all_scores[0].full.shape[0]), "n_captions": int(all_scores[0].full.shape[1]),
            "runs": [{"run": s.run, "selection_split": s.selection_split, "metrics": m}
                     for s, m in zip(all_scores, per_run, strict=True)],
        })


if __name__ == "__main__":
    main()
