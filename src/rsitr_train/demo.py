"""``rsitr demo``: the embedded default job, from nothing to a test-split result in minutes.

Synthetic data (:func:`rsitr.data.synth.generate_synthetic`: 1000 drawn top-down scenes with
grounded captions and the true object boxes as a detections file) → cached ResNet-18 features →
DOVE-S trained with the shipped ``demo`` recipe, the best epoch chosen on val → evaluated on test.
Every stage is reused or resumed when the command runs again on the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rsitr.data.synth import generate_synthetic
from rsitr_train.config import load_config
from rsitr_train.runs import evaluate_run
from rsitr_train.trainer import train

DATA_FILE = "dataset_synth.json"


def run_demo(out: Path, num_images: int = 1000, epochs: int | None = None,
             progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the demo in ``out`` (``data/``, ``cache/``, ``run/``); returns (training summary, test result)."""
    data_dir = out / "data"
    if not (data_dir / DATA_FILE).is_file():
        generate_synthetic(data_dir, num_images=num_images, image_size=128, seed=0, progress=progress)
    overrides = [f"data.path={json.dumps(str(data_dir / DATA_FILE))}",
                 f"features.detections={json.dumps(str(data_dir / 'detections.json'))}",
                 f"features.cache_dir={json.dumps(str(out / 'cache'))}"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    config = load_config("demo", overrides)
    run_dir = out / "run"
    summary = train(config, run_dir, progress=progress)
    result = evaluate_run(run_dir, "test", None, progress=progress)
    return summary, result
