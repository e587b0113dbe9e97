"""ImageFolder trees and retrieval datasets as scene-classification data."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsitr.data import load_dataset
from rsitr.data.imagefolder import (
    ClassificationData,
    load_classification_data,
    load_imagefolder,
    read_imagefolder,
    scene_classification_data,
    stratified_split,
)
from rsitr.data.images import decode_images
from rsitr.errors import DatasetError, ImageReadError, SplitNotFoundError

COUNTS = {"harbor": 4, "beach": 5, "forest": 7}


def _png(path: Path, value: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def _tree(root: Path, counts: dict[str, int] = COUNTS) -> Path:
    for k, (name, n) in enumerate(counts.items()):
        for i in range(n):
            _png(root / name / f"{name}_{i}.png", 40 * k + i)
    return root


def test_reads_classes_paths_and_labels(tmp_path: Path) -> None:
    root = _tree(tmp_path / "scenes")
    (root / "beach" / "notes.txt").write_text("not an image")
    (root / "forest" / ".hidden.png").write_bytes(b"ignored")
    _png(root / "forest" / "nested" / "forest_extra.PNG", 1)
    (root / ".cache").mkdir()
    tree = read_imagefolder(root)
    assert tree.classes == ["beach", "forest", "harbor"]
    assert len(tree.paths) == len(tree.labels) == 4 + 5 + 7 + 1
    for path, label in zip(tree.paths, tree.labels):
        assert path.relative_to(root).parts[0] == tree.classes[label]
        assert path.suffix.lower() == ".png"
    assert np.bincount(tree.labels).tolist() == [5, 8, 4]


def test_stratified_split_sizes_and_determinism(tmp_path: Path) -> None:
    root = _tree(tmp_path / "scenes")
    data = load_imagefolder(root, val_fraction=0.25, seed=0)
    # per class round(n / 4), at least one: beach 5 -> 1, forest 7 -> 2, harbor 4 -> 1
    assert data.counts("val") == [1, 2, 1]
    assert data.counts("train") == [4, 5, 3]
    assert not set(data.train_paths) & set(data.val_paths)
    assert len(set(data.train_paths) | set(data.val_paths)) == 16
    again = load_imagefolder(root, val_fraction=0.25, seed=0)
    assert again.val_paths == data.val_paths and again.train_paths == data.train_paths
    others = [load_imagefolder(root, val_fraction=0.25, seed=s).val_paths for s in range(1, 6)]
    assert any(o != data.val_paths for o in others)


def test_split_edge_cases() -> None:
    labels = [0, 0, 0, 1, 2, 2]
    train, val = stratified_split(labels, 0.0, seed=1)
    assert train == list(range(6)) and val == []
    train, val = stratified_split(labels, 0.5, seed=1)
    assert 3 in train and 3 not in val  # a class with one image stays in training
    assert sorted(train + val) == list(range(6))
    assert [labels[i] for i in val].count(2) == 1
    with pytest.raises(ValueError):
        stratified_split(labels, 1.0)


def test_ready_made_train_and_val_folders(tmp_path: Path) -> None:
    root = tmp_path / "aid"
    _tree(root / "train", {"airport": 3, "beach": 2})
    _tree(root / "val", {"beach": 2})
    _tree(root / "test", {"airport": 1})
    data = load_imagefolder(root, val_fraction=0.5)
    assert data.classes == ["airport", "beach"]
    assert len(data.train_paths) == 5 and data.counts("val") == [0, 2]
    assert all("val" in p.parts for p in data.val_paths)


def test_train_folder_alone_is_split(tmp_path: Path) -> None:
    root = tmp_path / "aid"
    _tree(root / "train", {"airport": 4, "beach": 4})
    data = load_imagefolder(root, val_fraction=0.25)
    assert data.classes == ["airport", "beach"]
    assert data.counts("val") == [1, 1] and data.counts("train") == [3, 3]


def test_val_class_unknown_to_train_names_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "aid"
    _tree(root / "train", {"airport": 2, "beach": 2})
    _tree(root / "val", {"desert": 1})
    with pytest.raises(DatasetError, match="desert") as info:
        load_imagefolder(root)
    assert str(root / "val" / "desert") in str(info.value)


def test_empty_folder_error_names_it(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DatasetError, match="empty folder") as info:
        read_imagefolder(root)
    assert str(root) in str(info.value) and "\n" not in str(info.value)


def test_class_folder_without_images_is_named(tmp_path: Path) -> None:
    root = _tree(tmp_path / "scenes", {"beach": 2})
    (root / "forest").mkdir()
    (root / "forest" / "readme.txt").write_text("no pictures here")
    with pytest.raises(DatasetError, match="no image files") as info:
        load_imagefolder(root)
    assert str(root / "forest") in str(info.value)


def test_images_without_class_folders_and_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _png(root / "a.png", 3)
    with pytest.raises(DatasetError, match="no class folders") as info:
        read_imagefolder(root)
    assert str(root) in str(info.value)
    with pytest.raises(DatasetError, match="no such folder"):
        read_imagefolder(tmp_path / "nowhere")


def test_unreadable_image_is_named_when_decoding(tmp_path: Path) -> None:
    root = _tree(tmp_path / "scenes", {"beach": 3})
    broken = root / "beach" / "beach_9.png"
    broken.write_bytes(b"\x89PNG but not really")
    data = load_imagefolder(root, val_fraction=0.0)
    with pytest.raises(ImageReadError) as info:
        decode_images(data.train_paths, 8, threads=2, progress=False)
    assert str(broken) in str(info.value) and "\n" not in str(info.value)


def test_decode_images_gives_uint8_at_the_size(tmp_path: Path) -> None:
    root = _tree(tmp_path / "scenes", {"beach": 3})
    paths = read_imagefolder(root).paths
    images = decode_images(paths, 10, threads=2, progress=False)
    assert images.shape == (3, 3, 10, 10) and str(images.dtype) == "torch.uint8"
    assert images[:, 0, 5, 5].tolist() == [0, 1, 2]  # the solid values written above, in path order


def test_scene_classification_data_from_a_retrieval_dataset(tiny_synth: Path) -> None:
    dataset = load_dataset(tiny_synth)
    assert dataset.scene_labels is not None
    train_ids, val_ids = dataset.split_indices("train"), dataset.split_indices("val")
    classes = sorted({dataset.scene_labels[i] for i in train_ids})
    unseen = [i for i in val_ids if dataset.scene_labels[i] not in classes]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = scene_classification_data(dataset)
    assert data.classes == classes
    assert data.train_paths == [dataset.image_path(i) for i in train_ids]
    assert [data.classes[k] for k in data.train_labels] == [dataset.scene_labels[i] for i in train_ids]
    kept = [i for i in val_ids if i not in unseen]
    assert data.val_paths == [dataset.image_path(i) for i in kept]
    assert [data.classes[k] for k in data.val_labels] == [dataset.scene_labels[i] for i in kept]
    assert data.dropped_val == len(unseen)
    assert any(str(len(unseen)) in str(w.message) for w in caught) == bool(unseen)
    assert not {dataset.image_path(i) for i in dataset.split_indices("test")} & set(data.train_paths + data.val_paths)


def test_val_images_of_unseen_classes_are_dropped_with_a_warning(tiny_synth: Path) -> None:
    dataset = load_dataset(tiny_synth)
    val_ids = dataset.split_indices("val")
    labels = list(dataset.scene_labels)
    labels[val_ids[0]] = "volcano"  # a class no training image has
    relabelled = dataclasses.replace(dataset, scene_labels=labels)
    with pytest.warns(UserWarning, match="dropped"):
        data = scene_classification_data(relabelled)
    assert dataset.image_path(val_ids[0]) not in data.val_paths
    assert data.dropped_val >= 1 and "volcano" not in data.classes


def test_held_out_fraction_when_no_val_split(tiny_synth: Path) -> None:
    dataset = load_dataset(tiny_synth)
    data = scene_classification_data(dataset, val_split=None, val_fraction=0.3, seed=2)
    train_paths = {dataset.image_path(i) for i in dataset.split_indices("train")}
    assert set(data.train_paths) | set(data.val_paths) == train_paths
    assert data.val_paths and not set(data.train_paths) & set(data.val_paths)


def test_dataset_without_scene_labels_names_its_source(tiny_synth: Path) -> None:
    dataset = dataclasses.replace(load_dataset(tiny_synth), scene_labels=None)
    with pytest.raises(DatasetError, match="no scene labels") as info:
        scene_classification_data(dataset)
    assert str(dataset.source) in str(info.value)
    with pytest.raises(SplitNotFoundError):
        scene_classification_data(load_dataset(tiny_synth), train_split="training")


def test_load_classification_data_dispatches_on_the_path(tiny_synth: Path, tmp_path: Path) -> None:
    from_dataset = load_classification_data(tiny_synth)
    assert from_dataset.classes == scene_classification_data(load_dataset(tiny_synth)).classes
    from_tree = load_classification_data(_tree(tmp_path / "scenes"), val_fraction=0.25)
    assert from_tree.classes == ["beach", "forest", "harbor"] and len(from_tree.val_paths) == 4


def test_classification_data_checks_labels() -> None:
    with pytest.raises(ValueError):
        ClassificationData(classes=["a", "b"], train_paths=[Path("x.png")], train_labels=[2])
