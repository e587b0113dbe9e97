"""rsitr_serve: the serving application of rsitr — indexing a user's imagery and searching it.

Modules: :mod:`~rsitr_serve.tiling` (cutting tiles from images read window by window by the library's
:mod:`rsitr.data.rasters`), :mod:`~rsitr_serve.indexer` with :mod:`~rsitr_serve.catalog`
and :mod:`~rsitr_serve.shards` (``rsitr index build/add/remove/info``), :mod:`~rsitr_serve.vectors`
(the first-stage FAISS index), :mod:`~rsitr_serve.search`, :mod:`~rsitr_serve.two_stage` and
:mod:`~rsitr_serve.sheets` (``rsitr search``, its two-stage rule on score matrices, contact sheets).

Its place in the tree: it imports the library (:mod:`rsitr`, above all :func:`rsitr.load_model`)
and never the training application; the library never imports it.
"""
