"""Writing files safely and reading the small JSON/YAML files the tool takes.

- `atomic_write`: a file appears whole or not at all (temporary sibling, fsync, rename).
- `staged_dir`: a directory is built beside its target and renamed into place.
- `read_json_object` / `read_yaml_mapping`: errors name the file and the line; YAML is read
  with a size cap and without aliases.
- A folder's manifest (`.hydralora-manifest.json`) lists the files the tool wrote into it: only
  those are ever replaced or removed. `folder_lock` keeps two runs out of one folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, StorageError, TrainingError

MANIFEST = ".hydralora-manifest.json"
# the files of an adapter folder (PEFT's names) and of the other folders this package writes
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SPLIT_FILE = "lora_split.json"  # a LoRA-Split (or per-request export) folder
ROUTER_STATS = "router_stats.json"
RUN_CONFIG = "train_config.yaml"  # every option of a training run
SUMMARY = "summary.json"  # what a training run measured
LOCK_NAME = ".hydralora.lock"
YAML_MAX_BYTES = 1 << 20
# errors that mean "this storage cannot take the file", not a bug
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


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
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise storage_error(err, target) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, StorageError) or err.errno not in STORAGE_ERRNOS:
            raise
        raise storage_error(err, target) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def storage_error(err: OSError, target: str | os.PathLike) -> OSError:
    """A disk-full (quota, read-only) error as a StorageError naming `target`; others as they are."""
    if err.errno not in STORAGE_ERRNOS:
        return err
    error = StorageError(f"{target}: could not write it ({os.strerror(err.errno)}); the previous "
                         "file, if any, is unchanged: free some space and run again")
    error.errno = err.errno  # (a filename would change str(error))
    return error


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


def is_safe_name(name: str) -> bool:
    """One path component that stays inside its folder."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name


def safe_name(text: str, taken: set[str] | None = None, limit: int = 64) -> str:
    """`text` (a name from data: a domain, a cluster) as one safe path component: letters,
    digits, `._-` kept, anything else `_`, no leading dot, at most `limit` characters, and not
    one of `taken` (a suffix -2, -3, ... is added; the name is added to `taken`)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).lstrip(".")[:limit] or "unnamed"
    base, n = name, 1
    while taken is not None and name in taken:
        n += 1
        name = f"{base}-{n}"
    if taken is not None:
        taken.add(name)
    return name


def read_manifest(folder: Path) -> set[str] | None:
    """The names the tool wrote into `folder` (None: no manifest, the folder is not ours).
    Entries that are not a single safe name are ignored."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
        names = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(names, list):
        return None
    return {n for n in names if isinstance(n, str) and is_safe_name(n) and n != MANIFEST}


def record_written(folder: Path, add: list[str] | set[str] = (), forget: list[str] | set[str] = ()) -> None:
    """Update `folder`'s manifest (atomically): `add` names the tool wrote, `forget` removed ones."""
    names = ((read_manifest(folder) or set()) | set(add)) - set(forget) - {MANIFEST}
    write_json(Path(folder) / MANIFEST, {"tool": "hydralora", "files": sorted(names)})


def remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_output_dir(output: Path, overwrite: bool, keep: Path | None = None,
                     keep_what: str = "the adapter") -> None:
    """Refuse an output that is a file, holds files the tool did not write (no manifest), holds
    an earlier output (unless overwriting), or would swallow `keep` (`keep_what` names it)."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output} exists and is not a directory")
    if keep is not None:
        out, src = output.resolve(), keep.resolve()
        if out == src or out in src.parents:
            raise ConfigError(f"--output {output} would replace {keep_what} {keep} itself")
    if output.exists() and any(output.iterdir()):
        if read_manifest(output) is None:
            raise ConfigError(
                f"{output} holds files this tool did not write; choose a new or empty --output "
                f"(--overwrite only replaces what hydralora wrote, listed in its {MANIFEST})"
            )
        if not overwrite:
            raise ConfigError(f"{output} holds an earlier output; pass --overwrite to replace "
                              "its files, or choose another --output")


@contextlib.contextmanager
def staged_dir(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory to build the output in. On success a new or empty
    `output` is replaced by it whole; an earlier output of ours (see `check_output_dir`) has
    the files its manifest lists replaced or removed, and nothing else touched. On failure the
    temporary directory is removed and `output` is untouched."""
    check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an export is for others to read
    try:
        yield tmp
        names = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)
        if not output.exists() or not any(output.iterdir()):
            record_written(tmp, names)
            if output.exists():
                output.rmdir()
            os.replace(tmp, output)
            return
        ours = read_manifest(output) or set()
        foreign = [n for n in names if (output / n).exists() and n not in ours]
        if foreign:
            raise ConfigError(f"{output}: would replace {', '.join(foreign[:5])}, which this tool "
                              "did not write; move them away or choose another --output")
        for name in names:
            target = output / name
            if target.is_dir() and not target.is_symlink():
                aside = output / f".{name}.old-{os.getpid()}"
                os.replace(target, aside)
                os.replace(tmp / name, target)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(tmp / name, target)
        for name in sorted(ours - set(names)):
            remove_entry(output / name)
        write_json(output / MANIFEST, {"tool": "hydralora", "files": names})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def acquire_lock(folder: Path) -> tuple[Path, str | None]:
    """Create `folder`/.hydralora.lock holding this process's PID and host; returns (lock path,
    a note when a stale lock of a dead process on this host was taken over). A lock of a live
    process, or of another host, is a TrainingError naming the holder."""
    path = Path(folder) / LOCK_NAME
    host = socket.gethostname()
    note = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            holder = holder if isinstance(holder, dict) else {}
            pid, where = holder.get("pid"), holder.get("host")
            if where == host and isinstance(pid, int) and not isinstance(pid, bool) and not _pid_alive(pid):
                note = f"took over the stale lock {path}: process {pid} on {host} no longer runs"
                path.unlink(missing_ok=True)
                continue
            raise TrainingError(
                f"{folder} is in use: {path} says process {pid} on {where} (since "
                f"{holder.get('since', '?')}) writes into it; wait for that run to end, or delete "
                f"{path} if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": host,
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        return path, note
    raise TrainingError(f"{path}: could not take the lock (another run keeps taking it)")


def release_lock(path: Path) -> None:
    """Remove the lock if it is still this process's."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


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


class _OptionsLoader(yaml.SafeLoader):
    """SafeLoader without aliases (no expansion blow-up: a 367-byte file could name billions of
    values) and with exponent floats such as 2e-4 (YAML 1.1 needs a dot: `2.0e-4`)."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted in option files; write the value out",
                self.peek_event().start_mark)
        return super().compose_node(parent, index)


_OptionsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from `path` ({} for an empty file); errors name the file and line.
    Files over YAML_MAX_BYTES and aliases are refused."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > YAML_MAX_BYTES:
            raise ConfigError(f"{path}: {size} bytes; option files are limited to {YAML_MAX_BYTES} bytes")
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_OptionsLoader)  # noqa: S506 (safe loader)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return data
