"""rsitr: remote-sensing image-text retrieval.

The library (datasets, text, backbones, features, models, losses, training, evaluation) imports
without the command-line layer; ``rsitr.cli`` is the console script on top of it.
"""

__version__ = "0.1.0"
