"""rsitr_serve: the serving application of rsitr — search, server and localisation over a model bundle.

Its place in the tree: it imports the library (:mod:`rsitr`, above all :func:`rsitr.load_model`)
and never the training application; the library never imports it.
"""
