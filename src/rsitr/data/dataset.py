"""The one in-memory model of an image-text retrieval dataset.

Every reader (Karpathy json, AMFMN precomp text, PIR/HarMA json, the synthetic generator) produces a
:class:`RetrievalDataset`. Images and captions are separate lists joined by ``caption_image``, the
image index of each caption, so no code assumes exactly five captions per image (Sydney and
RSICD have images with fewer distinct captions, and NWPU lists each image once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rsitr.errors import SplitNotFoundError

SPLITS = ("train", "val", "test")


@dataclass
class RetrievalDataset:
    """Images, captions and the caption-to-image map of one dataset.

    Attributes:
        name: short dataset name (used in cache keys and reports).
        image_dir: directory the image filenames are resolved against.
        image_files: filename of each image, relative to ``image_dir``; the list index is the image id.
        image_splits: split of each image, one of ``SPLITS``.
        captions: raw text of each caption.
        caption_image: int64 array, the image id of each caption.
        scene_labels: optional scene class name of each image.
        keywords: optional keyword list of each caption.
    """

    name: str
    image_dir: Path
    image_files: list[str]
    image_splits: list[str]
    captions: list[str]
    caption_image: np.ndarray
    scene_labels: list[str] | None = None
    keywords: list[list[str]] | None = None
    source: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.image_dir = Path(self.image_dir)
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.image_splits) != len(self.image_files):
            raise ValueError("image_splits and image_files differ in length")
        if len(self.caption_image) != len(self.captions):
            raise ValueError("caption_image and captions differ in length")
        if self.scene_labels is not None and len(self.scene_labels) != len(self.image_files):
            raise ValueError("scene_labels and image_files differ in length")
        if self.keywords is not None and len(self.keywords) != len(self.captions):
            raise ValueError("keywords and captions differ in length")

    @property
    def num_images(self) -> int:
        return len(self.image_files)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def image_path(self, index: int) -> Path:
        """Absolute path of image ``index``."""
        return self.image_dir / self.image_files[index]

    def captions_of(self, index: int) -> list[int]:
        """Caption ids of image ``index``."""
        return np.flatnonzero(self.caption_image == index).tolist()

    def splits(self) -> list[str]:
        """The splits present, in canonical order."""
        present = set(self.image_splits)
        return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))

    def split_indices(self, name: str) -> list[int]:
        """Image ids of split ``name``, in dataset order; SplitNotFoundError naming the splits present if empty."""
        keep = [i for i, s in enumerate(self.image_splits) if s == name]
        if not keep:
            raise SplitNotFoundError(f"dataset {self.name!r} has no {name!r} split (has: {', '.join(self.splits())})")
        return keep

    def split(self, name: str) -> RetrievalDataset:
        """The subset of images in split ``name`` and their captions, with ids renumbered from 0."""
        return self.subset(self.split_indices(name))

    def subset(self, image_ids: list[int]) -> RetrievalDataset:
        """The given images (in the given order) and all their captions, renumbered from 0."""
        new_id = {old: new for new, old in enumerate(image_ids)}
        caption_ids = [c for c, img in enumerate(self.caption_image.tolist()) if img in new_id]
        caption_ids.sort(key=lambda c: (new_id[int(self.caption_image[c])], c))
        return RetrievalDataset(
            name=self.name,
            image_dir=self.image_dir,
            image_files=[self.image_files[i] for i in image_ids],
            image_splits=[self.image_splits[i] for i in image_ids],
            captions=[self.captions[c] for c in caption_ids],
            caption_image=np.array([new_id[int(self.caption_image[c])] for c in caption_ids], dtype=np.int64),
            scene_labels=None if self.scene_labels is None else [self.scene_labels[i] for i in image_ids],
            keywords=None if self.keywords is None else [self.keywords[c] for c in caption_ids],
            source=self.source,
        )

    def summary(self) -> str:
        """One line per split: images and captions."""
        lines = []
        for s in self.splits():
            sub = self.split(s)
            lines.append(f"{s}: {sub.num_images} images, {sub.num_captions} captions")
        return "; ".join(lines)
