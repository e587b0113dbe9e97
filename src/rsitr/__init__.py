"""rsitr: remote-sensing image-text retrieval — the library.

Datasets (:mod:`rsitr.data`), text (:mod:`rsitr.text`), image backbones (:mod:`rsitr.backbones`),
features (:mod:`rsitr.features`), retrieval models (:mod:`rsitr.models`), losses, metrics and
scoring (:mod:`rsitr.evaluation`) and the model bundle (:mod:`rsitr.bundle`). It imports no
application: training lives in :mod:`rsitr_train`, serving in :mod:`rsitr_serve`, and the
``rsitr`` console script in :mod:`rsitr_cli`.

``rsitr.load_model(path)`` loads a trained model (a bundle written by ``rsitr export``, or a run
directory) to encode images and texts and score them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:
    from rsitr.bundle import RetrievalBundle, export_model, load_model

__all__ = ["RetrievalBundle", "__version__", "export_model", "load_model"]


def __getattr__(name: str) -> Any:
    """``rsitr.load_model`` and friends, imported on first use so ``import rsitr`` stays light."""
    if name in ("load_model", "export_model", "RetrievalBundle"):
        from rsitr import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'rsitr' has no attribute {name!r}")
