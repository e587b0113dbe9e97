"""The index folder: its settings (``index.json``) and its catalogue of files and tiles (SQLite).

An index folder holds::

    index.json            format, the model (path, fingerprint), the first-stage source, tiling, bands
    catalog.sqlite        files, tiles and shards (the truth about what the index holds)
    shards/shard-*.safetensors   per-tile encodings (:mod:`rsitr_serve.shards`)
    vectors.faiss, vectors.json  the first-stage vector index and the catalogue generation it reflects

The catalogue is the only record of what is indexed. Every change is one SQLite transaction made
after the shard it refers to is on disk (written to a temporary name and renamed), so an
interrupted job leaves the catalogue as it was after its last whole chunk; a shard that no
transaction refers to is an orphan and is deleted when the index is opened for writing. Every
transaction increments ``generation``; the vector index records the generation it was synced at,
and a search refuses an index whose vectors lag behind its catalogue (an interrupted job: run it
again). Row ids are ``AUTOINCREMENT``: an id is never reused, so a vector index can be brought back
in line with the catalogue by comparing id sets.

No timestamps are stored: the catalogue of an interrupted-then-resumed build is identical to that of
an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsitr.bundle import BACKBONE_FILE, MANIFEST, MODEL_FILE, RUN_MODEL_JSON, VOCAB_FILE
from rsitr.data.rasters import TileWindow
from rsitr.errors import ConfigError, DatasetError
from rsitr.features import file_sha256
from rsitr.io import check_writable, read_json, write_json

INDEX_FORMAT = "rsitr-index-v1"
SETTINGS_FILE = "index.json"
CATALOG_FILE = "catalog.sqlite"
SHARD_DIR = "shards"
VECTORS_FILE = "vectors.faiss"
LOCK_FILE = ".lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT UNIQUE NOT NULL,
    digest TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    crs TEXT,
    info TEXT NOT NULL,
    windows INTEGER NOT NULL,
    done INTEGER NOT NULL,
    complete INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tiles (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id INTEGER NOT NULL REFERENCES files(id),
    scale REAL NOT NULL,
    x INTEGER NOT NULL, y INTEGER NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,
    minx REAL, miny REAL, maxx REAL, maxy REAL,
    west REAL, south REAL, east REAL, north REAL,
    shard INTEGER NOT NULL,
    row INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tiles_by_file ON tiles(file_id);
CREATE TABLE IF NOT EXISTS shards (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

TILE_COLUMNS = ("file_id", "scale", "x", "y", "width", "height", "minx", "miny", "maxx", "maxy",
                "west", "south", "east", "north", "shard", "row")


def model_fingerprint(folder: str | Path) -> str:
    """A digest identifying a model folder's weights and vocabulary (a bundle or a run directory).

    A bundle's manifest lists the SHA-256 of each of its files (checked when it loads), so its
    fingerprint is the digest of that list; a run directory's is the digest of its weights, its
    vocabulary and the backbone weights it names. Copying a model elsewhere keeps the fingerprint;
    retraining or re-exporting another model changes it.
    """
    path = Path(folder)
    if (path / MANIFEST).is_file():
        manifest = read_json(path / MANIFEST, DatasetError)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            raise DatasetError(path / MANIFEST, "bundle manifest lists no files")
        listed = json.dumps({name: entry.get("sha256") for name, entry in sorted(files.items())}, sort_keys=True)
        return hashlib.sha256(listed.encode()).hexdigest()[:32]
    parts = [file_sha256(path / MODEL_FILE), file_sha256(path / VOCAB_FILE)]
    description = read_json(path / RUN_MODEL_JSON, DatasetError) if (path / RUN_MODEL_JSON).is_file() else {}
    backbone = path / BACKBONE_FILE
    if backbone.is_file():
        parts.append(file_sha256(backbone))
    elif isinstance(description, dict) and description.get("backbone_sha256"):
        parts.append(str(description["backbone_sha256"]))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


@dataclass
class IndexSettings:
    """What ``index.json`` records: everything that must stay the same for the life of an index.

    Attributes:
        model: ``{"path", "fingerprint", "name", "architecture"}`` of the model whose encodings
            the shards hold and whose full score re-ranks.
        first_stage: ``None`` when the model's own separable pair is the first stage, else the
            same record for the separate first-stage model (``--first-stage``).
        tile, overlap, scales: the tiling (:mod:`rsitr_serve.tiling`).
        bands: 1-based source bands that become R, G, B, or None for each file's default.
        shard_size: tiles per shard (and per catalogue transaction).
        vector_kind: ``auto``, ``flat``, ``ivf`` or ``hnsw`` (:mod:`rsitr_serve.vectors`).
        dim: dimension of the first-stage vectors.
        stage_key: the encoding key of the first stage's image side (``enc.KEY``, or ``stage.KEY``
            for a separate first-stage model).
    """

    model: dict[str, str]
    first_stage: dict[str, str] | None
    tile: int
    overlap: float
    scales: list[float]
    bands: list[int] | None
    shard_size: int
    vector_kind: str
    dim: int
    stage_key: str
    format: str = INDEX_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "model": self.model, "first_stage": self.first_stage,
                "tiling": {"tile": self.tile, "overlap": self.overlap, "scales": list(self.scales)},
                "bands": self.bands, "shard_size": self.shard_size, "vector_kind": self.vector_kind, "dim": self.dim,
                "stage_key": self.stage_key}

    @classmethod
    def read(cls, folder: Path) -> IndexSettings:
        """The settings of the index in ``folder``; a one-line DatasetError when it is not one."""
        path = folder / SETTINGS_FILE
        if not path.is_file():
            raise DatasetError(folder, f"not an rsitr index (no {SETTINGS_FILE}); build one with: rsitr index build")
        data = read_json(path, DatasetError)
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise DatasetError(path, f"index format {found!r} is not {INDEX_FORMAT!r}; build the index again")
        try:
            tiling = data["tiling"]
            return cls(model=dict(data["model"]), first_stage=data["first_stage"], tile=int(tiling["tile"]),
                       overlap=float(tiling["overlap"]), scales=[float(s) for s in tiling["scales"]],
                       bands=data["bands"], shard_size=int(data["shard_size"]), vector_kind=str(data["vector_kind"]),
                       dim=int(data["dim"]), stage_key=str(data["stage_key"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(path, f"index settings lack or mistype {exc}") from exc

    def write(self, folder: Path) -> None:
        write_json(folder / SETTINGS_FILE, self.to_dict())


@dataclass(frozen=True)
class FileRecord:
    """One indexed (or partly indexed) file of the catalogue."""

    id: int
    path: str
    digest: str
    bytes: int
    width: int
    height: int
    crs: str | None
    info: dict[str, Any]
    windows: int
    done: int
    complete: bool


class Catalog:
    """The SQLite catalogue of one index folder (see the module doc).

    Opened for writing, it takes an exclusive lock on the folder, so two jobs never write one index.
    """

    def __init__(self, folder: Path, writable: bool = False) -> None:
        self.folder = folder
        self.path = folder / CATALOG_FILE
        self._lock: int | None = None
        if writable:
            check_writable(folder, "index")
            self._lock = _lock_folder(folder)
        elif not self.path.is_file():
            raise DatasetError(folder, f"not an rsitr index (no {CATALOG_FILE})")
        uri = self.path.resolve().as_uri() + ("" if writable else "?mode=ro")
        try:
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            if writable:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise DatasetError(self.path, f"not a readable index catalogue ({exc})") from exc

    def close(self) -> None:
        """Close the catalogue; a writer folds its write-ahead log back first.

        The log (``-wal`` and ``-shm`` files) is what lets a reader work beside a writer; without
        it a finished index is one file that opens read-only from a read-only folder.
        """
        if self._lock is not None:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("PRAGMA journal_mode=DELETE")
        self.db.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic change; it increments ``generation``."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("INSERT INTO meta(key, value) VALUES('generation', '1') "
                            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------------------- reading

    def generation(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def files(self) -> list[FileRecord]:
        rows = self.db.execute("SELECT id, path, digest, bytes, width, height, crs, info, windows, done, complete "
                               "FROM files ORDER BY path").fetchall()
        return [_file_record(row) for row in rows]

    def next_id(self, table: str) -> int:
        """The id the next row of ``table`` gets (AUTOINCREMENT never reuses one)."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        return (int(row[0]) if row else 0) + 1

    def tile_locations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, shards, rows) of every tile, by id."""
        rows = self.db.execute("SELECT id, shard, row FROM tiles ORDER BY id").fetchall()
        table = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        return table[:, 0], table[:, 1], table[:, 2]

    def file_tiles(self, file_id: int) -> tuple[np.ndarray, list[TileWindow]]:
        """(ids, windows) of one file's tiles, by id (empty for a file without tiles)."""
        rows = self.db.execute("SELECT id, scale, x, y, width, height FROM tiles WHERE file_id = ? ORDER BY id",
                               (int(file_id),)).fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64), [TileWindow(float(r[1]), *map(int, r[2:])) for r in rows]

    def locate(self, tile_ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shards, rows) of ``tile_ids``, in their order; a DatasetError for an unknown id."""
        found = dict(self._select_in("SELECT id, shard, row FROM tiles WHERE id IN ({})", tile_ids, lambda r: (r[0], r[1:])))
        missing = [t for t in tile_ids if int(t) not in found]
        if missing:
            raise DatasetError(self.path, f"tiles {missing[:3]} are in the vector index but not in the catalogue")
        pairs = np.asarray([found[int(t)] for t in tile_ids], dtype=np.int64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]

    def tiles(self, tile_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Every column of ``tile_ids`` with the file's path and CRS, by tile id."""
        sql = ("SELECT t.id, f.path, f.crs, t.scale, t.x, t.y, t.width, t.height, t.minx, t.miny, t.maxx, t.maxy, "
               "t.west, t.south, t.east, t.north, f.id, f.width, f.height "
               "FROM tiles t JOIN files f ON f.id = t.file_id WHERE t.id IN ({})")
        names = ("id", "path", "crs", "scale", "x", "y", "width", "height", "minx", "miny", "maxx", "maxy",
                 "west", "south", "east", "north", "file_id", "file_width", "file_height")
        return dict(self._select_in(sql, tile_ids, lambda r: (int(r[0]), dict(zip(names, r)))))

    def _select_in(self, sql: str, ids: Sequence[int] | np.ndarray, make: Any) -> Iterator[Any]:
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 900):  # SQLite's limit on bound parameters
            part = ids[start:start + 900]
            for row in self.db.execute(sql.format(",".join("?" * len(part))), part):
                yield make(row)

    def counts(self) -> dict[str, int]:
        one = self.db.execute
        return {"files": one("SELECT COUNT(*) FROM files").fetchone()[0],
                "complete_files": one("SELECT COUNT(*) FROM files WHERE complete = 1").fetchone()[0],
                "tiles": one("SELECT COUNT(*) FROM tiles").fetchone()[0],
                "shards": one("SELECT COUNT(*) FROM shards").fetchone()[0],
                "shard_rows": one("SELECT COALESCE(SUM(rows), 0) FROM shards").fetchone()[0],
                "shard_bytes": one("SELECT COALESCE(SUM(bytes), 0) FROM shards").fetchone()[0]}

    def tiles_per_file(self) -> dict[int, int]:
        return {int(f): int(n) for f, n in self.db.execute("SELECT file_id, COUNT(*) FROM tiles GROUP BY file_id")}

    def file_lonlat_extents(self) -> dict[int, tuple[float, float, float, float]]:
        """Per georeferenced file, the (west, south, east, north) box of its tiles (they cover the file)."""
        rows = self.db.execute("SELECT file_id, MIN(west), MIN(south), MAX(east), MAX(north) FROM tiles "
                               "WHERE west IS NOT NULL GROUP BY file_id")
        return {int(r[0]): (float(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in rows}

    def tiles_per_scale(self) -> dict[float, int]:
        return {float(s): int(n) for s, n in self.db.execute("SELECT scale, COUNT(*) FROM tiles GROUP BY scale ORDER BY scale")}

    def shard_ids(self) -> set[int]:
        return {int(r[0]) for r in self.db.execute("SELECT id FROM shards")}

    def dump(self) -> dict[str, list[tuple]]:
        """Every row of every table, for comparing two catalogues."""
        return {table: self.db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in ("files", "tiles", "shards", "meta")}

    # ------------------------------------------------------------------------------- writing

    def remove_files(self, db: sqlite3.Connection, file_ids: Sequence[int]) -> int:
        """Delete files and their tiles (inside a transaction); returns how many tiles went."""
        removed = 0
        for file_id in file_ids:
            removed += db.execute("DELETE FROM tiles WHERE file_id = ?", (file_id,)).rowcount
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        return removed

    def empty_shards(self) -> list[int]:
        """Shards no tile refers to any more (their rows were all removed)."""
        return [int(r[0]) for r in self.db.execute(
            "SELECT id FROM shards WHERE id NOT IN (SELECT DISTINCT shard FROM tiles)")]


def _file_record(row: tuple) -> FileRecord:
    return FileRecord(id=row[0], path=row[1], digest=row[2], bytes=row[3], width=row[4], height=row[5], crs=row[6],
                      info=json.loads(row[7]), windows=row[8], done=row[9], complete=bool(row[10]))


def _lock_folder(folder: Path) -> int:
    """An exclusive advisory lock on the index folder, released when the process ends (even by kill -9)."""
    handle = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(handle)
        raise ConfigError(f"{folder}: the index is being written by another process") from exc
    return handle
