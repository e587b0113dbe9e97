"""End-to-end training, checkpoints, resuming and evaluation on a tiny synthetic dataset."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rsitr.bundle import load_model_weights
from rsitr.errors import CheckpointError, ConfigError
from rsitr.text import Vocabulary
from rsitr_cli.main import main
from rsitr_train.config import load_config
from rsitr_train.runs import CHECKPOINT, evaluate_run, load_run, result_table
from rsitr_train.trainer import train


def tiny_config(dataset, cache, epochs=2, **extra):
    overrides = [
        f"data.path={dataset}", f"features.cache_dir={cache}", "features.image_size=64", "features.precision=fp32",
        "model.name=dove-s", "model.params={embed_dim: 32, word_dim: 16}", f"train.epochs={epochs}",
        "train.batch_size=16", "train.lr=0.001",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def test_train_writes_a_complete_run(tiny_synth, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_config(tiny_synth, tmp_path / "cache"), run, progress=False)
    for name in ("config.yaml", "vocab.json", CHECKPOINT, "model.json", "resume.pt", "metrics.csv", "training_curves.png"):
        assert (run / name).is_file(), name
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and "val_mR" in rows[0]
    assert summary["best_epoch"] in (1, 2)
    assert not list(run.glob(".*.tmp"))  # nothing half-written left behind


def test_interrupted_run_resumes_to_the_same_weights(tiny_synth, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    straight = tmp_path / "straight"
    train(tiny_config(tiny_synth, cache, epochs=2), straight, progress=False)

    from rsitr_train import trainer as training

    original = training._train_epoch
    calls = {"n": 0}

    def crash_on_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(training, "_train_epoch", crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_synth, cache, epochs=2), resumed, progress=False)
    monkeypatch.setattr(training, "_train_epoch", original)
    train(tiny_config(tiny_synth, cache, epochs=2), resumed, progress=False)

    a = torch.load(straight / "resume.pt", weights_only=True)["model"]
    b = torch.load(resumed / "resume.pt", weights_only=True)["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    def rows_without_timing(path):
        import csv

        return [{k: v for k, v in row.items() if k != "train_seconds"} for row in csv.DictReader(path.open())]

    assert rows_without_timing(resumed / "metrics.csv") == rows_without_timing(straight / "metrics.csv")


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_a_damaged_resume_file_is_set_aside_and_the_run_starts_again(tiny_synth, tmp_path, damage, caplog):
    cache = tmp_path / "cache"
    straight = tmp_path / "straight"
    train(tiny_config(tiny_synth, cache, epochs=2), straight, progress=False)
    damaged = tmp_path / "damaged"
    train(tiny_config(tiny_synth, cache, epochs=2), damaged, progress=False)
    resume = damaged / "resume.pt"
    data = resume.read_bytes()
    resume.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(range(256)) * 64)
    with caplog.at_level("WARNING", logger="rsitr"):
        train(tiny_config(tiny_synth, cache, epochs=2), damaged, progress=False)  # the same command again
    assert any("resume.pt is damaged" in r.getMessage() for r in caplog.records)
    assert (damaged / "resume.pt.damaged").is_file()
    a = torch.load(straight / "resume.pt", weights_only=True)["model"]
    b = torch.load(damaged / "resume.pt", weights_only=True)["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_same_seed_same_result_different_seed_differs(tiny_synth, tmp_path):
    cache = tmp_path / "cache"
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(tiny_config(tiny_synth, cache, epochs=1, **{"train.seed": seed}), tmp_path / name, progress=False)
        runs.append(load_file(str(tmp_path / name / CHECKPOINT)))
    key = "word_embedding.weight"
    assert torch.equal(runs[0][key], runs[1][key])
    assert not torch.equal(runs[0][key], runs[2][key])


def test_evaluation_does_not_depend_on_the_encoding_chunk(tiny_synth, tmp_path, monkeypatch):
    """Every metric is identical whatever the chunking: equal captions tie exactly, not up to float noise."""
    from rsitr import evaluation

    data = json.loads(tiny_synth.read_text())  # a copy whose test images share one sentence, as RSICD's do
    test_images = [image for image in data["images"] if image["split"] == "test"]
    for image in test_images[1:]:
        image["sentences"][0] = dict(test_images[0]["sentences"][0])
    dataset = tmp_path / "dataset_repeats.json"
    dataset.write_text(json.dumps(data))
    (tmp_path / "images").symlink_to(tiny_synth.parent / "images")
    run = tmp_path / "run"
    train(tiny_config(dataset, tmp_path / "cache", epochs=1), run, progress=False)
    results = []
    for chunk in (1, 5, 512):
        monkeypatch.setattr(evaluation, "ENCODE_CHUNK", chunk)
        results.append(evaluate_run(run, "test", tmp_path / f"eval{chunk}.json", progress=False))
    for key in ("metrics", "metrics_reference_ties", "metrics_distinct_text"):
        assert results[0][key] == results[1][key] == results[2][key], key
    saved = json.loads((tmp_path / "eval5.json").read_text())
    assert saved["split"] == "test" and saved["metrics"] == results[1]["metrics"]
    assert saved["selection_split"] == "val" and saved["optimistic"] is False
    on_selection = evaluate_run(run, "val", tmp_path / "eval_val.json", progress=False)
    assert on_selection["optimistic"] is True and "optimistic" in result_table(on_selection)
    assert saved["n_distinct_texts"] < saved["n_captions"]  # the synthetic captions repeat, so ties occur
    assert saved["chance"]["t2i_r1"] == pytest.approx(100 / saved["n_images"])


def test_checkpoint_of_another_model_or_vocabulary_is_refused(tiny_synth, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_synth, tmp_path / "cache", epochs=1), run, progress=False)
    model, prepared = load_run(run, progress=False)
    other_vocab = Vocabulary.build(["a completely different vocabulary"])
    with pytest.raises(CheckpointError, match="vocabulary"):
        load_model_weights(run / CHECKPOINT, model, prepared.spec, other_vocab)
    with pytest.raises(CheckpointError, match="model"):
        load_model_weights(run / CHECKPOINT, model, prepared.spec.with_overrides({"dtga": "none"}), prepared.vocab)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_model_weights(tmp_path / "garbage.safetensors", model, prepared.spec, prepared.vocab)


def test_resume_with_a_different_config_is_refused(tiny_synth, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_synth, tmp_path / "cache", epochs=1), run, progress=False)
    with pytest.raises(ConfigError, match="another config"):
        train(tiny_config(tiny_synth, tmp_path / "cache", epochs=1, **{"train.lr": 0.5}), run, progress=False)


def test_cli_train_and_evaluate(tiny_synth, tmp_path, capsys):
    run = tmp_path / "cli-run"
    code = main(["--quiet", "train", "--dataset", str(tiny_synth), "--model", "dove-s", "--epochs", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(run), "--set", "features.image_size=64",
                 "--set", "model.params={embed_dim: 32}"])
    assert code == 0
    assert main(["--quiet", "evaluate", str(run), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "| chance |" in out and "i2t R@1" in out
    assert json.loads((run / "eval_val.json").read_text())["n_images"] > 0


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    code = main(["--quiet", "train", "--dataset", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "nowhere" in err
    assert main(["--quiet", "evaluate", str(tmp_path)]) == 2


def test_missing_or_corrupt_image_is_named_and_nothing_is_cached(tmp_path, capsys):
    from rsitr.data.synth import generate_synthetic

    generate_synthetic(tmp_path / "s", num_images=12, image_size=32, seed=0, progress=False)
    victim = tmp_path / "s" / "images" / "synth_00004.png"
    args = ["--quiet", "train", "--dataset", str(tmp_path / "s" / "dataset_synth.json"), "--out", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache"), "--set", "features.image_size=32", "--model", "dove-s"]
    victim.unlink()
    assert main(args) == 2
    assert "synth_00004.png: image file not found" in capsys.readouterr().err
    victim.write_bytes(b"garbage")
    assert main(args) == 2
    assert "synth_00004.png: cannot decode image" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_glove_initialises_the_word_embedding(tiny_synth, tmp_path):
    from rsitr_train.trainer import build_model, prepare

    glove = tmp_path / "glove.txt"
    glove.write_text("image " + " ".join(["0.5"] * 16) + "\nzzzunseen " + " ".join(["9"] * 16) + "\n")
    config = tiny_config(tiny_synth, tmp_path / "cache", epochs=1, **{"text.glove": str(glove)})
    prepared = prepare(config, progress=False)
    model = build_model(prepared)
    row = model.word_embedding.weight[prepared.vocab.word2idx["image"]]
    assert torch.allclose(row, torch.full((16,), 0.5))


def test_a_failed_fresh_run_leaves_nothing_and_an_unknown_parameter_stops_before_extraction(tiny_synth, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"model.params of model 'dove-s' \(rsitr/models/configs/dove-s.yaml\): .*unknown parameter"):
        train(tiny_config(tiny_synth, cache, epochs=1, **{"model.params.no_such_field": 1}), run, progress=False)
    assert not run.exists()  # nothing half-made left behind ...
    assert not list(cache.glob("*.safetensors"))  # ... and no feature was extracted first


def test_a_failure_after_the_first_saved_epoch_keeps_the_run_to_resume(tiny_synth, tmp_path, monkeypatch):
    from rsitr_train import trainer as training

    original = training._train_epoch
    calls = {"n": 0}

    def fail_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk gone")
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "_train_epoch", fail_second)
    with pytest.raises(RuntimeError):
        train(tiny_config(tiny_synth, tmp_path / "cache", epochs=2), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "resume.pt").is_file()
