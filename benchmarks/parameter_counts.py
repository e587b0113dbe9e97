"""Parameter counts of every shipped model beside the figures its paper reports.

Counts the trainable retrieval model (word embedding, text encoder, image heads, attention
modules) for a vocabulary of a given size, plus the frozen backbone without its classifier, and
prints the paper's figure from the model config's ``reference.parameters_m`` (DOVE Table I for
DOVE, DOVE-S, VSE++, SCAN and AMFMN; DSAN and ACF report none).

    python benchmarks/parameter_counts.py [--vocab-json PATH | --vocab-size N] [--models a,b]
"""

from __future__ import annotations

import argparse

from rsitr.features import FeatureSpec, feature_dims
from rsitr.models import create_model, get_model_spec, list_models
from rsitr.models.registry import get_model_reference
from rsitr.text import Vocabulary
from rsitr_train.experiments import backbone_parameters


def feature_spec(spec) -> FeatureSpec:
    return FeatureSpec(backbone=spec.backbone, **spec.features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-json", help="AMFMN vocabulary json (sets the embedding size)")
    parser.add_argument("--vocab-size", type=int, default=2500, help="embedding rows when no json is given")
    parser.add_argument("--models", help="comma-separated names or YAML paths (default: every shipped model)")
    args = parser.parse_args()
    vocab_size = len(Vocabulary.load(args.vocab_json)) if args.vocab_json else args.vocab_size
    names = args.models.split(",") if args.models else list_models()
    print(f"vocabulary: {vocab_size} rows")
    print("| model | backbone | trainable (M) | frozen backbone (M) | total (M) | paper (M) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        spec = get_model_spec(name)
        model = create_model(spec, feature_dims(feature_spec(spec)), vocab_size)
        trainable = model.num_parameters()
        frozen = backbone_parameters(spec.backbone)
        try:
            paper = get_model_reference(name).get("parameters_m", "–")
        except Exception:
            paper = "–"
        print(f"| {spec.name} | {spec.backbone} | {trainable / 1e6:.2f} | {frozen / 1e6:.2f} "
              f"| {(trainable + frozen) / 1e6:.2f} | {paper} |")


if __name__ == "__main__":
    main()
