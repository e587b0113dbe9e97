"""Parameter counts of DOVE (ResNet-50) and DOVE-S (ResNet-18) beside the paper's Table I.

Counts the trainable retrieval model (word embedding, BiGRU, DTGA, MSV/region heads, IFA, IGA)
for a vocabulary of a given size, plus the frozen backbone without its classifier.

    python benchmarks/parameter_counts.py [--vocab-json PATH | --vocab-size N]
"""

from __future__ import annotations

import argparse

from rsitr.backbones import create_backbone
from rsitr.features import FeatureSpec, feature_dims
from rsitr.models import create_model, get_model_spec
from rsitr.text import Vocabulary

PAPER_MILLIONS = {"dove": 38, "dove-s": 25}


def backbone_parameters(name: str) -> int:
    backbone = create_backbone(name)
    return sum(p.numel() for n, p in backbone.named_parameters() if not n.startswith("fc."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-json", help="AMFMN vocabulary json (sets the embedding size)")
    parser.add_argument("--vocab-size", type=int, default=2500, help="embedding rows when no json is given")
    args = parser.parse_args()
    vocab_size = len(Vocabulary.load(args.vocab_json)) if args.vocab_json else args.vocab_size
    print(f"vocabulary: {vocab_size} rows")
    print("| model | backbone | trainable (M) | frozen backbone (M) | total (M) | paper (M) |")
    print("|---|---|---|---|---|---|")
    for name in ("dove", "dove-s"):
        spec = get_model_spec(name)
        model = create_model(spec, feature_dims(FeatureSpec(backbone=spec.backbone)), vocab_size)
        trainable = model.num_parameters()
        frozen = backbone_parameters(spec.backbone)
        print(f"| {name} | {spec.backbone} | {trainable / 1e6:.2f} | {frozen / 1e6:.2f} | {(trainable + frozen) / 1e6:.2f} | {PAPER_MILLIONS[name]} |")


if __name__ == "__main__":
    main()
