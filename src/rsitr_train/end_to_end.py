"""End-to-end training: the backbone learns with the model, on images decoded once into memory.

With ``train.train_backbone: true`` the trainer (:mod:`rsitr_train.trainer`) reads no feature
cache. The backbone is built as feature extraction builds it (``features.backbone_weights``, or
the random init seeded by ``features.backbone_seed``), in channels_last layout, and every image
of the training and validation splits is decoded once into memory as uint8 at
``features.image_size`` (:class:`ImageStore`).

* Each batch's images (each distinct image once, however many of its captions the batch holds)
  are augmented when ``train.augment`` is on (:func:`end_to_end_augment`; drawn from a generator
  seeded by (seed, epoch), so a resumed run sees the same batches), normalised, and passed
  through :func:`rsitr.features.backbone_features`, the very function that fills the feature
  cache, so the model receives the same dict as from the cache. The region boxes are those the
  cache uses, moved with the image by the crop, flips and turns (:func:`transform_boxes`).
* BatchNorm layers of the backbone stay in eval mode (frozen running statistics; their scales and
  shifts still train). A batch of 100 captions holds repeated images and is small for batch
  statistics, and batch statistics would make an image's features depend on the other images of
  its batch; with frozen statistics every encoding still depends on one item only, as evaluation
  assumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from rsitr.backbones import Backbone, backbone_info, create_backbone
from rsitr.data import RetrievalDataset
from rsitr.data.images import decode_images, normalize
from rsitr.devices import module_device
from rsitr.errors import ConfigError, ImageReadError
from rsitr.features import FeatureSpec, backbone_features
from rsitr.features.compute import choose_boxes
from rsitr.features.detections import lookup, read_detections
from rsitr.progress import progress_bar
from rsitr_train.augment import AugmentConfig, Geometry, affine_matrices, color_jitter, eval_transform, sample_geometry, warp


@dataclass
class ImageStore:
    """Decoded images of some dataset images, with the region boxes the feature cache uses for them."""

    image_ids: Tensor  # (n,) full-dataset ids held, one per row
    images: Tensor  # (n, 3, S, S) uint8
    boxes: Tensor  # (n, N_r, 4) float32, resized-image pixels
    mask: Tensor  # (n, N_r) bool, False for padding boxes
    given: Tensor  # (n,) bool, True where the boxes are the image's own detections (kept by every box source)
    row_of: Tensor  # (dataset images,) int64: the row of each dataset id, -1 when not held

    def rows(self, image_ids: Tensor) -> Tensor:
        """Rows of full-dataset ``image_ids``; KeyError when one is not held."""
        rows = self.row_of[image_ids.long()]
        if bool((rows < 0).any()):
            raise KeyError(f"image ids not decoded: {image_ids[rows < 0][:5].tolist()}")
        return rows

    def holds(self, image_ids: Tensor) -> bool:
        return bool((self.row_of[image_ids.long()] >= 0).all())



def end_to_end_augment() -> AugmentConfig:
    """The augmentation of end-to-end training: mild, since captions describe the whole scene.

    Flips and 90-degree turns (aerial scenes have no canonical "up"), a random resized crop
    keeping 60-100 % of the area (a harder crop could cut away objects a caption names), and
    colour jitter of +-10 % without hue changes (captions name colours: "green trees", "blue sea").
    """
    return AugmentConfig(scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.5, rotate90=True,
                         brightness=0.1, contrast=0.1, saturation=0.1, hue=0.0)


def _original_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header (no decoding)."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError) as exc:
        raise ImageReadError(path, f"cannot read image size ({exc.__class__.__name__})") from exc


def region_boxes(dataset: RetrievalDataset, spec: FeatureSpec, image_ids: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """The boxes, masks and own-box flags feature extraction uses for ``image_ids``.

    (n, N_r, 4) float32, (n, N_r) bool, (n,) bool. Detections come from ``spec.detections`` (by
    image filename, see :mod:`rsitr.features.detections`); images without an entry get the grid
    boxes and the flag False, so that under ``spec.boxes="activation"`` :func:`backbone_features`
    proposes theirs, exactly as the feature cache does.
    """
    detections = read_detections(spec.detections) if spec.detections is not None else None
    boxes, masks, given = [], [], []
    for i in image_ids:
        entry = lookup(detections, dataset.image_files[i]) if detections is not None else None
        size = _original_size(dataset.image_path(i)) if entry else (spec.image_size, spec.image_size)
        b, m, own = choose_boxes(entry, size, spec)
        boxes.append(b)
        masks.append(m)
        given.append(own)
    if not boxes:
        return (torch.zeros(0, spec.num_regions, 4), torch.zeros(0, spec.num_regions, dtype=torch.bool),
                torch.zeros(0, dtype=torch.bool))
    return torch.stack(boxes), torch.stack(masks), torch.tensor(given, dtype=torch.bool)


def load_image_store(dataset: RetrievalDataset, spec: FeatureSpec, image_ids: list[int], threads: int = 0,
                     progress: bool = True) -> ImageStore:
    """Decode ``image_ids`` once into memory (uint8 at ``spec.image_size``) with their region boxes."""
    images = decode_images([dataset.image_path(i) for i in image_ids], spec.image_size, threads, progress,
                           desc="decoding images", bands=spec.bands)
    boxes, mask, given = region_boxes(dataset, spec, image_ids)
    ids = torch.tensor(image_ids, dtype=torch.int64)
    row_of = torch.full((dataset.num_images,), -1, dtype=torch.int64)
    row_of[ids] = torch.arange(len(ids))
    return ImageStore(image_ids=ids, images=images, boxes=boxes, mask=mask, given=given, row_of=row_of)


def transform_boxes(boxes: Tensor, geometry: Geometry, in_size: int, out_size: int) -> Tensor:
    """Move (B, N, 4) boxes from the stored image onto its warped version (:func:`rsitr_train.augment.warp`).

    The warp samples input point ``A @ p + t`` for output point ``p`` (normalised coordinates), so
    a box corner moves to ``A^-1 (q - t)``. Crops, flips and 90-degree turns keep boxes
    axis-aligned, so the two moved corners span the new box; it is clipped to the output image
    (a box the crop cut away collapses onto the border and keeps its mask).
    """
    theta = affine_matrices(geometry).double()
    inverse = torch.linalg.inv(theta[:, :, :2])  # (B, 2, 2)
    corners = boxes.double().reshape(boxes.shape[0], boxes.shape[1], 2, 2) * (2.0 / in_size) - 1.0
    moved = torch.einsum("bij,bnkj->bnki", inverse, corners - theta[:, None, None, :, 2])
    pixels = (moved + 1.0) * (out_size / 2.0)
    lo, hi = pixels.min(dim=2).values, pixels.max(dim=2).values
    return torch.cat([lo, hi], dim=-1).clamp(0.0, float(out_size)).float()


def _transform(images: Tensor, boxes: Tensor, mask: Tensor, size: int, augment: AugmentConfig | None,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Eval transform, or the augmentation of :func:`rsitr_train.augment.augment_batch` with boxes moved along.

    The augmentation calls augment_batch's steps one by one (same draws, same result) to keep the
    geometry for the boxes. Padding boxes stay zero.
    """
    if augment is None or generator is None:
        return eval_transform(images, size), boxes
    geometry = sample_geometry(images.shape[0], images.shape[-2], images.shape[-1], augment, generator)
    warped = color_jitter(warp(images, geometry, size), augment, generator)
    moved = transform_boxes(boxes, geometry, images.shape[-1], size)
    return warped, torch.where(mask.unsqueeze(-1), moved, boxes)


def store_features(backbone: Backbone, store: ImageStore, image_ids: Tensor, spec: FeatureSpec, precision: str,
                   augment: AugmentConfig | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Features of ``image_ids`` (repeats allowed) from decoded images, differentiable in the backbone.

    Each distinct image runs through the backbone once; rows are then repeated to follow
    ``image_ids``. Returns the dict :meth:`ImageFeatures.select` returns for the same ids.
    """
    unique, inverse = torch.unique(image_ids.cpu(), return_inverse=True)
    rows = store.rows(unique)
    images, boxes = _transform(store.images[rows], store.boxes[rows], store.mask[rows], spec.image_size, augment, generator)
    info = backbone_info(spec.backbone)
    device = module_device(backbone)  # augmentation draws stay on the CPU generator; the backbone runs where it lives
    features = backbone_features(backbone, normalize(images, info.mean, info.std).to(device), boxes.to(device),
                                 store.mask[rows].to(device), spec, precision, given=store.given[rows].to(device))
    return {key: value.index_select(0, inverse.to(device)) for key, value in features.items()}


@torch.no_grad()
def compute_store_features(backbone: Backbone, store: ImageStore, image_ids: Tensor, spec: FeatureSpec, precision: str,
                           batch_size: int, progress: bool = True) -> dict[str, Tensor]:
    """Eval-mode features of ``image_ids`` (eval transform, no gradients), in batches of ``batch_size``."""
    backbone.eval()
    parts = [store_features(backbone, store, chunk, spec, precision)
             for chunk in progress_bar(image_ids.split(max(1, batch_size)), desc="backbone features", enabled=progress)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def trainable_backbone_parameters(backbone: Backbone) -> list[nn.Parameter]:
    """Parameters that shape the features: everything but the unused classifier head."""
    heads = tuple(backbone.head_prefixes)
    return [p for name, p in backbone.named_parameters() if p.requires_grad and not name.startswith(heads)]


def backbone_train_mode(backbone: Backbone) -> None:
    """Training mode with every BatchNorm in eval mode: frozen statistics, trainable scale and shift."""
    backbone.train()
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def build_trainable_backbone(spec: FeatureSpec) -> Backbone:
    """The backbone feature extraction would use (weights, or seeded init), ready to train.

    Raises:
        ConfigError: the backbone has no trainable parameters outside its classifier.
    """
    backbone = create_backbone(spec.backbone, spec.weights, spec.seed).to(memory_format=torch.channels_last)
    if not trainable_backbone_parameters(backbone):
        raise ConfigError(f"train.train_backbone: backbone {spec.backbone!r} has no trainable parameters")
    backbone_train_mode(backbone)
    return backbone
