"""rsitr_cli: the ``rsitr`` console script, a thin layer over the library and both applications."""

from rsitr_cli.main import build_parser, main

__all__ = ["build_parser", "main"]
