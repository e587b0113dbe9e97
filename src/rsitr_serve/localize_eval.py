"""``rsitr localize-eval``: the SeLo metrics of a model on annotations in the ``anno.json`` format.

Every image is tiled and encoded once (:func:`rsitr_serve.localize.localize` with all of its captions),
each caption's heat map is scored against its polygons with
:func:`rsitr.localization_metrics.selo_metrics` (prob = heat / 255), and the report holds the
metrics of every sample, their means and standard deviations over the samples, and where the time
went (the stages of :mod:`rsitr_serve.localize`, plus the metrics themselves).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rsitr.bundle import RetrievalBundle
from rsitr.errors import ConfigError
from rsitr.io import check_writable, save_image
from rsitr.localization_metrics import LocalizationSample, average_metrics, prob_from_heat, read_annotations, selo_metrics
from rsitr_serve.localize import DEFAULT_BLUR, DEFAULT_SIZES, StageTimes, localize

REPORTED = ("rsu", "ras", "rda", "rmi")


def _by_image(samples: Sequence[LocalizationSample]) -> dict[str, list[int]]:
    """Sample indices per image name, images in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(sample.image, []).append(index)
    return groups


def _image_paths(groups: dict[str, list[int]], image_dir: Path, anno_json: str | Path) -> dict[str, Path]:
    """Each annotated image's path; one line naming the first missing one (and how many are missing)."""
    paths = {name: image_dir / name for name in groups}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise ConfigError(f"{image_dir / missing[0]}: image of {anno_json} not found "
                          f"({len(missing)} of {len(paths)} annotated images are missing from {image_dir})")
    return paths


def _save_heat(folder: Path, index: int, name: str, heat: Any) -> None:
    save_image(folder / f"{index:03d}_{Path(name).stem}.heat.png", heat)


def evaluate_localization(bundle: RetrievalBundle, anno_json: str | Path, image_dir: str | Path,
                          sizes: Sequence[int] = DEFAULT_SIZES, blur: int = DEFAULT_BLUR, batch_size: int = 64,
                          maps_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """The SeLo report of ``bundle`` on ``anno_json`` (images in ``image_dir``): per sample, mean, std, times."""
    started = time.perf_counter()
    samples = read_annotations(anno_json)
    groups = _by_image(samples)
    paths = _image_paths(groups, Path(image_dir), anno_json)
    maps = None if maps_dir is None else check_writable(maps_dir, "heat-map folder")
    times = StageTimes()
    metric_seconds = 0.0
    rows: list[dict[str, Any] | None] = [None] * len(samples)
    for name, indices in groups.items():
        result = localize(bundle, paths[name], [samples[i].caption for i in indices], sizes=sizes, blur=blur,
                          batch_size=batch_size, progress=progress)
        times.add(result.times)
        for k, index in enumerate(indices):
            tick = time.perf_counter()
            metrics = selo_metrics(prob_from_heat(result.heat[k]), samples[index].polygons)
            metric_seconds += time.perf_counter() - tick
            rows[index] = {"index": index, "image": name, "caption": samples[index].caption.strip(),
                           "width": result.width, "height": result.height, **metrics}
            if maps is not None:
                _save_heat(maps, index, name, result.heat[k])
    per_sample = [row for row in rows if row is not None]
    mean = average_metrics([{key: row[key] for key in REPORTED} for row in per_sample])
    seconds = {**{key: round(value, 3) for key, value in times.seconds.items()}, "metrics": round(metric_seconds, 3),
               "total": round(time.perf_counter() - started, 3)}
    return {"annotations": str(anno_json), "model": bundle.spec.name, "sizes": list(sizes), "blur": blur,
            "images": len(groups), "samples": per_sample, "mean": mean, "seconds": seconds}


def metrics_table(report: dict[str, Any]) -> str:
    """The averaged metrics as a Markdown table row set, with the sample count and the time."""
    mean = report["mean"]
    cells = " | ".join(f"{mean[key]:.4f} ± {mean[key + '_std']:.4f}" for key in REPORTED)
    return ("| model | samples | images | Rsu ↑ | Ras ↓ | Rda ↑ | Rmi ↑ | seconds |\n"
            "|---|---|---|---|---|---|---|---|\n"
            f"| {report['model']} | {len(report['samples'])} | {report['images']} | {cells} | {report['seconds']['total']:.1f} |")
