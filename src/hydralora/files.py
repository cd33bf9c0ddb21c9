"""Writing files safely and reading the small JSON/YAML files the tool takes.

- `atomic_write`: a file appears whole or not at all (temporary sibling, fsync, rename).
- `staged_dir`: a directory is built beside its target and renamed into place.
- `read_json_object` / `read_yaml_mapping`: errors name the file and the line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success fsync it and rename it to `target`.

    On any failure the temporary file is removed and `target` is untouched.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(target: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a whole text."""
    with atomic_write(target) as tmp:
        tmp.write_text(text)


def write_json(target: str | os.PathLike, value: Any, indent: int = 2) -> None:
    write_text(target, json.dumps(value, indent=indent) + "\n")


def write_yaml(target: str | os.PathLike, value: dict[str, Any]) -> None:
    write_text(target, yaml.safe_dump(value, sort_keys=False))


@contextlib.contextmanager
def temporary_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A hidden temporary directory inside `parent` (same file system: renames out of it are
    atomic), removed with whatever is left in it."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_dir(output: Path, overwrite: bool, keep: Path | None = None,
                     keep_what: str = "the adapter") -> None:
    """Refuse an output that exists (unless overwriting), is a file, or would swallow `keep`
    (`keep_what` names it in the message)."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output} exists and is not a directory")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"{output} exists and is not empty; choose another --output or pass --overwrite")
    if keep is not None:
        out, src = output.resolve(), keep.resolve()
        if out == src or out in src.parents:
            raise ConfigError(f"--output {output} would replace {keep_what} {keep} itself")


@contextlib.contextmanager
def staged_dir(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `output` by renames, on
    failure it is removed and `output` is untouched."""
    check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        if output.exists():
            backup = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, backup)
            os.replace(tmp, output)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(path: str | os.PathLike, missing: str = "no such file") -> dict[str, Any]:
    """A JSON object from `path`; errors name the file (and line) and what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {missing}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from `path` ({} for an empty file); errors name the file and line."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return data
