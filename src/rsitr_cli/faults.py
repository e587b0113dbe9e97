"""Kill -9 at a chosen moment: the harness of the fault matrix (``tests/test_faults.py``, ``benchmarks/faults.py``).

``python -m rsitr_cli.faults [--kill FAULT:N] [--count FILE] -- ARGS...`` runs ``rsitr ARGS...``
in this interpreter with the calls that mark the moments of each fault of :data:`FAULTS` counted.
With ``--kill FAULT:N`` the process sends itself SIGKILL at the N-th such moment of ``FAULT``;
with ``--count FILE`` the number of moments of every fault is written to ``FILE`` (JSON) when the
command ends, so that an uninterrupted run says how many moments there are to choose from.

SIGKILL sent from within at a chosen call is what ``kill -9`` from outside does at that moment —
no ``finally`` block, no ``atexit`` handler, no flush runs — but it lands where it is aimed ("during
validation", "while writing a checkpoint") instead of wherever a timer happens to fall. A
moment that is a write (``os.replace`` of a finished temporary file onto its name, the last step
of :func:`rsitr.io.atomic_path`) first cuts the temporary file to half its length: the process
dies as one killed mid-write would, leaving the partial file such a kill leaves.

:func:`run` starts such a command in a fresh interpreter; :func:`differences` compares the
outputs of two runs tensor by tensor (an empty list: bit-identical).
"""

from __future__ import annotations

import atexit
import csv
import fnmatch
import functools
import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The files a retrieval run or a pretraining run writes as its checkpoint.
CHECKPOINT_FILES = ("model.safetensors", "model.json", "backbone.safetensors", "backbone.json", "resume.pt")
#: Every file pretraining writes (its checkpoint, config, metrics and curves).
PRETRAIN_FILES = ("backbone.safetensors", "backbone.json", "resume.pt", "pretrain_config.json", "metrics.csv",
                  "pretrain_curves.png")
#: Columns of ``metrics.csv`` that measure time, and so differ between any two runs.
TIMING_COLUMNS = ("train_seconds", "images_per_s")


@dataclass(frozen=True)
class Hook:
    """A function whose calls are moments of a fault: ``attribute`` of ``module`` (``"Class.method"`` allowed).

    ``names``: for ``os.replace``, the moments are only the writes whose destination's file name
    matches one of these patterns (:mod:`fnmatch`); empty = every call.
    """

    module: str
    attribute: str
    names: tuple[str, ...] = ()

    @property
    def is_write(self) -> bool:
        return (self.module, self.attribute) == ("os", "replace")

    def selects(self, args: tuple[Any, ...]) -> bool:
        """Whether a call with ``args`` is a moment of this hook."""
        if not self.names:
            return True
        name = Path(str(args[1])).name if len(args) > 1 else ""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names)


@dataclass(frozen=True)
class Fault:
    """A kind of interruption: what it is, and the calls that are its moments."""

    moment: str
    hooks: tuple[Hook, ...]


FAULTS: dict[str, Fault] = {
    "training": Fault("during a training epoch (before an optimiser step)",
                      (Hook("rsitr_train.trainer", "Stepper.backward_and_step"),)),
    "validation": Fault("during validation (as the validation split is scored)",
                        (Hook("rsitr_train.trainer", "evaluate_features"),)),
    "checkpoint": Fault("while writing a checkpoint (weights, their description or the resume state)",
                        (Hook("os", "replace", CHECKPOINT_FILES),)),
    "pretraining": Fault("during pretraining (a training batch, a validation or recalibration batch, a write)",
                         (Hook("rsitr_train.pretrain", "augment_batch"), Hook("rsitr_train.pretrain", "eval_transform"),
                          Hook("os", "replace", PRETRAIN_FILES))),
    "features": Fault("during feature extraction (a batch, or writing the cache file)",
                      (Hook("rsitr.features.compute", "backbone_features"), Hook("os", "replace", ("*.safetensors",)))),
}


def _owner(hook: Hook) -> tuple[Any, str]:
    """The object holding the hooked function and its name there."""
    owner: Any = importlib.import_module(hook.module)
    *path, name = hook.attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _die_at_write(args: tuple[Any, ...]) -> None:
    """Cut the temporary file being renamed to half its length (a write cut short), then SIGKILL."""
    source = Path(str(args[0]))
    if source.is_file():
        os.truncate(source, source.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(counts: dict[str, int], kill: tuple[str, int] | None = None) -> None:
    """Wrap the hooks of every fault so that each call that is a moment adds one to ``counts[fault]``.

    ``kill=(fault, n)``: at the ``n``-th moment of ``fault`` the process kills itself (SIGKILL),
    before the call runs.
    """
    by_function: dict[tuple[str, str], list[tuple[str, Hook]]] = {}
    for name, fault in FAULTS.items():
        counts.setdefault(name, 0)
        for hook in fault.hooks:
            by_function.setdefault((hook.module, hook.attribute), []).append((name, hook))
    for hooks in by_function.values():
        owner, attribute = _owner(hooks[0][1])
        setattr(owner, attribute, _counted(getattr(owner, attribute), hooks, counts, kill))


def _counted(original: Callable[..., Any], hooks: list[tuple[str, Hook]], counts: dict[str, int],
             kill: tuple[str, int] | None) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for name, hook in hooks:
            if hook.selects(args):
                counts[name] += 1
                if kill is not None and kill == (name, counts[name]):
                    if hook.is_write:
                        _die_at_write(args)
                    os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    return wrapper


def _parse(argv: Sequence[str]) -> tuple[tuple[str, int] | None, Path | None, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: python -m rsitr_cli.faults [--kill FAULT:N] [--count FILE] -- RSITR-ARGS...")
    split = list(argv).index("--")
    options, rsitr_args = list(argv[:split]), list(argv[split + 1:])
    kill, count = None, None
    while options:
        option = options.pop(0)
        if option == "--kill" and options:
            fault, _, n = options.pop(0).partition(":")
            if fault not in FAULTS or not n.isdigit() or int(n) < 1:
                raise SystemExit(f"--kill FAULT:N with FAULT one of {', '.join(FAULTS)} and N >= 1")
            kill = (fault, int(n))
        elif option == "--count" and options:
            count = Path(options.pop(0))
        else:
            raise SystemExit(f"unknown option {option!r}")
    return kill, count, rsitr_args


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rsitr`` with the faults armed (see the module docstring); its exit status."""
    kill, count, rsitr_args = _parse(sys.argv[1:] if argv is None else argv)
    counts: dict[str, int] = {}
    arm(counts, kill)
    if count is not None:
        target = count

        def write_counts() -> None:  # at exit, when every moment of the run has been counted
            target.write_text(json.dumps(counts))

        atexit.register(write_counts)
    from rsitr_cli.main import main as rsitr

    return rsitr(rsitr_args)


# ------------------------------------------------------------------------------- the parent's side


@dataclass
class Outcome:
    """How a command run by :func:`run` ended: exit status (-9 when killed), its output, the moments counted."""

    returncode: int
    output: str
    counts: dict[str, int]

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def command(args: Sequence[str], kill: tuple[str, int] | None = None, count: Path | None = None) -> list[str]:
    """The command line that runs ``rsitr args`` under the harness (:func:`main`)."""
    line = [sys.executable, "-m", "rsitr_cli.faults"]
    if kill is not None:
        line += ["--kill", f"{kill[0]}:{kill[1]}"]
    if count is not None:
        line += ["--count", str(count)]
    return [*line, "--", *map(str, args)]


def environment() -> dict[str, str]:
    """The environment of a harnessed command: one thread, so its results do not depend on the machine's cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(args: Sequence[str], kill: tuple[str, int] | None = None, count: Path | None = None,
        timeout: float = 600.0, preexec: Callable[[], None] | None = None) -> Outcome:
    """Run ``rsitr args`` in a fresh interpreter under the harness (:func:`command`, :func:`environment`).

    ``count``: a file for the moments counted (read back into ``Outcome.counts``, when the run
    ended normally). ``preexec``: run in the child before it starts (e.g. a resource limit).
    """
    done = subprocess.run(command(args, kill, count), env=environment(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec)
    counts = json.loads(count.read_text()) if count is not None and count.is_file() else {}
    return Outcome(done.returncode, done.stdout + done.stderr, counts)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists of a checkpoint as ``{"a/b/0": leaf}``."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}/").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): value}


def read_outputs(path: Path) -> dict[str, Any]:
    """A run's output file as comparable leaves: tensors and metadata of a safetensors file, the
    state of a ``.pt`` file (its history and other timing-bearing text left out), the rows of a CSV
    without its timing columns, the content of a JSON file."""
    import torch
    from safetensors import safe_open

    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {**{f"tensor/{k}": handle.get_tensor(k) for k in handle.keys()},
                    **{f"metadata/{k}": v for k, v in (handle.metadata() or {}).items()}}
    if path.suffix == ".pt":
        state = torch.load(path, map_location="cpu", weights_only=True)
        history = json.loads(state.pop("history_json", "[]"))
        leaves = _flat(state)
        leaves["history"] = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in history]
        return leaves
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            return {"rows": [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]}
    return {"content": json.loads(path.read_text())}


def differences(reference: Path, other: Path) -> list[str]:
    """How file ``other`` differs from ``reference`` (:func:`read_outputs`); empty when bit-identical.

    Each entry names the key, with the largest absolute difference for tensors of the same shape.
    """
    import torch

    if not other.is_file():
        return [f"{other.name}: missing"]
    want, got = read_outputs(reference), read_outputs(other)
    found = [f"{other.name}:{key}: missing" for key in sorted(set(want) - set(got))]
    found += [f"{other.name}:{key}: unexpected" for key in sorted(set(got) - set(want))]
    for key in sorted(set(want) & set(got)):
        a, b = want[key], got[key]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.dtype != b.dtype or a.shape != b.shape:
                found.append(f"{other.name}:{key}: {b.dtype}{tuple(b.shape)} instead of {a.dtype}{tuple(a.shape)}")
            elif not torch.equal(a, b):
                gap = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else float("nan")
                found.append(f"{other.name}:{key}: max |difference| {gap:.3g}")
        elif a != b:
            found.append(f"{other.name}:{key}: differs")
    return found


@dataclass(frozen=True)
class Scenario:
    """A command faults are aimed at: its ``rsitr`` arguments, its output folder, and the files of
    that folder (names or globs) that must equal those of an uninterrupted run."""

    args: tuple[str, ...]
    out: Path
    compared: tuple[str, ...]
    #: Entries of :func:`differences` (``file:key``) that are not compared, each for a stated reason.
    ignored: tuple[str, ...] = ()

    def files(self) -> list[Path]:
        return sorted(path for pattern in self.compared for path in self.out.glob(pattern))


#: The scenario each fault is aimed at (the keys of :func:`scenarios`).
SCENARIO_OF = {"training": "training", "validation": "training", "checkpoint": "training",
               "pretraining": "pretraining", "features": "features"}


def scenarios(dataset: Path, work: Path, cache: Path) -> dict[str, Scenario]:
    """The tiny commands of the fault matrix on ``dataset`` (a Karpathy json with scene labels), writing under ``work``.

    Training: DOVE-S, 2 epochs, 32-d embeddings, features from the ready cache ``cache``.
    Pretraining: ResNet-18 at 64 px on the scene labels, 2 epochs. Features: ResNet-18 at
    64 px into ``work/cache``, batches of 8 images. Everything in float32 on one thread.
    """
    train = ("train", "--dataset", str(dataset), "--model", "dove-s", "--epochs", "2", "--cache-dir", str(cache),
             "--set", "features.image_size=64", "--set", "features.precision=fp32",
             "--set", "model.params={embed_dim: 32, word_dim: 16}", "--set", "train.batch_size=16",
             "--set", "train.threads=1", "--out", str(work / "run"), "--quiet")
    pretrain = ("pretrain", str(dataset), "--backbone", "resnet18", "--image-size", "64", "--epochs", "2",
                "--batch-size", "8", "--threads", "1", "--precision", "fp32", "--out", str(work / "pretrain"), "--quiet")
    features = ("features", str(dataset), "--cache-dir", str(work / "cache"), "--backbone", "resnet18",
                "--image-size", "64", "--precision", "fp32", "--batch-size", "8", "--quiet")
    return {
        "training": Scenario(train, work / "run", ("model.safetensors", "model.json", "resume.pt", "metrics.csv")),
        # Pretraining draws every random number from its own seeded generators, never from torch's
        # global one, whose state resume.pt still records: unseeded, it differs between any two
        # processes, interrupted or not, and changes nothing.
        "pretraining": Scenario(pretrain, work / "pretrain", ("backbone.safetensors", "backbone.json", "resume.pt",
                                                                "metrics.csv"), ignored=("resume.pt:torch_rng",)),
        "features": Scenario(features, work / "cache", ("*.safetensors",)),
    }


def compare(reference: Scenario, other: Scenario) -> list[str]:
    """How the outputs of ``other`` differ from those of ``reference`` (:func:`differences`), and any
    partial file left in its folder; empty when every compared file is bit-identical."""
    want = reference.files()
    if not want:
        return [f"{reference.out}: the reference run wrote none of {', '.join(reference.compared)}"]
    found = [entry for path in want for entry in differences(path, other.out / path.name)
             if not any(entry.startswith(f"{key}:") for key in reference.ignored)]
    found += [f"{name}: partial file left" for name in partial_files(other.out)]
    return found


def reference_run(scenario: Scenario, moments_file: Path) -> dict[str, int]:
    """Run ``scenario`` uninterrupted, counting the moments of every fault (:data:`FAULTS`); RuntimeError if it fails."""
    outcome = run(scenario.args, count=moments_file)
    if outcome.returncode != 0:
        raise RuntimeError(f"the uninterrupted run {' '.join(scenario.args[:1])} exited {outcome.returncode}: "
                           f"{outcome.output.strip()[-800:]}")
    return outcome.counts


def kill_then_rerun(reference: Scenario, scenario: Scenario, fault: str, moments: Sequence[int]) -> tuple[list[str], Outcome]:
    """Kill ``scenario``'s command at each of ``moments`` of ``fault`` in turn, then run it to the end.

    Each kill is a fresh run of the same command, which resumes what the previous one left, so
    its moments count from its own start; the first kill must land, a later one aimed past what
    is left lets that run finish. Returns what went wrong or differs from ``reference``
    (:func:`compare`; empty: the fault was survived) and the outcome of the last run.
    """
    for k, n in enumerate(moments):
        killed = run(scenario.args, kill=(fault, n))
        if not killed.killed and (k == 0 or killed.returncode != 0):
            return [f"the run to be killed at moment {n} of {fault} exited {killed.returncode}: "
                    f"{killed.output.strip()[-300:]}"], killed
    rerun = run(scenario.args)
    if rerun.returncode != 0:
        return [f"the rerun exited {rerun.returncode}: {rerun.output.strip()[-300:]}"], rerun
    return compare(reference, scenario), rerun


def partial_files(folder: Path) -> list[str]:
    """The temporary files of interrupted writes (:func:`rsitr.io.atomic_path`) in ``folder``."""
    return sorted(p.name for p in folder.glob(".*.tmp"))


if __name__ == "__main__":
    sys.exit(main())
