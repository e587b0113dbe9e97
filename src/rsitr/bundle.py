"""The model bundle: a trained retriever as a folder that loads with nothing else.

``rsitr export RUN_DIR --out MODEL_DIR`` (:func:`export_model`) writes everything needed to use
a model, and nothing else — no dataset, no feature cache, no training state::

    bundle.json          format version, architecture and config, feature spec, preprocessing,
                         text settings, precision, where the model came from, and the size and
                         SHA-256 of every other file
    backbone.safetensors the frozen (or end-to-end trained) image backbone, torchvision keys
    model.safetensors    the retrieval model's weights, the feature standardiser's statistics
                         among them (``standardize.*`` buffers)
    vocab.json           the vocabulary (AMFMN json layout)

:func:`load_model` reads a bundle or a run directory of ``rsitr train`` and returns a
:class:`RetrievalBundle`: ``encode_images`` (paths, PIL images or arrays of any size, with
optional region boxes), ``encode_texts`` and ``score``, plus ``first_stage`` where the model
has a separable pair of embeddings for a fast first retrieval stage.

Every check is a one-line :class:`~rsitr.errors.CheckpointError` naming the file: another format
version, a missing or truncated file, a digest that does not match the manifest.

Choices:

* Region and map features pass through the float16 rounding of the feature cache
  (:func:`rsitr.features.as_read`), so a bundle scores an image exactly as the run's evaluation
  scored it from the cache.
* A run without pretrained weights used a seeded random backbone; the bundle stores that backbone's
  weights, so it no longer depends on the seed or on the code that drew it.
* A detections file is a property of a dataset, not of a model: the bundle keeps no boxes, and
  images without boxes get the boxes of the run's box source, exactly as dataset images without
  detections did: the built-in 36 boxes (:func:`rsitr.features.roi.default_boxes`), or the
  activation proposals computed from the image itself (:mod:`rsitr.features.proposals`).
  ``bundle.json`` records the source as ``features.boxes``; a manifest (or a run's
  ``model.json``) without the field was written before it existed and means ``"grid"``. Pass a
  detector's boxes to ``encode_images``.
* ``features.dihedral`` (also under ``preprocessing``): the features averaged over the eight
  rotations and flips of an image (:class:`rsitr.features.FeatureSpec`); the bundle's feature spec
  carries it, so encoding, indexing and localisation compute them as the run's cache did. A
  manifest without the field predates it and means False.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rsitr.backbones import Backbone, backbone_info
from rsitr.devices import module_device, resolve_device, to_device
from rsitr.errors import CheckpointError
from rsitr.evaluation import encode_image_chunks, encode_text_chunks, score_encodings
from rsitr.features import (
    FeatureSpec,
    ImageInput,
    feature_dims,
    features_of_images,
    file_sha256,
    image_batch,
    load_backbone,
)
from rsitr.io import check_writable, read_json, read_yaml_mapping, save_tensors, write_json
from rsitr.models import RetrievalModel, create_model
from rsitr.models.base import Encoding
from rsitr.models.registry import ModelSpec
from rsitr.precision import check_precision
from rsitr.progress import progress_bar
from rsitr.text import Vocabulary, encode_batch, text_inputs

BUNDLE_FORMAT = "rsitr-model-v1"
MANIFEST = "bundle.json"
BACKBONE_FILE = "backbone.safetensors"
MODEL_FILE = "model.safetensors"
VOCAB_FILE = "vocab.json"
#: Files of a run directory that :func:`load_model` reads (written by ``rsitr train``).
RUN_MODEL_JSON = "model.json"
RUN_CONFIG = "config.yaml"


def vocab_digest(vocab: Vocabulary) -> str:
    """A short digest of the vocabulary's word list, recorded with the weights trained on it."""
    return hashlib.sha256("\n".join(vocab.idx2word).encode("utf-8")).hexdigest()[:16]


@dataclass
class RetrievalBundle:
    """A trained retriever ready to encode images and texts and to score them.

    Attributes:
        model: the retrieval model, in eval mode.
        backbone: the frozen image backbone, in eval mode and channels_last layout.
        vocab: the vocabulary captions are tokenised with.
        spec: the model's name, architecture, backbone and parameters.
        feature_spec: the features the model reads (backbone weights, image size, regions, maps).
        max_length: captions are cut to this many tokens, as in training.
        precision: the model's default precision (``"fp32"`` or ``"bf16"``); features use
            ``feature_spec.precision``.
        info: where the model came from (run, epoch, validation metrics), as recorded.
    """

    model: RetrievalModel
    backbone: Backbone
    vocab: Vocabulary
    spec: ModelSpec
    feature_spec: FeatureSpec
    max_length: int = 48
    precision: str = "fp32"
    info: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------- devices

    def to(self, device: str | torch.device) -> RetrievalBundle:
        """The model and backbone moved to ``device`` (in place; returns the bundle).

        Whatever the device, encodings and scores come back on the CPU: images and texts move to
        the device batch by batch and their results back, so callers (an index's shards, a heat
        map) never hold device tensors.
        """
        self.model.to(device)
        self.backbone.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return module_device(self.model)

    # ------------------------------------------------------------------------------- encoding

    def image_features(self, images: Sequence[ImageInput], boxes: Sequence[np.ndarray | None] | None = None,
                       scores: Sequence[np.ndarray | None] | None = None, batch_size: int = 32,
                       progress: bool = False) -> dict[str, torch.Tensor]:
        """Backbone features of any images, as the model reads them from a feature cache.

        ``boxes[k]`` are image k's region boxes (x1, y1, x2, y2 in its own pixels) or None for the
        built-in ones; ``scores[k]`` rank them when there are more than the model uses.
        """
        if not images:
            raise ValueError("encode_images needs at least one image")
        parts = []
        starts = range(0, len(images), max(1, batch_size))
        for start in progress_bar(starts, desc="image features", unit="batch", enabled=progress):
            stop = start + batch_size
            batch = image_batch(images[start:stop], self.feature_spec,
                                None if boxes is None else boxes[start:stop],
                                None if scores is None else scores[start:stop])
            parts.append(to_device(features_of_images(self.backbone, batch, self.feature_spec), "cpu"))
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def encode_images(self, images: Sequence[ImageInput], boxes: Sequence[np.ndarray | None] | None = None,
                      scores: Sequence[np.ndarray | None] | None = None, batch_size: int = 32,
                      precision: str | None = None, progress: bool = False) -> Encoding:
        """Encodings of any images (paths, PIL images or arrays; any size and mode)."""
        features = self.image_features(images, boxes, scores, batch_size, progress)
        return self.encode_features(features, precision)

    def encode_features(self, features: dict[str, torch.Tensor], precision: str | None = None) -> Encoding:
        """Encodings of images given by their backbone features (e.g. rows of a feature cache).

        Encoded in the evaluation's fixed chunks, so an image encodes as it did in evaluation.
        """
        return to_device(encode_image_chunks(self.model, features, self._precision(precision)), "cpu")

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Token ids, lengths and the model's extra text inputs of free-text queries.

        A query carries nothing but its own text: keyword inputs (AMFMN) come from its own words.
        """
        tokens, lengths = encode_batch(self.vocab, list(texts), self.max_length)
        return tokens, lengths, text_inputs(self.vocab, list(texts), self.model.text_inputs)

    def encode_texts(self, texts: Sequence[str], precision: str | None = None) -> Encoding:
        """Encodings of sentences, in the evaluation's fixed chunks."""
        if not texts:
            raise ValueError("encode_texts needs at least one text")
        tokens, lengths, extras = self.tokenize(texts)
        return to_device(encode_text_chunks(self.model, tokens, lengths, extras, self._precision(precision)), "cpu")

    def score(self, image_encodings: Encoding, text_encodings: Encoding, precision: str | None = None,
              progress: bool = False) -> torch.Tensor:
        """(n_images, n_texts) float32 scores: the model's full score (pair by pair for pairwise models)."""
        return score_encodings(self.model, image_encodings, text_encodings, self._precision(precision), progress)

    @property
    def has_first_stage(self) -> bool:
        """Whether the model has a separable pair of embeddings (see :meth:`first_stage`)."""
        return self.model.first_stage is not None

    def first_stage(self, image_encodings: Encoding, text_encodings: Encoding) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-length (n, d) image and text embeddings whose dot products approximate the full score.

        Separable models return the embeddings their score is the cosine of. DOVE returns the
        global pair V_M / T_G (Eq. 29): the global visual-semantic constraint (Eq. 30–31, weight
        λ_g) trains exactly their cosine to rank matching pairs first, and neither depends on the
        other side, so they can be indexed once and searched by nearest neighbour before the
        pairwise IGA score re-ranks the short list.

        Raises:
            ValueError: the model has no separable stage.
        """
        return self.first_stage_images(image_encodings), self.first_stage_texts(text_encodings)

    def first_stage_images(self, image_encodings: Encoding) -> torch.Tensor:
        """The image side of :meth:`first_stage` alone (what an image index stores)."""
        return torch.nn.functional.normalize(image_encodings[self._first_stage_keys()[0]].float(), dim=-1)

    def first_stage_texts(self, text_encodings: Encoding) -> torch.Tensor:
        """The text side of :meth:`first_stage` alone (what a text query searches an image index with)."""
        return torch.nn.functional.normalize(text_encodings[self._first_stage_keys()[1]].float(), dim=-1)

    def _first_stage_keys(self) -> tuple[str, str]:
        keys = self.model.first_stage
        if keys is None:
            raise ValueError(f"model {self.spec.name!r} has no separable first stage")
        return keys

    def _precision(self, precision: str | None) -> str:
        return check_precision(precision or self.precision)

    # ------------------------------------------------------------------------------- saving

    def save(self, out_dir: str | Path) -> Path:
        """Write the bundle to ``out_dir`` (see the module doc); returns the manifest's path.

        Every file is written atomically, the manifest last, so a folder without ``bundle.json``
        is an unfinished export and a folder with one is complete.
        """
        out = check_writable(out_dir, "model bundle folder")
        (out / MANIFEST).unlink(missing_ok=True)
        save_tensors(out / BACKBONE_FILE, {k: v.float() if v.is_floating_point() else v
                                           for k, v in self.backbone.state_dict().items()},
                     metadata={"rsitr_backbone": self.spec.backbone})
        save_tensors(out / MODEL_FILE, self.model.state_dict(), metadata={"rsitr_model": json.dumps(self.spec.to_dict()),
                               "vocab_sha": vocab_digest(self.vocab)})
        self.vocab.save(out / VOCAB_FILE)
        write_json(out / MANIFEST, self._manifest(out))
        return out / MANIFEST

    def _manifest(self, out: Path) -> dict[str, Any]:
        info = backbone_info(self.spec.backbone)
        features = replace(self.feature_spec, weights=None, detections=None).to_dict()
        features["weights"] = BACKBONE_FILE
        features["boxes"] = self.feature_spec.boxes
        standardiser = sorted(k for k in self.model.state_dict() if k.startswith("standardize."))
        return {
            "format": BUNDLE_FORMAT,
            "model": self.spec.to_dict(),
            "features": features,
            "feature_dims": feature_dims(self.feature_spec),
            "preprocessing": {"image_size": self.feature_spec.image_size, "resize": "bilinear", "color": "RGB",
                              "input_range": [0, 1], "mean": list(info.mean), "std": list(info.std),
                              "default_boxes": "rsitr.features.roi.default_boxes",
                              "boxes": self.feature_spec.boxes, "bands": features["bands"],
                              "dihedral": self.feature_spec.dihedral},
            "text": {"max_length": self.max_length, "vocab_size": len(self.vocab), "vocab_sha": vocab_digest(self.vocab),
                     "text_inputs": list(self.model.text_inputs)},
            "precision": {"model": self.precision, "features": self.feature_spec.precision},
            "first_stage": list(self.model.first_stage) if self.model.first_stage else None,
            "standardizer": standardiser,
            "source": self.info,
            "files": {name: _file_entry(out / name) for name in (BACKBONE_FILE, MODEL_FILE, VOCAB_FILE)},
        }


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


# ----------------------------------------------------------------------------------- loading


def load_model(path: str | Path, verify: bool = True, device: str | torch.device | None = None) -> RetrievalBundle:
    """Load a model bundle (``bundle.json``) or a run directory (``model.json``) for use.

    ``verify`` checks every file of a bundle against the sizes and digests of its manifest.
    ``device``: where it runs (:func:`rsitr.devices.resolve_device`: ``cpu``, ``cuda:N``, ``mps``,
    ``auto``); None keeps it on the CPU, where it is loaded.

    Raises:
        CheckpointError: neither a bundle nor a run directory, another format version, a missing,
            truncated or altered file, or weights that do not fit the model.
    """
    folder = Path(path)
    where = None if device is None else resolve_device(device)
    if (folder / MANIFEST).is_file():
        bundle = _load_bundle(folder, verify)
    elif (folder / RUN_MODEL_JSON).is_file() or (folder / MODEL_FILE).is_file():
        bundle = _load_run(folder)
    else:
        if not folder.exists():
            raise CheckpointError(folder, "model folder not found")
        raise CheckpointError(folder, f"not a model bundle ({MANIFEST}) or a run directory ({RUN_MODEL_JSON})")
    return bundle if where is None else bundle.to(where)


def export_model(source: str | Path, out_dir: str | Path) -> Path:
    """Write the bundle of a run directory (or copy a bundle) to ``out_dir``; returns the manifest."""
    return load_model(source).save(out_dir)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    data = read_json(path, CheckpointError)
    if not isinstance(data, dict):
        raise CheckpointError(path, f"{what} must be a JSON object")
    return data


def _verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {BACKBONE_FILE, MODEL_FILE, VOCAB_FILE}:
        raise CheckpointError(folder / MANIFEST, f"manifest must list {BACKBONE_FILE}, {MODEL_FILE} and {VOCAB_FILE}")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(path, "bundle file missing")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(path, f"bundle file is {size} bytes, the manifest says {entry.get('bytes')} (truncated or replaced)")
        if file_sha256(path) != entry.get("sha256"):
            raise CheckpointError(path, "bundle file does not match the SHA-256 digest of its manifest")


def _load_bundle(folder: Path, verify: bool) -> RetrievalBundle:
    manifest = _read_json(folder / MANIFEST, "bundle manifest")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(folder / MANIFEST, f"bundle format {manifest.get('format')!r} is not {BUNDLE_FORMAT!r}; "
                              "export the model again with this version of rsitr")
    if verify:
        _verify_files(folder, manifest)
    try:
        spec = ModelSpec.from_dict(manifest["model"])
        features = dict(manifest["features"])
        text = manifest["text"]
        precision = manifest["precision"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(folder / MANIFEST, f"bundle manifest lacks {exc}") from exc
    features["weights"] = folder / BACKBONE_FILE
    features.setdefault("boxes", "grid")  # rsitr-model-v1 manifests written before the box source existed
    vocab = Vocabulary.load(folder / VOCAB_FILE)
    return _assemble(spec, FeatureSpec.from_dict(features), vocab, folder / MODEL_FILE, int(text["max_length"]),
                     precision["model"], dict(manifest.get("source") or {}))


def _run_settings(folder: Path, description: dict[str, Any]) -> tuple[int, str]:
    """Caption length and model precision of a run.

    ``model.json`` records them; runs written before it did have them in their resolved ``config.yaml``.
    """
    if "max_length" in description and "precision" in description:
        return int(description["max_length"]), str(description["precision"])
    data = read_yaml_mapping(folder / RUN_CONFIG, "a run config must be a mapping of sections")
    try:
        return int(data["text"]["max_length"]), str(data["train"]["precision"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(folder / RUN_CONFIG, f"run config lacks {exc}") from exc


def _load_run(folder: Path) -> RetrievalBundle:
    """A run directory of ``rsitr train``: its best checkpoint, vocabulary and backbone."""
    description = _read_json(folder / RUN_MODEL_JSON, "run model description")
    try:
        spec = ModelSpec.from_dict(description["model"])
        feature_spec = FeatureSpec.from_dict({"boxes": "grid", **description["features"]})  # older runs: grid
    except (KeyError, TypeError) as exc:
        raise CheckpointError(folder / RUN_MODEL_JSON, f"run model description lacks {exc}") from exc
    max_length, precision = _run_settings(folder, description)
    trained = description.get("trained_backbone")
    weights = folder / trained if trained else feature_spec.weights  # end to end: the run's own backbone
    if weights is not None and not weights.is_file():
        problem = "end-to-end run without its trained backbone" if trained else "backbone weights of the run not found"
        raise CheckpointError(weights, problem)
    expected = description.get("backbone_sha256")
    if not trained and weights is not None and expected and file_sha256(weights) != expected:
        raise CheckpointError(weights, "backbone weights changed since the run was trained (SHA-256 differs)")
    feature_spec = replace(feature_spec, weights=weights)
    vocab = Vocabulary.load(folder / VOCAB_FILE)
    info = {"run": str(folder.resolve()), "epoch": description.get("epoch"),
            "val_metrics": description.get("val_metrics"), "vocab_sha": description.get("vocab_sha")}
    return _assemble(spec, feature_spec, vocab, folder / MODEL_FILE, max_length, precision, info)


def _assemble(spec: ModelSpec, feature_spec: FeatureSpec, vocab: Vocabulary, weights: Path, max_length: int,
              precision: str, info: dict[str, Any]) -> RetrievalBundle:
    """The model with ``weights`` and the backbone of ``feature_spec`` (its ``weights``, or its seeded init)."""
    model = create_model(spec, feature_dims=feature_dims(feature_spec), vocab_size=len(vocab))
    load_model_weights(weights, model, spec, vocab)
    return RetrievalBundle(model=model.eval(), backbone=load_backbone(feature_spec), vocab=vocab, spec=spec,
                           feature_spec=feature_spec,
                           max_length=max_length, precision=check_precision(precision, "model precision"), info=info)


def read_checkpoint_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors checkpoint; CheckpointError when missing or unreadable."""
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(path, f"not a readable safetensors file ({exc.__class__.__name__})") from exc


def load_model_weights(path: Path, model: RetrievalModel, spec: ModelSpec, vocab: Vocabulary) -> dict[str, str]:
    """Load ``path`` into ``model`` after checking it was saved for this model (and vocabulary, if recorded)."""
    meta = read_checkpoint_metadata(path)
    if "rsitr_model" not in meta:
        raise CheckpointError(path, "not an rsitr checkpoint (no model metadata)")
    saved = ModelSpec.from_dict(json.loads(meta["rsitr_model"]))
    if saved.architecture != spec.architecture or saved.params != spec.params:
        raise CheckpointError(path, f"checkpoint is of model {saved.architecture} {saved.params}, not {spec.architecture} {spec.params}")
    if "vocab_sha" in meta and meta["vocab_sha"] != vocab_digest(vocab):
        raise CheckpointError(path, "checkpoint was trained with another vocabulary")
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(path, f"weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return meta
