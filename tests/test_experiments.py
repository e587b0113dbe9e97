"""Benchmark and ablation harness: aggregation, tables, reuse of finished runs, study files."""

from __future__ import annotations

import json

import pytest

from rsitr.errors import ConfigError
from rsitr_cli.main import main
from rsitr_train import experiments
from rsitr_train.experiments import RunResult, Variant, aggregate, list_studies, load_study, markdown_tables, variant_config


def _result(label: str, seed: int, mr: float, r1: float) -> RunResult:
    metrics = {k: 0.0 for k in (*experiments.RECALL_COLUMNS, *experiments.RANK_COLUMNS)}
    metrics.update({"mR": mr, "i2t_r1": r1})
    return RunResult(label=label, seed=seed, model=label, metrics=metrics, best_epoch=seed + 1,
                     trainable_parameters=2_000_000, backbone_parameters=11_000_000, train_seconds=10.0, run_dir="x")


def test_aggregate_mean_and_sample_std() -> None:
    table = aggregate([_result("a", 0, 10.0, 1.0), _result("a", 1, 14.0, 3.0), _result("b", 0, 5.0, 2.0)])
    assert list(table) == ["a", "b"]
    assert table["a"]["mean"]["mR"] == pytest.approx(12.0)
    assert table["a"]["std"]["mR"] == pytest.approx(2.8284271, rel=1e-6)  # sample std of (10, 14)
    assert table["a"]["std"]["i2t_r1"] == pytest.approx(1.4142136, rel=1e-6)
    assert table["b"]["std"]["mR"] == 0.0 and table["a"]["best_epochs"] == [1, 2]
    text = markdown_tables(table, "t", chance={k: 1.0 for k in experiments.RECALL_COLUMNS})
    assert "| a | 13.0 M (2.0 + 11.0) | – |" in text
    assert "12.00 ± 2.83" in text and "| b |" in text and "| chance |" in text
    assert "5.00 ±" not in text  # one seed: no spread shown


def test_variant_config_applies_overrides_and_seed() -> None:
    config = variant_config({"data": {"path": "d.json"}}, Variant("x", ["model.params.embed_dim=64", "train.epochs=3"]), 7)
    assert config.model.params == {"embed_dim": 64} and config.train.epochs == 3 and config.train.seed == 7
    with pytest.raises(ConfigError, match="unknown key"):
        variant_config({}, Variant("x", ["train.epoch=3"]), 0)


def test_every_shipped_study_loads_and_names_real_parameters() -> None:
    from rsitr.models.registry import build_config, get_model_spec

    names = list_studies()
    assert {"dove-dtga", "dove-modules", "dove-heads", "dove-embed", "dove-batch", "dove-lambda",
            "acf-p", "acf-q", "acf-margin"} <= set(names)
    for name in names:
        study = load_study(name)
        spec = get_model_spec(study.model)
        for row in study.rows:
            params = {k.split(".", 2)[2]: json.loads(v) for k, _, v in (o.partition("=") for o in row.overrides)
                      if k.startswith("model.params.")}
            build_config(spec.architecture, {**spec.params, **params})  # raises on an unknown parameter


def test_study_file_errors(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: dove\nrows:\n  - {params: {dtga: ff}}\n")
    with pytest.raises(ConfigError, match="label"):
        load_study(bad)
    with pytest.raises(ConfigError, match="unknown study"):
        load_study("no-such-study")


def test_benchmark_end_to_end_and_reuse(tiny_synth, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "bench"
    argv = ["--quiet", "benchmark", "--dataset", str(tiny_synth), "--models", "dove-s", "--seeds", "2",
            "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--set", "model.params.embed_dim=32",
            "--set", "features.image_size=64", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "benchmark.json").read_text())
    runs = report["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all(r["label"] == "dove-s" for r in runs)
    assert report["table"]["dove-s"]["mean"]["mR"] == pytest.approx((runs[0]["metrics"]["mR"] + runs[1]["metrics"]["mR"]) / 2)
    assert runs[0]["metrics"] != runs[1]["metrics"]  # the seed changes the run
    assert "| 25 M |" in (out / "benchmark.md").read_text()  # DOVE-S's paper count beside ours

    # A second call reuses the finished runs: training must not run again.
    def no_training(*args, **kwargs):
        raise AssertionError("finished runs must be reused")

    monkeypatch.setattr("rsitr_train.trainer.train", no_training)
    assert main(argv) == 0
    again = json.loads((out / "benchmark.json").read_text())
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in runs]
    capsys.readouterr()


def test_benchmark_rejects_unknown_model_before_training(tiny_synth, tmp_path, capsys) -> None:
    code = main(["--quiet", "benchmark", "--dataset", str(tiny_synth), "--models", "dove-s,nope", "--out", str(tmp_path)])
    assert code == 2 and "unknown model 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "dove-s").exists()


def test_ablate_sweep_writes_table_and_plot(tiny_synth, tmp_path, capsys) -> None:
    study = tmp_path / "lam.yaml"
    study.write_text("title: lambda\nmodel: dove-s\nsweep: lambda_g\nlog_x: true\nrows:\n"
                     "  - {label: small, params: {lambda_g: 0.1}}\n  - {label: large, params: {lambda_g: 10.0}}\n")
    code = main(["--quiet", "ablate", str(study), "--dataset", str(tiny_synth), "--epochs", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--set", "model.params.embed_dim=32",
                 "--set", "features.image_size=64", "--out", str(tmp_path / "abl")])
    assert code == 0
    text = (tmp_path / "abl" / "lam.md").read_text()
    assert "| small |" in text and "| large |" in text
    assert (tmp_path / "abl" / "lam.png").stat().st_size > 1000
    runs = json.loads((tmp_path / "abl" / "lam.json").read_text())["runs"]
    assert runs[0]["metrics"] != runs[1]["metrics"]
    capsys.readouterr()
