"""The smaller sub-commands, end to end through ``main(argv)``."""

import json

import pytest
import torch

from rsitr_cli.main import main


def test_synth_info_features_models(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["--quiet", "data", "synth", "--out", str(out), "--num-images", "12", "--image-size", "32"]) == 0
    assert json.loads((out / "dataset_synth.json").read_text())["images"]
    assert main(["data", "info", str(out)]) == 0
    assert "12 images, 60 captions" in capsys.readouterr().out

    args = ["--quiet", "features", str(out), "--backbone", "resnet18", "--image-size", "32", "--precision", "fp32",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    assert "extracted" in capsys.readouterr().out
    assert main(args) == 0
    assert "loaded from the cache" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert main([*args, "--boxes", "activation"]) == 0  # another box source is another cache file
    assert "extracted" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2

    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "dove " in listing and "dove-s" in listing and "resnet18" in listing


def test_unknown_model_is_one_line(tiny_synth, tmp_path, capsys):
    assert main(["--quiet", "train", "--dataset", str(tiny_synth), "--model", "nope", "--out", str(tmp_path / "r"),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nope'" in err and "dove-s" in err


def test_pretrain_command_on_dataset_scene_labels(tiny_synth, tmp_path, capsys) -> None:
    """`rsitr pretrain` on a retrieval dataset's scene labels writes a backbone that loads."""
    from rsitr.backbones import create_backbone

    out = tmp_path / "pre"
    code = main(["--quiet", "pretrain", str(tiny_synth), "--backbone", "resnet18", "--image-size", "64",
                 "--epochs", "1", "--batch-size", "8", "--threads", "1", "--precision", "fp32", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "classes" in printed and "--backbone-weights" in printed
    loaded = create_backbone("resnet18", weights=out / "backbone.safetensors")
    fresh = create_backbone("resnet18")
    assert not torch.equal(loaded.conv1.weight, fresh.conv1.weight)  # trained weights, not the init


def test_pretrain_command_reads_a_yaml_recipe_and_flags_override_it(tiny_synth, tmp_path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("backbone: resnet18\nimage_size: 48\nepochs: 3\nbatch_size: 8\nprecision: fp32\ncutmix: 1.0\n")
    out = tmp_path / "pre"
    code = main(["--quiet", "pretrain", str(tiny_synth), "--config", str(recipe), "--epochs", "1", "--threads", "1",
                 "--out", str(out)])
    assert code == 0
    saved = json.loads((out / "pretrain_config.json").read_text())["config"]
    assert (saved["image_size"], saved["epochs"], saved["cutmix"]) == (48, 1, 1.0)


def test_pretrain_command_errors_in_one_line(tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["pretrain", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rsitr: error:") and str(empty) in err and "\n" not in err


def test_salient_command_draws_amfmn_masks(tiny_synth, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    code = main(["--quiet", "train", "--dataset", str(tiny_synth), "--model", "amfmn-sim", "--epochs", "1",
                 "--batch-size", "20", "--cache-dir", str(tmp_path / "cache"), "--set", "features.image_size=64",
                 "--set", "model.params.embed_dim=32", "--set", "model.params.word_dim=16", "--out", str(run)])
    assert code == 0
    out = tmp_path / "masks.png"
    assert main(["--quiet", "salient", str(run), "--split", "test", "--count", "3", "--out", str(out)]) == 0
    assert out.stat().st_size > 5000
    capsys.readouterr()


def test_salient_command_needs_an_amfmn_run(tiny_synth, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["--quiet", "train", "--dataset", str(tiny_synth), "--model", "dove-s", "--epochs", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--set", "features.image_size=64",
                 "--set", "model.params.embed_dim=32", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["--quiet", "salient", str(run), "--out", str(tmp_path / "m.png")]) == 2
    assert "no salient mask" in capsys.readouterr().err


def test_quiet_is_accepted_before_and_after_the_command(capsys) -> None:
    for argv in (["--quiet", "models"], ["models", "--quiet"], ["data", "--quiet", "info", "--help"]):
        try:
            code = main(argv)
        except SystemExit as stop:  # --help exits after printing
            code = stop.code
        assert code == 0, argv
    assert "dove-s" in capsys.readouterr().out


def test_an_output_folder_that_cannot_be_written_is_one_line_before_any_work(tiny_synth, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker / "run", "/proc/rsitr-cannot-write-here/run"):
        code = main(["train", "--dataset", str(tiny_synth), "--out", str(out), "--epochs", "1", "--quiet",
                     "--cache-dir", str(tmp_path / "cache")])
        err = capsys.readouterr().err
        assert code == 2 and "cannot write the run directory there" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # refused before the features were extracted
    code = main(["features", str(tiny_synth), "--cache-dir", str(blocker / "cache"), "--backbone", "resnet18",
                 "--image-size", "64", "--quiet"])
    assert code == 2 and "cannot write the feature cache there" in capsys.readouterr().err


def test_a_decompression_bomb_is_one_line_naming_the_limit(tmp_path):
    from PIL import Image

    from rsitr.data.images import read_image
    from rsitr.errors import ImageReadError

    path = tmp_path / "huge.png"
    Image.new("1", (14_000, 14_000)).save(path)  # 196 Mpx in a few hundred kB
    with pytest.raises(ImageReadError, match="huge.png: image is larger than the .*-pixel limit"):
        read_image(path)
