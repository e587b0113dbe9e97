"""The newcomer's path: the README's commands paste and parse, every option says what it does, one
spelling per option, --quiet anywhere, and ``train`` → ``evaluate`` works on the split it names."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

from rsitr_cli.main import build_parser, main, train_summary_table

README = Path(__file__).resolve().parents[1] / "README.md"


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def _commands(block: str) -> list[list[str]]:
    """The shell commands of a block: continuation lines joined, comments dropped, split at && and ;."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "||"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def test_no_readme_command_has_a_comment_after_a_line_continuation() -> None:
    for block in _bash_blocks():
        lines = block.splitlines()
        for number, line in enumerate(lines):
            assert not re.search(r"\\\s+#", line), f"a comment after a continuation ends the command: {line!r}"
            if line.rstrip().endswith("\\"):
                following = lines[number + 1].strip() if number + 1 < len(lines) else ""
                assert following and not following.startswith("#"), f"continuation into nothing after {line!r}"


def test_every_rsitr_command_of_the_readme_parses() -> None:
    parsed = 0
    for block in _bash_blocks():
        for words in _commands(block):
            if Path(words[0]).name != "rsitr":
                continue
            try:
                build_parser().parse_args(words[1:])
            except SystemExit as stop:
                pytest.fail(f"README command does not parse ({stop.code}): {shlex.join(words)}")
            parsed += 1
    assert parsed >= 20  # the worked example, the bundle, search, serve, benchmark, ablate, pretrain ...


def _parsers(parser: argparse.ArgumentParser, path: str = "rsitr"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_option_and_argument_has_help_text() -> None:
    missing = [f"{path} {action.dest}" for path, parser in _parsers(build_parser()) for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction | argparse._HelpAction) and not action.help]
    assert not missing, f"options without help: {', '.join(missing)}"


@pytest.mark.parametrize(("argv", "right"), [
    (["benchmark", "--dataset", "d.json", "--model", "dove", "--out", "b"], "--models"),
    (["benchmark", "--dataset", "d.json", "--models", "dove", "--seed", "3", "--out", "b"], "--seeds N"),
    (["ablate", "dove-modules", "--dataset", "d.json", "--seed", "1"], "--seeds N"),
    (["ablate", "dove-modules", "--dataset", "d.json", "--model", "dove"], "the study's model"),
])
def test_experiments_take_one_spelling_and_name_it(argv, right, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and right in err and "for one run (rsitr train)" in err


def test_quiet_after_nested_sub_commands() -> None:
    parser = build_parser()
    argv = ["index", "build", "scenes", "--model", "m", "--out", "o"]
    assert not parser.parse_args(argv).quiet
    assert parser.parse_args([*argv, "--quiet"]).quiet
    assert parser.parse_args(["--quiet", *argv]).quiet
    assert parser.parse_args(["index", "--quiet", *argv[1:]]).quiet


def test_the_train_summary_is_a_table_with_a_command_that_works() -> None:
    summary = {"best_epoch": 3, "best_val_mR": 40.071, "seconds_per_epoch": 12.34, "parameters": 1_234_000,
               "epochs": 5, "selection_split": "select", "report_split": "val"}
    text = train_summary_table(summary, "runs/my run")
    assert "best epoch      3 of 5" in text and "40.07 (on select" in text and "1.23 M trainable" in text
    assert "rsitr evaluate 'runs/my run'   (reports val)" in text  # quoted: it pastes as one argument
    text = train_summary_table({**summary, "selection_split": "val", "report_split": None}, "runs/r")
    assert "rsitr evaluate runs/r --split val   (optimistic" in text


def _train_val_only(tiny_synth: Path, folder: Path) -> Path:
    """The tiny dataset with its test images moved into val (a train/val release like UCM-Captions)."""
    folder.mkdir()
    data = json.loads(tiny_synth.read_text())
    for image in data["images"]:
        image["split"] = "val" if image["split"] == "test" else image["split"]
    (folder / "dataset_synth.json").write_text(json.dumps(data))
    (folder / "images").symlink_to(tiny_synth.parent / "images")
    return folder / "dataset_synth.json"


@pytest.mark.slow  # trains two one-epoch runs (about 15 s on 2 cores)
def test_train_names_the_split_evaluate_reports_by_default(tiny_synth, tmp_path, capsys) -> None:
    tiny = ["--model", "dove-s", "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--set", "features.image_size=64",
            "--set", "model.params={embed_dim: 32, word_dim: 16}", "--quiet"]
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(tiny_synth), *tiny, "--out", str(run), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "{" not in out and "(reports test)" in out  # a table, not raw JSON
    assert json.loads((tmp_path / "s.json").read_text())["report_split"] == "test"
    assert main(["evaluate", str(run), "--quiet"]) == 0
    assert json.loads((run / "eval_test.json").read_text())["split"] == "test"
    capsys.readouterr()

    selected_on_val = tmp_path / "run-val"
    assert main(["train", "--dataset", str(_train_val_only(tiny_synth, tmp_path / "tv")), *tiny,
                 "--out", str(selected_on_val)]) == 0
    assert f"rsitr evaluate {selected_on_val} --split val   (optimistic" in capsys.readouterr().out
    assert main(["evaluate", str(selected_on_val), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "give --split val" in err
    assert main(["evaluate", str(selected_on_val), "--split", "val", "--quiet"]) == 0
