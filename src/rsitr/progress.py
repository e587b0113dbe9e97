"""The one way rsitr reports progress: messages through :mod:`logging`, long loops as tqdm bars.

Library and application modules log through :func:`get_logger` (a logger under ``"rsitr"``, so
one setting controls all of them) and wrap every long loop in :func:`progress_bar`. Nothing
prints: a program that embeds rsitr decides where messages go; the console script sends them to
standard output with :func:`log_to_console`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

ROOT_LOGGER = "rsitr"
T = TypeVar("T")


def get_logger(module: str) -> logging.Logger:
    """The logger of a module: ``rsitr.features.cache`` as is, ``rsitr_train.trainer`` as ``rsitr.train.trainer``."""
    if module.startswith("rsitr_"):
        module = f"{ROOT_LOGGER}.{module[len('rsitr_'):]}"
    elif module != ROOT_LOGGER and not module.startswith(f"{ROOT_LOGGER}."):
        module = f"{ROOT_LOGGER}.{module}"
    return logging.getLogger(module)


def progress_bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar that disappears when done (``leave=False``) and is off when ``enabled`` is False."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=options.pop("leave", False),
                **options)


class _StdoutHandler(logging.Handler):
    """Writes each message as a line to whatever ``sys.stdout`` is at that moment (tests replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # a logging failure must never stop the work
            self.handleError(record)


def log_to_console(level: int = logging.INFO) -> None:
    """Send rsitr's messages (``level`` and above) to standard output as plain lines; idempotent."""
    root = logging.getLogger(ROOT_LOGGER)
    root.setLevel(level)
    if not any(isinstance(h, _StdoutHandler) for h in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
