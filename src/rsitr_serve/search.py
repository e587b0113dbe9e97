"""Searching an image index: by sentence (two stages), by example image, and sentences for an image.

``rsitr search INDEX_DIR "a sentence"`` (:meth:`TileSearcher.search_text`):

1. **First stage.** The sentence's first-stage vector (DOVE: T_G, Eq. 29) searches the FAISS index of
   the tiles' first-stage vectors (DOVE: V_M) for the ``rerank`` nearest by inner product of unit
   vectors (the cosine the global constraint of Eq. 30–31 trains).
2. **Second stage.** Those candidates' stored encodings are scored against the sentence with the
   model's full score (DOVE: cos(V_MR, T_RG) through IGA, Eq. 23–28) and ordered by it; ties keep the
   first-stage order. ``rerank=0`` returns the first stage's order and scores.

This is the rule :func:`rsitr_serve.two_stage.two_stage_order` states on score matrices, where
``benchmarks/two_stage.py`` measures its cost against exhaustive pairwise scoring; with
``rerank`` at least the index size the two are the same ranking (:meth:`exhaustive_text`).

``--image PATH`` (:meth:`search_image`): the query image's first-stage vector against the tiles'
(image → image). The models of this field score image–text pairs only, so images are compared by
the cosine of the first-stage image embeddings, and ``score`` is that cosine. ``--captions FILE``
with ``--image`` (:meth:`rank_captions`) ranks the user's sentences for the image by the full score.

A query carries nothing but its own text or image. An index refuses a model other than the one it
was built with, and refuses to search while its vectors lag behind its catalogue (an interrupted
``build``/``add``: run it again).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsitr.data.rasters import TileWindow
from rsitr.errors import ConfigError, DatasetError
from rsitr.text import tokenize
from rsitr_serve.catalog import SHARD_DIR, VECTORS_FILE, Catalog, IndexSettings
from rsitr_serve.indexer import Encoders, open_encoders, open_indexed, stage_prefix, unit_rows, vectors_generation
from rsitr_serve.localize import DEFAULT_BLUR, fuse_window_scores, normalise_and_smooth, odd_kernel
from rsitr_serve.shards import ENCODING_PREFIX, ShardReader
from rsitr_serve.vectors import VectorIndex

#: Largest side of a query image read whole; larger rasters are read decimated to this size.
QUERY_IMAGE_MAX = 4096
#: Tiles scored at once by :meth:`TileSearcher.exhaustive_text`.
EXHAUSTIVE_BLOCK = 4096


@dataclass(frozen=True)
class TileResult:
    """One search hit: a tile of a file, where it lies, and its score."""

    tile_id: int
    file: str
    window: TileWindow
    crs: str | None
    bounds: tuple[float, float, float, float] | None  # minx, miny, maxx, maxy in ``crs``
    lonlat: tuple[float, float, float, float] | None  # west, south, east, north (EPSG:4326)
    score: float
    first_stage_score: float
    file_id: int = 0
    file_size: tuple[int, int] = (0, 0)  # the file's width and height in pixels

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``file``, ``window``, ``bounds``, ``score`` and the rest."""
        w = self.window
        return {"file": self.file, "window": {"x": w.x, "y": w.y, "width": w.width, "height": w.height},
                "scale": w.scale, "tile_id": self.tile_id,
                "bounds": None if self.bounds is None else {"crs": self.crs, "minx": self.bounds[0], "miny": self.bounds[1],
                                                            "maxx": self.bounds[2], "maxy": self.bounds[3]},
                "lonlat": None if self.lonlat is None else dict(zip(("west", "south", "east", "north"), self.lonlat)),
                "score": self.score, "first_stage_score": self.first_stage_score}

    def line(self) -> str:
        w = self.window
        where = f"{Path(self.file).name}  x={w.x} y={w.y} {w.width}x{w.height}"
        if self.lonlat is not None:
            west, south, east, north = self.lonlat
            where += f"  lon {(west + east) / 2:.5f} lat {(south + north) / 2:.5f}"
        return f"{self.score:8.4f}  {where}"


class TileSearcher:
    """An opened index: its model, catalogue, shards and vector index, ready for queries."""

    def __init__(self, index_dir: str | Path, model_dir: str | Path | None = None, device: str | torch.device | None = None) -> None:
        self.folder = Path(index_dir)
        self.settings = IndexSettings.read(self.folder)
        self.encoders: Encoders = open_encoders(self.settings, model_dir, device)
        self.catalog = Catalog(self.folder)
        self.vectors = self._open_vectors()
        self.shards = ShardReader(self.folder / SHARD_DIR)

    def _open_vectors(self) -> VectorIndex:
        if vectors_generation(self.folder) != self.catalog.generation():
            raise DatasetError(self.folder, "the index was interrupted while being written (its vectors lag behind "
                                            "its catalogue): run the same rsitr index build/add again")
        index, _ = VectorIndex.load(self.folder / VECTORS_FILE, dim=self.settings.dim)
        return index

    def close(self) -> None:
        self.catalog.close()
        self.shards.close()

    def __enter__(self) -> TileSearcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.vectors)

    # ------------------------------------------------------------------------------- text queries

    def check_words(self, text: str) -> None:
        """A one-line ConfigError when no word of ``text`` is in the model's vocabulary."""
        vocab = self.encoders.model.vocab
        words = tokenize(text)
        if not any(w in vocab for w in words):
            raise ConfigError(f"no word of the query {text!r} is known to the model (its vocabulary has "
                              f"{len(vocab) - 2} words); rephrase it")

    def search_text(self, text: str, k: int = 20, rerank: int = 100) -> list[TileResult]:
        """The ``k`` best tiles for a sentence: first stage, then the full score over ``rerank`` candidates."""
        if k < 1:
            raise ConfigError(f"-k must be >= 1, got {k}")
        if rerank and rerank < k:
            raise ConfigError(f"--rerank must be 0 (first stage only) or at least -k ({k}), got {rerank}")
        self.check_words(text)
        texts = self.encoders.model.encode_texts([text])
        query = self.encoders.stage.first_stage_texts(self._stage_texts(text, texts)).numpy()
        first_scores, ids = self.vectors.search(query, max(k, rerank))
        found = ids[0] >= 0
        ids, first = ids[0][found], first_scores[0][found]
        if not rerank or len(ids) == 0:
            return self._results(ids[:k], first[:k], first[:k])
        full = self._full_scores(ids, texts)
        order = np.lexsort((np.arange(len(ids)), -full))[:k]  # by full score, ties in first-stage order
        return self._results(ids[order], full[order], first[order])

    def _full_scores(self, ids: np.ndarray, texts: dict[str, torch.Tensor]) -> np.ndarray:
        shards, rows = self.catalog.locate(ids)
        return self._stored_scores(shards, rows, texts)

    def _stored_scores(self, shards: np.ndarray, rows: np.ndarray, texts: dict[str, torch.Tensor]) -> np.ndarray:
        """The full score of one text against stored encodings, ``EXHAUSTIVE_BLOCK`` rows of the shards at a time."""
        if len(rows) == 0:
            return np.zeros(0)
        return np.concatenate([
            self.encoders.model.score(self.shards.gather(shards[s:s + EXHAUSTIVE_BLOCK], rows[s:s + EXHAUSTIVE_BLOCK],
                                                         ENCODING_PREFIX), texts)[:, 0].numpy().astype(np.float64)
            for s in range(0, len(rows), EXHAUSTIVE_BLOCK)])

    def exhaustive_text(self, text: str, k: int = 20) -> list[TileResult]:
        """The ``k`` best tiles by the full score over every tile (the baseline of the first stage)."""
        self.check_words(text)
        texts = self.encoders.model.encode_texts([text])
        ids, shards, rows = self.catalog.tile_locations()
        full = self._stored_scores(shards, rows, texts)
        order = np.lexsort((ids, -full))[:k]
        first = self._first_stage_scores(ids[order], self._stage_texts(text, texts))
        return self._results(ids[order], full[order], first)

    def _stage_texts(self, text: str, texts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The first-stage model's encoding of ``text``: ``texts`` itself unless the first stage is a separate model."""
        return self.encoders.stage.encode_texts([text]) if self.encoders.separate_stage else texts

    def _first_stage_scores(self, ids: np.ndarray, stage_texts: dict[str, torch.Tensor]) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros(0)
        shards, rows = self.catalog.locate(ids)
        stored = self.shards.gather(shards, rows, stage_prefix(self.settings), keys=[self.settings.stage_key])
        query = self.encoders.stage.first_stage_texts(stage_texts).numpy()
        return (unit_rows(stored[self.settings.stage_key]) @ query[0]).astype(np.float64)

    def localize_in_file(self, file_id: int, text: str, width: int, height: int, out_shape: tuple[int, int],
                         blur: int = DEFAULT_BLUR) -> tuple[np.ndarray, tuple[int, int]]:
        """Semantic localisation of ``text`` in an indexed file from the tiles the index holds.

        No pixel is read or encoded: the file's stored tiles (every scale of the index) are scored
        with the full model score and fused into a heat map as :mod:`rsitr_serve.localize` fuses
        SeLo windows (mean score of the covering tiles, min–max to 0..255, median blur). The map is
        sampled at ``out_shape`` (rows, cols) and the blur scaled to it (``blur`` px of the file).

        Returns:
            the (rows, cols) uint8 heat map and the hottest point (x, y) in file pixels.
        """
        self.check_words(text)
        ids, windows = self.catalog.file_tiles(file_id)
        if len(ids) == 0:
            raise ConfigError(f"file {file_id} has no tiles in the index")
        texts = self.encoders.model.encode_texts([text])
        scores = self._full_scores(ids, texts)
        fused = fuse_window_scores(windows, scores, width, height, out_shape=out_shape)
        heat = normalise_and_smooth(fused, odd_kernel(blur * out_shape[1] / width))
        row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
        return heat, (int((col + 0.5) * width / out_shape[1]), int((row + 0.5) * height / out_shape[0]))

    # ------------------------------------------------------------------------------- image queries

    def _query_image(self, path: str | Path) -> np.ndarray:
        """An image file as one uint8 RGB array (decimated when larger than :data:`QUERY_IMAGE_MAX`)."""
        with open_indexed(path, self.settings) as source:
            whole = TileWindow(1.0, 0, 0, source.info.width, source.info.height)
            if max(source.info.width, source.info.height) <= QUERY_IMAGE_MAX:
                return source.read(whole)
            return source.thumbnail(whole, QUERY_IMAGE_MAX)

    def search_image(self, image: str | Path | np.ndarray, k: int = 20) -> list[TileResult]:
        """The ``k`` tiles whose first-stage image vectors are nearest to the query image's."""
        if k < 1:
            raise ConfigError(f"-k must be >= 1, got {k}")
        array = self._query_image(image) if not isinstance(image, np.ndarray) else image
        encoded = self.encoders.encode(self.encoders.prepare([array]))
        prefix = stage_prefix(self.settings)
        query = unit_rows(encoded[f"{prefix}{self.settings.stage_key}"])
        scores, ids = self.vectors.search(query, k)
        found = ids[0] >= 0
        return self._results(ids[0][found], scores[0][found], scores[0][found])

    def rank_captions(self, image: str | Path | np.ndarray, captions: list[str]) -> list[tuple[str, float]]:
        """The user's sentences for an image, best first, by the model's full score."""
        if not captions:
            raise ConfigError("no captions to rank")
        array = self._query_image(image) if not isinstance(image, np.ndarray) else image
        model = self.encoders.model
        images = model.encode_images([array])
        scores = model.score(images, model.encode_texts(captions))[0].numpy()
        order = np.lexsort((np.arange(len(captions)), -scores))
        return [(captions[i], float(scores[i])) for i in order]

    # ------------------------------------------------------------------------------- results

    def _results(self, ids: np.ndarray, scores: np.ndarray, first: np.ndarray) -> list[TileResult]:
        rows = self.catalog.tiles([int(i) for i in ids])
        out = []
        for tile_id, score, first_score in zip(ids, scores, first):
            row = rows[int(tile_id)]
            bounds = None if row["minx"] is None else (row["minx"], row["miny"], row["maxx"], row["maxy"])
            lonlat = None if row["west"] is None else (row["west"], row["south"], row["east"], row["north"])
            out.append(TileResult(tile_id=int(tile_id), file=row["path"],
                                  window=TileWindow(row["scale"], row["x"], row["y"], row["width"], row["height"]),
                                  crs=row["crs"], bounds=bounds, lonlat=lonlat, score=float(score),
                                  first_stage_score=float(first_score), file_id=int(row["file_id"]),
                                  file_size=(int(row["file_width"]), int(row["file_height"]))))
        return out


def read_captions(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file: the sentences ``--captions`` ranks."""
    file = Path(path)
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(file, f"cannot read the captions file ({exc.__class__.__name__})") from exc
    captions = [line for line in lines if line]
    if not captions:
        raise DatasetError(file, "the captions file holds no sentence (one per line)")
    return captions
