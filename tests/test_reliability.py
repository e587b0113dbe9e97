"""The bad-input cases of ``scripts/reliability_table.py`` (docs/reliability.md), run in-process.

Each case must give its expected exit status (2 for an error, 0 for input accepted with a
warning) and one line naming the problem, and leave nothing behind in its work folder.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reliability_table.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("reliability_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


table_script = _load_script()


def _check(outcomes) -> None:
    problems = [f"{o.case.name}: exit {o.status} (expected {o.case.status}), {o.lines} lines, "
                f"left behind {o.left_behind}: {o.message!r}" for o in outcomes if not o.ok]
    assert not problems, "\n".join(problems)
    for o in outcomes:
        if o.skipped:
            continue
        assert o.message, o.case.name
        if o.case.status == 2:
            assert o.message.startswith("rsitr: error: "), (o.case.name, o.message)


def test_cases_have_distinct_names_and_cover_the_issue_list() -> None:
    names = [case.name for case in table_script.cases()]
    assert len(names) == len(set(names))
    for name in ("resume-truncated", "resume-random", "config-type", "set-type-float", "set-type-int", "config-range",
                 "set-unknown-key", "model-params", "out-proc", "out-under-file", "out-unwritable", "image-bomb",
                 "caption-punctuation", "image-truncated", "image-corrupt", "dataset-truncated", "safetensors-truncated",
                 "safetensors-random", "pth-pickle", "caption-empty", "caption-oov", "config-unknown-key",
                 "run-other-model", "run-other-vocabulary", "device-missing"):
        assert name in names, name


def test_cases_without_a_run_give_one_line_and_leave_nothing_behind(tmp_path) -> None:
    """Config, --set, output folder, device, image, dataset json, caption and .pth cases (no training needed)."""
    selected = [case for case in table_script.cases() if not case.needs_run]
    outcomes = table_script.run_cases(selected, tmp_path, table_script.in_process_runner, log=lambda line: None)
    _check(outcomes)
    by_name = {o.case.name: o for o in outcomes}
    assert by_name["set-type-float"].message.startswith("rsitr: error: --set train.lr=fast: ")
    assert by_name["set-unknown-key"].message.startswith("rsitr: error: --set train.no_such_key=1: unknown key")
    assert "evil.pth" in by_name["pth-pickle"].message and not (tmp_path / table_script.PICKLE_MARKER).exists()
    assert "cuda:3" in by_name["device-missing"].message
    assert not (tmp_path / "o_type").exists() and not (tmp_path / "o_params").exists()


@pytest.mark.slow  # trains a one-epoch run and retrains it twice (damaged resume.pt): about a minute on 2 cores
def test_cases_of_a_run_give_one_line_and_leave_nothing_behind(tmp_path) -> None:
    selected = [case for case in table_script.cases() if case.needs_run]
    outcomes = table_script.run_cases(selected, tmp_path, table_script.in_process_runner, log=lambda line: None)
    _check(outcomes)
    assert (tmp_path / "r_trunc" / "resume.pt.damaged").is_file()  # set aside, and the run trained again
    assert (tmp_path / "r_trunc" / "resume.pt").is_file()


def test_the_table_escapes_cells_and_counts_what_was_not_as_expected() -> None:
    case = table_script.Case("x", "a case", ("data", "info", "a b.json"))
    good = table_script.Outcome(case, 2, "rsitr: error: a|b: problem", 1, [], 0.1)
    bad = table_script.Outcome(case, 0, "", 0, ["half.json (new)"], 0.1)
    skipped = table_script.Outcome(table_script.Case("y", "another", ("models",)), None, "", 0, [], 0.0, skipped="not here")
    page = table_script.table([good, bad, skipped])
    assert "`rsitr data info 'a b.json'`" in page  # the command pastes into a shell
    assert "`rsitr: error: a\\|b: problem`" in page  # a | would split the cell
    assert "| 0 (expected 2) |" in page and "no: half.json (new)" in page
    assert "1 of 2 cases run as expected; not as expected: x. Not run here: y." in page
