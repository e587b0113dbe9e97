"""Run every bad-input case as a real ``rsitr`` process and write the table of what each gives.

The table (``docs/reliability.md``) is generated, never typed, so it cannot go stale: each case
writes a small bad input into a temporary work folder (a tiny synthetic dataset and a one-epoch
run of it are made first), runs ``python -m rsitr_cli ARGS`` there as a child process, and
records its exit status, the line it printed, and whether anything was left behind. "Left
behind" compares every file and folder of the work folder before and after the command (size
and modification time), outside the paths a case is allowed to write, and looks for temporary
files (``.*.tmp``) anywhere; a half-written output shows up in one of the two. New paths that
hold no data (an empty folder, an empty ``.lock`` file) are named in the table but not counted.

A case passes when its exit status is the expected one (2 for an error; 0 for input that is
accepted with a warning) and its message is one line: for an error, the only line on standard
error, ``rsitr: error: FILE: PROBLEM``; for a warning, the one line of standard output holding
the case's keyword.

Usage::

    python scripts/reliability_table.py                  # all cases, writes docs/reliability.md
    python scripts/reliability_table.py --only empty-caption --out /dev/stdout
    python scripts/reliability_table.py --keep work/     # keep the work folder to look at

``tests/test_reliability.py`` runs the same cases in-process (:func:`in_process_runner`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: What a runner returns: exit status, standard output, standard error.
Completed = tuple[int, str, str]
#: Runs ``rsitr ARGV`` in a work folder.
Runner = Callable[[Sequence[str], Path], Completed]

DATASET = "data/dataset_synth.json"
RUN = "run"
CACHE = "cache"
#: The tiny model every training case uses (small enough for a CPU in seconds).
TINY = ("--model", "dove-s", "--epochs", "1", "--cache-dir", CACHE, "--set", "features.image_size=64",
        "--set", "model.params={embed_dim: 32, word_dim: 16}", "--quiet")
TRAIN = ("train", "--dataset", DATASET, *TINY)
FEATURES = ("features", "--backbone", "resnet18", "--image-size", "64", "--quiet")
#: A file a case's command would create if it ran a pickled object (it must never exist).
PICKLE_MARKER = "PICKLE-WAS-EXECUTED"


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it, the command that meets it, and what it must give.

    ``writes``: path prefixes (relative to the work folder) the command may legitimately change,
    e.g. the run a damaged ``resume.pt`` restarts. ``keyword``: for a case accepted with a
    warning (``status`` 0), a word of the warning line on standard output. ``skip``: returns
    why the case cannot be shown here (e.g. root writes into any folder), or None.
    """

    name: str
    title: str
    argv: tuple[str, ...]
    make: Callable[[Path], None] | None = None
    status: int = 2
    keyword: str | None = None
    writes: tuple[str, ...] = ()
    skip: Callable[[], str | None] | None = None

    @property
    def needs_run(self) -> bool:
        """Whether the case starts from the one-epoch run (the run itself, or its own ``r_*`` copy of it)."""
        return any(arg == RUN or arg.startswith("r_") for arg in self.argv)


@dataclass
class Outcome:
    """What one case gave: exit status, its message line, how many lines, and what it left behind."""

    case: Case
    status: int | None
    message: str
    lines: int
    left_behind: list[str]
    seconds: float
    skipped: str | None = None
    kept: list[str] = field(default_factory=list)  # new paths that hold no data (empty folders, empty lock files)

    @property
    def ok(self) -> bool:
        """Expected status, a one-line message, nothing left behind (a skipped case is not a failure)."""
        if self.skipped:
            return True
        return self.status == self.case.status and self.lines == 1 and not self.left_behind


# ----------------------------------------------------------------------------- making bad inputs


def _write(work: Path, name: str, text: str) -> None:
    path = work / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _truncate(path: Path) -> None:
    """Keep the first half of ``path`` (a copy cut short, a disk that filled up)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _randomise(path: Path, seed: int = 0) -> None:
    """Replace ``path`` by as many seeded random bytes (a file of another kind, a disk error)."""
    import numpy as np

    size = max(path.stat().st_size, 1024)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())


def _copy_run(work: Path, name: str) -> Path:
    target = work / name
    shutil.copytree(work / RUN, target)
    return target


def _copy_dataset(work: Path, name: str) -> Path:
    """A copy of the tiny dataset under ``name/`` (its json, images and detections)."""
    target = work / name
    shutil.copytree(work / "data", target)
    return target


def _edit_dataset(work: Path, name: str, edit: Callable[[dict], None]) -> None:
    """A copy of the dataset whose Karpathy json went through ``edit``."""
    path = _copy_dataset(work, name) / "dataset_synth.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _first_sentence(split: str) -> Callable[[dict], dict]:
    def pick(data: dict) -> dict:
        image = next(entry for entry in data["images"] if entry["split"] == split)
        return image["sentences"][0]
    return pick


def _set_caption(split: str, raw: str) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        sentence = _first_sentence(split)(data)
        sentence["raw"] = raw
        sentence["tokens"] = [word for word in raw.lower().split() if word.isalnum()]
    return edit


def _first_image(folder: Path) -> Path:
    return sorted((folder / "images").glob("*.png"))[0]


def _bomb(work: Path) -> None:
    """A dataset one of whose images is a 14,000 × 14,000 PNG (196 Mpx in a few hundred kB)."""
    from PIL import Image

    Image.new("1", (14_000, 14_000)).save(_first_image(_copy_dataset(work, "d_bomb")))


def _pickled_object(work: Path) -> None:
    """A ``.pth`` whose pickle would create :data:`PICKLE_MARKER` if it were run."""
    import torch

    class Payload:
        def __reduce__(self):  # unpickling calls open(PICKLE_MARKER, "w"): proof that it ran
            return (open, (PICKLE_MARKER, "w"))

    torch.save({"state_dict": Payload()}, work / "evil.pth")


def _swap_vocabulary(work: Path) -> None:
    """A copy of the run whose ``vocab.json`` orders two words the other way (another vocabulary)."""
    path = _copy_run(work, "r_vocab") / "vocab.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    words = sorted(data["word2idx"], key=lambda w: data["word2idx"][w])
    first, second = words[0], words[1]
    data["word2idx"][first], data["word2idx"][second] = data["word2idx"][second], data["word2idx"][first]
    data.pop("idx2word", None)
    path.write_text(json.dumps(data), encoding="utf-8")


def _locked_folder(work: Path) -> None:
    (work / "locked").mkdir()
    (work / "locked").chmod(0o555)


def _root_writes_anywhere() -> str | None:
    return "not shown: this process runs as root, which may write into a read-only folder" if os.geteuid() == 0 else None


def cases() -> list[Case]:
    """Every bad-input case, in the order of the table."""
    def train_to(out: str, *extra: str) -> tuple[str, ...]:
        return (*TRAIN, *extra, "--out", out)

    def features_of(dataset: str, cache: str, *extra: str) -> tuple[str, ...]:
        return (*FEATURES, dataset, "--cache-dir", cache, *extra)

    return [
        Case("resume-truncated", "a truncated resume.pt", train_to("r_trunc"),
             lambda w: _truncate(_copy_run(w, "r_trunc") / "resume.pt"), status=0, keyword="damaged", writes=("r_trunc",)),
        Case("resume-random", "a resume.pt of random bytes", train_to("r_random"),
             lambda w: _randomise(_copy_run(w, "r_random") / "resume.pt"), status=0, keyword="damaged", writes=("r_random",)),
        Case("config-type", 'a config value of the wrong type (epochs: "ten")',
             ("train", "--config", "bad_type.yaml", "--dataset", DATASET, "--out", "o_type"),
             lambda w: _write(w, "bad_type.yaml", 'train:\n  epochs: "ten"\n')),
        Case("set-type-float", "--set of the wrong type (train.lr=fast)", train_to("o_lr", "--set", "train.lr=fast")),
        Case("set-type-int", "--set of the wrong type (train.epochs=1.5)", train_to("o_epochs", "--set", "train.epochs=1.5")),
        Case("config-range", "a config value out of range (batch_size: -5)",
             ("train", "--config", "bad_range.yaml", "--dataset", DATASET, "--out", "o_range"),
             lambda w: _write(w, "bad_range.yaml", "train:\n  batch_size: -5\n")),
        Case("set-unknown-key", "--set of an unknown key", train_to("o_key", "--set", "train.no_such_key=1")),
        Case("config-unknown-key", "a config with an unknown key (train.epoch)",
             ("train", "--config", "bad_key.yaml", "--dataset", DATASET, "--out", "o_cfgkey"),
             lambda w: _write(w, "bad_key.yaml", "train:\n  epoch: 3\n")),
        Case("model-params", "an unknown model.params entry", train_to("o_params", "--set", "model.params.no_such_param=1")),
        Case("out-proc", "--out under /proc", train_to("/proc/rsitr-reliability/run")),
        Case("out-under-file", "--out under a file", train_to("a_file/run"), lambda w: _write(w, "a_file", "x\n")),
        Case("out-unwritable", "--out in a folder without write permission", train_to("locked/run"), _locked_folder,
             skip=_root_writes_anywhere),
        Case("device-missing", "a device the machine lacks (--device cuda:3)", train_to("o_device", "--device", "cuda:3")),
        Case("image-bomb", "a 14,000 × 14,000 PNG (decompression bomb)", features_of("d_bomb/dataset_synth.json", "c_bomb"),
             _bomb),
        Case("image-truncated", "a truncated image", features_of("d_trunc/dataset_synth.json", "c_trunc"),
             lambda w: _truncate(_first_image(_copy_dataset(w, "d_trunc")))),
        Case("image-corrupt", "an image of random bytes", features_of("d_corrupt/dataset_synth.json", "c_corrupt"),
             lambda w: _randomise(_first_image(_copy_dataset(w, "d_corrupt")))),
        Case("dataset-truncated", "a truncated dataset json", ("data", "info", "d_json/dataset_synth.json"),
             lambda w: _truncate(_copy_dataset(w, "d_json") / "dataset_synth.json")),
        Case("caption-empty", "an empty caption", ("data", "info", "d_empty/dataset_synth.json"),
             lambda w: _edit_dataset(w, "d_empty", _set_caption("train", ""))),
        Case("caption-punctuation", "a caption of punctuation only", ("data", "info", "d_punct/dataset_synth.json"),
             lambda w: _edit_dataset(w, "d_punct", _set_caption("train", "... !")), status=0, keyword="no word"),
        Case("caption-oov", "a caption of out-of-vocabulary words only, at evaluation",
             ("evaluate", RUN, "--dataset", "d_oov/dataset_synth.json", "--json", "oov_eval.json", "--quiet"),
             lambda w: _edit_dataset(w, "d_oov", _set_caption("test", "zzyzx qwxvb")), status=0,
             keyword="no word of the run's vocabulary", writes=("oov_eval.json", CACHE)),
        Case("safetensors-truncated", "a truncated model.safetensors", ("evaluate", "r_st_trunc", "--quiet"),
             lambda w: _truncate(_copy_run(w, "r_st_trunc") / "model.safetensors")),
        Case("safetensors-random", "a model.safetensors of random bytes", ("evaluate", "r_st_random", "--quiet"),
             lambda w: _randomise(_copy_run(w, "r_st_random") / "model.safetensors")),
        Case("pth-pickle", "a .pth holding a pickled object (never run)",
             features_of(DATASET, "c_pth", "--backbone-weights", "evil.pth"), _pickled_object),
        Case("run-other-model", "--out a run directory of another model",
             ("train", "--dataset", DATASET, "--model", "vsepp", "--epochs", "1", "--cache-dir", CACHE,
              "--set", "features.image_size=64", "--quiet", "--out", RUN)),
        Case("run-other-vocabulary", "a run directory whose vocab.json is another vocabulary",
             ("evaluate", "r_vocab", "--quiet"), _swap_vocabulary),
    ]


# ----------------------------------------------------------------------------- running them


def subprocess_runner(argv: Sequence[str], work: Path) -> Completed:
    """``python -m rsitr_cli ARGV`` as a child process in ``work``, one thread each for the math libraries."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "rsitr_cli", *argv], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    return done.returncode, done.stdout, done.stderr


def in_process_runner(argv: Sequence[str], work: Path) -> Completed:
    """:func:`rsitr_cli.main.main` in this process, in ``work``, capturing what it prints (for the tests)."""
    from rsitr_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    before = Path.cwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(list(argv))
            except SystemExit as stop:  # argparse's own errors
                status = stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(before)
    return status, out.getvalue(), err.getvalue()


def build_inputs(work: Path, runner: Runner = subprocess_runner, with_run: bool = True) -> None:
    """The tiny dataset (36 images, 64 px) and, ``with_run``, a one-epoch run of it, which the cases start from."""
    steps = [("data", "synth", "--out", "data", "--num-images", "36", "--image-size", "64", "--quiet")]
    if with_run:
        steps.append((*TRAIN, "--out", RUN))
    for argv in steps:
        status, out, err = runner(argv, work)
        if status != 0:
            raise RuntimeError(f"setting up with rsitr {shlex.join(argv)} failed ({status}): {err or out}")


def _state(work: Path, allowed: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``work`` outside ``allowed`` prefixes: relative path -> (size, mtime_ns)."""
    state = {}
    for path in work.rglob("*"):
        rel = path.relative_to(work).as_posix()
        if any(rel == prefix or rel.startswith(prefix.rstrip("/") + "/") for prefix in allowed):
            continue
        info = path.lstat()
        state[rel] = (0 if path.is_dir() else info.st_size, 0 if path.is_dir() else info.st_mtime_ns)
    return state


def _empty_leftovers(work: Path, new: Sequence[str]) -> set[str]:
    """Of the ``new`` paths, those that hold no data: empty ``*.lock`` files, and folders holding nothing else.

    They are reported beside the answer, not counted as left behind: no output, half-written or
    not. A failed ``rsitr features`` made its cache folder (checked writable before the work) and
    may have taken the cache's advisory lock (:func:`rsitr.features.cache.cache_lock`).
    """
    locks = {rel for rel in new if rel.endswith(".lock") and (work / rel).is_file() and not (work / rel).stat().st_size}
    folders = set()
    for rel in new:
        if (work / rel).is_dir():
            inside = [p.relative_to(work).as_posix() for p in (work / rel).rglob("*") if p.is_file()]
            if all(path in locks for path in inside):
                folders.add(rel)
    return locks | folders


def _left_behind(work: Path, before: dict[str, tuple[int, int]],
                 after: dict[str, tuple[int, int]]) -> tuple[list[str], list[str]]:
    """Files created, changed or removed by a command and temporary files anywhere; and the empty leftovers."""
    new = [rel for rel in after if rel not in before]
    empty = _empty_leftovers(work, new)
    changed = [f"{rel} (new)" for rel in new if rel not in empty]
    changed += [f"{rel} (changed)" for rel in after if rel in before and after[rel] != before[rel]]
    changed += [f"{rel} (removed)" for rel in before if rel not in after]
    changed += [f"{p.relative_to(work).as_posix()} (temporary)" for p in work.rglob(".*.tmp")]
    if (work / PICKLE_MARKER).exists():
        changed.append(f"{PICKLE_MARKER} (the pickle ran)")
    outermost = sorted(rel for rel in empty if not any(rel.startswith(other + "/") for other in empty))
    return sorted(set(changed)), [rel + ("/" if (work / rel).is_dir() else "") for rel in outermost]


def _message(case: Case, out: str, err: str, work: Path) -> tuple[str, int]:
    """The case's message and how many lines it took (see the module docstring)."""
    if case.keyword is None:
        lines = [line for line in err.splitlines() if line.strip()]
    else:
        lines = [line for line in out.splitlines() if case.keyword in line]
    text = lines[0] if lines else (err.strip().splitlines() or [""])[-1]
    for prefix in {str(work.resolve()), str(work)}:
        text = text.replace(prefix + os.sep, "").replace(prefix, ".")
    return text.strip(), len(lines)


def run_case(case: Case, work: Path, runner: Runner = subprocess_runner) -> Outcome:
    """Make the case's input in ``work`` (which holds :func:`build_inputs`), run it, and judge it."""
    reason = case.skip() if case.skip else None
    if reason:
        return Outcome(case, None, "", 0, [], 0.0, skipped=reason)
    if case.make is not None:
        case.make(work)
    before = _state(work, case.writes)
    started = time.perf_counter()
    status, out, err = runner(case.argv, work)
    seconds = time.perf_counter() - started
    message, lines = _message(case, out, err, work)
    left, kept = _left_behind(work, before, _state(work, case.writes))
    return Outcome(case, status, message, lines, left, seconds, kept=kept)


def run_cases(selected: Sequence[Case], work: Path, runner: Runner = subprocess_runner,
              log: Callable[[str], None] = print) -> list[Outcome]:
    """:func:`build_inputs`, then every case in turn (each on its own copy of what it damages)."""
    build_inputs(work, runner, with_run=any(case.needs_run for case in selected))
    outcomes = []
    for case in selected:
        outcome = run_case(case, work, runner)
        state = "skipped" if outcome.skipped else ("ok" if outcome.ok else "NOT OK")
        log(f"{case.name:24s} {state:8s} exit {outcome.status}  {outcome.seconds:5.1f} s  {outcome.message[:100]}")
        outcomes.append(outcome)
    return outcomes


# ----------------------------------------------------------------------------- the table


def _cell(text: str) -> str:
    """A Markdown table cell as a code span (``|`` escaped; backticks would end the span)."""
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`" if text else ""


def table(outcomes: Sequence[Outcome]) -> str:
    """The Markdown page of the outcomes (docs/reliability.md)."""
    failed = [o.case.name for o in outcomes if not o.ok]
    lines = [
        "# Reliability: what each bad input gives",
        "",
        "Generated by `python scripts/reliability_table.py`, which makes each bad input in a temporary folder (a",
        "36-image synthetic dataset and a one-epoch DOVE-S run of it first), runs the command as a child process",
        "(`python -m rsitr_cli …`, shown as `rsitr …`; paths are relative to that folder) and records what it",
        "gives. Do not edit by hand: run the script again. `tests/test_reliability.py` runs the same cases.",
        "",
        "An error exits with status 2 and prints one line on standard error, naming the file (or argument) and",
        "the problem. Input that is accepted exits with 0 and says so in one line of its output: a damaged",
        "`resume.pt` is moved aside and the run starts again; captions without a word are kept (every reference",
        "split counts them) and read as `<unk>`. *Nothing left behind* compares every file and folder of the",
        "work folder before and after the command, outside what the case may write (the restarted run, the",
        "evaluation's JSON), and looks for temporary files anywhere. New paths that hold no data (an empty",
        "folder, the feature cache's empty advisory `.lock` file) are named beside the answer, not counted.",
        "",
        "| case | command | exit status | message | nothing left behind |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        command = _cell("rsitr " + shlex.join(o.case.argv))
        if o.skipped:
            lines.append(f"| {o.case.title} | {command} | — | {o.skipped} | — |")
            continue
        status = f"{o.status}" + ("" if o.status == o.case.status else f" (expected {o.case.status})")
        message = _cell(o.message) + ("" if o.lines == 1 else f" ({o.lines} lines)")
        behind = "yes" if not o.left_behind else "no: " + ", ".join(o.left_behind)
        if o.kept:
            behind += " (empty, stays: " + ", ".join(o.kept) + ")"
        lines.append(f"| {o.case.title} | {command} | {status} | {message} | {behind} |")
    ran = [o for o in outcomes if not o.skipped]
    skipped = [o.case.name for o in outcomes if o.skipped]
    lines += ["", f"{sum(o.ok for o in ran)} of {len(ran)} cases run as expected"
              + (f"; not as expected: {', '.join(failed)}." if failed else ".")
              + (f" Not run here: {', '.join(skipped)}." if skipped else ""), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "reliability.md"),
                        help="Markdown file to write (default docs/reliability.md)")
    parser.add_argument("--only", nargs="+", metavar="CASE", help="run these cases only (names as in the log)")
    parser.add_argument("--keep", help="work in this (new) folder and keep it, instead of a temporary one")
    args = parser.parse_args(argv)
    selected = [c for c in cases() if not args.only or c.name in args.only]
    if args.only and len(selected) != len(set(args.only)):
        parser.error(f"unknown case among {args.only}; cases: {', '.join(c.name for c in cases())}")
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = Path(args.keep)
            work.mkdir(parents=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rsitr-reliability-")))
        stack.callback(lambda: (work / "locked").exists() and (work / "locked").chmod(0o755))  # let it be removed
        outcomes = run_cases(selected, work)
    text = table(outcomes)
    if args.out == "/dev/stdout":
        print(text)
    else:
        from rsitr.io import write_text

        write_text(args.out, text)
        print(f"wrote {args.out}")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
