"""One device against another on the same run: training speed, the metrics, and a cross-device evaluation.

The prepared check for a machine with a GPU (it runs on a CPU-only machine too, comparing the CPU
with itself). On the embedded synthetic dataset, the demo recipe (DOVE-S, seeded random ResNet-18,
128 px) trains once on each device with the same seed; then:

* seconds per epoch on each device, and their ratio;
* the test metrics of each run (the same seed on two devices: floating-point sums in another order,
  so close, not bit-identical);
* the run trained on the second device evaluated on the first (a GPU-trained run on the CPU), which
  must give the metrics that run gave on its own device, up to the same rounding.

::

    python benchmarks/device_check.py --devices cpu,cuda --out runs/device-check

Writes ``device_check.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from rsitr.data.synth import generate_synthetic
from rsitr.io import write_json
from rsitr_train.config import load_config
from rsitr_train.runs import evaluate_run
from rsitr_train.trainer import train


def _train_on(device: str, data: Path, out: Path, epochs: int, slot: int) -> dict:
    config = load_config("demo", [f"data.path={json.dumps(str(data / 'dataset_synth.json'))}",
                                  f"features.detections={json.dumps(str(data / 'detections.json'))}",
                                  f"features.cache_dir={json.dumps(str(out / ('cache-' + device.replace(':', '-'))))}",
                                  f"train.epochs={epochs}"])
    run = out / f"run{slot}-{device.replace(':', '-')}"
    summary = train(config, run, progress=False, device=device)
    result = evaluate_run(run, "test", None, progress=False, device=device)
    return {"run": str(run), "seconds_per_epoch": summary.get("seconds_per_epoch"), "test": result["metrics"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="cpu,cuda", help="two devices, comma-separated (the first evaluates the second's run)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default="runs/device-check")
    args = parser.parse_args()
    first, second = args.devices.split(",")
    out = Path(args.out)
    data = out / "data"
    if not (data / "dataset_synth.json").is_file():
        generate_synthetic(data, num_images=args.images, image_size=128, seed=0, progress=False)
    runs = {f"{slot}:{device}": _train_on(device, data, out, args.epochs, slot) for slot, device in enumerate((first, second))}
    one, two = runs[f"0:{first}"], runs[f"1:{second}"]
    across = evaluate_run(two["run"], "test", None, progress=False, device=first)["metrics"]
    record = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "runs": runs, "speed_ratio": one["seconds_per_epoch"] / two["seconds_per_epoch"],
              f"{second}_run_evaluated_on_{first}": across,
              "mR_difference_across_devices": across["mR"] - two["test"]["mR"],
              "mR_difference_between_devices": two["test"]["mR"] - one["test"]["mR"]}
    write_json(out / "device_check.json", record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
