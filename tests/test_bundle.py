"""The model bundle: export a run, delete its dataset and cache, load it alone, get the same scores."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rsitr
from rsitr.bundle import BACKBONE_FILE, BUNDLE_FORMAT, MANIFEST, MODEL_FILE, export_model, load_model
from rsitr.errors import CheckpointError
from rsitr_cli.main import main
from rsitr_train.config import load_config
from rsitr_train.runs import load_run
from rsitr_train.trainer import evaluate_split, train


def _config(dataset: Path, cache: Path, model: str = "dove-s", **extra: str):
    overrides = [f"data.path={dataset}", f"features.cache_dir={cache}", "features.image_size=64",
                 "features.precision=fp32", f"model.name={model}", "model.params={embed_dim: 32, word_dim: 16}",
                 "train.epochs=1", "train.batch_size=16", "train.lr=0.001"]
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_synth) -> dict:
    """A trained DOVE-S run on a private copy of the tiny dataset, its test scores, and an export."""
    root = tmp_path_factory.mktemp("bundle")
    data = root / "data"
    shutil.copytree(tiny_synth.parent, data)
    run = root / "run"
    train(_config(data / tiny_synth.name, root / "cache"), run, progress=False)
    model, prepared = load_run(run, progress=False)
    _, sims, split = evaluate_split(model, prepared, "test", progress=False)
    dataset = prepared.dataset
    images = [dataset.image_path(int(i)) for i in split.image_ids]
    captions = [dataset.captions[int(c)] for c in split.caption_ids]
    # What a user keeps: the test images copied elsewhere and the caption texts.
    user = root / "user_images"
    user.mkdir()
    kept = []
    for path in images:
        target = user / path.name
        shutil.copyfile(path, target)
        kept.append(str(target))
    bundle_dir = root / "bundle"
    export_model(run, bundle_dir)
    return {"root": root, "run": run, "bundle": bundle_dir, "sims": sims, "images": kept, "captions": captions,
            "data": data, "cache": root / "cache"}


def test_bundle_holds_only_safetensors_and_json(trained) -> None:
    names = sorted(p.name for p in trained["bundle"].iterdir())
    assert names == sorted([MANIFEST, BACKBONE_FILE, MODEL_FILE, "vocab.json"])
    manifest = json.loads((trained["bundle"] / MANIFEST).read_text())
    assert manifest["format"] == BUNDLE_FORMAT
    assert manifest["model"]["architecture"] == "dove"
    assert manifest["preprocessing"]["image_size"] == 64 and len(manifest["preprocessing"]["mean"]) == 3
    assert manifest["features"]["weights"] == BACKBONE_FILE and manifest["features"]["detections"] is None
    assert manifest["standardizer"] and all(k.startswith("standardize.") for k in manifest["standardizer"])
    assert manifest["first_stage"] == ["global", "global"]
    for name, entry in manifest["files"].items():
        assert (trained["bundle"] / name).stat().st_size == entry["bytes"]


@pytest.mark.slow  # a fresh interpreter imports torch and the model: several seconds
def test_bundle_reproduces_the_run_scores_in_a_fresh_process_without_dataset_or_cache(trained, tmp_path) -> None:
    shutil.rmtree(trained["data"])
    shutil.rmtree(trained["cache"])
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"images": trained["images"], "captions": trained["captions"]}))
    out = tmp_path / "scores.npy"
    script = textwrap.dedent(f"""
        import json, numpy as np, rsitr
        spec = json.load(open({str(inputs)!r}))
        model = rsitr.load_model({str(trained["bundle"])!r})
        scores = model.score(model.encode_images(spec["images"], batch_size=5), model.encode_texts(spec["captions"]))
        np.save({str(out)!r}, scores.numpy())
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=300)
    fresh = torch.from_numpy(np.load(out))
    assert fresh.shape == trained["sims"].shape
    assert torch.allclose(fresh, trained["sims"], atol=1e-6, rtol=0)


def test_run_directory_and_bundle_load_to_the_same_model(trained) -> None:
    from_run, from_bundle = load_model(trained["run"]), load_model(trained["bundle"])
    images = [np.asarray(Image.open(p).convert("RGB")) for p in trained["images"][:3]]
    texts = trained["captions"][:4]
    a = from_run.score(from_run.encode_images(images), from_run.encode_texts(texts))
    b = from_bundle.score(from_bundle.encode_images(images), from_bundle.encode_texts(texts))
    assert torch.equal(a, b)


def test_encode_images_takes_paths_pil_and_arrays_of_any_size(trained) -> None:
    model = rsitr.load_model(trained["bundle"])
    picture = Image.open(trained["images"][0])
    as_array = np.asarray(picture.convert("RGB"))
    encodings = [model.encode_images([source]) for source in (trained["images"][0], picture, as_array)]
    for other in encodings[1:]:
        for key in encodings[0]:
            assert torch.equal(encodings[0][key], other[key])
    large = np.asarray(picture.convert("RGB").resize((190, 130)))
    grey = (np.asarray(picture.convert("L")) / 255.0).astype(np.float32)
    rgba = np.dstack([as_array, np.full(as_array.shape[:2], 255, np.uint8)])
    scores = model.score(model.encode_images([large, grey, rgba]), model.encode_texts(["a plane", "two ships"]))
    assert scores.shape == (3, 2) and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="shape"):
        model.encode_images([np.zeros((4, 4, 2), np.uint8)])


def test_boxes_change_the_region_features_and_none_means_the_default_boxes(trained) -> None:
    model = rsitr.load_model(trained["bundle"])
    image = trained["images"][0]
    default = model.image_features([image])
    again = model.image_features([image], boxes=[None])
    boxed = model.image_features([image], boxes=[np.array([[0.0, 0.0, 20.0, 20.0], [10, 10, 60, 50]])])
    assert torch.equal(default["regions"], again["regions"])
    assert boxed["region_mask"][0, :2].all() and not boxed["region_mask"][0, 2:].any()
    assert not torch.equal(default["regions"], boxed["regions"])


def test_first_stage_is_the_global_pair_and_ranks_like_its_cosine(trained) -> None:
    model = rsitr.load_model(trained["bundle"])
    images, texts = model.encode_images(trained["images"]), model.encode_texts(trained["captions"])
    v, t = model.first_stage(images, texts)
    assert torch.allclose(v.norm(dim=1), torch.ones(len(v)), atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(images["global"][:, None], texts["global"][None], dim=-1)
    assert torch.allclose(v @ t.T, cosine, atol=1e-5)


def _broken_copy(trained, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(trained["bundle"], copy)
    return copy


def test_another_format_version_is_a_one_line_error(trained, tmp_path) -> None:
    copy = _broken_copy(trained, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["format"] = "rsitr-model-v0"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="rsitr-model-v0") as error:
        load_model(copy)
    assert "\n" not in str(error.value) and str(copy / MANIFEST) in str(error.value)


def test_truncated_file_is_a_one_line_error(trained, tmp_path) -> None:
    copy = _broken_copy(trained, tmp_path)
    data = (copy / MODEL_FILE).read_bytes()
    (copy / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as error:
        load_model(copy)
    assert "\n" not in str(error.value) and MODEL_FILE in str(error.value)


def test_digest_mismatch_is_a_one_line_error(trained, tmp_path) -> None:
    copy = _broken_copy(trained, tmp_path)
    data = bytearray((copy / BACKBONE_FILE).read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    (copy / BACKBONE_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256") as error:
        load_model(copy)
    assert "\n" not in str(error.value)


def test_not_a_model_folder(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a model bundle"):
        load_model(tmp_path)


def test_export_command_writes_a_verified_bundle(trained, tmp_path, capsys) -> None:
    out = tmp_path / "exported"
    assert main(["--quiet", "export", str(trained["bundle"]), "--out", str(out)]) == 0
    assert "with a separable first stage" in capsys.readouterr().out
    assert load_model(out).spec.name == "dove-s"
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "model folder not found" in capsys.readouterr().err


def test_a_run_evaluates_on_a_moved_dataset(tiny_synth, tmp_path) -> None:
    """``rsitr evaluate RUN --dataset PATH`` reads the data from where it is now, with the same result."""
    data = tmp_path / "data"
    shutil.copytree(tiny_synth.parent, data)
    run = tmp_path / "run"
    train(_config(data / tiny_synth.name, tmp_path / "cache"), run, progress=False)
    assert main(["--quiet", "evaluate", str(run), "--split", "test"]) == 0
    before = json.loads((run / "eval_test.json").read_text())
    moved = tmp_path / "moved"
    data.rename(moved)
    assert main(["--quiet", "evaluate", str(run), "--split", "test"]) == 2  # the config's path is gone
    assert main(["--quiet", "evaluate", str(run), "--split", "test", "--dataset", str(moved / tiny_synth.name)]) == 0
    after = json.loads((run / "eval_test.json").read_text())
    assert after["metrics"] == before["metrics"] and after["n_captions"] == before["n_captions"]


@pytest.mark.slow  # trains and resumes a run
def test_run_directories_of_the_earlier_layout_still_load_and_resume(tiny_synth, tmp_path, monkeypatch) -> None:
    """Runs written before the bundle existed: resume.pt kept ``best_mR``; model.json had no backbone
    digest, caption length or precision."""
    from rsitr_train import trainer

    run = tmp_path / "run"
    config = _config(tiny_synth, tmp_path / "cache", **{"train.epochs": "2"})
    original, calls = trainer._train_epoch, {"n": 0}

    def stop_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "_train_epoch", stop_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, run, progress=False)
    monkeypatch.setattr(trainer, "_train_epoch", original)
    state = torch.load(run / "resume.pt", weights_only=True)
    state["best_mR"] = state.pop("best")
    torch.save(state, run / "resume.pt")
    description = json.loads((run / "model.json").read_text())
    for key in ("max_length", "precision"):  # not recorded by the earlier layout
        description.pop(key)
    description.pop("backbone_sha256", None)  # nor this (a random backbone has none anyway)
    (run / "model.json").write_text(json.dumps(description))
    old = load_model(run)  # caption length and precision now come from config.yaml
    assert (old.spec.name, old.max_length, old.precision) == ("dove-s", config.text.max_length, config.train.precision)
    summary = train(config, run, progress=False)
    history = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(history) == 3 and summary["best_epoch"] in (1, 2)
