"""Dataset readers (Karpathy, precomp, PIR), layout detection, scene labels and image decoding.

Small files in each real layout are written into ``tmp_path``; the real releases in ``../shared/data``
are checked against their published sizes when that folder is present.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsitr.data import (
    RetrievalDataset,
    check_images,
    detect_layout,
    load_dataset,
    read_karpathy,
    read_pir,
    read_precomp,
    write_karpathy,
)
from rsitr.data.images import load_image
from rsitr.data.scenes import UCM_CLASSES, infer_scene_labels, read_class_lists, scene_from_prefix, ucm_scene
from rsitr.errors import ConfigError, DatasetError, ImageReadError, UnknownLayoutError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared(*parts: str) -> Path:
    """A path under the shared real data, skipping the test when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {'/'.join(parts)}")
    return path


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("".join(line + newline for line in lines)).encode("utf-8"))
    return path


def write_json_file(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------- Karpathy


def karpathy_json(tmp_path: Path) -> Path:
    """A UCM-like Karpathy file: train, restval, val, test; keywords per image and per sentence."""
    images = [
        {"filename": "1.tif", "split": "train", "imgid": 0, "keywords": ["farm", "field"],
         "sentences": [{"raw": "There is a piece of farmland .", "tokens": ["there", "is"]},
                       {"raw": "It is a piece of cropland .", "tokens": ["it", "is"]}]},
        {"filename": "150.tif", "split": "restval", "imgid": 1,
         "sentences": [{"raw": "An airplane at the airport .", "tokens": [], "keywords": ["plane"]}]},
        {"filename": "801.tif", "split": "val", "imgid": 2,
         "sentences": [{"raw": "Two freeways .", "tokens": []}, {"raw": "A freeway .", "tokens": []}]},
        {"filename": "2100.tif", "split": "test", "imgid": 3, "sentences": [{"raw": "A tennis court .", "tokens": []}]},
    ]
    (tmp_path / "imgs").mkdir(parents=True, exist_ok=True)
    return write_json_file(tmp_path / "dataset_ucm.json", {"dataset": "ucm", "images": images})


def test_karpathy_reads_splits_restval_keywords_and_ucm_scenes(tmp_path: Path) -> None:
    ds = read_karpathy(karpathy_json(tmp_path))
    assert ds.name == "ucm"
    assert ds.image_dir == tmp_path / "imgs"
    assert ds.image_files == ["1.tif", "150.tif", "801.tif", "2100.tif"]
    assert ds.image_splits == ["train", "train", "val", "test"]  # restval counts as train
    assert ds.captions[0] == "There is a piece of farmland ."
    assert ds.caption_image.tolist() == [0, 0, 1, 2, 2, 3]
    assert ds.caption_image.dtype == np.int64
    assert ds.keywords == [["farm", "field"], ["farm", "field"], ["plane"], [], [], []]
    assert ds.scene_labels == ["agricultural", "airplane", "freeway", "tenniscourt"]


def test_karpathy_image_dir_defaults(tmp_path: Path) -> None:
    path = write_json_file(tmp_path / "dataset_x.json", {"images": [
        {"filename": "a.png", "split": "test", "sentences": [{"raw": "a", "tokens": ["a"]}]}]})
    ds = read_karpathy(path)
    assert ds.image_dir == tmp_path and ds.name == "x"
    assert ds.keywords is None and ds.scene_labels is None
    (tmp_path / "images").mkdir()
    assert read_karpathy(path).image_dir == tmp_path / "images"
    (tmp_path / "imgs").mkdir()
    assert read_karpathy(path).image_dir == tmp_path / "imgs"
    assert read_karpathy(path, image_dir=tmp_path / "elsewhere", name="y").image_dir == tmp_path / "elsewhere"


def test_karpathy_errors_name_the_file(tmp_path: Path) -> None:
    bad_split = write_json_file(tmp_path / "dataset_a.json", {"images": [
        {"filename": "a.png", "split": "holdout", "sentences": []}]})
    with pytest.raises(DatasetError, match=r"dataset_a\.json.*holdout"):
        read_karpathy(bad_split)
    empty = write_json_file(tmp_path / "dataset_b.json", {"images": [
        {"filename": "a.png", "split": "train", "sentences": [{"raw": "  ", "tokens": []}]}]})
    with pytest.raises(DatasetError, match=r"dataset_b\.json.*empty caption"):
        read_karpathy(empty)
    no_images = write_json_file(tmp_path / "dataset_c.json", {"foo": []})
    with pytest.raises(DatasetError, match=r"dataset_c\.json.*images"):
        read_karpathy(no_images)
    broken = tmp_path / "dataset_d.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"dataset_d\.json: invalid JSON"):
        read_karpathy(broken)


def make_dataset(tmp_path: Path) -> RetrievalDataset:
    return RetrievalDataset(
        name="toy",
        image_dir=tmp_path / "images",
        image_files=["a/x_1.png", "y_2.png", "z_3.png"],
        image_splits=["train", "val", "train"],
        captions=["one", "two, with comma.", "three", "four"],
        caption_image=np.array([0, 1, 0, 2]),
        scene_labels=["x", "y", "z"],
        keywords=[["k1"], [], ["k3", "k4"], ["k5"]],
    )


def test_karpathy_write_read_round_trip(tmp_path: Path) -> None:
    original = make_dataset(tmp_path)
    path = tmp_path / "dataset_toy.json"
    write_karpathy(original, path)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary file
    back = read_karpathy(path, image_dir=original.image_dir)
    # captions come back grouped by image: image 0 owns captions 0 and 2
    assert back.image_files == original.image_files
    assert back.image_splits == original.image_splits
    assert back.scene_labels == original.scene_labels
    assert back.captions == ["one", "three", "two, with comma.", "four"]
    assert back.caption_image.tolist() == [0, 0, 1, 2]
    assert back.keywords == [["k1"], ["k3", "k4"], [], ["k5"]]
    assert back.name == "toy"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["images"][1]["sentences"][0]["tokens"] == ["two", "with", "comma"]
    # a second round trip is exact
    write_karpathy(back, tmp_path / "again.json")
    again = read_karpathy(tmp_path / "again.json", image_dir=back.image_dir, name="toy")
    for field in ("name", "image_dir", "image_files", "image_splits", "captions", "scene_labels", "keywords"):
        assert getattr(again, field) == getattr(back, field), field
    assert np.array_equal(again.caption_image, back.caption_image)


def test_split_and_subset_renumber(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    train = ds.split("train")
    assert train.image_files == ["a/x_1.png", "z_3.png"]
    assert train.captions == ["one", "three", "four"]
    assert train.caption_image.tolist() == [0, 0, 1]
    assert train.keywords == [["k1"], ["k3", "k4"], ["k5"]]
    assert train.scene_labels == ["x", "z"]
    sub = ds.subset([2, 1])
    assert sub.image_files == ["z_3.png", "y_2.png"]
    assert sub.captions == ["four", "two, with comma."]
    assert sub.caption_image.tolist() == [0, 1]
    with pytest.raises(KeyError, match="test"):
        ds.split("test")


# ---------------------------------------------------------------------------------------- precomp


def precomp_root(tmp_path: Path) -> Path:
    """RSITMD-like: train lists images once with 5 lines each, test repeats names per caption."""
    folder = tmp_path / "rsitmd" / "precomp"
    train_names = ["baseballfield_452.tif", "beach_1.tif"]
    write_lines(folder / "train_filename.txt", train_names)
    write_lines(folder / "train_caps.txt", [f"{n} caption {i}" for n in train_names for i in range(5)])
    test_names = ["boat_0.tif"] * 3 + ["playground_1.tif"] * 2
    write_lines(folder / "test_filename.txt", test_names, newline="\r\n")  # Sydney ships CRLF files
    write_lines(folder / "test_caps.txt", [f"test caption {i}" for i in range(5)], newline="\r\n")
    (tmp_path / "rsitmd" / "images").mkdir()
    return folder


def test_precomp_train_and_test_styles(tmp_path: Path) -> None:
    ds = read_precomp(precomp_root(tmp_path))
    assert ds.name == "rsitmd"
    assert ds.image_dir == tmp_path / "rsitmd" / "images"
    assert ds.image_files == ["baseballfield_452.tif", "beach_1.tif", "boat_0.tif", "playground_1.tif"]
    assert ds.image_splits == ["train", "train", "test", "test"]
    assert ds.caption_image.tolist() == [0] * 5 + [1] * 5 + [2] * 3 + [3] * 2
    assert ds.captions[5] == "beach_1.tif caption 0"
    assert ds.captions[-1] == "test caption 4"  # no trailing \r
    assert ds.scene_labels == ["baseballfield", "beach", "boat", "playground"]


def test_precomp_groups_non_consecutive_repeats(tmp_path: Path) -> None:
    write_lines(tmp_path / "test_filename.txt", ["a.tif", "b.tif", "a.tif"])
    write_lines(tmp_path / "test_caps.txt", ["a1", "b1", "a2"])
    ds = read_precomp(tmp_path)
    assert ds.image_files == ["a.tif", "b.tif"]
    assert ds.captions == ["a1", "a2", "b1"]
    assert ds.caption_image.tolist() == [0, 0, 1]
    assert ds.scene_labels is None  # numeric-free names without a scene prefix


def test_precomp_nwpu_style_three_captions_per_image(tmp_path: Path) -> None:
    folder = tmp_path / "nwpu" / "precomp"
    write_lines(folder / "test_filename.txt", ["airplane_1.jpg", "baseball_diamond_2.jpg"])
    write_lines(folder / "test_caps.txt", ["p1", "p2", "p3", "d1", "d2", "d3"])
    ds = read_precomp(folder)
    assert ds.name == "nwpu"
    assert ds.image_dir == tmp_path / "nwpu"  # no images/ folder: the dataset root
    assert ds.caption_image.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.scene_labels == ["airplane", "baseball_diamond"]


def test_precomp_verify_resplit(tmp_path: Path) -> None:
    folder = precomp_root(tmp_path)
    write_lines(folder / "train_filename_verify.txt", ["beach_1.tif"])
    write_lines(folder / "train_caps_verify.txt", ["b"] * 5)
    write_lines(folder / "val_filename_verify.txt", ["baseballfield_452.tif"])
    write_lines(folder / "val_caps_verify.txt", ["v"] * 5)
    ds = read_precomp(folder, verify=True)
    assert ds.image_files == ["beach_1.tif", "baseballfield_452.tif", "boat_0.tif", "playground_1.tif"]
    assert ds.image_splits == ["train", "val", "test", "test"]
    with pytest.raises(DatasetError, match="verify"):
        read_precomp(precomp_root(tmp_path / "plain"), verify=True)  # only the regular files


def test_precomp_count_mismatch_names_both_files_and_counts(tmp_path: Path) -> None:
    write_lines(tmp_path / "train_filename.txt", ["a.tif", "b.tif"])
    write_lines(tmp_path / "train_caps.txt", ["c"] * 7)
    with pytest.raises(DatasetError) as info:
        read_precomp(tmp_path)
    message = str(info.value)
    assert "train_caps.txt" in message and "train_filename.txt" in message
    assert "7" in message and "2" in message
    assert "\n" not in message


def test_precomp_empty_caption_names_file_and_line(tmp_path: Path) -> None:
    write_lines(tmp_path / "train_filename.txt", ["a.tif", "b.tif"])
    write_lines(tmp_path / "train_caps.txt", ["a1", "a2", "b1", ""])
    with pytest.raises(DatasetError, match=r"train_caps\.txt: line 4 is an empty caption"):
        read_precomp(tmp_path)


def test_precomp_drops_images_whose_captions_are_all_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # RSITMD's train_caps.txt has four images whose five lines are all empty.
    write_lines(tmp_path / "train_filename.txt", ["a.tif", "b.tif", "c.tif"])
    write_lines(tmp_path / "train_caps.txt", ["a1", "a2", "", "", "c1", "c2"])
    with caplog.at_level(logging.WARNING):
        ds = read_precomp(tmp_path)
    assert ds.image_files == ["a.tif", "c.tif"]
    assert ds.caption_image.tolist() == [0, 0, 1, 1]
    assert "b.tif" in caplog.text


def test_precomp_missing_partner_file(tmp_path: Path) -> None:
    write_lines(tmp_path / "val_caps.txt", ["x"])
    with pytest.raises(DatasetError, match=r"val_filename\.txt: file not found"):
        read_precomp(tmp_path)


# -------------------------------------------------------------------------------------------- PIR


def pir_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "rsitmd" / "json"
    write_json_file(folder / "rsitmd_train.json", [
        {"caption": "c0", "image": "train/bridge_942.tif", "image_id": 5, "label_name": "bridge", "label": 0},
        {"caption": "c1", "image": "train/park_1.tif", "image_id": 6, "label_name": "park", "label": 1},
        {"caption": "c2", "image": "train/bridge_942.tif", "image_id": 5, "label_name": "bridge", "label": 0},
    ])
    write_json_file(folder / "rsitmd_val.json", [
        {"image": "val/farmland_1767.tif", "caption": ["v0", "v1"], "label_name": "farmland", "label": 26}])
    write_json_file(folder / "rsitmd_test.json", [
        {"image": "test/parking_229.tif", "caption": ["t0", "t1", "t2"]}])
    return folder


def test_pir_reads_caption_and_image_entries(tmp_path: Path) -> None:
    ds = read_pir(pir_folder(tmp_path))
    assert ds.name == "rsitmd"
    assert ds.image_dir == tmp_path / "rsitmd"  # no images/ folder: the dataset root
    assert ds.image_files == ["bridge_942.tif", "park_1.tif", "farmland_1767.tif", "parking_229.tif"]
    assert ds.image_splits == ["train", "train", "val", "test"]
    assert ds.captions == ["c0", "c2", "c1", "v0", "v1", "t0", "t1", "t2"]
    assert ds.caption_image.tolist() == [0, 0, 1, 2, 2, 3, 3, 3]
    assert ds.scene_labels == ["bridge", "park", "farmland", "parking"]  # label_name, else prefix


def test_pir_keeps_split_folder_when_it_exists_and_reads_single_files(tmp_path: Path) -> None:
    folder = pir_folder(tmp_path)
    (tmp_path / "rsitmd" / "images" / "test").mkdir(parents=True)
    ds = read_pir(folder / "rsitmd_test.json")
    assert ds.image_dir == tmp_path / "rsitmd" / "images"
    assert ds.image_files == ["test/parking_229.tif"]
    both = read_pir([folder / "rsitmd_val.json", folder / "rsitmd_test.json"], name="other")
    assert both.name == "other" and both.splits() == ["val", "test"]


def test_pir_errors(tmp_path: Path) -> None:
    path = write_json_file(tmp_path / "x_test.json", [{"image": "a.tif", "caption": ["ok", ""]}])
    with pytest.raises(DatasetError, match=r"x_test\.json: entry 0 \(a\.tif\) has an empty caption"):
        read_pir(path)
    with pytest.raises(DatasetError, match=r"notes\.json"):
        read_pir(write_json_file(tmp_path / "notes.json", []))


# -------------------------------------------------------------------------------- auto-detection


def test_load_dataset_detects_each_layout(tmp_path: Path) -> None:
    karpathy = karpathy_json(tmp_path / "ucm")
    assert detect_layout(karpathy) == "karpathy"
    assert detect_layout(tmp_path / "ucm") == "karpathy"
    assert load_dataset(tmp_path / "ucm").num_images == 4
    assert load_dataset(karpathy, layout="karpathy").num_images == 4

    precomp_root(tmp_path / "a")
    assert detect_layout(tmp_path / "a" / "rsitmd") == "precomp"  # via precomp/
    assert load_dataset(tmp_path / "a" / "rsitmd").num_captions == 15
    assert load_dataset(tmp_path / "a" / "rsitmd" / "precomp" / "test_caps.txt").num_captions == 15

    pir_folder(tmp_path / "b")
    assert detect_layout(tmp_path / "b" / "rsitmd") == "pir"  # via json/
    assert detect_layout(tmp_path / "b" / "rsitmd" / "json" / "rsitmd_val.json") == "pir"
    assert load_dataset(tmp_path / "b" / "rsitmd").num_images == 4

    precomp_root(tmp_path / "b")  # a root with both precomp/ and json/
    assert load_dataset(tmp_path / "b" / "rsitmd").num_captions == 15
    assert load_dataset(tmp_path / "b" / "rsitmd", layout="pir").num_captions == 8


def test_load_dataset_unknown_layout_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(UnknownLayoutError) as info:
        load_dataset(tmp_path)
    message = str(info.value)
    assert message.startswith(str(tmp_path)) and "no known dataset layout" in message
    assert "dataset_*.json" in message and "_caps.txt" in message and "{name}_{train,val,test}.json" in message
    with pytest.raises(UnknownLayoutError, match=r"notes\.txt"):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(UnknownLayoutError, match="precomp"):
        load_dataset(tmp_path, layout="precomp")
    with pytest.raises(ConfigError, match="layout must be one of"):
        load_dataset(tmp_path, layout="coco")
    with pytest.raises(DatasetError, match=r"missing: no such file"):
        load_dataset(tmp_path / "missing")


def test_check_images(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    (tmp_path / "images" / "a").mkdir(parents=True)
    for name in ds.image_files[:2]:
        Image.new("RGB", (4, 4)).save(tmp_path / "images" / name)
    with pytest.raises(ImageReadError, match=r"z_3\.png: image file not found"):
        check_images(ds)
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "z_3.png")
    check_images(ds)


# ---------------------------------------------------------------------------------------- scenes


def test_scene_helpers(tmp_path: Path) -> None:
    assert scene_from_prefix("baseballfield_452.tif") == "baseballfield"
    assert scene_from_prefix("test/storage_tank_12.jpg") == "storage_tank"
    assert scene_from_prefix("00013.jpg") is None
    assert ucm_scene("1.tif") == "agricultural"
    assert ucm_scene("100.tif") == "agricultural"
    assert ucm_scene("101.webp") == "airplane"
    assert ucm_scene("2100.tif") == "tenniscourt"
    assert ucm_scene("2101.tif") is None
    assert len(UCM_CLASSES) == 21 and list(UCM_CLASSES) == sorted(UCM_CLASSES)
    write_lines(tmp_path / "classes" / "BaseballField.txt", ["00013.jpg", ""])
    write_lines(tmp_path / "classes" / "Port.txt", ["00256.jpg"])
    lists = read_class_lists(tmp_path / "classes")
    assert lists == {"00013.jpg": "baseballfield", "00256.jpg": "port"}
    assert infer_scene_labels(["00013.jpg", "beach_3.jpg"], class_lists=lists) == ["baseballfield", "beach"]
    assert infer_scene_labels(["00013.jpg", "7.tif"], class_lists=lists) is None  # partial -> none
    assert infer_scene_labels(["7.tif"], dataset_name="sydney") is None  # UCM rule only for UCM
    write_lines(tmp_path / "classes" / "Beach.txt", ["00256.jpg"])
    with pytest.raises(DatasetError, match=r"Port\.txt: 00256\.jpg is also listed"):
        read_class_lists(tmp_path / "classes")


# ---------------------------------------------------------------------------------------- images


def save_constant(path: Path, mode: str, size: tuple[int, int], value, **kwargs) -> Path:
    Image.new(mode, size, value).save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    ("filename", "mode", "value", "expected", "kwargs"),
    [
        ("rgb.png", "RGB", (10, 200, 30), (10, 200, 30), {}),
        ("rgba.png", "RGBA", (10, 200, 30, 255), (10, 200, 30), {}),
        ("gray.png", "L", 77, (77, 77, 77), {}),
        ("palette.png", "P", 0, (0, 0, 0), {}),
        ("rgb.tif", "RGB", (1, 2, 3), (1, 2, 3), {}),
        ("lossless.webp", "RGB", (90, 60, 30), (90, 60, 30), {"lossless": True}),
        ("photo.jpg", "RGB", (128, 64, 32), (128, 64, 32), {"quality": 100}),
    ],
)
def test_load_image_modes_give_known_pixels(tmp_path: Path, filename, mode, value, expected, kwargs) -> None:
    path = save_constant(tmp_path / filename, mode, (40, 24), value, **kwargs)  # non-square
    tensor, original = load_image(path, 32)
    assert original == (40, 24)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    want = torch.tensor(expected, dtype=torch.float32).view(3, 1, 1) / 255.0
    tolerance = 3 / 255 if filename.endswith(".jpg") else 1e-6
    assert torch.allclose(tensor, want.expand_as(tensor), atol=tolerance)


def test_load_image_16bit_tiff_is_rescaled_by_its_range(tmp_path: Path) -> None:
    array = np.zeros((16, 16), dtype=np.uint16)
    array[:, 8:] = 4000
    path = tmp_path / "deep.tif"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I;16")
    tensor, original = load_image(path, 16)
    assert original == (16, 16)
    assert torch.all(tensor[:, :, :8] == 0.0) and torch.all(tensor[:, :, 8:] == 1.0)


def test_load_image_missing_or_corrupt_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"nothere\.png: image file not found"):
        load_image(tmp_path / "nothere.png", 8)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 this is not really a jpeg")
    with pytest.raises(ImageReadError, match=r"corrupt\.jpg: cannot decode image"):
        load_image(corrupt, 8)


# -------------------------------------------------------------------------------------- real data


def test_real_rsitmd_precomp_and_pir() -> None:
    root = shared("rsitmd")
    precomp = load_dataset(root)
    test = precomp.split("test")
    assert (test.num_images, test.num_captions) == (452, 2260)
    assert precomp.split("train").num_images == 4291 - 4  # 4 train images have only empty lines
    labels = dict(zip(precomp.image_files, precomp.scene_labels))
    assert labels["baseballfield_452.tif"] == "baseballfield"
    assert labels["sparseresidential_3814.tif"] == "sparseresidential"
    assert labels["boat_0.tif"] == "boat"
    assert precomp.image_path(precomp.image_files.index("sparseresidential_3814.tif")).is_file()

    pir = load_dataset(root, layout="pir")
    test = pir.split("test")
    assert (test.num_images, test.num_captions) == (452, 2260)
    assert sorted(test.image_files) == sorted(precomp.split("test").image_files)
    assert pir.split("train").num_images + pir.split("val").num_images == 4291
    assert dict(zip(pir.image_files, pir.scene_labels))["bridge_942.tif"] == "bridge"

    verify = read_precomp(root / "precomp", verify=True)
    assert verify.splits() == ["train", "val", "test"]


def test_real_rsicd() -> None:
    root = shared("rsicd")
    ds = load_dataset(root)
    test = ds.split("test")
    assert (test.num_images, test.num_captions) == (1093, 5465)
    assert ds.scene_labels is not None
    labels = dict(zip(ds.image_files, ds.scene_labels))
    assert labels["00256.jpg"] == "bridge"  # numeric name, from classes/Bridge.txt
    assert labels["stadium_1.jpg"] == "stadium"
    pir = load_dataset(root, layout="pir")
    assert (pir.split("test").num_images, pir.split("test").num_captions) == (1093, 5465)
    tensor, _ = load_image(ds.image_path(ds.image_files.index("00013.jpg")), 64)
    assert tensor.shape == (3, 64, 64)


def test_real_ucm_captions() -> None:
    root = shared("ucm_captions")
    ds = load_dataset(root)
    assert ds.image_dir == root / "imgs"
    assert ds.split("train").num_images == 1680
    assert ds.split("val").num_images == 210
    assert ds.num_images == 1890
    check_images(ds)  # every image is present
    for index in (0, 937, ds.num_images - 1):  # decode a few
        tensor, _ = load_image(ds.image_path(index), 32)
        assert tensor.shape == (3, 32, 32)
    labels = dict(zip(ds.image_files, ds.scene_labels))
    assert labels["1.webp"] == "agricultural"
    assert labels["801.webp"] == "freeway"
    assert labels["2050.webp"] == "tenniscourt"
    assert "farmland" in ds.captions[ds.captions_of(ds.image_files.index("1.webp"))[0]]


def test_real_sydney() -> None:
    root = shared("sydney")
    ds = load_dataset(root)
    assert [ds.split(s).num_images for s in ("train", "val", "test")] == [497, 58, 28]
    assert ds.split("train").num_captions == 2485
    assert not any("\r" in c for c in ds.captions)
    tensor, original = load_image(root / "images" / "1.tif", 32)
    assert original == (500, 500) and tensor.shape == (3, 32, 32)


def test_real_nwpu() -> None:
    ds = load_dataset(shared("nwpu"))
    assert (ds.num_images, ds.num_captions) == (3150, 15750)
    assert ds.splits() == ["test"]
    assert ds.scene_labels is not None and ds.scene_labels[0] == "airplane"


def test_captions_without_a_word_are_reported_in_one_line(tmp_path: Path, caplog) -> None:
    """Empty captions are an error of the reader; captions of punctuation only are kept with one warning."""
    images = [{"filename": "a.png", "split": "train", "sentences": [{"raw": "?", "tokens": []}, {"raw": " ... !", "tokens": []},
                                                                     {"raw": "a road .", "tokens": []}]},
              {"filename": "b.png", "split": "test", "sentences": [{"raw": "two roads", "tokens": []}]}]
    path = write_json_file(tmp_path / "dataset_x.json", {"dataset": "x", "images": images})
    with caplog.at_level(logging.WARNING, logger="rsitr"):
        load_dataset(path)
    (record,) = [r for r in caplog.records if "no word" in r.getMessage()]
    assert "2 caption(s) have no word" in record.getMessage() and "a.png" in record.getMessage()
    caplog.clear()
    images[0]["sentences"] = images[0]["sentences"][2:]
    with caplog.at_level(logging.WARNING, logger="rsitr"):
        load_dataset(write_json_file(tmp_path / "dataset_y.json", {"dataset": "y", "images": images}))
    assert not [r for r in caplog.records if "no word" in r.getMessage()]
