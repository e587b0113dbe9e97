"""The fault matrix: kill -9 at chosen moments, a full disk, a read-only folder, two writers of one cache.

A kill is SIGKILL that the process sends itself at the N-th call of a function that marks the
moment (:mod:`rsitr_cli.faults`); the same command is then run again in a fresh interpreter, and
its outputs must be bit-identical to those of an uninterrupted run of the same seed, with no
partial file left. The other faults run in this process with the failing call monkeypatched.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import log_lines
from rsitr.data import load_dataset
from rsitr.errors import ConfigError
from rsitr.features import FeatureSpec, extract_features, load_features
from rsitr.features import cache as cache_module
from rsitr.features.cache import cache_lock
from rsitr.io import atomic_path, write_failure
from rsitr_cli import faults
from rsitr_cli.faults import Scenario, compare, partial_files, scenarios
from rsitr_cli.main import main
from rsitr_train import trainer
from rsitr_train.loop import RESUME

SPEC = FeatureSpec(backbone="resnet18", image_size=64, precision="fp32")


# ------------------------------------------------------------------------------------- kill -9


class References:
    """Uninterrupted runs of the fault matrix's commands (made when first asked for) and their moments."""

    def __init__(self, dataset: Path, work: Path, cache: Path) -> None:
        self.dataset, self.work, self.cache = dataset, work, cache
        self.made: dict[str, tuple[Scenario, dict[str, int]]] = {}

    def scenario(self, name: str, work: Path) -> Scenario:
        """The command ``name`` writing under ``work`` (the training features come from the reference's cache)."""
        return scenarios(self.dataset, work, self.cache)[name]

    def __getitem__(self, name: str) -> tuple[Scenario, dict[str, int]]:
        """The reference run of ``name`` and how many moments of each fault it had."""
        if name not in self.made:
            scenario = self.scenario(name, self.work)
            self.made[name] = (scenario, faults.reference_run(scenario, self.work / f"{name}-moments.json"))
        return self.made[name]


@pytest.fixture(scope="module")
def references(tiny_synth, tmp_path_factory) -> References:
    return References(tiny_synth, tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("cache"))


def _kill_then_rerun(references: References, fault: str, moment, work: Path) -> tuple[Scenario, list[str], str]:
    """Kill the fault's command at its ``moment(count)``-th moment, run it again; (its scenario, differences, rerun output)."""
    name = faults.SCENARIO_OF[fault]
    reference, counts = references[name]
    scenario = references.scenario(name, work)
    n = moment(counts[fault])
    assert 1 <= n <= counts[fault], (fault, counts)
    found, rerun = faults.kill_then_rerun(reference, scenario, fault, [n])
    return scenario, found, rerun.output


def test_kill_during_a_training_epoch_then_the_same_command_ends_bit_identical(references, tmp_path) -> None:
    _, found, output = _kill_then_rerun(references, "training", lambda count: count // 2 + 1, tmp_path)
    assert found == []
    assert "resuming" in output  # the kill landed after the first epoch was saved (half-way through the steps)


@pytest.mark.slow  # two fresh interpreters that train (the kill during training above is the quick one)
def test_kill_during_validation_then_the_same_command_ends_bit_identical(references, tmp_path) -> None:
    _, found, output = _kill_then_rerun(references, "validation", lambda count: count, tmp_path)  # the last epoch's
    assert found == [] and "resuming" in output


@pytest.mark.slow  # two fresh interpreters that train
def test_kill_while_writing_a_checkpoint_leaves_a_partial_file_that_is_never_read(references, tmp_path) -> None:
    reference, counts = references["training"]
    scenario = references.scenario("training", tmp_path)
    killed = faults.run(scenario.args, kill=("checkpoint", counts["checkpoint"]))  # the last write: the final resume.pt
    assert killed.killed
    left = partial_files(scenario.out)
    assert len(left) == 1 and left[0].startswith(f".{RESUME}.")  # cut short, never renamed onto resume.pt
    assert torch.load(scenario.out / RESUME, weights_only=True)["epoch"] == 0  # the first epoch's state is intact
    rerun = faults.run(scenario.args)
    assert rerun.returncode == 0, rerun.output
    assert re.search(r"removed 1 partial file\(s\) an interrupted run left \(\.resume\.pt\.", rerun.output)
    assert compare(reference, scenario) == []


@pytest.mark.slow  # kills at two more checkpoint writes: the best model's weights and its description
def test_kill_at_other_checkpoint_writes_then_the_same_command_ends_bit_identical(references, tmp_path) -> None:
    for n in (1, 2):  # the first epoch's model.safetensors, then its model.json
        _, found, _ = _kill_then_rerun(references, "checkpoint", lambda count, n=n: n, tmp_path / str(n))
        assert found == [], n


@pytest.mark.slow  # two fresh interpreters that pretrain a ResNet-18
def test_kill_during_pretraining_then_the_same_command_ends_bit_identical(references, tmp_path) -> None:
    _, found, output = _kill_then_rerun(references, "pretraining", lambda count: count * 2 // 3, tmp_path)
    assert found == [] and "resuming" in output


@pytest.mark.slow  # fresh interpreters that extract features
def test_kill_during_feature_extraction_then_the_same_command_gives_the_same_cache(references, tmp_path) -> None:
    for where, moment in (("batch", lambda count: 2), ("cache write", lambda count: count)):
        scenario, found, output = _kill_then_rerun(references, "features", moment, tmp_path / where.replace(" ", "_"))
        assert found == [], where
        if where == "cache write":  # the partial file of the killed writer is removed under the lock
            assert "removed 1 partial file(s)" in output


# ---------------------------------------------------------------------- partial and torn caches


@pytest.fixture(scope="module")
def extracted(tiny_synth, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A valid feature cache of the tiny dataset, and its tensors."""
    cache = tmp_path_factory.mktemp("features")
    features = extract_features(load_dataset(tiny_synth), SPEC, cache, progress=False)
    return cache, features.tensors()


def test_a_partial_cache_file_is_detected_and_redone_with_one_line(tiny_synth, extracted, tmp_path) -> None:
    dataset = load_dataset(tiny_synth)
    path = SPEC.cache_path(dataset, tmp_path)
    whole = SPEC.cache_path(dataset, extracted[0]).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # as a copy cut short would leave it
    leftover = path.with_name(f".{path.name}.x1y2.tmp")  # as a writer killed mid-write leaves it
    leftover.write_bytes(whole[:1000])
    lines: list[str] = []
    with log_lines(lines.append):
        again = extract_features(dataset, SPEC, tmp_path, progress=False)
    unreadable = [line for line in lines if "unreadable feature cache" in line]
    assert len(unreadable) == 1 and path.name in unreadable[0] and "\n" not in unreadable[0]
    assert any("removed 1 partial file(s)" in line for line in lines) and not leftover.exists()
    for key, value in extracted[1].items():
        assert torch.equal(again.tensors()[key], value), key
        assert torch.equal(load_features(path).tensors()[key], value), key


def test_two_writers_of_one_feature_cache_one_computes_and_the_other_reads_its_file(tiny_synth, extracted, tmp_path,
                                                                                   monkeypatch) -> None:
    dataset = load_dataset(tiny_synth)
    path = SPEC.cache_path(dataset, tmp_path)
    computed: list[int] = []
    real = cache_module.compute_features
    monkeypatch.setattr(cache_module, "compute_features", lambda *a, **k: computed.append(1) or real(*a, **k))
    results: dict[int, dict[str, torch.Tensor]] = {}

    def writer(k: int) -> None:
        results[k] = extract_features(dataset, SPEC, tmp_path, progress=False).tensors()

    waiting: list[str] = []
    with log_lines(lambda line: waiting.append(line) if "waiting for it" in line else None):
        with cache_lock(path):  # a third writer holds the lock: both must queue behind it
            threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 60
            while len(waiting) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(waiting) == 2 and not path.exists()
        for thread in threads:
            thread.join(timeout=120)
    assert computed == [1]  # the second reads what the first wrote
    for key, value in extracted[1].items():
        assert torch.equal(results[0][key], value) and torch.equal(results[1][key], value), key
    assert partial_files(tmp_path) == []


@pytest.mark.slow  # two fresh interpreters extracting at once
def test_two_processes_writing_one_feature_cache_one_waits(references, tmp_path) -> None:
    reference, _ = references["features"]
    scenario = references.scenario("features", tmp_path)
    scenario.out.mkdir()
    path = reference.files()[0]
    logs = [tmp_path / f"out{k}.txt" for k in range(2)]
    with cache_lock(scenario.out / path.name):  # held until both are queued, so that they surely overlap
        processes = [subprocess.Popen(faults.command(scenario.args), env=faults.environment(), stdout=log.open("w"),
                                      stderr=subprocess.STDOUT) for log in logs]
        deadline = time.monotonic() + 120
        while sum("waiting for it" in log.read_text() for log in logs) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [process.wait(timeout=300) for process in processes] == [0, 0]
    outputs = [log.read_text() for log in logs]
    assert all("waiting for it" in text for text in outputs), outputs
    assert sum("loaded 36 images from cache" in text for text in outputs) == 1, outputs  # the other computed it
    assert compare(reference, scenario) == []


# --------------------------------------------------------------------- full disk, read-only folder


def _tiny_run(dataset: Path, cache: Path, epochs: int = 2) -> list[str]:
    return ["--quiet", "train", "--dataset", str(dataset), "--model", "dove-s", "--epochs", str(epochs),
            "--cache-dir", str(cache), "--set", "features.image_size=64", "--set", "features.precision=fp32",
            "--set", "model.params={embed_dim: 32, word_dim: 16}", "--set", "train.batch_size=16"]


def _no_space() -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _no_space_in_torch() -> None:
    """What torch.save raises when the Python file it writes to is refused (as measured): its error, the OSError its context."""
    try:
        _no_space()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904 (as torch raises it)


def _full_disk_at(monkeypatch, module, attribute: str, name: str, fail) -> None:
    """Make ``module.attribute`` (a writer taking the content and a path or file) write half of ``.name.*`` and ``fail()``."""
    real = getattr(module, attribute)

    def writer(obj, target, *args, **kwargs):
        real(obj, target, *args, **kwargs)
        path = Path(getattr(target, "name", target))
        if path.name.startswith(f".{name}."):
            if hasattr(target, "flush"):
                target.flush()
            os.truncate(path, path.stat().st_size // 2)
            fail()

    monkeypatch.setattr(module, attribute, writer)


@pytest.mark.parametrize("name", ["model.safetensors", RESUME])
def test_a_full_disk_while_writing_a_checkpoint_is_one_line_naming_it_and_leaves_nothing(tiny_synth, extracted, tmp_path,
                                                                                       monkeypatch, capsys, name) -> None:
    import rsitr.io

    if name == RESUME:
        _full_disk_at(monkeypatch, torch, "save", name, _no_space_in_torch)
    else:
        _full_disk_at(monkeypatch, rsitr.io, "save_file", name, _no_space)
    cache = tmp_path / "cache"
    shutil.copytree(extracted[0], cache)
    run = tmp_path / "run"
    code = main([*_tiny_run(tiny_synth, cache, epochs=1), "--out", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{run / name}: cannot write the file (" in err and "nothing was written" in err
    assert not run.exists()  # a fresh run that never saved an epoch leaves no folder behind
    assert partial_files(cache) == []


def test_a_full_disk_while_writing_the_feature_cache_is_one_line_and_leaves_no_partial_file(tiny_synth, tmp_path,
                                                                                           monkeypatch, capsys) -> None:
    import rsitr.io

    dataset = load_dataset(tiny_synth)
    path = SPEC.cache_path(dataset, tmp_path)
    _full_disk_at(monkeypatch, rsitr.io, "save_file", path.name, _no_space)
    code = main(["--quiet", "features", str(tiny_synth), "--cache-dir", str(tmp_path), "--backbone", "resnet18",
                 "--image-size", "64", "--precision", "fp32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"rsitr: error: {path}: cannot write the file (No space left on device); nothing was written"
    assert not path.exists() and partial_files(tmp_path) == []
    with cache_lock(path) as waited:  # the lock went with the failed writer
        assert not waited


@pytest.mark.slow  # a fresh interpreter that extracts features under a real file-size limit
def test_a_real_file_size_limit_while_writing_the_feature_cache_is_one_line(tiny_synth, tmp_path) -> None:
    """The C++/Rust writers under a real refusal of the system (RLIMIT_FSIZE: writes past 64 KiB fail with EFBIG)."""
    import resource
    import signal

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel stops the process instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    scenario = scenarios(tiny_synth, tmp_path, tmp_path)["features"]
    outcome = faults.run(scenario.args, preexec=limited)
    path = SPEC.cache_path(load_dataset(tiny_synth), scenario.out)
    assert outcome.returncode == 2, outcome.output
    assert f"rsitr: error: {path}: cannot write the file (File too large); nothing was written" in outcome.output
    assert not path.exists() and partial_files(scenario.out) == []


def _read_only(monkeypatch, folder: Path, after: threading.Event | None = None) -> None:
    """Refuse every new file in ``folder`` as a read-only file system does (once ``after`` is set, if given).

    Tests run as root, whom permission bits do not stop, so the refusal is made where files are
    created (:func:`tempfile.mkstemp`, which every rsitr writer goes through).
    """
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        where = Path(kwargs.get("dir") or ".").resolve()
        if (after is None or after.is_set()) and (where == folder.resolve() or folder.resolve() in where.parents):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_a_read_only_output_folder_is_one_line_before_any_work(tiny_synth, tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _read_only(monkeypatch, run)
    code = main([*_tiny_run(tiny_synth, tmp_path / "cache", epochs=1), "--out", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"rsitr: error: {run}: cannot write the run directory there (Read-only file system)"
    assert not (tmp_path / "cache").exists()  # refused before any feature was extracted
    assert not run.exists() or not any(run.iterdir())  # nothing written


@pytest.mark.slow  # three training epochs in this process (two, then the one left after the failure)
def test_a_folder_made_read_only_mid_run_is_one_line_naming_the_file_and_the_last_epoch_stays(
        tiny_synth, extracted, tmp_path, monkeypatch, capsys) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(extracted[0], cache)
    run = tmp_path / "run"
    second_epoch = threading.Event()
    real = trainer._train_epoch

    def epoch(*args, **kwargs):
        if args[4] == 1:  # the folder turns read-only while the second epoch trains
            second_epoch.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "_train_epoch", epoch)
    _read_only(monkeypatch, run, after=second_epoch)
    code = main([*_tiny_run(tiny_synth, cache), "--out", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.fullmatch(rf"rsitr: error: {re.escape(str(run))}/[\w.]+: cannot write the file \(Read-only file system\); "
                        "nothing was written", err), err
    assert torch.load(run / RESUME, weights_only=True)["epoch"] == 0 and partial_files(run) == []
    monkeypatch.undo()  # writable again: the same command finishes the run
    assert main([*_tiny_run(tiny_synth, cache), "--out", str(run)]) == 0
    assert torch.load(run / RESUME, weights_only=True)["epoch"] == 1


def test_write_failures_are_told_from_other_errors(tmp_path) -> None:
    assert write_failure(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    assert write_failure(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
                         ) == "No space left on device"  # as safetensors reports it
    from_torch = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert write_failure(from_torch) is None  # no reason given: not taken for one ...
    from_torch.__context__ = OSError(errno.EFBIG, "File too large")
    assert write_failure(from_torch) == "File too large"  # ... unless the system's error came with it
    wrapped = ValueError("could not save")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert write_failure(wrapped) == "Disk quota exceeded"
    assert write_failure(ValueError("a tensor is not contiguous")) is None
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(ValueError, match="not contiguous"), atomic_path(target) as tmp:  # not a write failure: as it was
        tmp.write_text("new")
        raise ValueError("a tensor is not contiguous")
    with pytest.raises(ConfigError, match=r"x.json: cannot write the file \(No space left on device\)"), atomic_path(target) as tmp:
        tmp.write_text("ne")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old" and partial_files(tmp_path) == []
