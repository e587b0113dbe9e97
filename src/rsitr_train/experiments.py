"""Comparison and ablation experiments: many (configuration, seed) runs, one table.

``rsitr benchmark`` trains every requested model on one dataset with the same feature cache,
trainer and schedule, evaluates each run's best-on-validation checkpoint on the report split, and
writes a Markdown table laid out like DOVE's Table I (parameters; i2t and t2i R@1/5/10; mR) as
mean ± std over seeds, with DSAN's MedR, MeanR and R@sum beside it, plus the raw numbers as JSON.

``rsitr ablate`` does the same over the rows of a study file (``rsitr_train/configs/studies/*.yaml``): each row
is a label plus model-parameter and training overrides, so DOVE's Tables II–V and Fig. 6 and ACF's
Tables 1–3 are data, not code.

Every run lives in its own directory (``OUT/<label>/seed<k>``, or ``OUT/<label>/resplit<k>``) and
is resumed or reused when the command is repeated, so an interrupted benchmark continues where it
stopped.

The protocol (:func:`resolve_protocol`). A reported split is never the split the checkpoints were
chosen on. A dataset with a test split selects on val and reports test. A dataset with train and
val only (UCM-Captions, Sydney-Captions) gets a selection split carved out of train (image level,
seeded, stratified by scene label, stored in each run's ``splits.json``) and reports val.
Reporting the selection split itself takes an explicit ``report_selection=True``, and every table
then says "selection split (optimistic)". ``resplits=N`` is DOVE's Table I protocol (Sec. IV-A):
N random image-level reallocations of train + val (seeded, each run storing its own), one run
each, mean ± std on test; ablations keep the fixed split, as the paper does.
"""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rsitr.errors import ConfigError
from rsitr.io import list_yaml_names, read_named_yaml, write_json, write_text
from rsitr.progress import get_logger
from rsitr_train.config import RunConfig, apply_override, config_from_dict, describes

logger = get_logger(__name__)

#: Columns of the recall table (DOVE Table I) and of the rank table (DSAN Tables).
RECALL_COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR")
RANK_COLUMNS = ("i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr", "rsum")
RESULT_FILE = "result.json"


@dataclass
class Variant:
    """One row of an experiment: a label and the config overrides that define it."""

    label: str
    overrides: list[str] = field(default_factory=list)  # "section.key=value" items


@dataclass
class RunResult:
    """Metrics of one trained run on the report split.

    ``metrics`` use the strict tie rule (the headline); ``reference_ties`` the reference code's
    argsort order; ``distinct_text`` the distinct-text view (:mod:`rsitr.evaluation`).
    """

    label: str
    seed: int
    model: str
    metrics: dict[str, float]
    best_epoch: int
    trainable_parameters: int
    backbone_parameters: int
    train_seconds: float
    run_dir: str
    reference_ties: dict[str, float] = field(default_factory=dict)
    distinct_text: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Protocol:
    """Where an experiment chooses its checkpoints and where it reports them.

    ``overrides`` are the config items that set the selection split up (e.g. the carve).
    """

    selection_split: str
    report_split: str
    overrides: tuple[str, ...] = ()
    optimistic: bool = False  # reporting the selection split itself

    def describe(self) -> str:
        """The caption fragment of a table: which split chose, which split is reported."""
        if self.optimistic:
            return f"selected and reported on {self.report_split}: selection split (optimistic)"
        return f"selected on {self.selection_split}, reported on {self.report_split}"


#: Share of each scene class of train carved out as the selection split of a train/val dataset
#: (UCM-Captions: 168 of 1680 training images, about the size of its 210-image val split).
SELECTION_FRACTION = 0.1
SELECTION_SPLIT = "select"


def resolve_protocol(base: dict[str, Any], report_selection: bool = False,
                     selection_fraction: float = SELECTION_FRACTION) -> Protocol:
    """The protocol of ``base``'s dataset (see the module docstring)."""
    from rsitr.data import load_dataset

    data = config_from_dict(copy.deepcopy(base)).data
    splits = load_dataset(data.path, layout=data.layout, image_dir=data.image_dir, name=data.name).splits()
    if report_selection:
        return Protocol(data.val_split, data.val_split, optimistic=True)
    if "test" in splits and "test" not in (data.train_split, data.val_split):
        return Protocol(data.val_split, "test")
    if data.selection_fraction and "val" in splits and data.val_split != "val":  # the config carves already
        return Protocol(data.val_split, "val")
    if data.val_split in splits and data.val_split != data.train_split:
        return Protocol(SELECTION_SPLIT, data.val_split, overrides=(
            f"data.val_split={SELECTION_SPLIT}", f"data.selection_fraction={selection_fraction}"))
    raise ConfigError(f"{data.path}: splits {', '.join(splits)} leave no split to report that was not used "
                      "to train or select")


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def variant_config(base: dict[str, Any], variant: Variant, seed: int) -> RunConfig:
    """The run config of ``variant`` at ``seed`` on top of the ``base`` config dict."""
    data = copy.deepcopy(base)
    for item in variant.overrides:
        apply_override(data, item)
    apply_override(data, f"train.seed={seed}")
    return config_from_dict(data, f"variant {variant.label!r}")


_BACKBONE_PARAMETERS: dict[str, int] = {}


def backbone_parameters(name: str) -> int:
    """Parameters of the frozen backbone ``name`` without its classifier (counted once per name)."""
    if name not in _BACKBONE_PARAMETERS:
        from rsitr.backbones import create_backbone

        model = create_backbone(name)
        heads = tuple(model.head_prefixes)
        _BACKBONE_PARAMETERS[name] = sum(p.numel() for k, p in model.named_parameters() if not k.startswith(heads))
    return _BACKBONE_PARAMETERS[name]


def run_variant(config: RunConfig, run_dir: Path, label: str, split: str, progress: bool = True,
                device: str | None = None) -> RunResult:
    """Train ``config`` in ``run_dir`` (resuming) and evaluate its best checkpoint on ``split``.

    ``device``: where to train and evaluate (:func:`rsitr.devices.resolve_device`; None = the best available).
    A finished run (``result.json`` written for the same config and split) is reused as it is.
    """
    from rsitr.evaluation import extra_views
    from rsitr_train.runs import load_run
    from rsitr_train.trainer import evaluate_split, train

    if split == config.data.train_split:
        raise ConfigError(f"{label}: the report split {split!r} is the training split")
    result_path = run_dir / RESULT_FILE
    if result_path.is_file():
        saved = json.loads(result_path.read_text(encoding="utf-8"))
        if describes(saved.get("config"), config) and saved.get("split") == split:
            logger.info(f"{label} seed {config.train.seed}: reusing finished run {run_dir}")
            return RunResult(**saved["result"])
    started = time.perf_counter()
    summary = train(config, run_dir, progress=progress, device=device)
    seconds = time.perf_counter() - started
    model, prepared = load_run(run_dir, progress=progress, device=device)
    metrics, sims, data = evaluate_split(model, prepared, split, progress=progress)
    result = RunResult(
        label=label, seed=config.train.seed, model=prepared.spec.name, metrics=metrics,
        best_epoch=int(summary["best_epoch"] or 0), trainable_parameters=model.num_parameters(),
        backbone_parameters=backbone_parameters(prepared.spec.backbone), train_seconds=round(seconds, 1),
        run_dir=str(run_dir), **extra_views(sims, data),
    )
    write_json(result_path, {"config": config.to_dict(), "split": split, "result": asdict(result)})
    logger.info(f"{label} seed {config.train.seed}: {split} mR {metrics['mR']:.2f} (best epoch {result.best_epoch}, {seconds:.0f} s)")
    return result


def run_variants(base: dict[str, Any], variants: list[Variant], seeds: list[int], out_dir: Path, split: str,
                 progress: bool = True, resplits: int = 0, device: str | None = None) -> list[RunResult]:
    """Every variant at every seed, each in ``out_dir/<label>/seed<k>``.

    ``resplits=N`` replaces the seeds: run k reallocates train + val with seed k
    (``data.resplit``, ``data.split_seed=k``) and trains with seed k, in ``out_dir/<label>/resplit<k>``.
    """
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"experiment rows must have distinct labels, got {labels}")
    results = []
    for variant in variants:
        if resplits:
            data = config_from_dict(copy.deepcopy(base)).data
            for k in range(resplits):
                config = variant_config(base, Variant(variant.label, [
                    *variant.overrides, f"data.resplit={json.dumps([data.train_split, data.val_split])}",
                    f"data.split_seed={k}"]), k)
                results.append(run_variant(config, out_dir / _slug(variant.label) / f"resplit{k}", variant.label,
                                           split, progress, device))
            continue
        for seed in seeds:
            config = variant_config(base, variant, seed)
            results.append(run_variant(config, out_dir / _slug(variant.label) / f"seed{seed}", variant.label, split, progress,
                                       device))
    return results


# ----------------------------------------------------------------------------------------- tables


def aggregate(results: list[RunResult], which: str = "metrics") -> dict[str, dict[str, Any]]:
    """Per label: mean and sample std over seeds of every metric, parameters, seconds, seeds.

    ``which`` names the metrics: ``metrics`` (the headline), ``reference_ties`` or ``distinct_text``.
    """
    table: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r.label for r in results):
        runs = [r for r in results if r.label == label]
        keys = getattr(runs[0], which).keys()
        values = {k: np.array([getattr(r, which)[k] for r in runs], dtype=np.float64) for k in keys}
        table[label] = {
            "model": runs[0].model,
            "seeds": [r.seed for r in runs],
            "mean": {k: float(v.mean()) for k, v in values.items()},
            "std": {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()},
            "trainable_parameters": runs[0].trainable_parameters,
            "backbone_parameters": runs[0].backbone_parameters,
            "train_seconds": float(np.mean([r.train_seconds for r in runs])),
            "best_epochs": [r.best_epoch for r in runs],
        }
    return table


def _cell(row: dict[str, Any], key: str, digits: int = 2) -> str:
    mean, std = row["mean"][key], row["std"][key]
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(row["seeds"]) > 1 else f"{mean:.{digits}f}"


def _params(row: dict[str, Any]) -> str:
    trainable, frozen = row["trainable_parameters"] / 1e6, row["backbone_parameters"] / 1e6
    return f"{trainable + frozen:.1f} M ({trainable:.1f} + {frozen:.1f})"


def _paper_params(row: dict[str, Any]) -> str:
    value = row.get("paper_parameters_m")
    return "–" if value is None else f"{value} M"


def add_references(table: dict[str, dict[str, Any]]) -> None:
    """Add each shipped model's paper parameter count (``reference.parameters_m``) to its row."""
    from rsitr.errors import RsitrError
    from rsitr.models.registry import get_model_reference

    for row in table.values():
        try:
            row["paper_parameters_m"] = get_model_reference(row["model"]).get("parameters_m")
        except RsitrError:
            row["paper_parameters_m"] = None


def markdown_tables(table: dict[str, dict[str, Any]], title: str, with_params: bool = True,
                    chance: dict[str, float] | None = None) -> str:
    """Two Markdown tables: recalls and mR (DOVE Table I layout), then MedR/MeanR/R@sum (DSAN)."""
    head = ["Model", *(["Params (trainable + frozen backbone)", "Params (paper)"] if with_params else []),
            "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "mR"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in table.items():
        cells = [label, *([_params(row), _paper_params(row)] if with_params else []), *(_cell(row, k) for k in RECALL_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    if chance is not None:
        cells = ["chance", *(["–", "–"] if with_params else []), *(f"{chance[k]:.2f}" for k in RECALL_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    rank_head = ["Model", "i2t MedR", "i2t MeanR", "t2i MedR", "t2i MeanR", "R@sum", "train s/run", "best epochs"]
    lines += ["", "| " + " | ".join(rank_head) + " |", "|" + "---|" * len(rank_head)]
    for label, row in table.items():
        cells = [label, _cell(row, "i2t_medr", 1), _cell(row, "i2t_meanr", 1), _cell(row, "t2i_medr", 1),
                 _cell(row, "t2i_meanr", 1), _cell(row, "rsum", 1), f"{row['train_seconds']:.0f}",
                 ", ".join(str(e) for e in row["best_epochs"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _chance(base: dict[str, Any], split: str) -> dict[str, float]:
    from rsitr.data import load_dataset
    from rsitr.evaluation import chance_metrics

    data = config_from_dict(copy.deepcopy(base)).data
    dataset = load_dataset(data.path, layout=data.layout, image_dir=data.image_dir, name=data.name)
    image_ids = dataset.split_indices(split)
    local = {img: k for k, img in enumerate(image_ids)}
    captions = np.array([local[int(i)] for i in dataset.caption_image if int(i) in local], dtype=np.int64)
    return chance_metrics(len(image_ids), captions)


def write_report(out_dir: Path, name: str, title: str, results: list[RunResult], base: dict[str, Any],
                 protocol: Protocol, extra: dict[str, Any] | None = None, with_params: bool = True) -> tuple[Path, str]:
    """Write ``name.md`` and ``name.json`` in ``out_dir``; returns the Markdown path and text.

    Besides the headline tables: the mR under the reference code's tie order beside ours, and the
    distinct-text view (:func:`rsitr.evaluation.distinct_text_metrics`), each only as an extra.
    """
    table = aggregate(results)
    if with_params:
        add_references(table)
    chance = _chance(base, protocol.report_split)
    text = markdown_tables(table, title, with_params=with_params, chance=chance) + "\n" + extra_tables(results)
    md_path = out_dir / f"{name}.md"
    write_text(md_path, text)
    write_json(out_dir / f"{name}.json", {
        "title": title, "split": protocol.report_split, "selection_split": protocol.selection_split,
        "optimistic": protocol.optimistic, "table": table, "chance": chance,
        "ties_reference": aggregate(results, "reference_ties"), "distinct_text": aggregate(results, "distinct_text"),
        "runs": [asdict(r) for r in results], **(extra or {}),
    })
    return md_path, text


def extra_tables(results: list[RunResult]) -> str:
    """The tie-rule comparison and the distinct-text recalls as Markdown (empty for older results)."""
    if not all(r.reference_ties and r.distinct_text for r in results):
        return ""
    ours, reference, distinct = aggregate(results), aggregate(results, "reference_ties"), aggregate(results, "distinct_text")
    lines = ["Tie rule: mR with ties broken against the query (ours, the headline) and in the reference code's "
             "argsort order.", "", "| Model | mR (ours) | mR (reference order) | difference |", "|---|---|---|---|"]
    for label in ours:
        diffs = [r.reference_ties["mR"] - r.metrics["mR"] for r in results if r.label == label]
        lines.append(f"| {label} | {_cell(ours[label], 'mR')} | {_cell(reference[label], 'mR')} | "
                     f"{np.mean(diffs):+.2f} |")
    head = ["Model", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "mR"]
    lines += ["", "Distinct-text view (an extra, not the headline): an item with the same text as a true one counts "
              "as found; each distinct text is one query.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in distinct.items():
        lines.append("| " + " | ".join([label, *(_cell(row, k) for k in RECALL_COLUMNS)]) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- benchmark


def run_benchmark(base: dict[str, Any], models: list[str], seeds: list[int], out_dir: Path,
                  report_selection: bool = False, resplits: int = 0, progress: bool = True,
                  device: str | None = None) -> tuple[Path, str]:
    """Train and evaluate ``models`` (registered names or YAML paths) at every seed; write the report.

    The splits follow :func:`resolve_protocol`; ``resplits=N`` runs DOVE's Table I protocol instead
    of the seeds (it needs a test split, since train and val are reallocated).
    """
    from rsitr.models import get_model_spec

    for name in models:
        get_model_spec(name)  # fail before any training on an unknown name
    protocol = resolve_protocol(base, report_selection)
    if resplits and (protocol.report_split != "test" or protocol.overrides):
        raise ConfigError("--resplits reallocates train and val, so it needs a dataset with a test split to report on")
    base = _with_overrides(base, protocol.overrides)
    variants = [Variant(label=Path(name).stem if name.endswith((".yaml", ".yml")) else name,
                        overrides=[f"model.name={json.dumps(name)}"]) for name in models]
    started = time.perf_counter()
    results = run_variants(base, variants, seeds, out_dir, protocol.report_split, progress, resplits=resplits, device=device)
    dataset = config_from_dict(copy.deepcopy(base)).data
    runs = f"{resplits} random train/val reallocation(s)" if resplits else f"{len(seeds)} seed(s)"
    title = f"{dataset.name or Path(dataset.path).stem}: {protocol.describe()}, {runs}"
    return write_report(out_dir, "benchmark", title, results, base, protocol,
                        extra={"models": models, "seeds": seeds, "resplits": resplits,
                               "wall_seconds": round(time.perf_counter() - started, 1)})


def _with_overrides(base: dict[str, Any], overrides: tuple[str, ...] | list[str]) -> dict[str, Any]:
    data = copy.deepcopy(base)
    for item in overrides:
        apply_override(data, item)
    return data


# ----------------------------------------------------------------------------------------- ablations


@dataclass
class Study:
    """An ablation study: rows of overrides on one model, and an optional sweep plot."""

    name: str
    title: str
    model: str
    rows: list[Variant]
    sweep: str | None = None  # model parameter swept along the x axis of a plot (e.g. lambda_g)
    log_x: bool = False


def _studies_dir():
    return resources.files("rsitr_train") / "configs" / "studies"


def list_studies() -> list[str]:
    """Names of the shipped ablation studies."""
    return list_yaml_names(_studies_dir())


def load_study(name: str | Path) -> Study:
    """A shipped study by name, or a user's study YAML by path.

    Study YAML::

        title: DTGA input combinations (DOVE Table II)
        model: dove
        sweep: lambda_g        # optional: plot the metrics against this parameter
        log_x: true
        rows:
          - label: "H^f, H^f"
            params: {dtga: ff}    # model parameters
            train: {batch_size: 64} # training overrides (optional)
            features: {num_regions: 20}  # the model's feature needs (optional)
    """

    data, label = read_named_yaml(name, _studies_dir(), "study", list_studies)
    unknown = sorted(set(data) - {"title", "model", "rows", "sweep", "log_x"})
    if unknown or "rows" not in data or "model" not in data:
        raise ConfigError(f"study {label!r}: needs 'model' and 'rows' (unknown fields: {', '.join(unknown) or 'none'})")
    rows = []
    for row in data["rows"]:
        bad = sorted(set(row) - {"label", "params", "train", "features"})
        if bad or "label" not in row:
            raise ConfigError(f"study {label!r}: each row needs a label and may have params, train, features "
                              f"(got {sorted(row)})")
        overrides = [f"model.params.{k}={json.dumps(v)}" for k, v in (row.get("params") or {}).items()]
        overrides += [f"train.{k}={json.dumps(v)}" for k, v in (row.get("train") or {}).items()]
        overrides += [f"model.features.{k}={json.dumps(v)}" for k, v in (row.get("features") or {}).items()]
        rows.append(Variant(label=str(row["label"]), overrides=overrides))
    return Study(name=label, title=str(data.get("title", label)), model=str(data["model"]), rows=rows,
                 sweep=data.get("sweep"), log_x=bool(data.get("log_x", False)))


def run_study(study: Study, base: dict[str, Any], seeds: list[int], out_dir: Path, report_selection: bool = False,
              progress: bool = True, device: str | None = None) -> tuple[Path, str]:
    """Run every row of ``study`` on ``study.model`` (splits by :func:`resolve_protocol`); write the table (and the sweep plot)."""
    protocol = resolve_protocol(base, report_selection)
    base = _with_overrides(base, [*protocol.overrides, f"model.name={json.dumps(study.model)}"])
    started = time.perf_counter()
    results = run_variants(base, study.rows, seeds, out_dir, protocol.report_split, progress, device=device)
    title = f"{study.title}: {protocol.describe()}, {len(seeds)} seed(s)"
    path, text = write_report(out_dir, study.name, title, results, base, protocol,
                              extra={"study": study.name, "seeds": seeds,
                                     "wall_seconds": round(time.perf_counter() - started, 1)}, with_params=False)
    if study.sweep:
        from rsitr_train.plots import plot_sweep

        values = [_sweep_value(row, study.sweep) for row in study.rows]
        plot_sweep(aggregate(results), values, study.sweep, out_dir / f"{study.name}.png", log_x=study.log_x)
    return path, text


def _sweep_value(row: Variant, parameter: str) -> float:
    for item in row.overrides:
        key, _, value = item.partition("=")
        if key.endswith(f".{parameter}"):
            return float(yaml.safe_load(value))
    raise ConfigError(f"study row {row.label!r} does not set the swept parameter {parameter!r}")
