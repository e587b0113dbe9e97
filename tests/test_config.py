import pytest

from rsitr.errors import ConfigError
from rsitr_train.config import load_config


def test_defaults_are_the_papers():
    c = load_config(None)
    assert (c.train.epochs, c.train.batch_size, c.train.lr, c.train.lr_decay, c.train.lr_decay_every) == (50, 100, 2e-4, 0.7, 20)
    assert c.features.image_size == 256


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  path: somewhere\ntrain:\n  epochs: 3\nmodel:\n  name: dove-s\n")
    c = load_config(path, ["train.epochs=5", "model.params.dtga=none", "features.backbone_weights=w.pth"])
    assert c.data.path == "somewhere" and c.train.epochs == 5
    assert c.model.name == "dove-s" and c.model.params == {"dtga": "none"}
    assert c.features.backbone_weights == "w.pth"
    saved = tmp_path / "saved.yaml"
    saved.write_text(c.to_yaml())
    assert load_config(saved) == c  # a run directory's config.yaml reads back to the same config


def test_unknown_keys_are_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(path)
    with pytest.raises(ConfigError, match="section"):
        load_config(None, ["nonsense=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
