"""Validation accuracy of a pretrained backbone at several input sizes: which size to extract at.

Not a test: a check to run after ``rsitr pretrain`` and before ``rsitr features``. A backbone is
trained (and its BatchNorm statistics recalibrated) at one input size; used at another, the
objects it sees change scale and its activations leave the calibrated range. This script loads
``backbone.safetensors`` with its trained classifier, decodes the validation images at each
size (the same eval transform as pretraining: resize to ``size * 8/7``, centre crop ``size``)
and prints top-1 accuracy and loss per size, so the feature size can be chosen on validation
data instead of guessed.

    python benchmarks/backbone_sizes.py PRETRAIN_DIR DATASET [--sizes 112,128,160,224,256]

``PRETRAIN_DIR`` is an ``rsitr pretrain`` output folder; ``DATASET`` the data it was trained on.
``--val-split none`` scores the held-out share of train that ``rsitr pretrain --val-split none``
used (the retrieval runs' selection split); choose the size there, not on a split you report.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from rsitr.data.imagefolder import load_classification_data
from rsitr.data.images import decode_images
from rsitr.errors import ConfigError
from rsitr.io import load_tensors
from rsitr_train.pretrain import BACKBONE_FILE, BACKBONE_JSON, PretrainConfig, _Split, build_classifier, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pretrain_dir")
    parser.add_argument("dataset")
    parser.add_argument("--sizes", default="112,128,144,160,192,224,256")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--val-split", default="val", help="split to score; none = the held-out share of train")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out share with --val-split none")
    args = parser.parse_args()
    folder = Path(args.pretrain_dir)
    if not (folder / BACKBONE_JSON).is_file():
        raise ConfigError(f"{folder}: no {BACKBONE_JSON}; give an rsitr pretrain output folder")
    description = json.loads((folder / BACKBONE_JSON).read_text(encoding="utf-8"))
    data = load_classification_data(args.dataset, val_fraction=args.val_fraction,
                                    val_split=None if args.val_split.lower() == "none" else args.val_split)
    if list(data.classes) != description["classes"]:
        raise ConfigError(f"{args.dataset}: its classes differ from those {folder} was trained on")
    config = PretrainConfig(backbone=description["backbone"], image_size=description["image_size"],
                            precision=args.precision)
    model = build_classifier(config, len(data.classes))
    model.load_state_dict(load_tensors(folder / BACKBONE_FILE))
    model = model.to(memory_format=torch.channels_last)
    labels = torch.tensor(data.val_labels)
    print(f"{folder} ({description['backbone']}, trained at {description['image_size']} px, epoch {description['epoch']}), "
          f"{len(labels)} validation images")
    print("| input size | top-1 accuracy | loss |")
    print("|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        sized = replace(config, image_size=size)
        images = decode_images(data.val_paths, sized.decode_size, progress=False)
        result = evaluate(model, _Split(images, labels), sized, len(data.classes))
        print(f"| {size} | {100 * result['val_acc']:.2f} % | {result['val_loss']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
