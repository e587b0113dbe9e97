"""Writing the synthetic dataset: images, the Karpathy json and the detections file.

:func:`generate_synthetic` runs the three stages for every image (sample the scene, render it,
caption it, each on its own random stream) and writes the files described in the package
docstring of :mod:`rsitr.data.synth`. Caption tokens use the project tokenizer
(:func:`rsitr.text.tokenize`), the same one every reader and vocabulary uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rsitr.data.dataset import RetrievalDataset
from rsitr.data.synth.captions import make_captions
from rsitr.data.synth.render import render_scene
from rsitr.data.synth.sampling import CAPTION_STREAM, RENDER_STREAM, image_rng, make_scene
from rsitr.data.synth.scene import SceneDescription
from rsitr.errors import ConfigError
from rsitr.io import save_image, write_json
from rsitr.text import tokenize

#: Seed-stream suffix of the split shuffle, kept apart from every per-image stream.
_SPLIT_STREAM = 2**31 - 1


def _check_args(num_images: int, image_size: int, split_fractions: tuple[float, ...], captions_per_image: int) -> None:
    """Reject arguments that cannot give a valid dataset."""
    if num_images < 3:
        raise ConfigError(f"num_images must be at least 3 (one per split), got {num_images}")
    if image_size < 32:
        raise ConfigError(f"image_size must be at least 32 pixels, got {image_size}")
    if captions_per_image < 1:
        raise ConfigError(f"captions_per_image must be at least 1, got {captions_per_image}")
    if len(split_fractions) != 3 or any(f <= 0 for f in split_fractions) or abs(sum(split_fractions) - 1) > 1e-6:
        raise ConfigError(f"split_fractions must be three positive numbers summing to 1, got {split_fractions}")


def assign_splits(num_images: int, seed: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> list[str]:
    """Split name of each image: a seeded shuffle cut by ``fractions``; every split gets >= 1 image."""
    n_val = max(1, math.floor(fractions[1] * num_images + 0.5))  # round half up, not to even
    n_test = max(1, math.floor(fractions[2] * num_images + 0.5))
    n_train = num_images - n_val - n_test
    if n_train < 1:
        n_train, n_val, n_test = 1, max(1, num_images - 2), 1
    order = np.random.default_rng([int(seed), _SPLIT_STREAM]).permutation(num_images)
    splits = [""] * num_images
    for rank, img in enumerate(order.tolist()):
        splits[img] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return splits


def _detection_order(scene: SceneDescription) -> list[int]:
    """Object indices by decreasing box area (ties by drawing order), roads and runways last."""
    def key(i: int) -> tuple[bool, int, int]:
        obj = scene.objects[i]
        x1, y1, x2, y2 = obj.box
        return (obj.cls == "road", -(x2 - x1) * (y2 - y1), i)

    return sorted(range(len(scene.objects)), key=key)


def _detections_entry(scene: SceneDescription) -> dict[str, list]:
    """Boxes, scores and labels of one image, ordered by decreasing score ``1 - 0.001 * rank``."""
    order = _detection_order(scene)
    return {
        "boxes": [list(scene.objects[i].box) for i in order],
        "scores": [round(1.0 - 0.001 * rank, 3) for rank in range(len(order))],
        "labels": [scene.objects[i].cls for i in order],
    }


def _karpathy_entry(index: int, filename: str, split: str, label: str, texts: list[str], first_sentid: int) -> dict:
    """One image of the Karpathy json, its sentences numbered from ``first_sentid``."""
    return {
        "filename": filename,
        "imgid": index,
        "split": split,
        "sentences": [
            {"raw": t, "tokens": tokenize(t), "imgid": index, "sentid": first_sentid + j} for j, t in enumerate(texts)
        ],
        "sentids": list(range(first_sentid, first_sentid + len(texts))),
        "label": label,
    }


def generate_synthetic(
    out_dir: str | Path,
    num_images: int = 600,
    image_size: int = 128,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    captions_per_image: int = 5,
    progress: bool = True,
) -> RetrievalDataset:
    """Generate the synthetic dataset into ``out_dir`` and return it.

    Writes ``images/synth_XXXXX.png``, ``dataset_synth.json`` (Karpathy layout, ``label`` = scene
    type) and ``detections.json`` (ground-truth boxes); see :mod:`rsitr.data.synth` for the layouts.
    Deterministic: the same arguments give byte-identical files, and image ``i`` (and its captions
    and boxes) does not depend on ``num_images``; only the split assignment does.

    Raises:
        ConfigError: an argument is out of range.
    """
    _check_args(num_images, image_size, tuple(split_fractions), captions_per_image)
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    splits = assign_splits(num_images, seed, tuple(split_fractions))  # type: ignore[arg-type]
    files: list[str] = []
    labels: list[str] = []
    captions: list[str] = []
    caption_image: list[int] = []
    karpathy: list[dict] = []
    detections: dict[str, dict] = {}
    for i in tqdm(range(num_images), desc="synthetic images", unit="img", disable=not progress):
        scene = make_scene(seed, i, image_size)
        filename = f"synth_{i:05d}.png"
        save_image(image_dir / filename, render_scene(scene, image_rng(seed, i, RENDER_STREAM)))
        texts = make_captions(scene, image_rng(seed, i, CAPTION_STREAM), captions_per_image)
        karpathy.append(_karpathy_entry(i, filename, splits[i], scene.scene_type, texts, len(captions)))
        detections[filename] = _detections_entry(scene)
        files.append(filename)
        labels.append(scene.scene_type)
        captions.extend(texts)
        caption_image.extend([i] * len(texts))
    json_path = out / "dataset_synth.json"
    write_json(json_path, {"dataset": "synth", "images": karpathy})
    write_json(out / "detections.json", {"format": "rsitr-detections-v1", "images": detections})
    return RetrievalDataset(
        name="synth",
        image_dir=image_dir,
        image_files=files,
        image_splits=splits,
        captions=captions,
        caption_image=np.array(caption_image, dtype=np.int64),
        scene_labels=labels,
        source=json_path,
    )
