"""Building and updating an image index: files → tiles → encodings → shards, catalogue and vectors.

``rsitr index build PATH... --model MODEL_DIR --out INDEX_DIR`` (:func:`build_index`) walks files
and folders, cuts every image into tiles (:mod:`rsitr_serve.tiling`), reads each tile window by
window (:mod:`rsitr.data.rasters`), encodes it with the model bundle exactly as
:meth:`rsitr.bundle.RetrievalBundle.encode_images` encodes a picture, and stores the encodings in
shards, the tiles in the catalogue and the first-stage vectors in a FAISS index.

How a job is cut into chunks, and why an interrupted job resumes to the same index:

* Files are taken in sorted path order. A file with more tiles than ``shard_size`` is a run of
  chunks of ``shard_size`` tile windows each, numbered from its first window; smaller files are
  grouped greedily, in order, into chunks of at most ``shard_size`` windows. A chunk is encoded in
  batches from its first window, written as one shard, then committed to the catalogue in one
  transaction (:mod:`rsitr_serve.catalog`).
* The work left after an interruption starts at a chunk boundary (an unfinished large file resumes
  at its next chunk, every other unfinished file starts over), and the greedy grouping of the files
  after it is the same as the uninterrupted job's. So every chunk, every batch in it, hence every
  encoding, every id and every shard is the same: the resumed index is identical.
* Re-running ``build`` on the same files encodes nothing: a file whose path and content digest
  (SHA-256) are in the catalogue as complete is skipped. A file whose content changed is removed
  and indexed again.
* Decoding runs in a thread ahead of the model (GDAL and PIL release the GIL while reading and
  resizing), at most two batches ahead, with GDAL's block cache bounded
  (:data:`rsitr.data.rasters.GDAL_CACHE_MB`), so memory does not grow with the size of a scene.

Bad input: a missing, unreadable or truncated file is skipped with one warning line naming it and
counted in the summary; a file that fails part-way loses the tiles it had (none of its tiles stay
in the index). Tiles with no valid pixel (all nodata, or alpha 0) are not indexed.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsitr.bundle import RetrievalBundle, load_model
from rsitr.data.images import tiff_bands
from rsitr.data.rasters import (
    RASTER_SUFFIXES,
    ImageSource,
    RasterInfo,
    TileWindow,
    bounded_reading,
    is_supported,
    open_image,
    probe_image,
)
from rsitr.errors import ConfigError, DatasetError, RsitrError
from rsitr.features import ImageBatch, features_of_images, file_sha256, image_batch
from rsitr.io import read_json
from rsitr.progress import get_logger, progress_bar
from rsitr_serve.catalog import SHARD_DIR, TILE_COLUMNS, VECTORS_FILE, Catalog, FileRecord, IndexSettings, model_fingerprint
from rsitr_serve.shards import ENCODING_PREFIX, STAGE_PREFIX, ShardReader, shard_name, write_shard
from rsitr_serve.tiling import check_tiling, count_tiles, iter_tile_windows
from rsitr_serve.vectors import (
    VECTOR_KINDS,
    VectorIndex,
    VectorIndexSpec,
    choose_spec,
    meta_path,
    rebuild_needed,
    sync,
    training_ids,
)

logger = get_logger(__name__)

#: Defaults of ``rsitr index build`` (see docs/search.md for the measurements behind them).
DEFAULT_TILE = 256
DEFAULT_OVERLAP = 0.5
DEFAULT_SCALES = (1.0,)
DEFAULT_SHARD_SIZE = 1024


@dataclass
class Encoders:
    """The model whose encodings an index stores, and the model of its first stage (often the same)."""

    model: RetrievalBundle
    stage: RetrievalBundle

    @property
    def separate_stage(self) -> bool:
        return self.stage is not self.model

    @property
    def stage_key(self) -> str:
        """The encoding key of the first stage's image side (``enc.KEY`` or ``stage.KEY`` in the shards)."""
        return self.stage._first_stage_keys()[0]

    def bundles(self) -> list[RetrievalBundle]:
        return [self.model, self.stage] if self.separate_stage else [self.model]

    def prepare(self, arrays: Sequence[np.ndarray]) -> list[ImageBatch]:
        """The arrays resized and normalised for each bundle's backbone (done in the reading thread)."""
        return [image_batch(list(arrays), bundle.feature_spec) for bundle in self.bundles()]

    def encode(self, prepared: Sequence[ImageBatch]) -> dict[str, torch.Tensor]:
        """Shard tensors of prepared images: ``enc.*`` of the model, ``stage.KEY`` of a separate first stage.

        The same computation as :meth:`rsitr.bundle.RetrievalBundle.encode_images`: backbone
        features of the batch, then the model's image encoder.
        """
        encoded = [bundle.encode_features(features_of_images(bundle.backbone, batch, bundle.feature_spec))
                   for bundle, batch in zip(self.bundles(), prepared)]
        out = {f"{ENCODING_PREFIX}{k}": v for k, v in encoded[0].items()}
        if self.separate_stage:
            out[f"{STAGE_PREFIX}{self.stage_key}"] = encoded[1][self.stage_key]
        return out


def load_encoders(model_dir: str | Path, first_stage_dir: str | Path | None = None,
                  device: str | torch.device | None = None) -> Encoders:
    """The model of an index and its first stage; a one-line error when there is no separable stage."""
    model = load_model(model_dir, device=device)
    if first_stage_dir is None:
        if not model.has_first_stage:
            raise ConfigError(f"{model_dir}: model {model.spec.name!r} has no separable first stage; "
                              "give --first-stage OTHER_MODEL_DIR (a separable model, e.g. one of vsepp or dove)")
        return Encoders(model, model)
    stage = load_model(first_stage_dir, device=device)
    if not stage.has_first_stage:
        raise ConfigError(f"{first_stage_dir}: first-stage model {stage.spec.name!r} has no separable pair of embeddings")
    return Encoders(model, stage)


def _model_record(path: str | Path, bundle: RetrievalBundle) -> dict[str, str]:
    return {"path": str(Path(path).resolve()), "fingerprint": model_fingerprint(path), "name": bundle.spec.name,
            "architecture": bundle.spec.architecture}


# ----------------------------------------------------------------------------------- planning


def collect_files(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Supported image files under ``paths`` (files and folders, recursively), sorted; and warnings.

    A path that does not exist, or a file given by name with an unsupported suffix, is a warning;
    unsupported files inside a folder are passed over silently (a folder of scenes has sidecars).
    """
    found: set[Path] = set()
    warnings = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found.update(p.resolve() for p in path.rglob("*") if p.is_file() and is_supported(p))
        elif path.is_file():
            if is_supported(path):
                found.add(path.resolve())
            else:
                warnings.append(f"{path}: not a supported image file (GeoTIFF/TIFF, JPEG, PNG or WebP); skipped")
        else:
            warnings.append(f"{path}: no such file or folder; skipped")
    return sorted(found, key=str), warnings


@dataclass
class PlannedFile:
    """A file to encode in this job: what is known about it, and where its work starts."""

    path: Path
    digest: str
    bytes: int
    info: dict[str, Any]
    width: int
    height: int
    crs: str | None
    windows: int
    start: int = 0
    file_id: int | None = None


@dataclass(frozen=True)
class Chunk:
    """Tile windows ``[start, stop)`` of each of its files, encoded and committed together."""

    parts: tuple[tuple[int, int, int], ...]  # (planned file index, start window, stop window)

    @property
    def windows(self) -> int:
        return sum(stop - start for _, start, stop in self.parts)


def plan_chunks(files: Sequence[PlannedFile], shard_size: int) -> list[Chunk]:
    """Cut the work into chunks (see the module doc for the rule and why it makes resuming exact)."""
    chunks: list[Chunk] = []
    group: list[tuple[int, int, int]] = []
    group_size = 0
    for index, planned in enumerate(files):
        if planned.windows > shard_size:
            if group:
                chunks.append(Chunk(tuple(group)))
                group, group_size = [], 0
            for start in range(planned.start, planned.windows, shard_size):
                chunks.append(Chunk(((index, start, min(start + shard_size, planned.windows)),)))
            continue
        if group and group_size + planned.windows > shard_size:
            chunks.append(Chunk(tuple(group)))
            group, group_size = [], 0
        group.append((index, 0, planned.windows))
        group_size += planned.windows
    if group:
        chunks.append(Chunk(tuple(group)))
    return chunks


@dataclass
class JobSummary:
    """What a build or add did."""

    files_seen: int = 0
    files_unchanged: int = 0
    files_encoded: int = 0
    files_replaced: int = 0
    tiles_encoded: int = 0
    tiles_empty: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    vectors_added: int = 0
    vectors_removed: int = 0

    @property
    def tiles_per_second(self) -> float:
        return self.tiles_encoded / self.seconds if self.seconds > 0 else float("nan")

    def line(self) -> str:
        return (f"{self.files_seen} files: {self.files_encoded} encoded ({self.files_replaced} changed), "
                f"{self.files_unchanged} unchanged, {len(self.skipped)} skipped; {self.tiles_encoded} tiles in "
                f"{self.seconds:.1f} s ({self.tiles_per_second:.1f} tiles/s), {self.tiles_empty} empty tiles left out")


def _tiling(settings: IndexSettings) -> tuple[int, float, tuple[float, ...]]:
    return settings.tile, settings.overlap, tuple(settings.scales)


def bands_for(path: Path, settings: IndexSettings) -> list[int] | None:
    """The index's ``--bands`` for a raster; pictures (JPEG, PNG, WebP) are always read as RGB."""
    return tiff_bands(path, settings.bands)


def open_indexed(path: str | Path, settings: IndexSettings, stretch: Any = None) -> ImageSource:
    """``path`` opened as the index reads it (its bands), for tiles, thumbnails and query images alike."""
    return open_image(path, bands_for(Path(path), settings), stretch=stretch)


#: Threads that hash and probe files before a job (hashlib and GDAL release the GIL).
PLANNING_THREADS = 2


def _inspect(path: Path, known: dict[str, FileRecord], settings: IndexSettings) -> tuple[str, RasterInfo | None, str | None]:
    """(content digest, what the file holds or None when it is indexed unchanged, problem or None)."""
    try:
        digest = file_sha256(path)
        record = known.get(str(path))
        if record is not None and record.digest == digest and record.complete:
            return digest, None, None
        return digest, probe_image(path, bands_for(path, settings)), None
    except RsitrError as exc:  # unreadable, or without the bands the index uses
        return "", None, str(exc)


def _plan_files(found: Sequence[Path], catalog: Catalog, settings: IndexSettings, summary: JobSummary,
                replaced: list[int], progress: bool) -> list[PlannedFile]:
    """What to do with each file, in order: skip it (unchanged or unreadable, with a warning), or encode it."""
    known = {record.path: record for record in catalog.files()}
    planned = []
    with ThreadPoolExecutor(max_workers=PLANNING_THREADS, thread_name_prefix="rsitr-plan") as pool:
        inspected = pool.map(lambda path: _inspect(path, known, settings), found)
        for path, (digest, info, problem) in zip(found, progress_bar(inspected, total=len(found), desc="checking files",
                                                                       unit="file", enabled=progress)):
            if problem is not None:
                summary.skipped.append(problem)
                logger.warning("skipped %s", problem)
                continue
            if info is None:
                summary.files_unchanged += 1
                continue
            planned.append(_plan_file(path, digest, info, known.get(str(path)), settings, summary, replaced))
    return planned


def _plan_file(path: Path, digest: str, info: RasterInfo, known: FileRecord | None, settings: IndexSettings,
               summary: JobSummary, replaced: list[int]) -> PlannedFile:
    """The plan of a new or changed file, or of one an interrupted job left unfinished."""
    start, file_id = 0, None
    if known is not None:
        if known.digest == digest:
            start, file_id = known.done, known.id  # an interrupted large file resumes at its next chunk
        else:
            replaced.append(known.id)
            summary.files_replaced += 1
    windows = count_tiles(info.width, info.height, *_tiling(settings))
    if start % settings.shard_size or start >= windows:
        start = 0  # not a chunk boundary of this tiling: start the file over
    return PlannedFile(path=path, digest=digest, bytes=path.stat().st_size, info=info.to_dict(), width=info.width,
                       height=info.height, crs=info.crs, windows=windows, start=start, file_id=file_id)


# ----------------------------------------------------------------------------------- reading


@dataclass
class TileBatch:
    """Tiles of one chunk read and prepared for the model, in chunk order."""

    prepared: list[ImageBatch]
    owners: list[int]  # planned-file index of each tile
    windows: list[TileWindow]
    bounds: list[tuple[Any, ...]]


@dataclass
class ChunkEnd:
    """The end of a chunk's tiles: which of its files failed, and how many windows were empty."""

    chunk: Chunk
    failed: dict[int, str] = field(default_factory=dict)
    empty: int = 0


def _tile_bounds(source: ImageSource, window: TileWindow) -> tuple[Any, ...]:
    bounds = source.bounds(window) or (None,) * 4
    lonlat = source.lonlat_bounds(window) or (None,) * 4
    return (*bounds, *lonlat)


def _read_chunk(chunk: Chunk, files: Sequence[PlannedFile], settings: IndexSettings, batch_size: int,
                encoders: Encoders) -> Iterator[TileBatch | ChunkEnd]:
    """The tiles of ``chunk`` in its order, ``batch_size`` at a time, then its :class:`ChunkEnd`.

    Batches restart at every chunk, so a chunk's batches do not depend on what came before it.
    """
    end = ChunkEnd(chunk)
    arrays: list[np.ndarray] = []
    owners: list[int] = []
    windows: list[TileWindow] = []
    bounds: list[tuple[Any, ...]] = []

    def flush() -> TileBatch:
        batch = TileBatch(encoders.prepare(arrays), list(owners), list(windows), list(bounds))
        arrays.clear()
        owners.clear()
        windows.clear()
        bounds.clear()
        return batch

    for index, start, stop in chunk.parts:
        planned = files[index]
        try:
            stretch = planned.info.get("stretch") if planned.path.suffix.lower() in RASTER_SUFFIXES else None
            with open_indexed(planned.path, settings, stretch=stretch) as source:
                planned.info = source.info.to_dict()  # a picture's stretch is known once decoded
                cut = iter_tile_windows(planned.width, planned.height, *_tiling(settings))
                for window in itertools.islice(cut, start, stop):
                    if source.is_empty(window):
                        end.empty += 1
                        continue
                    arrays.append(source.read(window))
                    owners.append(index)
                    windows.append(window)
                    bounds.append(_tile_bounds(source, window))
                    if len(arrays) == batch_size:
                        yield flush()
        except RsitrError as exc:
            end.failed[index] = str(exc)
    if arrays:
        yield flush()
    yield end


def _read_ahead(chunks: Sequence[Chunk], files: Sequence[PlannedFile], settings: IndexSettings, batch_size: int,
                encoders: Encoders) -> Iterator[TileBatch | ChunkEnd]:
    """:func:`_read_chunk` of every chunk, run in a thread at most two batches ahead of the caller."""
    slots: queue.Queue[TileBatch | ChunkEnd | BaseException | None] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        try:
            with bounded_reading():
                _produce()
        except BaseException as exc:  # handed to the consumer, which re-raises it
            slots.put(exc)

    def _produce() -> None:
        for chunk in chunks:
            for item in _read_chunk(chunk, files, settings, batch_size, encoders):
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        slots.put(None)

    worker = threading.Thread(target=produce, name="rsitr-tiles", daemon=True)
    worker.start()
    try:
        while (item := slots.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


# ----------------------------------------------------------------------------------- the job


def _clean_orphans(folder: Path, catalog: Catalog) -> None:
    """Delete shards and temporary files no catalogue transaction refers to (left by an interrupted job)."""
    shard_dir = folder / SHARD_DIR
    known = {shard_name(i) for i in catalog.shard_ids()}
    for path in shard_dir.glob("*") if shard_dir.is_dir() else []:
        if path.name not in known:
            path.unlink(missing_ok=True)
    for path in folder.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def _commit_chunk(catalog: Catalog, folder: Path, end: ChunkEnd, batches: Sequence[TileBatch],
                  encoded: Sequence[dict[str, torch.Tensor]], files: Sequence[PlannedFile]) -> int:
    """Write the chunk's shard and record it, its files and tiles in one transaction; returns the tiles kept.

    Tiles of a file that failed are dropped (and the file's tiles of earlier chunks removed).
    """
    tiles = [(owner, window, bounds) for batch in batches
             for owner, window, bounds in zip(batch.owners, batch.windows, batch.bounds)]
    keep = [i for i, (owner, _, _) in enumerate(tiles) if owner not in end.failed]
    kept = [tiles[i] for i in keep]
    shard_id = catalog.next_id("shards")
    first_tile = catalog.next_id("tiles")
    nbytes = 0
    if kept:
        tensors = {key: torch.cat([part[key] for part in encoded])[keep] for key in encoded[0]}
        (folder / SHARD_DIR).mkdir(exist_ok=True)
        nbytes = write_shard(folder / SHARD_DIR / shard_name(shard_id), tensors,
                             list(range(first_tile, first_tile + len(kept))))
    with catalog.transaction() as db:
        if kept:
            db.execute("INSERT INTO shards(id, rows, bytes) VALUES(?, ?, ?)", (shard_id, len(kept), nbytes))
        ids: dict[int, int] = {}
        for index, _, stop in end.chunk.parts:
            planned = files[index]
            if index in end.failed:
                if planned.file_id is not None:
                    catalog.remove_files(db, [planned.file_id])
                    planned.file_id = None
                continue
            complete = int(stop == planned.windows)
            if planned.file_id is None:
                cursor = db.execute(
                    "INSERT INTO files(path, digest, bytes, width, height, crs, info, windows, done, complete) "
                    "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (str(planned.path), planned.digest, planned.bytes, planned.width, planned.height, planned.crs,
                     json.dumps(planned.info, sort_keys=True), planned.windows, stop, complete))
                planned.file_id = int(cursor.lastrowid or 0)
            else:
                db.execute("UPDATE files SET done = ?, complete = ? WHERE id = ?", (stop, complete, planned.file_id))
            ids[index] = planned.file_id
        rows = [(ids[owner], w.scale, w.x, w.y, w.width, w.height, *bounds, shard_id, row)
                for row, (owner, w, bounds) in enumerate(kept)]
        db.executemany(f"INSERT INTO tiles({', '.join(TILE_COLUMNS)}) VALUES({', '.join('?' * len(TILE_COLUMNS))})", rows)
    return len(kept)


def _settings_for(encoders: Encoders, model_dir: str | Path, first_stage_dir: str | Path | None, tile: int, overlap: float,
                  scales: Sequence[float], bands: Sequence[int] | None, shard_size: int, vector_kind: str) -> IndexSettings:
    check_tiling(tile, overlap, scales)
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    if vector_kind not in VECTOR_KINDS:
        raise ConfigError(f"--vector-index must be one of {', '.join(VECTOR_KINDS)}, got {vector_kind!r}")
    probe = encoders.stage.first_stage_texts(encoders.stage.encode_texts(["a"]))
    if bands is None:  # the bands the model was trained on (its feature spec), so tiles look like its training images
        bands = encoders.model.feature_spec.bands
    return IndexSettings(model=_model_record(model_dir, encoders.model),
                         first_stage=None if first_stage_dir is None else _model_record(first_stage_dir, encoders.stage),
                         tile=int(tile), overlap=float(overlap), scales=[float(s) for s in scales],
                         bands=None if bands is None else [int(b) for b in bands], shard_size=int(shard_size),
                         vector_kind=vector_kind, dim=int(probe.shape[1]), stage_key=encoders.stage_key)


def _check_same(existing: IndexSettings, wanted: IndexSettings, folder: Path) -> None:
    """An existing index accepts a build only with the settings it was made with."""
    if existing.model["fingerprint"] != wanted.model["fingerprint"]:
        raise ConfigError(f"{folder}: the index was built with model {existing.model['name']} ({existing.model['path']}); "
                          "it cannot take another model's encodings (build a new index with --out)")
    for name in ("tile", "overlap", "scales", "bands", "first_stage"):
        old, new = getattr(existing, name), getattr(wanted, name)
        if name == "first_stage":
            old, new = (old or {}).get("fingerprint"), (new or {}).get("fingerprint")
        if old != new:
            raise ConfigError(f"{folder}: the index was built with {name} {old}, not {new}; "
                              "use the index's settings (rsitr index info) or another --out")


def build_index(paths: Sequence[str | Path], model_dir: str | Path, out_dir: str | Path, *,
                first_stage_dir: str | Path | None = None, tile: int = DEFAULT_TILE, overlap: float = DEFAULT_OVERLAP,
                scales: Sequence[float] = DEFAULT_SCALES, bands: Sequence[int] | None = None,
                shard_size: int = DEFAULT_SHARD_SIZE, vector_kind: str = "auto", batch_size: int = 32,
                progress: bool = True, device: str | torch.device | None = None) -> JobSummary:
    """Create an index of ``paths`` in ``out_dir``, or bring an existing one up to date (resume).

    Raises:
        ConfigError: an existing index made with another model or other settings, or bad settings.
    """
    folder = Path(out_dir)
    encoders = load_encoders(model_dir, first_stage_dir, device)
    wanted = _settings_for(encoders, model_dir, first_stage_dir, tile, overlap, scales, bands, shard_size, vector_kind)
    try:
        existing: IndexSettings | None = IndexSettings.read(folder)
    except DatasetError:
        existing = None
    if existing is not None:
        _check_same(existing, wanted, folder)
        wanted = existing
    with Catalog(folder, writable=True) as catalog:
        if existing is None:
            wanted.write(folder)
        return _run_job(paths, encoders, wanted, folder, catalog, batch_size, progress)


def add_to_index(index_dir: str | Path, paths: Sequence[str | Path], *, model_dir: str | Path | None = None,
                 batch_size: int = 32, progress: bool = True, device: str | torch.device | None = None) -> JobSummary:
    """Index new or changed files of ``paths`` into an existing index (its model and settings)."""
    folder = Path(index_dir)
    settings = IndexSettings.read(folder)
    encoders = open_encoders(settings, model_dir, device)
    with Catalog(folder, writable=True) as catalog:
        return _run_job(paths, encoders, settings, folder, catalog, batch_size, progress)


def open_encoders(settings: IndexSettings, model_dir: str | Path | None, device: str | torch.device | None = None) -> Encoders:
    """The index's model (from ``model_dir`` when given: it must be the same model) and first stage."""
    model_path = Path(model_dir) if model_dir is not None else Path(settings.model["path"])
    check_model(settings.model, model_path)
    stage_path = None
    if settings.first_stage is not None:
        stage_path = Path(settings.first_stage["path"])
        check_model(settings.first_stage, stage_path)
    return load_encoders(model_path, stage_path, device)


def check_model(record: dict[str, str], path: Path) -> None:
    """A one-line ConfigError unless ``path`` holds the model an index was built with."""
    if not path.exists():
        raise ConfigError(f"{path}: the index's model {record['name']} is not there any more; give its folder with --model")
    if model_fingerprint(path) != record["fingerprint"]:
        raise ConfigError(f"{path}: not the model this index was built with ({record['name']}, fingerprint "
                          f"{record['fingerprint'][:12]}); build an index for this model with rsitr index build")


def _run_job(paths: Sequence[str | Path], encoders: Encoders, settings: IndexSettings, folder: Path, catalog: Catalog,
             batch_size: int, progress: bool) -> JobSummary:
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    summary = JobSummary()
    started = time.perf_counter()
    _clean_orphans(folder, catalog)
    found, warnings = collect_files(paths)
    for warning in warnings:
        logger.warning("%s", warning)
    summary.skipped.extend(warnings)
    summary.files_seen = len(found) + len(warnings)
    replaced: list[int] = []
    planned = _plan_files(found, catalog, settings, summary, replaced, progress)
    if replaced:
        with catalog.transaction() as db:
            catalog.remove_files(db, replaced)
    chunks = plan_chunks(planned, settings.shard_size)
    total = sum(c.windows for c in chunks)
    failed: dict[int, str] = {}
    batches: list[TileBatch] = []
    encoded: list[dict[str, torch.Tensor]] = []
    with progress_bar(total=total, desc="indexing", unit="tile", enabled=progress, leave=True) as bar:
        for item in _read_ahead(chunks, planned, settings, batch_size, encoders):
            if isinstance(item, TileBatch):
                batches.append(item)
                encoded.append(encoders.encode(item.prepared))
                bar.update(len(item.owners))
                continue
            summary.tiles_encoded += _commit_chunk(catalog, folder, item, batches, encoded, planned)
            summary.tiles_empty += item.empty
            bar.update(item.empty)
            batches, encoded = [], []
            for index, message in item.failed.items():
                if index not in failed:
                    failed[index] = message
                    logger.warning("skipped %s", message)
    summary.skipped.extend(failed.values())
    summary.files_encoded = len(planned) - len(failed)
    _drop_empty_shards(folder, catalog)
    summary.vectors_added, summary.vectors_removed = sync_vectors(folder, catalog, settings, progress)
    summary.seconds = time.perf_counter() - started
    logger.info("%s", summary.line())
    return summary


# ----------------------------------------------------------------------------------- removing and vectors


def remove_from_index(index_dir: str | Path, paths: Sequence[str | Path], progress: bool = True) -> tuple[int, int]:
    """Drop files (or every file under a folder) from an index; returns (files, tiles) removed."""
    folder = Path(index_dir)
    settings = IndexSettings.read(folder)
    with Catalog(folder, writable=True) as catalog:
        targets = [str(Path(p).resolve()) for p in paths]
        doomed = [f for f in catalog.files() if any(f.path == t or f.path.startswith(t.rstrip("/") + "/") for t in targets)]
        unknown = [t for t in targets if not any(f.path == t or f.path.startswith(t.rstrip("/") + "/") for f in doomed)]
        for target in unknown:
            logger.warning("%s: not in the index; nothing removed for it", target)
        tiles = 0
        if doomed:
            with catalog.transaction() as db:
                tiles = catalog.remove_files(db, [f.id for f in doomed])
        _drop_empty_shards(folder, catalog)
        sync_vectors(folder, catalog, settings, progress)
    return len(doomed), tiles


def _drop_empty_shards(folder: Path, catalog: Catalog) -> None:
    """Delete shards whose every row was removed (the catalogue first, then the file)."""
    empty = catalog.empty_shards()
    if not empty:
        return
    with catalog.transaction() as db:
        db.executemany("DELETE FROM shards WHERE id = ?", [(i,) for i in empty])
    for shard_id in empty:
        (folder / SHARD_DIR / shard_name(shard_id)).unlink(missing_ok=True)


def stage_vectors_of(folder: Path, catalog: Catalog, settings: IndexSettings, ids: np.ndarray) -> np.ndarray:
    """Unit first-stage vectors of tiles ``ids``, from the shards, float32 (n, dim)."""
    if len(ids) == 0:
        return np.zeros((0, settings.dim), dtype=np.float32)
    shards, rows = catalog.locate(ids)
    stored = ShardReader(folder / SHARD_DIR).gather(shards, rows, stage_prefix(settings), keys=[settings.stage_key])
    return unit_rows(stored[settings.stage_key])


def stage_prefix(settings: IndexSettings) -> str:
    """Where the shards keep the first stage's image side: the model's encodings or a separate model's."""
    return STAGE_PREFIX if settings.first_stage is not None else ENCODING_PREFIX


def unit_rows(vectors: torch.Tensor) -> np.ndarray:
    """Rows scaled to unit length, float32 (the first stage's inner product is then the cosine)."""
    return torch.nn.functional.normalize(vectors.float(), dim=-1).numpy().astype(np.float32, copy=False)


def sync_vectors(folder: Path, catalog: Catalog, settings: IndexSettings, progress: bool = True) -> tuple[int, int]:
    """Bring the FAISS index in line with the catalogue and record the generation it reflects.

    The kind and build parameters follow the tile count (:func:`rsitr_serve.vectors.choose_spec`);
    when they no longer suit it (:func:`rsitr_serve.vectors.rebuild_needed`: an index that grew
    past the exact-search threshold, or to four times the size its lists were trained for) the
    vector index is made afresh, trained on a seeded sample of the tiles. A damaged vector file
    is made afresh too: the catalogue and the shards hold everything it is made from.
    """
    ids, _, _ = catalog.tile_locations()
    path = folder / VECTORS_FILE
    index = None
    if path.is_file():
        try:
            index, _ = VectorIndex.load(path, dim=settings.dim)
        except RsitrError as exc:
            logger.warning("%s; making the vector index afresh", exc)
        if index is not None and rebuild_needed(index.spec, len(ids), settings.vector_kind):
            index = None
    if index is None:
        spec = choose_spec(len(ids), settings.dim, settings.vector_kind)
        training = None
        if spec.kind == "ivf":
            training = stage_vectors_of(folder, catalog, settings, training_ids(ids, spec, seed=0))
        index = VectorIndex.create(spec, training=training, seed=0)
    added, removed = sync(index, ids, lambda wanted: stage_vectors_of(folder, catalog, settings, wanted), progress=progress)
    index.save(path, {"generation": str(catalog.generation())})
    return added, removed


def vectors_generation(folder: Path) -> int | None:
    """The catalogue generation the index's vectors were last synced at (None: never, or unreadable)."""
    record_path = meta_path(folder / VECTORS_FILE)
    if not record_path.is_file():
        return None
    try:
        record = read_json(record_path, DatasetError)
        return int(record["meta"]["generation"])
    except (RsitrError, KeyError, TypeError, ValueError):
        return None


def index_info(index_dir: str | Path) -> dict[str, Any]:
    """What an index holds: settings, counts, sizes, the vector index, and whether it is complete."""
    folder = Path(index_dir)
    settings = IndexSettings.read(folder)
    with Catalog(folder) as catalog:
        counts = catalog.counts()
        per_scale = catalog.tiles_per_scale()
        generation = catalog.generation()
        incomplete = [f.path for f in catalog.files() if not f.complete]
    record_path = meta_path(folder / VECTORS_FILE)
    record = read_json(record_path, DatasetError) if record_path.is_file() else {}
    vectors = {"spec": record.get("spec"), "count": record.get("count", 0), "bytes": record.get("bytes", 0)}
    if record.get("spec"):
        vectors["bytes_per_vector"] = VectorIndexSpec.from_dict(record["spec"]).bytes_per_vector(record.get("count"))
    return {"settings": settings.to_dict(), **counts, "dead_rows": counts["shard_rows"] - counts["tiles"],
            "tiles_per_scale": per_scale, "generation": generation, "vectors": vectors, "incomplete_files": incomplete,
            "ready": vectors_generation(folder) == generation and not incomplete}


__all__ = ["DEFAULT_OVERLAP", "DEFAULT_SCALES", "DEFAULT_SHARD_SIZE", "DEFAULT_TILE", "Encoders", "FileRecord", "JobSummary",
           "add_to_index", "build_index", "check_model", "collect_files", "index_info", "load_encoders", "plan_chunks",
           "remove_from_index", "stage_vectors_of", "sync_vectors"]
