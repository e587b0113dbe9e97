"""Every exception rsitr raises on bad input.

Each message is one line that names the offending file (or argument) and the problem, so that a
user can act on it without reading a traceback. The CLI prints ``str(error)`` and exits with 2.
"""

from __future__ import annotations

from pathlib import Path


class RsitrError(Exception):
    """Base class of all rsitr errors about user input."""


class DatasetError(RsitrError):
    """A dataset file is missing, unreadable, or inconsistent with its siblings."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnknownLayoutError(DatasetError):
    """No reader recognises the files at a dataset path."""


class ImageReadError(DatasetError):
    """An image file is missing or cannot be decoded."""


class CheckpointError(RsitrError):
    """A checkpoint does not match the model, vocabulary or backbone it is loaded into."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(RsitrError):
    """A configuration value is unknown, of the wrong type, or out of range."""


class UnknownModelError(ConfigError):
    """A model name is not in the registry; the message lists the registered names."""


class SplitNotFoundError(RsitrError, KeyError):
    """A dataset has no images in the requested split."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
