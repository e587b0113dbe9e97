"""How far the tie rule can move and does move a table, on real caption sets and trained runs.

rsitr ranks a true item after every wrong item with an equal score; the field's reference code
orders equal scores by ``np.argsort``. Equal scores arise when two captions of *different* images
have the same words (after tokenising: case and punctuation do not count): against any image they
score exactly the same, so an image query may see another image's copy of its own sentence tie with
its own caption. Text-to-image ranks are not affected (the candidates are different images).

Two parts:

* ``--datasets PATH ...``: per caption set (its report split), how many captions share their exact
  text with a caption of another image, and the share of image queries that *can* be affected:
  those with at least one such caption. That share bounds how many i2t queries can change rank,
  whatever the model.
* ``--runs RUN_DIR ...``: per trained run, mR under both rules on ``--split`` (its report split).

    python benchmarks/tie_rule.py --datasets DATA/rsicd DATA/rsitmd DATA/nwpu DATA/sydney DATA/ucm_captions \
        --runs RUN_DIR ... --split val
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from rsitr.data import load_dataset
from rsitr.data.tokenized import split_data
from rsitr.text import Vocabulary


def report_split(splits: list[str]) -> str:
    """The split a table reports: test when there is one, else val."""
    return "test" if "test" in splits else "val"


def caption_set_ties(path: str) -> dict[str, object]:
    """Shared-text statistics of the report split of the dataset at ``path``."""
    dataset = load_dataset(path)
    split = report_split(dataset.splits())
    vocab = Vocabulary.build(dataset.split(split).captions)
    data = split_data(dataset, split, vocab, max_length=48)
    images_of_text: dict[int, set[int]] = defaultdict(set)
    for text, image in zip(data.text_ids.tolist(), data.caption_local_image.tolist(), strict=True):
        images_of_text[text].add(image)
    shared = np.array([len(images_of_text[t]) > 1 for t in data.text_ids.tolist()])
    affected = np.unique(data.caption_local_image[shared])
    n_images = len(data.image_ids)
    return {"dataset": dataset.name, "split": split, "images": n_images, "captions": len(shared),
            "distinct_texts": len(images_of_text), "captions_sharing_text": int(shared.sum()),
            "images_that_can_change": int(len(affected)), "share_of_i2t_queries": 100.0 * len(affected) / n_images}


def run_ties(run_dir: str, split: str) -> dict[str, object]:
    """mR of a trained run on ``split`` under the strict and the reference tie rule."""
    from rsitr_train.runs import evaluate_run

    result = evaluate_run(run_dir, split, json_path=None, progress=False)
    ours, reference = result["metrics"], result["metrics_reference_ties"]
    return {"run": run_dir, "split": split, "mR": ours["mR"], "mR_reference": reference["mR"],
            "i2t_r1": ours["i2t_r1"], "i2t_r1_reference": reference["i2t_r1"],
            "distinct_texts": result["n_distinct_texts"], "captions": result["n_captions"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=[])
    parser.add_argument("--runs", nargs="*", default=[])
    parser.add_argument("--split", default="val", help="split the runs are evaluated on (their report split)")
    args = parser.parse_args()
    if args.datasets:
        print("| dataset | split | images | captions | distinct texts | captions sharing their text with another "
              "image | i2t queries that can change (%) |")
        print("|---|---|---|---|---|---|---|")
        for path in args.datasets:
            row = caption_set_ties(path)
            print(f"| {row['dataset']} | {row['split']} | {row['images']} | {row['captions']} | {row['distinct_texts']} | "
                  f"{row['captions_sharing_text']} | {row['images_that_can_change']} ({row['share_of_i2t_queries']:.1f}) |")
    if args.runs:
        print("\n| run | split | mR (ours) | mR (reference order) | difference | i2t R@1 (ours) | i2t R@1 (reference) |")
        print("|---|---|---|---|---|---|---|")
        for run in args.runs:
            row = run_ties(run, args.split)
            print(f"| {row['run']} | {row['split']} | {row['mR']:.2f} | {row['mR_reference']:.2f} | "
                  f"{row['mR_reference'] - row['mR']:+.2f} | {row['i2t_r1']:.2f} | {row['i2t_r1_reference']:.2f} |")


if __name__ == "__main__":
    main()
