"""The package layout is the architecture: which part may import which, checked on every module.

    rsitr        the library: data, text, backbones, features, models, losses, evaluation, bundle
    rsitr_train  the training application   -> may import rsitr
    rsitr_serve  the serving application    -> may import rsitr
    rsitr_cli    the console script         -> may import all of them

Imports inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

ALLOWED = {
    "rsitr": {"rsitr"},
    "rsitr_train": {"rsitr", "rsitr_train"},
    "rsitr_serve": {"rsitr", "rsitr_serve"},
    "rsitr_cli": {"rsitr", "rsitr_train", "rsitr_serve", "rsitr_cli"},
}
#: Third-party packages only the applications may use (plots belong with the applications).
APPLICATION_ONLY = {"matplotlib"}


def imported_packages(path: Path) -> set[str]:
    """Top-level package names a module imports, anywhere in its body."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def modules(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_part_imports_only_what_it_may(package: str) -> None:
    ours = set(ALLOWED)
    offenders = []
    for path in modules(package):
        wrong = (imported_packages(path) & ours) - ALLOWED[package]
        if package == "rsitr":
            wrong |= imported_packages(path) & APPLICATION_ONLY
        if wrong:
            offenders.append(f"{path.relative_to(SRC)} imports {', '.join(sorted(wrong))}")
    assert not offenders, "; ".join(offenders)


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from rsitr_train.trainer import train\n    import matplotlib.pyplot\n")
    assert imported_packages(module) == {"rsitr_train", "matplotlib"}


def test_every_part_exists_and_models_import_no_sibling_model() -> None:
    for package in ALLOWED:
        assert (SRC / package / "__init__.py").is_file(), package
    models = SRC / "rsitr" / "models"
    shared = {"base", "registry", "layers", "__init__"}
    model_files = {p.stem for p in models.glob("*.py")} - shared
    for path in models.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        siblings = {node.module.split(".")[2] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module and node.module.startswith("rsitr.models.") and node.module.count(".") >= 2}
        assert not (siblings & model_files) - {path.stem}, f"{path.name} imports {siblings & model_files}"
