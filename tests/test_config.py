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


@pytest.mark.parametrize("override, message", [
    ("train.epochs=ten", "--set train.epochs=ten: train.epochs must be an integer, got 'ten'"),
    ("train.epochs=1.5", "train.epochs must be an integer, got 1.5"),
    ("train.lr=fast", "--set train.lr=fast: train.lr must be a number"),
    ("train.batch_size=-5", "train.batch_size must be >= 1, got -5"),
    ("train.lr=0", "train.lr must be > 0"),
    ("features.image_size=8", "features.image_size must be >= 16"),
    ("text.dataset_keywords=maybe", "text.dataset_keywords must be true or false"),
    ("data.path=12", "data.path must be a string"),
])
def test_wrong_types_and_out_of_range_values_name_the_override(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_wrong_values_in_a_file_name_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match=r"run.yaml: train.epochs must be an integer"):
        load_config(path)


def test_numbers_yaml_reads_as_strings_are_numbers():
    config = load_config(None, ["train.lr=1e-5", "train.grad_clip=0", "train.backbone_lr=null"])
    assert config.train.lr == 1e-5 and isinstance(config.train.lr, float) and config.train.grad_clip == 0
