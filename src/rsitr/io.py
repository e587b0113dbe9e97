"""Reading and writing files: atomic writes, safetensors, JSON and YAML, and strict keys.

Every writer goes through :func:`atomic_path`: the content is written to a temporary file in the
same directory and renamed over the target only once it is complete, so an interrupted run leaves
either the old file or the new one, never a truncated one.

Every YAML file rsitr reads (run configs, model configs, studies, pretraining recipes) goes through
:func:`read_yaml_mapping` or :func:`read_named_yaml` (``yaml.safe_load``, one-line errors naming
the file), and every mapping of settings is checked with :func:`check_keys`: a key that does
nothing is a trap, so an unknown key is an error that lists the valid ones.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from rsitr.errors import ConfigError, DatasetError, RsitrError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    A write that fails for want of room or permission (a full disk, a quota, a folder made
    read-only) is a one-line ConfigError naming ``path`` (:func:`write_failure` tells such
    failures from others), and the temporary file is removed: the old file, if any, is intact.
    A process killed mid-write leaves its temporary ``.<name>.*.tmp`` (never read as the file);
    :func:`remove_partial_writes` clears those when the job runs again.
    """
    target = Path(path)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, target)
    except Exception as exc:
        reason = None if isinstance(exc, RsitrError) else write_failure(exc)  # an rsitr error already says it all
        if reason is None:
            raise
        raise ConfigError(f"{target}: cannot write the file ({reason}); nothing was written") from exc
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


#: What writers other than Python's own report when the system refuses a write: torch's
#: serialiser and the safetensors library turn the OSError into a RuntimeError or their own error.
_WRITE_FAILURE_WORDS = tuple(os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS,
                                                             errno.EACCES))


def write_failure(exc: BaseException) -> str | None:
    """Why the system refused a write, if ``exc`` (or an exception it came from) says so; None otherwise.

    An OSError is such a failure; so is an error of another type whose message carries the
    system's words for a full disk, a quota, a file-size limit, a read-only file system or a
    refused permission, because a Rust or C++ writer (safetensors) reports the system's error in
    an error of its own. (torch.save given a path says only "unexpected pos"; given a Python file
    it leaves the OSError as the context of its error, which is found here.)
    """
    seen: BaseException | None = exc
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError):
            return seen.strerror or seen.__class__.__name__
        text = str(seen)
        for words in _WRITE_FAILURE_WORDS:
            if words.lower() in text.lower():
                return words
        seen = seen.__cause__ or seen.__context__
    return None


def remove_partial_writes(folder: str | Path, name: str = "*") -> list[str]:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` for ``name`` (a glob; all by default).

    Such a file is left only by a process killed mid-write. Call it only where no other live
    process can be writing the same files (a run's own folder, a cache file under its lock).
    Returns the names removed.
    """
    removed = []
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return sorted(removed)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(folder: str | Path, what: str = "output folder") -> Path:
    """Make ``folder`` (and its parents) and prove a file can be written there; one-line ConfigError otherwise.

    Called before long work starts, so that a folder under a file, on a read-only or full file
    system, or without permission fails at once instead of after minutes of extraction.
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".rsitr-write-check.", dir=path)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the {what} there ({exc.strerror or exc.__class__.__name__})") from exc
    return path


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_image(path: str | Path, image: Any, format: str = "PNG", **options: Any) -> None:
    """Write a PIL image or a uint8 array (H×W gray, H×W×3 RGB) to ``path`` atomically in ``format``.

    ``options`` go to PIL's writer (e.g. ``quality=90`` for JPEG).
    """
    from PIL import Image

    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    with atomic_path(path) as tmp:
        picture.save(tmp, format=format, **options)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically. Tensors are made contiguous."""
    flat = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file into CPU tensors."""
    return load_file(str(path), device="cpu")


def read_json(path: str | Path, error: Callable[[Path, str], Exception] = DatasetError) -> Any:
    """Parse a JSON file, turning every failure into a one-line ``error(path, problem)``."""
    path = Path(path)
    if not path.is_file():
        raise error(path, "file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise error(path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise error(path, f"cannot read file ({exc.__class__.__name__})") from exc


def check_keys(values: Mapping[str, Any], valid: Iterable[str], where: str, what: str = "key", prefix: str = "") -> None:
    """ConfigError ``"{where}: unknown {what}(s) a, b; valid: ..."`` when ``values`` has keys outside ``valid``.

    ``prefix`` is written before each unknown key (``"train."`` names ``train.epoch``).
    """
    allowed = list(valid)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        names = ", ".join(f"{prefix}{key}" for key in unknown)
        raise ConfigError(f"{where}: unknown {what}(s) {names}; valid: {', '.join(sorted(allowed))}")


def _parse_yaml(text: str, source: str | Path) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc.__class__.__name__})") from exc


def read_yaml_mapping(path: str | Path, shape_error: str) -> dict[str, Any]:
    """The mapping a YAML file holds; one-line ConfigErrors naming the file otherwise.

    ``shape_error`` completes the message when the file holds something other than a mapping
    (e.g. "a run config must be a mapping of sections"). An empty file is an empty mapping.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from exc
    data = _parse_yaml(text, path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {shape_error}")
    return data


def read_named_yaml(name: str | Path, folder: Traversable, kind: str, available: Callable[[], list[str]],
                    error: type[Exception] = ConfigError) -> tuple[dict[str, Any], str]:
    """A user's YAML file given by path, or the shipped ``folder/<name>.yaml``; returns (data, label).

    ``folder`` is an :mod:`importlib.resources` traversable, ``available`` lists the shipped names
    for the error message, ``kind`` is the word used in messages ("model", "study", "config").
    """
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{path}: {kind} file not found")
        text, label = path.read_text(encoding="utf-8"), path.stem
    else:
        resource = folder / f"{name}.yaml"
        if not resource.is_file():
            raise error(f"unknown {kind} {str(name)!r}; available: {', '.join(available())}")
        text, label = resource.read_text(encoding="utf-8"), str(name)
    data = _parse_yaml(text, name) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: a {kind} config must be a mapping")
    return data, label


def list_yaml_names(folder: Traversable) -> list[str]:
    """Stems of the ``*.yaml`` files of a packaged folder, sorted."""
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
