"""The whole real pipeline on a UCM-Captions folder, with the time of every stage.

    pretrain a backbone on the scene labels of the train split  (rsitr pretrain)
    extract and cache its features for every image             (rsitr features)
    train DOVE on the cached features, best epoch on val        (rsitr train)
    evaluate on val, and on test when the folder has a test split

No external weights are used: the backbone learns the 21 UC Merced scene classes from the
training images only (the class of an image comes from its number), so nothing of val or test is
seen before evaluation. A script, not a test: it takes tens of minutes on a 2-core CPU.

    python benchmarks/ucm.py [--dataset ../shared/data/ucm_captions] [--out runs/ucm-pipeline]
                             [--backbone resnet18] [--pretrain-epochs 30] [--epochs 20] [--seed 0]

Every stage writes into ``--out`` and resumes: running the script again continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rsitr.config import load_config
from rsitr.data.imagefolder import load_classification_data
from rsitr.evaluation import chance_metrics, format_table
from rsitr.io import write_json
from rsitr.pretrain import PretrainConfig, pretrain
from rsitr.training import evaluate_split, feature_spec, load_run, prepare, train

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET), help="UCM-Captions folder (Karpathy layout)")
    parser.add_argument("--out", default="runs/ucm-pipeline")
    parser.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--model", default=None, help="retrieval model (default: dove-s for resnet18, dove for resnet50)")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--pretrain-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--image-size", type=int, default=256, help="retrieval feature size (the paper: 256)")
    args = parser.parse_args()
    out = Path(args.out)
    model = args.model or ("dove-s" if args.backbone == "resnet18" else "dove")
    timings: dict[str, float] = {}

    with stage("pretrain", timings):
        data = load_classification_data(args.dataset, seed=args.seed)
        print(data.summary())
        config = PretrainConfig(backbone=args.backbone, image_size=args.pretrain_size, epochs=args.pretrain_epochs,
                                seed=args.seed, precision=args.precision)
        summary = pretrain(config, data, out / "pretrain")
        print(f"best val accuracy {summary['best_val_acc']:.4f} at epoch {summary['best_epoch']}")
    weights = out / "pretrain" / "backbone.safetensors"

    run_config = load_config(Path(__file__).resolve().parents[1] / "configs" / "dove_ucm.yaml", [
        f"data.path={json.dumps(str(args.dataset))}", f"model.name={model}", f"features.backbone_weights={json.dumps(str(weights))}",
        f"features.precision={args.precision}", f"features.cache_dir={json.dumps(str(out / 'cache'))}",
        f"features.image_size={args.image_size}", f"train.epochs={args.epochs}", f"train.seed={args.seed}",
    ])
    with stage("features", timings):
        prepared = prepare(run_config, progress=True)
        print(f"{prepared.features.num_images} images cached ({feature_spec(run_config, prepared.spec).backbone})")
    with stage("train", timings):
        result = train(run_config, out / "run")
        print(f"best val mR {result['best_val_mR']:.2f} at epoch {result['best_epoch']}")
    trained, prepared = load_run(out / "run", progress=False)
    report = {"timings_s": timings, "pretrain": summary, "train": result}
    for split in ("val", "test"):
        if split not in prepared.dataset.splits():
            continue
        with stage(f"evaluate {split}", timings):
            metrics, _, split_data = evaluate_split(trained, prepared, split, 256, progress=False)
        chance = chance_metrics(len(split_data.image_ids), split_data.caption_local_image)
        print(format_table(metrics, chance, title=f"UCM-Captions {split}"))
        report[split] = metrics
    print(json.dumps(timings, indent=2))
    write_json(out / "pipeline.json", report)


if __name__ == "__main__":
    main()
