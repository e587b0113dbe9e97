"""Training and checkpointing.

A run directory holds everything needed to evaluate or resume a run::

    config.yaml          the resolved run configuration
    vocab.json           the vocabulary (AMFMN layout)
    model.safetensors    weights of the epoch with the best validation mR (never chosen on test)
    model.json           its model spec, feature spec, vocabulary digest, epoch and val metrics
    backbone.safetensors the backbone of that epoch (end-to-end runs only; torchvision keys, so
                         ``--backbone-weights`` and :func:`rsitr.backbones.create_backbone` load it)
    resume.pt            last epoch's model, optimiser, scheduler and RNG state (for resuming),
                         and the backbone in end-to-end runs
    metrics.csv          loss terms and validation metrics per epoch
    training_curves.png  the same, plotted

Training draws batches over captions (each epoch visits every training caption once), looks up the
cached features of each caption's image, and steps Adam with the paper's step decay.

``train.precision: bf16`` runs the model's forward (``training_loss``, and validation scoring)
under CPU bfloat16 autocast; master weights, gradients and the optimiser stay float32.

End-to-end training (``train.train_backbone: true``) trains the backbone with the model instead of
reading cached features:

* The backbone is built as feature extraction builds it (``features.backbone_weights``, or the
  random init seeded by ``features.backbone_seed``), in channels_last layout, and every image of
  the training and validation splits is decoded once into memory as uint8 at
  ``features.image_size`` (:func:`rsitr.pretrain.decode_images`).
* Each batch's images (each distinct image once, however many of its captions the batch holds) are
  augmented when ``train.augment`` is on (:func:`end_to_end_augment`: flips, 90-degree turns, a
  mild random resized crop, mild colour jitter; drawn from a generator seeded by (seed, epoch), so
  a resumed run sees the same batches), normalised, and passed through
  :func:`rsitr.features.backbone_features`, the very function that fills the feature cache, so the
  model receives the same dict as from the cache. The region boxes are those the cache uses,
  moved with the image by the crop, flips and turns.
* BatchNorm layers of the backbone stay in eval mode (frozen running statistics; their scales and
  shifts still train). A batch of 100 captions holds repeated images and is small for batch
  statistics, and batch statistics would make an image's features depend on the other images of
  its batch; with frozen statistics every encoding still depends on one item only, as evaluation
  assumes.
* The model's feature standardiser (``standardize``) is fitted once, on the initial backbone's
  training features (the feature cache), and kept fixed: re-fitting it as the backbone moves
  would shift the inputs of the layers that are learning to read them.
* One Adam optimiser with two parameter groups: the model at ``train.lr`` and the backbone at
  ``train.backbone_lr`` (default a tenth of ``lr``: pretrained features should move slowly
  while the heads are still random). Gradients are clipped per group; the step decay applies to
  both.
* Validation computes the validation images' features with the current backbone (eval transform,
  no gradients) each epoch; :func:`load_run` rebuilds the requested split's features from the saved
  ``backbone.safetensors`` rather than from the frozen cache.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from rsitr.augment import AugmentConfig, Geometry, affine_matrices, color_jitter, eval_transform, sample_geometry, warp
from rsitr.backbones import Backbone, create_backbone
from rsitr.config import RunConfig, load_config
from rsitr.data import RetrievalDataset, load_dataset
from rsitr.data.images import normalize
from rsitr.detections import lookup, read_detections, select_boxes
from rsitr.errors import CheckpointError, ConfigError, ImageReadError
from rsitr.evaluation import autocast, compute_similarity, recall_metrics
from rsitr.features import FeatureSpec, ImageFeatures, backbone_features, extract_features, feature_dims
from rsitr.io import atomic_path, save_tensors, write_json, write_text
from rsitr.models import RetrievalModel, create_model, get_model_spec
from rsitr.models.base import TrainingCorpus
from rsitr.models.registry import ModelSpec
from rsitr.text import Vocabulary, encode_batch, keyword_inputs, load_glove

CHECKPOINT = "model.safetensors"
BACKBONE_CHECKPOINT = "backbone.safetensors"
RESUME = "resume.pt"
METRICS = "metrics.csv"


@dataclass
class SplitData:
    """Captions of one split as token tensors, with the (full-dataset) image id of each."""

    image_ids: torch.Tensor  # (n_images,) full-dataset ids of the split's images
    tokens: torch.Tensor  # (n_captions, L)
    lengths: torch.Tensor  # (n_captions,)
    caption_image: torch.Tensor  # (n_captions,) full-dataset image id of each caption
    caption_local_image: np.ndarray  # (n_captions,) index into image_ids of each caption
    caption_ids: torch.Tensor  # (n_captions,) full-dataset caption id of each caption
    extras: dict[str, torch.Tensor]  # the model's text_inputs, row-aligned with tokens (e.g. keyword_tokens)


@dataclass
class ImageStore:
    """Decoded images of some dataset images, with the region boxes the feature cache uses for them."""

    image_ids: Tensor  # (n,) full-dataset ids held, one per row
    images: Tensor  # (n, 3, S, S) uint8
    boxes: Tensor  # (n, N_r, 4) float32, resized-image pixels
    mask: Tensor  # (n, N_r) bool, False for padding boxes
    row_of: Tensor  # (dataset images,) int64: the row of each dataset id, -1 when not held

    def rows(self, image_ids: Tensor) -> Tensor:
        """Rows of full-dataset ``image_ids``; KeyError when one is not held."""
        rows = self.row_of[image_ids.long()]
        if bool((rows < 0).any()):
            raise KeyError(f"image ids not decoded: {image_ids[rows < 0][:5].tolist()}")
        return rows

    def holds(self, image_ids: Tensor) -> bool:
        return bool((self.row_of[image_ids.long()] >= 0).all())


@dataclass
class Prepared:
    """Everything a run needs besides the model: dataset, vocabulary, features, model spec.

    ``features`` is the frozen-backbone cache (None when an end-to-end run is loaded for
    evaluation: its features come from ``backbone``). ``backbone`` and ``images`` are set in
    end-to-end training (the backbone being trained and the decoded train/val images) and when
    such a run is loaded (the trained backbone; images are decoded per evaluated split).
    """

    config: RunConfig
    dataset: RetrievalDataset
    vocab: Vocabulary
    features: ImageFeatures | None
    spec: ModelSpec
    feature_spec: FeatureSpec
    backbone: Backbone | None = None
    images: ImageStore | None = None


def vocab_digest(vocab: Vocabulary) -> str:
    return hashlib.sha256("\n".join(vocab.idx2word).encode("utf-8")).hexdigest()[:16]


def feature_spec(config: RunConfig, spec: ModelSpec) -> FeatureSpec:
    """The feature-extraction spec of a run: the run's feature section, then what the model needs.

    The model's ``features`` (e.g. DSAN's 299 px and 8 × 8 Inception grid) override the run's
    defaults, since the model cannot run on anything else.
    """
    f = config.features
    values: dict[str, Any] = {
        "backbone": spec.backbone,
        "weights": f.backbone_weights,
        "image_size": f.image_size,
        "detections": f.detections,
        "precision": f.precision,
        "seed": f.backbone_seed,
    }
    values.update(spec.features)
    return FeatureSpec(**values)


def text_extras(dataset: RetrievalDataset, caption_ids: list[int], vocab: Vocabulary,
                text_inputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The extra text inputs a model declares (``RetrievalModel.text_inputs``) for these captions."""
    extras: dict[str, torch.Tensor] = {}
    for name in text_inputs:
        if name != "keywords":
            raise ConfigError(f"unknown text input {name!r} (known: keywords)")
        keywords = None if dataset.keywords is None else [dataset.keywords[c] for c in caption_ids]
        tokens, lengths = keyword_inputs(vocab, [dataset.captions[c] for c in caption_ids], keywords)
        extras["keyword_tokens"], extras["keyword_lengths"] = tokens, lengths
    return extras


def split_data(dataset: RetrievalDataset, split: str, vocab: Vocabulary, max_length: int,
               text_inputs: tuple[str, ...] = ()) -> SplitData:
    """Tokenise the captions of ``split``; image and caption ids stay those of the full dataset."""
    image_ids = dataset.split_indices(split)
    local = {img: k for k, img in enumerate(image_ids)}
    caption_ids = [c for c, img in enumerate(dataset.caption_image.tolist()) if img in local]
    tokens, lengths = encode_batch(vocab, [dataset.captions[c] for c in caption_ids], max_length)
    caption_image = dataset.caption_image[caption_ids]
    return SplitData(
        image_ids=torch.tensor(image_ids, dtype=torch.int64),
        tokens=tokens,
        lengths=lengths,
        caption_image=torch.from_numpy(caption_image),
        caption_local_image=np.array([local[int(i)] for i in caption_image], dtype=np.int64),
        caption_ids=torch.tensor(caption_ids, dtype=torch.int64),
        extras=text_extras(dataset, caption_ids, vocab, text_inputs),
    )


def prepare(config: RunConfig, vocab: Vocabulary | None = None, progress: bool = True, extract: bool = True) -> Prepared:
    """Read the dataset, build or load the vocabulary, and extract (or load cached) features.

    ``extract=False`` skips the feature cache (``features`` is None): for an end-to-end run whose
    features come from its own trained backbone.
    """
    if not config.data.path:
        raise ConfigError("data.path is empty: give the dataset file or folder (--dataset PATH)")
    dataset = load_dataset(config.data.path, layout=config.data.layout, image_dir=config.data.image_dir, name=config.data.name)
    for split in (config.data.train_split, config.data.val_split):
        if split not in dataset.splits():
            raise ConfigError(f"{config.data.path}: no {split!r} split (has: {', '.join(dataset.splits())})")
    if vocab is None:
        if config.text.vocab:
            vocab = Vocabulary.load(config.text.vocab)
        else:
            train = dataset.split(config.data.train_split)
            vocab = Vocabulary.build(train.captions, min_count=config.text.min_count)
    spec = get_model_spec(config.model.name).with_overrides(config.model.params, config.model.features)
    fspec = feature_spec(config, spec)
    features = None
    if extract:
        features = extract_features(dataset, fspec, Path(config.features.cache_dir),
                                    batch_size=config.features.batch_size, progress=progress)
    return Prepared(config=config, dataset=dataset, vocab=vocab, features=features, spec=spec, feature_spec=fspec)


def build_model(prepared: Prepared, fit_statistics: bool = True) -> RetrievalModel:
    """Create the run's model; word vectors come from GloVe when configured.

    ``fit_statistics`` fits the feature standardiser on the training split; callers that load
    weights right after (evaluation, resuming) skip it, since the checkpoint holds the statistics.
    """
    torch.manual_seed(prepared.config.train.seed)
    dims = feature_dims(prepared.feature_spec)
    model = create_model(prepared.spec, feature_dims=dims, vocab_size=len(prepared.vocab))
    if prepared.config.text.glove:
        embedding = getattr(model, "word_embedding", None)
        if embedding is None:
            raise ConfigError(f"model {prepared.spec.name!r} has no word embedding to initialise from GloVe")
        weights, found = load_glove(prepared.config.text.glove, prepared.vocab, embedding.embedding_dim)
        embedding.weight.data.copy_(weights)
        print(f"GloVe: {found}/{len(prepared.vocab) - 1} words found")
    standardizer = getattr(model, "standardize", None)
    if fit_statistics and standardizer is not None:
        if prepared.features is None:
            raise ConfigError("fitting the feature standardiser needs the cached features (prepare with extract=True)")
        train_ids = torch.tensor(prepared.dataset.split_indices(prepared.config.data.train_split))
        standardizer.fit(prepared.features.select(train_ids))
    return model


def evaluate_split(model: RetrievalModel, prepared: Prepared, split: str, batch_size: int, progress: bool = True,
                   data: SplitData | None = None, precision: str | None = None) -> tuple[dict[str, float], Tensor, SplitData]:
    """Metrics, similarity matrix and caption data of one split.

    Args:
        data: the split already tokenised (else tokenised here).
        precision: ``"fp32"`` or ``"bf16"`` for the model (and a trained backbone); None = the
            run's ``train.precision``.

    Image features come from the cache, or in an end-to-end run from ``prepared.backbone``
    (:func:`split_image_features`).
    """
    precision = precision or prepared.config.train.precision
    if data is None:
        data = split_data(prepared.dataset, split, prepared.vocab, prepared.config.text.max_length, model.text_inputs)
    image_features = split_image_features(prepared, data.image_ids, precision, progress)
    sims = compute_similarity(model, image_features, data.tokens, data.lengths, batch_size=batch_size, progress=progress,
                              text_extras=data.extras, precision=precision)
    return recall_metrics(sims, data.caption_local_image), sims, data


def split_image_features(prepared: Prepared, image_ids: Tensor, precision: str, progress: bool = True) -> dict[str, Tensor]:
    """Features of ``image_ids``: from the cache, or from the run's own backbone when it has one."""
    if prepared.backbone is None:
        if prepared.features is None:
            raise ConfigError("no image features: the run has neither a feature cache nor a trained backbone")
        return prepared.features.select(image_ids)
    store = prepared.images
    if store is None or not store.holds(image_ids):
        store = load_image_store(prepared.dataset, prepared.feature_spec, image_ids.tolist(),
                                 threads=prepared.config.train.threads, progress=progress)
    return compute_store_features(prepared.backbone, store, image_ids, prepared.feature_spec, precision,
                                  prepared.config.features.batch_size, progress)


# ----------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model: RetrievalModel, prepared: Prepared, epoch: int, metrics: dict[str, float]) -> None:
    """Weights as safetensors; model spec, feature dims and vocabulary digest in its metadata."""
    metadata = {
        "rsitr_model": json.dumps(prepared.spec.to_dict()),
        "feature_dims": json.dumps(feature_dims(prepared.feature_spec)),
        "vocab_sha": vocab_digest(prepared.vocab),
        "vocab_size": str(len(prepared.vocab)),
        "epoch": str(epoch),
        "val_metrics": json.dumps(metrics),
    }
    description = {
        "model": prepared.spec.to_dict(),
        "features": prepared.feature_spec.to_dict(),
        "feature_dims": feature_dims(prepared.feature_spec),
        "vocab_size": len(prepared.vocab),
        "vocab_sha": vocab_digest(prepared.vocab),
        "epoch": epoch,
        "val_metrics": metrics,
    }
    if prepared.backbone is not None:  # end to end: the features come from this file, not the cache
        metadata["trained_backbone"] = description["trained_backbone"] = BACKBONE_CHECKPOINT
    save_tensors(path, model.state_dict(), metadata=metadata)
    write_json(path.with_suffix(".json"), description)


def save_backbone(path: Path, backbone: Backbone, epoch: int) -> None:
    """The backbone's state dict with torchvision keys (loadable by ``--backbone-weights``), atomically."""
    metadata = {"rsitr_backbone": backbone.name, "epoch": str(epoch)}
    save_tensors(path, backbone.state_dict(), metadata=metadata)


def load_trained_backbone(run_dir: Path, spec: FeatureSpec) -> Backbone:
    """The saved ``backbone.safetensors`` of an end-to-end run, frozen and in eval mode."""
    path = run_dir / BACKBONE_CHECKPOINT
    if not path.is_file():
        raise CheckpointError(path, "end-to-end run without its trained backbone")
    return create_backbone(spec.backbone, weights=path).eval().requires_grad_(False).to(memory_format=torch.channels_last)


def read_checkpoint_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(path, f"not a readable safetensors file ({exc.__class__.__name__})") from exc


def load_model_weights(path: Path, model: RetrievalModel, spec: ModelSpec, vocab: Vocabulary) -> dict[str, str]:
    """Load ``path`` into ``model`` after checking it was saved for this model and vocabulary."""
    meta = read_checkpoint_metadata(path)
    if "rsitr_model" not in meta:
        raise CheckpointError(path, "not an rsitr checkpoint (no model metadata)")
    saved = ModelSpec.from_dict(json.loads(meta["rsitr_model"]))
    if saved.architecture != spec.architecture or saved.params != spec.params:
        raise CheckpointError(path, f"checkpoint is of model {saved.architecture} {saved.params}, not {spec.architecture} {spec.params}")
    if meta.get("vocab_sha") != vocab_digest(vocab):
        raise CheckpointError(path, "checkpoint was trained with another vocabulary")
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(path, f"weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return meta


def load_run(run_dir: str | Path, progress: bool = True) -> tuple[RetrievalModel, Prepared]:
    """Rebuild the model of a run directory with its best weights, ready to evaluate.

    For an end-to-end run the trained backbone is loaded too (``prepared.backbone``) and the
    frozen cache is not read: :func:`evaluate_split` computes the split's features with it.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise CheckpointError(run_dir, "not a run directory (no config.yaml)")
    config = load_config(config_path)
    vocab = Vocabulary.load(run_dir / "vocab.json")
    end_to_end = config.train.train_backbone
    prepared = prepare(config, vocab=vocab, progress=progress, extract=not end_to_end)
    model = build_model(prepared, fit_statistics=False)
    load_model_weights(run_dir / CHECKPOINT, model, prepared.spec, vocab)
    if end_to_end:
        prepared.backbone = load_trained_backbone(run_dir, prepared.feature_spec)
    return model.eval(), prepared


# ----------------------------------------------------------------------------------------- training


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


def region_boxes(dataset: RetrievalDataset, spec: FeatureSpec, image_ids: list[int]) -> tuple[Tensor, Tensor]:
    """The boxes and masks feature extraction uses for ``image_ids``: (n, N_r, 4) float32, (n, N_r) bool.

    Detections come from ``spec.detections`` (by image filename, see :mod:`rsitr.detections`);
    images without an entry get the default boxes, exactly as the feature cache chooses them.
    """
    detections = read_detections(spec.detections) if spec.detections is not None else None
    boxes, masks = [], []
    for i in image_ids:
        entry = lookup(detections, dataset.image_files[i]) if detections is not None else None
        size = _original_size(dataset.image_path(i)) if entry else (spec.image_size, spec.image_size)
        b, m = select_boxes(entry[0] if entry else None, entry[1] if entry else None, size, spec.image_size,
                            spec.num_regions)
        boxes.append(b)
        masks.append(m)
    if not boxes:
        return torch.zeros(0, spec.num_regions, 4), torch.zeros(0, spec.num_regions, dtype=torch.bool)
    return torch.stack(boxes), torch.stack(masks)


def load_image_store(dataset: RetrievalDataset, spec: FeatureSpec, image_ids: list[int], threads: int = 0,
                     progress: bool = True) -> ImageStore:
    """Decode ``image_ids`` once into memory (uint8 at ``spec.image_size``) with their region boxes."""
    from rsitr.pretrain import decode_images

    images = decode_images([dataset.image_path(i) for i in image_ids], spec.image_size, threads, progress,
                           desc="decoding images")
    boxes, mask = region_boxes(dataset, spec, image_ids)
    ids = torch.tensor(image_ids, dtype=torch.int64)
    row_of = torch.full((dataset.num_images,), -1, dtype=torch.int64)
    row_of[ids] = torch.arange(len(ids))
    return ImageStore(image_ids=ids, images=images, boxes=boxes, mask=mask, row_of=row_of)


def transform_boxes(boxes: Tensor, geometry: Geometry, in_size: int, out_size: int) -> Tensor:
    """Move (B, N, 4) boxes from the stored image onto its warped version (:func:`rsitr.augment.warp`).

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
    """Eval transform, or the augmentation of :func:`rsitr.augment.augment_batch` with boxes moved along.

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
    unique, inverse = torch.unique(image_ids, return_inverse=True)
    rows = store.rows(unique)
    images, boxes = _transform(store.images[rows], store.boxes[rows], store.mask[rows], spec.image_size, augment, generator)
    features = backbone_features(backbone, normalize(images), boxes, store.mask[rows], spec, precision)
    return {key: value.index_select(0, inverse) for key, value in features.items()}


@torch.no_grad()
def compute_store_features(backbone: Backbone, store: ImageStore, image_ids: Tensor, spec: FeatureSpec, precision: str,
                           batch_size: int, progress: bool = True) -> dict[str, Tensor]:
    """Eval-mode features of ``image_ids`` (eval transform, no gradients), in batches of ``batch_size``."""
    backbone.eval()
    parts = [store_features(backbone, store, chunk, spec, precision)
             for chunk in tqdm(image_ids.split(max(1, batch_size)), desc="backbone features", disable=not progress,
                               leave=False)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _trainable_backbone_parameters(backbone: Backbone) -> list[nn.Parameter]:
    """Parameters that shape the features: everything but the unused classifier head."""
    heads = tuple(backbone.head_prefixes)
    return [p for name, p in backbone.named_parameters() if p.requires_grad and not name.startswith(heads)]


def _backbone_train_mode(backbone: Backbone) -> None:
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
    if not _trainable_backbone_parameters(backbone):
        raise ConfigError(f"train.train_backbone: backbone {spec.backbone!r} has no trainable parameters")
    _backbone_train_mode(backbone)
    return backbone


def _start_end_to_end(prepared: Prepared, train_ids: Tensor, val_ids: Tensor, progress: bool) -> None:
    """Build the trainable backbone and decode the training and validation images into ``prepared``."""
    prepared.backbone = build_trainable_backbone(prepared.feature_spec)
    ids = sorted(set(train_ids.tolist()) | set(val_ids.tolist()))
    prepared.images = load_image_store(prepared.dataset, prepared.feature_spec, ids,
                                       threads=prepared.config.train.threads, progress=progress)


def _build_optimizer(model: RetrievalModel, backbone: Backbone | None, config: RunConfig) -> torch.optim.Adam:
    """Adam over the model (``lr``), plus a second group for the backbone (``backbone_lr``) end to end."""
    heads = [p for p in model.parameters() if p.requires_grad]
    if backbone is None:
        return torch.optim.Adam(heads, lr=config.train.lr)
    groups = [{"params": heads},
              {"params": _trainable_backbone_parameters(backbone), "lr": config.train.effective_backbone_lr}]
    return torch.optim.Adam(groups, lr=config.train.lr)


def _lr_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig) -> torch.optim.lr_scheduler.StepLR:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.train.lr_decay_every, gamma=config.train.lr_decay)


def _save_resume(path: Path, model, optimizer, scheduler, epoch: int, best: float, history: list[dict],
                 backbone: Backbone | None = None) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "best_mR": best,
        "history_json": json.dumps(history),
        "torch_rng": torch.get_rng_state(),
    }
    if backbone is not None:
        state["backbone"] = backbone.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _restore(path: Path, model: RetrievalModel, backbone: Backbone | None, optimizer, scheduler) -> dict[str, Any]:
    """Load ``resume.pt`` into the model, backbone, optimiser, scheduler and the global RNG; returns the state."""
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    if backbone is not None:
        if "backbone" not in state:
            raise CheckpointError(path, "resume state has no backbone, but train.train_backbone is on")
        backbone.load_state_dict(state["backbone"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0].keys()))
    writer.writeheader()
    writer.writerows(history)
    write_text(run_dir / METRICS, buffer.getvalue())
    from rsitr.plots import plot_training_curves

    plot_training_curves(history, run_dir / "training_curves.png")


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Caption order of an epoch: a permutation seeded by (seed, epoch), so a resumed run repeats it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()  # a one-pair batch has no negative
    return batches


def _augment_generator(seed: int, epoch: int) -> torch.Generator:
    """The augmentation draws of an epoch, seeded by (seed, epoch) apart from the batch order."""
    return torch.Generator().manual_seed((seed * 100_003 + epoch) * 2 + 1)


def _same_config(run_dir: Path, config: RunConfig) -> bool:
    """Whether ``run_dir/config.yaml`` (if any) describes ``config``; keys it lacks take their defaults."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return True
    try:
        saved = load_config(path)
    except (ConfigError, TypeError):
        return False
    return saved.to_yaml() == config.to_yaml()


def train(config: RunConfig, run_dir: str | Path, progress: bool = True, log=print) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; resumes when ``run_dir`` holds a ``resume.pt`` of the same config.

    Returns a summary: best epoch, its validation metrics, seconds per epoch.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    resume_path = run_dir / RESUME
    if resume_path.exists():
        if not _same_config(run_dir, config):
            raise ConfigError(f"{run_dir}: holds a run with another config; choose a new --out or delete it")
        vocab = Vocabulary.load(run_dir / "vocab.json")
    else:
        vocab = None
    prepared = prepare(config, vocab=vocab, progress=progress)
    write_text(run_dir / "config.yaml", config.to_yaml())
    prepared.vocab.save(run_dir / "vocab.json")

    model = build_model(prepared, fit_statistics=not resume_path.exists())
    train_data = split_data(prepared.dataset, config.data.train_split, prepared.vocab, config.text.max_length, model.text_inputs)
    val_data = split_data(prepared.dataset, config.data.val_split, prepared.vocab, config.text.max_length, model.text_inputs)
    if config.train.train_backbone:
        _start_end_to_end(prepared, train_data.image_ids, val_data.image_ids, progress)
    backbone = prepared.backbone
    optimizer = _build_optimizer(model, backbone, config)
    scheduler = _lr_scheduler(optimizer, config)
    start_epoch, best, history = 0, -math.inf, []
    if resume_path.exists():
        state = _restore(resume_path, model, backbone, optimizer, scheduler)
        start_epoch, best, history = int(state["epoch"]) + 1, float(state["best_mR"]), json.loads(state["history_json"])
        log(f"resuming {run_dir} at epoch {start_epoch + 1}/{config.train.epochs}")

    model.prepare_training(TrainingCorpus(
        captions=prepared.dataset.captions, caption_image=prepared.dataset.caption_image,
        train_caption_ids=train_data.caption_ids.numpy(), keywords=prepared.dataset.keywords, vocab=prepared.vocab,
    ))
    n_params = model.num_parameters()
    n_backbone = sum(p.numel() for p in _trainable_backbone_parameters(backbone)) if backbone is not None else 0
    how = (f"+ {n_backbone / 1e6:.2f} M backbone trained end to end" if backbone is not None
           else "backbone frozen, features cached")
    log(f"model {prepared.spec.name}: {n_params / 1e6:.2f} M trainable parameters ({how})")
    for epoch in range(start_epoch, config.train.epochs):
        started = time.perf_counter()
        terms = _train_epoch(model, optimizer, prepared, train_data, epoch, progress)
        train_seconds = time.perf_counter() - started
        metrics, _, _ = evaluate_split(model, prepared, config.data.val_split, config.train.eval_batch_size, progress=False,
                                       data=val_data)
        lrs = {"lr": optimizer.param_groups[0]["lr"]}
        if backbone is not None:
            lrs["backbone_lr"] = optimizer.param_groups[1]["lr"]
        row = {"epoch": epoch + 1, **lrs, **terms, "train_seconds": round(train_seconds, 3),
               **{f"val_{k}": round(v, 4) for k, v in metrics.items()}}
        scheduler.step()
        history.append(row)
        improved = metrics["mR"] > best
        if improved:
            best = metrics["mR"]
            if backbone is not None:
                save_backbone(run_dir / BACKBONE_CHECKPOINT, backbone, epoch + 1)
            save_checkpoint(run_dir / CHECKPOINT, model, prepared, epoch + 1, metrics)
        _write_metrics(run_dir, history)
        _save_resume(resume_path, model, optimizer, scheduler, epoch, best, history, backbone)
        log(f"epoch {epoch + 1}/{config.train.epochs}  loss {terms['loss']:.4f}  val mR {metrics['mR']:.2f}"
            f"  rsum {metrics['rsum']:.1f}  {train_seconds:.1f}s{'  *best' if improved else ''}")
    best_row = max(history, key=lambda r: r["val_mR"]) if history else {}
    summary = {"best_epoch": best_row.get("epoch"), "best_val_mR": best_row.get("val_mR"),
               "seconds_per_epoch": float(np.mean([r["train_seconds"] for r in history])) if history else 0.0,
               "parameters": n_params}
    if backbone is not None:
        summary["backbone_parameters"] = n_backbone
    return summary


def _trim(values: torch.Tensor) -> torch.Tensor:
    """Drop trailing all-padding columns of a padded token tensor (lengths are left as they are)."""
    if values.dim() != 2:
        return values
    used = (values != 0).any(dim=0).nonzero()
    return values[:, : int(used.max()) + 1] if len(used) else values[:, :1]


def _train_epoch(model: RetrievalModel, optimizer, prepared: Prepared, data: SplitData, epoch: int, progress: bool) -> dict[str, float]:
    """One pass over the training captions; mean loss terms. End to end, the backbone steps as well."""
    config = prepared.config.train
    model.train()
    backbone = prepared.backbone
    generator = None
    if backbone is not None:
        _backbone_train_mode(backbone)
        generator = _augment_generator(config.seed, epoch) if config.effective_augment else None
    augment = end_to_end_augment() if generator is not None else None
    sums: dict[str, float] = {}
    batches = _epoch_batches(len(data.lengths), config.batch_size, config.seed, epoch)
    for batch in tqdm(batches, desc=f"epoch {epoch + 1}", disable=not progress, leave=False):
        lengths = data.lengths[batch]
        tokens = data.tokens[batch, : int(lengths.max())]
        image_ids = data.caption_image[batch]
        if backbone is None:
            features = prepared.features.select(image_ids)
        else:
            features = store_features(backbone, prepared.images, image_ids, prepared.feature_spec, config.precision,
                                      augment, generator)
        extras = {name: _trim(value[batch]) for name, value in data.extras.items()}
        with autocast(config.precision):
            terms = model.training_loss(features, tokens, lengths, image_ids, caption_ids=data.caption_ids[batch], **extras)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if config.grad_clip > 0:  # after backward, before step; per group so one cannot starve the other
            for group in optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], config.grad_clip)
        optimizer.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
    return {name: round(total / max(1, len(batches)), 5) for name, total in sums.items()}
