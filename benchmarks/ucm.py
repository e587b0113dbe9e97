"""The whole real pipeline on a UCM-Captions folder, with the time of every stage.

    pretrain a backbone on the scene labels of the train split  (rsitr pretrain)
    optionally fine-tune it at a larger size                     (rsitr pretrain --init-weights)
    extract and cache its features for every image             (rsitr features)
    train DOVE on the cached features, one run per seed,        (rsitr train)
      best epoch on the selection split carved out of train
    evaluate each run on val (fp32 and bf16), and on test when the folder has a test split

No external weights are used: the backbone learns the 21 UC Merced scene classes from the
training images only (the class of an image comes from its number), so nothing of val or test is
seen before evaluation. UCM-Captions has train and val only, so both the pretraining's best epoch
and DOVE's are chosen on the same held-out 10 % of each class of train (the ``dove_ucm`` recipe's
``selection_fraction``; :mod:`rsitr.data.splits`), and val is only ever reported. A script, not a
test: it takes tens of minutes on a 2-core CPU.

    python benchmarks/ucm.py [--dataset ../shared/data/ucm_captions] [--out runs/ucm-pipeline]
                             [--backbone resnet18] [--pretrain-epochs 150] [--pretrain-size 128]
                             [--cutmix 0.5] [--weight-decay 5e-4] [--finetune-size 0]
                             [--image-size SIZE] [--epochs 6] [--seed 0] [--seeds 3]

The defaults are the recipe ``pretrain_ucm_r18`` (``src/rsitr_train/configs/``): 150 epochs at 128 px, where an
epoch costs about a third of one at 224 px. Features are extracted at the size the backbone was
trained at last (the pretraining size, or ``--finetune-size`` when fine-tuning), because a
backbone used at another size than it was trained and BatchNorm-calibrated at loses accuracy;
``--image-size`` overrides it.

Every stage writes into ``--out`` and resumes: running the script again continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rsitr.data.imagefolder import load_classification_data
from rsitr.errors import ConfigError
from rsitr.evaluation import chance_metrics, class_oracle_metrics, format_table
from rsitr.io import write_json
from rsitr_train.config import load_config
from rsitr_train.experiments import SELECTION_FRACTION
from rsitr_train.pretrain import PretrainConfig, pretrain
from rsitr_train.runs import load_run
from rsitr_train.trainer import evaluate_split, feature_spec, prepare, train

DEFAULT_DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ucm_captions"


def stage(name: str, timings: dict[str, float]):
    """Context manager that records the wall time of a stage and prints it."""

    class _Stage:
        def __enter__(self):
            self.start = time.perf_counter()
            print(f"== {name}", flush=True)

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.start, 1)
            print(f"== {name}: {timings[name]:.1f} s", flush=True)

    return _Stage()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET), help="UCM-Captions folder (Karpathy layout)")
    parser.add_argument("--out", default="runs/ucm-pipeline")
    parser.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--model", default=None, help="retrieval model (default: dove-s for resnet18, dove for resnet50)")
    parser.add_argument("--pretrain-epochs", type=int, default=150)
    parser.add_argument("--pretrain-size", type=int, default=128)
    parser.add_argument("--pretrain-lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--cutmix", type=float, default=0.5, help="probability that a pretraining batch is CutMixed")
    parser.add_argument("--finetune-size", type=int, default=0, help="fine-tune the backbone at this size (0: no)")
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--finetune-lr", type=float, default=0.005)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed and the first retrieval seed")
    parser.add_argument("--seeds", type=int, default=3, help="retrieval runs, with seeds seed .. seed+seeds-1")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="pretraining and features")
    parser.add_argument("--train-precision", default="fp32", choices=["fp32", "bf16"], help="retrieval training")
    parser.add_argument("--image-size", type=int, default=0,
                        help="retrieval feature size (0: the size the backbone was trained at last)")
    return parser.parse_args()


def pretrain_stages(args: argparse.Namespace, out: Path, timings: dict[str, float]) -> tuple[Path, dict]:
    """Pretrain (and optionally fine-tune) the backbone; the weights file and a summary per stage."""
    # held out: the retrieval runs' selection split (same share of each class, split seed 0)
    data = load_classification_data(args.dataset, val_split=None, val_fraction=SELECTION_FRACTION, seed=0)
    print(data.summary())
    config = PretrainConfig(backbone=args.backbone, image_size=args.pretrain_size, epochs=args.pretrain_epochs,
                            lr=args.pretrain_lr, weight_decay=args.weight_decay, cutmix=args.cutmix,
                            seed=args.seed, precision=args.precision)
    summaries = {}
    with stage("pretrain", timings):
        summaries["pretrain"] = pretrain(config, data, out / "pretrain")
    weights = out / "pretrain" / "backbone.safetensors"
    if args.finetune_size:
        finetune = PretrainConfig(backbone=args.backbone, image_size=args.finetune_size, epochs=args.finetune_epochs,
                                  lr=args.finetune_lr, warmup_epochs=1.0, weight_decay=args.weight_decay,
                                  cutmix=args.cutmix, seed=args.seed, precision=args.precision,
                                  init_weights=str(weights))
        with stage("finetune", timings):
            summaries["finetune"] = pretrain(finetune, data, out / f"finetune{args.finetune_size}")
        weights = out / f"finetune{args.finetune_size}" / "backbone.safetensors"
    for name, summary in summaries.items():
        print(f"{name}: best val accuracy {summary['best_val_acc']:.4f} at epoch {summary['best_epoch']}")
    return weights, summaries


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std) of a list, or the single value."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    args = parse_args()
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    out = Path(args.out)
    model = args.model or ("dove-s" if args.backbone == "resnet18" else "dove")
    timings: dict[str, float] = {}
    weights, summaries = pretrain_stages(args, out, timings)
    image_size = args.image_size or args.finetune_size or args.pretrain_size
    report: dict = {"args": vars(args), "timings_s": timings, **summaries, "runs": {}}
    for k in range(args.seeds):
        seed = args.seed + k
        run_config = load_config("dove_ucm", [
            f"data.selection_fraction={SELECTION_FRACTION}", "data.split_seed=0",
            f"data.path={json.dumps(str(args.dataset))}", f"model.name={model}",
            f"features.backbone_weights={json.dumps(str(weights))}", f"features.precision={args.precision}",
            f"features.cache_dir={json.dumps(str(out / 'cache'))}", f"features.image_size={image_size}",
            f"train.epochs={args.epochs}", f"train.seed={seed}", f"train.precision={args.train_precision}",
        ])
        if k == 0:
            with stage("features", timings):
                prepared = prepare(run_config, progress=True)
                print(f"{prepared.features.num_images} images cached ({feature_spec(run_config, prepared.spec).backbone})")
        run_dir = out / f"run-seed{seed}"
        with stage(f"train seed {seed}", timings):
            result = train(run_config, run_dir)
        print(f"seed {seed}: best val mR {result['best_val_mR']:.2f} at epoch {result['best_epoch']}")
        trained, prepared = load_run(run_dir, progress=False)
        entry = {"train": result}
        for split in ("val", "test"):
            if split not in prepared.dataset.splits():
                continue
            for precision in ("fp32", "bf16"):
                with stage(f"evaluate {split} {precision} seed {seed}", timings):
                    metrics, _, split_data = evaluate_split(trained, prepared, split, progress=False,
                                                            precision=precision)
                entry[f"{split}_{precision}"] = metrics
            chance = chance_metrics(len(split_data.image_ids), split_data.caption_local_image)
            print(format_table(entry[f"{split}_fp32"], chance, title=f"{Path(args.dataset).name} {split}, seed {seed}"))
            entry[f"{split}_chance"] = chance
            labels = prepared.dataset.scene_labels
            if labels is not None:
                oracle = class_oracle_metrics([labels[i] for i in split_data.image_ids.tolist()],
                                              split_data.caption_local_image)
                recalls = ", ".join(f"{key} {oracle[key]:.2f}" for key in
                                    ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"))
                print(f"scene-class oracle (knows each item's class, nothing more): {recalls}, mR {oracle['mR']:.2f}")
                entry[f"{split}_class_oracle"] = oracle
        report["runs"][seed] = entry
        write_json(out / "pipeline.json", report)
    for key in sorted({k for entry in report["runs"].values() for k in entry if k.endswith(("_fp32", "_bf16"))}):
        values = [entry[key]["mR"] for entry in report["runs"].values()]
        print(f"{key} mR over {len(values)} seed(s): {mean_std(values)}")
    print(json.dumps(timings, indent=2))
    write_json(out / "pipeline.json", report)


if __name__ == "__main__":
    main()
