"""The one feature computation, for dataset images and for any image a user has.

:func:`backbone_features` turns a batch of normalised images and their region boxes into the
features models read (see :mod:`rsitr.features` for what each one is). Everything that needs image
features goes through it: the cache (:func:`compute_features`, without gradients), end-to-end
training (with gradients) and :func:`image_batch` + :func:`features_of_images` for images that
belong to no dataset (a user's folder, a crop of a large scene, an uploaded picture).

Region boxes: an image's own boxes (a detections entry, or boxes a caller passes) always win; an
image without them gets the boxes of ``spec.boxes``: the fixed grid, chosen before the backbone
runs, or activation proposals (:mod:`rsitr.features.proposals`), chosen inside
:func:`backbone_features` from the maps of the same forward pass. ``ImageBatch.given`` tells the two
apart, and the boxes actually used are returned as ``region_boxes``.

Under ``FeatureSpec.dihedral`` every feature is computed from the backbone's maps averaged over the
eight rotations and flips of the image (the dihedral group D4), mapped back onto the image first.

Regions and spatial maps are stored in float16 (:func:`as_stored`); features of arbitrary images
pass through the same rounding, so a model scores a picture exactly as it scored it from the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.distributed import broadcast
from torch.nn import functional as F

from rsitr.backbones import Backbone, backbone_info, create_backbone
from rsitr.backbones.fold import folded_forward_levels
from rsitr.data.dataset import RetrievalDataset
from rsitr.data.images import load_image, normalize, read_image, resize_rgb, tiff_bands, to_rgb
from rsitr.devices import module_device, reduced_dtype
from rsitr.distributed import process_device, shard_range, world
from rsitr.errors import ConfigError
from rsitr.features.detections import Detections, lookup, own_boxes, read_detections, select_boxes
from rsitr.features.proposals import activation_boxes, proposal_levels
from rsitr.features.roi import roi_mean
from rsitr.features.spec import LEVEL_KEYS, MAP_PREFIX, FeatureSpec, feature_dims, parse_maps
from rsitr.precision import autocast
from rsitr.progress import get_logger, progress_bar

logger = get_logger(__name__)
_FP16_MAX = float(torch.finfo(torch.float16).max)

#: What :func:`image_batch` accepts as one image: a file path, a PIL image, or an (H, W), (H, W, 3)
#: or (H, W, 4) array (uint8, or float in [0, 1]).
ImageInput = str | Path | Image.Image | np.ndarray



@dataclass
class ImageBatch:
    """Images ready for the backbone, with the region boxes features are pooled from.

    Attributes:
        images: (B, 3, S, S) float32, normalised with the backbone's mean and std.
        boxes: (B, N_r, 4) float32 boxes in resized-image pixels (the grid where ``given`` is
            False; :func:`backbone_features` replaces those under ``spec.boxes="activation"``).
        mask: (B, N_r) bool, False for padding boxes.
        given: (B,) bool, True where the boxes are the image's own (a detections entry or boxes
            passed by the caller), which every box source keeps.
    """

    images: Tensor
    boxes: Tensor
    mask: Tensor
    given: Tensor


def load_backbone(spec: FeatureSpec) -> Backbone:
    """The frozen backbone of ``spec`` in eval mode and channels_last layout.

    channels_last lets oneDNN pick its fast convolution kernels: about 2x on CPU in fp32 and
    needed for the bf16 speed-up; it changes the memory layout only, not the result.
    """
    model = create_backbone(spec.backbone, spec.weights, spec.seed).eval().requires_grad_(False)
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack memory_format


def choose_boxes(entry: tuple[np.ndarray, np.ndarray] | None, original_size: tuple[int, int],
                 spec: FeatureSpec) -> tuple[Tensor, Tensor, bool]:
    """The ``spec.num_regions`` boxes and mask of one image, and whether they are its own.

    Its own: from its (boxes, scores) entry when one of them is usable (kept by every box source);
    otherwise the grid boxes and False (replaced by proposals under ``spec.boxes="activation"``).
    """
    own = own_boxes(entry[0], entry[1], original_size, spec.image_size, spec.num_regions) if entry else None
    if own is not None:
        return own[0], own[1], True
    boxes, mask = select_boxes(None, None, original_size, spec.image_size, spec.num_regions)
    return boxes, mask, False


def _batch(images: list[Tensor], boxes: list[Tensor], masks: list[Tensor], given: list[bool],
           spec: FeatureSpec) -> ImageBatch:
    info = backbone_info(spec.backbone)
    return ImageBatch(normalize(torch.stack(images), info.mean, info.std), torch.stack(boxes), torch.stack(masks),
                      torch.tensor(given, dtype=torch.bool))


def dataset_batch(dataset: RetrievalDataset, ids: Sequence[int], spec: FeatureSpec,
                  detections: Detections | None) -> ImageBatch:
    """Decode and resize dataset images ``ids`` and choose their boxes from ``detections``."""
    images, boxes, masks, given = [], [], [], []
    for i in ids:
        image, original_size = load_image(dataset.image_path(i), spec.image_size, spec.bands)
        entry = lookup(detections, dataset.image_files[i]) if detections is not None else None
        b, m, own = choose_boxes(entry, original_size, spec)
        images.append(image)
        boxes.append(b)
        masks.append(m)
        given.append(own)
    return _batch(images, boxes, masks, given, spec)


def image_batch(images: Sequence[ImageInput], spec: FeatureSpec,
                boxes: Sequence[np.ndarray | None] | None = None,
                scores: Sequence[np.ndarray | None] | None = None) -> ImageBatch:
    """Any images, of any size and mode, prepared exactly as dataset images are.

    A TIFF path is read with ``spec.bands`` (the bands the model was trained on); a picture path,
    a PIL image or an array is taken as RGB (:func:`rsitr.data.images.tiff_bands`).

    Args:
        images: paths, PIL images or arrays (see :data:`ImageInput`).
        boxes: per image, (k, 4) region boxes ``x1, y1, x2, y2`` in that image's original pixels,
            or None for the boxes of ``spec.boxes`` (as an image without detections gets in a dataset).
        scores: per image, (k,) box scores (the best ``num_regions`` boxes are kept); None = all equal.
    """
    if boxes is not None and len(boxes) != len(images):
        raise ConfigError(f"{len(boxes)} box sets for {len(images)} images")
    tensors, chosen, masks, own = [], [], [], []
    for k, item in enumerate(images):
        picture = read_image(item, tiff_bands(item, spec.bands)) if isinstance(item, (str, Path)) else to_rgb(item)
        original_size = picture.size
        tensors.append(resize_rgb(picture, spec.image_size))
        entry = None
        if boxes is not None and boxes[k] is not None:
            given = np.asarray(boxes[k], dtype=np.float64).reshape(-1, 4)
            given_scores = scores[k] if scores is not None and scores[k] is not None else np.ones(len(given))
            entry = (given, np.asarray(given_scores, dtype=np.float64))
        b, m, is_own = choose_boxes(entry, original_size, spec)
        chosen.append(b)
        masks.append(m)
        own.append(is_own)
    return _batch(tensors, chosen, masks, own, spec)


def batch_ranges(n: int, batch_size: int) -> list[range]:
    """The image rows of each extraction batch: ``range(n)`` cut every ``batch_size`` rows."""
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _prefetched(dataset: RetrievalDataset, spec: FeatureSpec, detections: Detections | None,
                ranges: list[range]) -> Iterator[tuple[range, ImageBatch]]:
    """The batches of ``ranges`` in order, the next one decoding in a thread while the caller computes this one.

    PIL releases the GIL while decoding and resizing, so one loader thread overlaps image I/O
    with the backbone without the start-up cost of worker processes.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsitr-images") as pool:
        pending: list[Future[ImageBatch]] = [pool.submit(dataset_batch, dataset, r, spec, detections) for r in ranges[:2]]
        for i, r in enumerate(ranges):
            batch = pending.pop(0).result()
            if i + 2 < len(ranges):
                pending.append(pool.submit(dataset_batch, dataset, ranges[i + 2], spec, detections))
            yield r, batch


def backbone_features(model: Backbone, images: Tensor, boxes: Tensor, mask: Tensor, spec: FeatureSpec,
                      precision: str | None = None, given: Tensor | None = None) -> dict[str, Tensor]:
    """The features of a batch of images, as :meth:`ImageFeatures.select` returns cached ones.

    This is the one feature computation: the cache runs it under :func:`torch.inference_mode`
    with a frozen backbone, and end-to-end training runs it with gradients, so a trained
    backbone's features are by construction what the cache would hold for it.

    Args:
        model: the backbone (its mode and ``requires_grad`` are the caller's business).
        images: (B, 3, S, S) ImageNet-normalised float images.
        boxes: (B, N_r, 4) region boxes in image pixels (as :func:`rsitr.features.detections.select_boxes` gives).
        mask: (B, N_r) bool, False for padding boxes (their features are zero).
        spec: which levels, maps and regions to compute; ``spec.dihedral`` computes all of them
            from the level maps averaged over the eight rotations and flips of each image
            (:func:`_dihedral_levels`; the images must then be square).
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the backbone only, on the images' device); None = ``spec.precision``.
        given: (B,) bool, True where ``boxes`` are the image's own and are kept whatever
            ``spec.boxes`` says (see :class:`ImageBatch`). None: every image's boxes are its own
            when ``spec.detections`` is set, and none are otherwise.

    Returns:
        float32 ``level1`` .. ``level4`` (B, C_l), ``map_<level>`` (B, C, s, s) for ``spec.maps``,
        ``regions`` (B, N_r, C_region) (zero width when ``num_regions`` is 0), and ``region_mask``
        and ``region_boxes``: the mask and boxes the regions were pooled with (``boxes`` and
        ``mask``, with the activation proposals, mask True, in place of the images' that are not
        ``given`` under ``spec.boxes="activation"``).
    """
    levels = _dihedral_levels(model, images, precision or spec.precision) if spec.dihedral \
        else _levels(model, images, precision or spec.precision)
    out = {key: _in_float32(lambda chunk: chunk.mean(dim=(2, 3)), lvl) for key, lvl in zip(LEVEL_KEYS, levels)}
    names = backbone_info(spec.backbone).level_names
    for level, size in parse_maps(spec.maps, spec.backbone):
        out[f"{MAP_PREFIX}{level}"] = _in_float32(lambda chunk, s=size: F.adaptive_avg_pool2d(chunk, s), levels[names.index(level)])
    level_index = names.index(spec.region_level)
    if spec.boxes == "activation" and spec.num_regions:
        boxes, mask = _with_proposals(levels, boxes, mask, given, model, spec)
    if spec.num_regions == 0:
        out["regions"] = images.new_zeros(images.shape[0], 0, levels[level_index].shape[1], dtype=torch.float32)
    else:
        scale = 1.0 / model.level_strides[level_index]
        pooled = _in_float32(lambda chunk, chunk_boxes: roi_mean(chunk, chunk_boxes, scale, spec.roi_output_size, sampling_ratio=2),
                             levels[level_index], boxes)
        # Padding boxes (mask False) get zero features rather than whatever a zero box samples.
        out["regions"] = pooled * mask.unsqueeze(-1).to(torch.float32)
    out["region_mask"], out["region_boxes"] = mask, boxes
    return out


#: Largest float32 slice of a level map :func:`_in_float32` makes at once (at least one image).
_CHUNK_BYTES = 4 * 1024 * 1024


def _in_float32(pool: Callable[..., Tensor], level: Tensor, *per_image: Tensor) -> Tensor:
    """``pool`` of ``level`` widened to float32, a few images at a time, results concatenated over the batch.

    Every pooling of :func:`backbone_features` works image by image, so slicing the batch changes
    no value, and each reads the map in float32 as it always did. Slices of at most
    :data:`_CHUNK_BYTES` instead of one float32 copy of the whole map: on a CPU a fresh buffer of
    a whole batch's map (up to hundreds of MB) is mapped from the system and every page of it
    faults on first write, which cost several times the pooling itself; small slices reuse the
    allocator's memory. ``per_image`` tensors (boxes) are sliced along with the map.
    """
    step = max(1, _CHUNK_BYTES // max(level[0].numel() * 4, 1)) if len(level) else 1
    if step >= len(level):
        return pool(level.float(), *per_image)
    return torch.cat([pool(level[i:i + step].float(), *(t[i:i + step] for t in per_image)) for i in range(0, len(level), step)])


def _levels(model: Backbone, images: Tensor, precision: str) -> list[Tensor]:
    """The backbone's level maps of ``images`` (channels_last, autocast to ``precision``), in the dtype they come out in.

    A frozen forward (no gradients, eval mode) runs the backbone with its BatchNorms folded into
    the convolutions (:func:`rsitr.backbones.fold.folded_forward_levels`, fused afresh from the
    current weights at every call): one pass less over every map, the same function up to rounding
    (float32 rounding in fp32; bfloat16 rounding under bf16, where the fused weights are rounded
    instead of the convolution outputs). Every frozen forward (the cache, :func:`features_of_images`)
    runs the same fused network, so they agree exactly; a forward with gradients (end-to-end
    training) runs the modules as they are.

    The maps stay in the dtype they come out in (bfloat16 under bf16): :func:`backbone_features`
    pools them in float32 a few images at a time (:func:`_in_float32`) rather than copying every
    whole map to float32.
    """
    images = images.contiguous(memory_format=torch.channels_last)
    frozen = not torch.is_grad_enabled() and not model.training
    with autocast(precision, images.device):
        if frozen:
            return folded_forward_levels(model, images, reduced_dtype(images.device) if precision == "bf16" else None)
        return model.forward_levels(images)


#: The eight elements of the dihedral group D4 as (quarter turns k, flip): g(x) = flip_w(rot90(x, k)).
DIHEDRAL_ELEMENTS: tuple[tuple[int, bool], ...] = tuple((k, flip) for flip in (False, True) for k in range(4))


def dihedral_transform(x: Tensor, k: int, flip: bool) -> Tensor:
    """g(x) = flip_w(rot90(x, k)) over the last two (spatial) axes; out of place, so autograd sees it."""
    turned = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(turned, dims=(-1,)) if flip else turned


def dihedral_inverse(y: Tensor, k: int, flip: bool) -> Tensor:
    """g^-1(y) = rot90(flip_w(y), -k): undoes :func:`dihedral_transform` (flips are their own inverse)."""
    return torch.rot90(torch.flip(y, dims=(-1,)) if flip else y, -k, dims=(-2, -1))


def _dihedral_levels(model: Backbone, images: Tensor, precision: str) -> list[Tensor]:
    """The level maps of ``images`` averaged over the eight D4 copies, each mapped back onto the image.

    Overhead imagery has no preferred orientation: a scene turned by 90 degrees or mirrored shows
    the same place, yet a CNN's features change with it. Each image runs through the backbone
    under every element g of D4 (:data:`DIHEDRAL_ELEMENTS`); every level map of g(x) is taken
    back by g^-1, so cell (y, x) of each of the eight maps describes the same image area, and the
    eight aligned maps are averaged. Everything downstream (global pooling, ``map_*``, RoIAlign
    regions in the image's own box coordinates, activation proposals) then reads the averaged
    maps. Choice: average aligned *maps* rather than pooled vectors, because one averaged map
    serves every output at once, keeps the boxes in the image's frame (no box has to be turned
    along), and is the same as averaging the pooled features of the copies with their boxes
    transformed, since pooling and RoIAlign are linear in the map. The features become invariant
    to the group exactly (up to float summation order): the copies of g(x) are the copies of x.

    Eight forward passes of the batch, summed as they come (measured on a CPU: about 1.8x faster
    than one pass over the 8·B stacked copies, and one batch of activations in memory, not eight).
    Out-of-place operations only, so end-to-end training backpropagates through all eight passes.
    A backbone in train mode sees BatchNorm statistics of each copy's batch, which are those of a
    turned batch.

    Raises:
        ConfigError: the images are not square (a turned map would not fit its cell grid).
    """
    if images.shape[-1] != images.shape[-2]:
        raise ConfigError(f"dihedral features need square images, got {images.shape[-2]} x {images.shape[-1]} "
                          "(images are resized to image_size x image_size)")
    total: list[Tensor] | None = None
    for k, flip in DIHEDRAL_ELEMENTS:
        levels = [dihedral_inverse(lvl.float(), k, flip) for lvl in _levels(model, dihedral_transform(images, k, flip), precision)]
        total = levels if total is None else [t + lvl for t, lvl in zip(total, levels)]
    assert total is not None
    return [t / len(DIHEDRAL_ELEMENTS) for t in total]


def _with_proposals(levels: list[Tensor], boxes: Tensor, mask: Tensor, given: Tensor | None, model: Backbone,
                    spec: FeatureSpec) -> tuple[Tensor, Tensor]:
    """``boxes`` and ``mask`` with the activation proposals of the images whose boxes are not their own."""
    if given is None:
        given = torch.full((boxes.shape[0],), spec.detections is not None, dtype=torch.bool)
    given = given.to(boxes.device)
    if bool(given.all()):
        return boxes, mask
    names = backbone_info(spec.backbone).level_names
    level_index = names.index(spec.region_level)
    proposed = activation_boxes([levels[i] for i in proposal_levels(names, spec.region_level)],
                                model.level_strides[level_index], spec.image_size, spec.num_regions)
    keep = given[:, None]
    return torch.where(keep[..., None], boxes, proposed.to(boxes)), torch.where(keep, mask, True)


def _stored_keys(features: dict[str, Tensor], spec: FeatureSpec) -> list[str]:
    """Keys kept in float16 on disk: the spatial maps, and the regions when there are any."""
    return [key for key in features if key.startswith(MAP_PREFIX) or (key == "regions" and spec.num_regions)]


def to_float16(tensor: Tensor) -> Tensor:
    """``tensor`` rounded to float16, clamped to its range (what every float16 store of rsitr holds)."""
    return tensor.float().clamp(-_FP16_MAX, _FP16_MAX).half()


def as_stored(features: dict[str, Tensor], spec: FeatureSpec) -> dict[str, Tensor]:
    """``features`` as the cache holds them: regions and maps rounded to float16 (:func:`to_float16`)."""
    out = dict(features)
    for key in _stored_keys(features, spec):
        out[key] = to_float16(features[key])
    return out


def as_read(features: dict[str, Tensor], spec: FeatureSpec) -> dict[str, Tensor]:
    """``features`` as a model receives them from the cache: stored, then float32 again."""
    stored = as_stored(features, spec)
    return {key: value.float() if key in _stored_keys(stored, spec) else value for key, value in stored.items()}


@torch.inference_mode()
def features_of_images(backbone: Backbone, batch: ImageBatch, spec: FeatureSpec) -> dict[str, Tensor]:
    """Eval features of an :class:`ImageBatch`, exactly as a model reads them from the cache (on the backbone's device)."""
    device = module_device(backbone)
    return as_read(backbone_features(backbone, batch.images.to(device), batch.boxes.to(device), batch.mask.to(device), spec,
                                     given=batch.given.to(device)), spec)


def _allocate(n: int, spec: FeatureSpec) -> dict[str, Tensor]:
    dims = feature_dims(spec)
    out = {key: torch.zeros(n, c, dtype=torch.float32) for key, c in zip(LEVEL_KEYS, dims["level_channels"])}
    out["regions"] = torch.zeros(n, spec.num_regions, dims["region_channels"], dtype=torch.float16)
    out["region_mask"] = torch.zeros(n, spec.num_regions, dtype=torch.bool)
    out["region_boxes"] = torch.zeros(n, spec.num_regions, 4, dtype=torch.float32)
    for level, (channels, size) in dims["maps"].items():
        out[f"{MAP_PREFIX}{level}"] = torch.zeros(n, channels, size, size, dtype=torch.float16)
    return out


def compute_dataset_tensors(dataset: RetrievalDataset, spec: FeatureSpec, batch_size: int = 32,
                            progress: bool = True, device: str | torch.device | None = None) -> dict[str, Tensor]:
    """Run the frozen backbone over every image of ``dataset`` (all splits, dataset order).

    Returns the stored tensors (:func:`as_stored`) by name, on the CPU; no cache is read or
    written. Logs the throughput (images/s). ``device``: where the backbone runs
    (:func:`rsitr.distributed.process_device`; None = the best available).

    In a distributed run (``torchrun``) every process computes a contiguous share of the batches
    (:func:`rsitr.distributed.shard_range` over the batch list, so every batch holds exactly the
    images it holds in one process and goes through the same computation), then each share is
    broadcast from its process, so that every process returns the tensors of all images, as one
    process would have computed them.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    detections = read_detections(spec.detections) if spec.detections is not None else None
    where = process_device(device)
    model = load_backbone(spec).to(where)
    n = dataset.num_images
    out = _allocate(n, spec)
    ranges = batch_ranges(n, batch_size)
    me = world()
    shares = [[ranges[i] for i in shard_range(len(ranges), rank, me.size)] for rank in range(me.size)]
    mine = shares[me.rank]
    count = sum(len(r) for r in mine)
    start = time.perf_counter()
    with torch.inference_mode(), progress_bar(total=count, desc="features", unit="img", enabled=progress, leave=True) as bar:
        for rows, batch in _prefetched(dataset, spec, detections, mine):
            images, boxes, mask, given = (t.to(where) for t in (batch.images, batch.boxes, batch.mask, batch.given))
            result = as_stored(backbone_features(model, images, boxes, mask, spec, given=given), spec)
            for key in out:
                out[key][rows.start:rows.stop] = result[key].cpu()
            bar.update(len(rows))
    if me.distributed:
        _share_rows(out, [range(s[0].start, s[-1].stop) if s else range(0) for s in shares], where)
    seconds = time.perf_counter() - start
    logger.info("features: %d images in %.1f s (%.1f images/s, %s %s%s)", count, seconds,
                count / seconds if seconds > 0 else float("nan"), spec.backbone, spec.precision,
                f", process {me.rank + 1} of {me.size}" if me.distributed else "")
    return out


def _share_rows(out: dict[str, Tensor], rows: list[range], device: torch.device) -> None:
    """Fill ``out`` on every process with each process's ``rows`` (broadcast from their owner, in place).

    Tensors travel through ``device`` (NCCL broadcasts GPU tensors only); bool as uint8, since not
    every backend broadcasts bool.
    """
    for owner, part in enumerate(rows):
        if not len(part):
            continue
        for key in sorted(out):
            value = out[key][part.start:part.stop]
            payload = (value.to(torch.uint8) if value.dtype == torch.bool else value).to(device).contiguous()
            broadcast(payload, src=owner)
            out[key][part.start:part.stop] = payload.to(value.dtype).cpu()
