"""Frozen-backbone image features: what they are, how they are computed, and their cache.

DOVE (Sec. III-A) keeps its ResNet-50 frozen, so every image's features are computed once and
cached. Per image the features are:

* ``level1`` .. ``level4``: the global-average-pooled outputs of ResNet ``layer1`` .. ``layer4``,
  float32 (n, C_l): the N_m = 4 multiscale features M_v that Eq. 1 refines into F_M.
* ``regions``: RoIAlign (:func:`rsitr.features.roi.roi_align`) of the ``region_level`` map over
  N_r boxes, averaged over the output bins, stored float16 (n, N_r, C_region), zero for padding
  boxes: the region features R_v that Eq. 2 projects into F_R. float16 halves the cache on disk;
  models receive float32.
* ``region_mask``: bool (n, N_r), False for padding boxes (an image with fewer detections).
* ``region_boxes``: float32 (n, N_r, 4), the boxes in resized-image pixels.
* ``map_<level>`` (only for the levels a model asks for in ``FeatureSpec.maps``): the spatial
  output of that backbone level, adaptive-average-pooled to ``size × size``, stored float16
  (n, C, size, size). AMFMN's multiscale maps, DSAN's 8 × 8 Inception grid and ACF's 7 × 7 ViG
  node graph are all such maps. ``num_regions=0`` skips the region features when a model has no
  use for them (their tensors then have zero width).

Modules: :mod:`~rsitr.features.spec` (what determines the features), :mod:`~rsitr.features.compute`
(the computation, for dataset images and any other image), :mod:`~rsitr.features.cache` (the
safetensors cache of a dataset), :mod:`~rsitr.features.roi` (RoIAlign and the built-in boxes),
:mod:`~rsitr.features.detections` (detections files and the choice of boxes).
"""

from rsitr.features.cache import ImageFeatures, compute_features, extract_features, load_features, save_features
from rsitr.features.compute import (
    ImageBatch,
    ImageInput,
    as_read,
    as_stored,
    backbone_features,
    dataset_batch,
    features_of_images,
    image_batch,
    load_backbone,
)
from rsitr.features.spec import (
    FEATURES_FORMAT,
    LEVEL_KEYS,
    MAP_PREFIX,
    TENSOR_KEYS,
    FeatureSpec,
    default_cache_dir,
    feature_dims,
    file_sha256,
    parse_maps,
)
from rsitr.precision import PRECISIONS

__all__ = [
    "FEATURES_FORMAT",
    "LEVEL_KEYS",
    "MAP_PREFIX",
    "PRECISIONS",
    "TENSOR_KEYS",
    "FeatureSpec",
    "ImageBatch",
    "ImageFeatures",
    "ImageInput",
    "as_read",
    "as_stored",
    "backbone_features",
    "compute_features",
    "dataset_batch",
    "default_cache_dir",
    "extract_features",
    "feature_dims",
    "features_of_images",
    "file_sha256",
    "image_batch",
    "load_backbone",
    "load_features",
    "parse_maps",
    "save_features",
]
