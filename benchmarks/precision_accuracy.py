"""Does bfloat16 change retrieval accuracy? A trained run evaluated in every precision combination.

Not a test: a check on real data that the bf16 paths lose nothing that matters. For a run trained
on cached (frozen-backbone) features, the split is evaluated with

    features extracted in fp32 or bf16 autocast   x   model encoding and scoring in fp32 or bf16

and the script prints, per combination, the six recalls, mR, the time of scoring, and the largest
absolute difference of the similarity matrix from the all-fp32 one. Both caches are kept in the
run's cache folder (the precision is part of the cache key), so a second call is fast. For an
end-to-end run the backbone's precision follows the model's, so only two rows are printed.

    python benchmarks/precision_accuracy.py RUN_DIR [--split val]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from rsitr.evaluation import chance_metrics, format_table
from rsitr.features import extract_features
from rsitr_train.runs import load_run
from rsitr_train.trainer import Prepared, evaluate_split

PRECISIONS = ("fp32", "bf16")


def with_feature_precision(prepared: Prepared, precision: str) -> Prepared:
    """``prepared`` whose cached features were extracted with the backbone in ``precision``."""
    spec = replace(prepared.feature_spec, precision=precision)
    cache_dir = Path(prepared.config.features.cache_dir)
    features = extract_features(prepared.dataset, spec, cache_dir, batch_size=prepared.config.features.batch_size)
    return replace(prepared, features=features, feature_spec=spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    model, prepared = load_run(args.run_dir, progress=False)
    end_to_end = prepared.backbone is not None
    feature_precisions = ("(run's backbone)",) if end_to_end else PRECISIONS
    rows, reference, chance = [], None, None
    for feature_precision in feature_precisions:
        variant = prepared if end_to_end else with_feature_precision(prepared, feature_precision)
        for model_precision in PRECISIONS:
            started = time.perf_counter()
            metrics, sims, data = evaluate_split(model, variant, args.split, progress=False,
                                                 precision=model_precision)
            seconds = time.perf_counter() - started
            reference = sims if reference is None else reference
            chance = chance or chance_metrics(len(data.image_ids), data.caption_local_image)
            rows.append((feature_precision, model_precision, metrics, seconds, float((sims - reference).abs().max())))
    print(f"{args.run_dir}, {args.split} split")
    print("| features | model | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | mR | seconds | max abs sim diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR")
    for feature_precision, model_precision, metrics, seconds, diff in rows:
        recalls = " | ".join(f"{metrics[k]:.2f}" for k in keys)
        print(f"| {feature_precision} | {model_precision} | {recalls} | {seconds:.2f} | {diff:.4f} |")
    print(format_table(rows[0][2], chance, title="fp32 reference against chance"))


if __name__ == "__main__":
    main()
