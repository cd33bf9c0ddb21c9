"""Writing files safely, and the manifest of what the tool wrote.

- `atomic_write`: a file appears whole or not at all (temporary sibling, fsync, rename).
- A folder's manifest (`.hydralora-manifest.json`) lists the entries the tool wrote into it:
  only those are ever replaced or removed (`not_ours`, `remove_owned`); every folder the tool
  creates gets one (`stamp_tree`). `folders.py` builds on it: locks, claims, staged outputs.
- `redact`: credentials never reach a file we write.
- Disk full, quota, read-only file system, no permission: one `StorageError` naming the path
  and what to do (`storage_error`, `check_writable`).
- The JSON/YAML readers live in `readers.py` (re-exported here).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, StorageError

MANIFEST = ".hydralora-manifest.json"
# the files of an adapter folder (PEFT's names) and of the other folders this package writes
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SPLIT_FILE = "lora_split.json"  # a LoRA-Split (or per-request export) folder
ROUTER_STATS = "router_stats.json"
RUN_CONFIG = "train_config.yaml"  # every option of a training run
SUMMARY = "summary.json"  # what a training run measured
LOCK_NAME = ".hydralora.lock"
# errors that mean "this storage cannot take the file", not a bug: what to do about each
STORAGE_HINTS = {
    errno.ENOSPC: "free some space and run again",
    errno.EDQUOT: "free some space (disk quota) and run again",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EFBIG: "the file is too large for this file system: write somewhere else",
    errno.EACCES: "permission denied: write somewhere you may write to",
    errno.EPERM: "permission denied: write somewhere you may write to",
    errno.EIO: "the storage failed: check the file system (space, quota, the disk) and run again",
}
STORAGE_ERRNOS = set(STORAGE_HINTS)


def _set_and_restore_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK_AT_IMPORT = _set_and_restore_umask()  # where /proc is missing: read once, before any thread of ours


def _umask() -> int:
    """The process umask now. Read from /proc (Linux) without setting it: reading it through
    os.umask means setting it, which in a process with threads (a tracker's writer, compare's
    pool) would leave a window in which another thread's file is made world-writable."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return UMASK_AT_IMPORT


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success fsync it and rename it to `target`.

    On any failure the temporary file is removed and `target` is untouched. `exclusive`: the
    file must not exist when it is put in place (a hard link, which cannot replace a file), so
    a file another process wrote meanwhile is never replaced.
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
        if exclusive:
            _link_new(tmp, target)
        else:
            os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, StorageError) or err.errno not in STORAGE_ERRNOS:
            raise
        raise storage_error(err, target) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _link_new(tmp: Path, target: Path) -> None:
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise ConfigError(f"{target} appeared while this command ran (another process wrote it); "
                          "it was not replaced: choose another name") from None
    except OSError as err:  # a file system without hard links
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK) or os.path.lexists(target):
            raise
        os.replace(tmp, target)
    tmp.unlink(missing_ok=True)


def storage_error(err: OSError, target: str | os.PathLike, what: str = "the previous file, if any, "
                  "is unchanged") -> OSError:
    """A disk-full (quota, read-only, permission) error as a StorageError naming `target` and
    what to do about that errno; others as they are."""
    if err.errno not in STORAGE_ERRNOS:
        return err
    error = StorageError(f"{target}: could not write it ({err.strerror or os.strerror(err.errno)}); {what}: "
                         f"{STORAGE_HINTS[err.errno]}")
    error.errno = err.errno  # (a filename would change str(error))
    return error


def check_writable(folder: str | os.PathLike, flag: str = "--output") -> None:
    """Fail at once, before slow work, when nothing can be written into `folder` (or into the
    nearest existing folder above it): read-only file system, no permission, disk full."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".hydralora-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS:
            raise
        raise StorageError(f"{flag}: cannot write into {folder} ({os.strerror(err.errno)}): "
                           f"{STORAGE_HINTS[err.errno]}") from None


def write_text(target: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a whole text."""
    with atomic_write(target) as tmp:
        tmp.write_text(text)


def write_json(target: str | os.PathLike, value: Any, indent: int = 2) -> None:
    write_text(target, json.dumps(value, indent=indent) + "\n")


def write_yaml(target: str | os.PathLike, value: dict[str, Any], header: str = "") -> None:
    write_text(target, header + yaml.safe_dump(value, sort_keys=False))


# ---------------------------------------------------------------------------- credentials
# keys whose value is a credential (not `pad_token` & co.: those are tokenizer settings)
SECRET_KEY = re.compile(r"^token$|(^|[_-])((hub|hf|auth|access|api|bearer|refresh|id|session|github|gh|"
                        r"wandb|openai|push_to_hub)[_-]?token|password|passwd|secret|secret[_-]?key|"
                        r"api[_-]?key|apikey|access[_-]?key|private[_-]?key|credentials?)$", re.I)
# values that are credentials whatever their key: Hugging Face, GitHub, OpenAI-style, AWS keys,
# Slack tokens, and the password of a URL (scheme://user:password@host)
SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}|\bgh[pousr]_[A-Za-z0-9]{20,}|\bsk-[A-Za-z0-9_-]{20,}"
                          r"|\bAKIA[0-9A-Z]{16}\b|\bxox[abprs]-[A-Za-z0-9-]{10,}")
URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)([^@\s/]+)(@)", re.I)
REDACTED = "<redacted>"


def redact(value: Any) -> tuple[Any, list[str]]:
    """`value` (JSON-like) with every credential taken out, and where they were: the value of a
    credential-like key becomes None, a token or URL password inside a string `<redacted>`."""
    found: list[str] = []

    def walk(v: Any, where: str) -> Any:
        if isinstance(v, dict):
            out = {}
            for k, item in v.items():
                here = f"{where}.{k}" if where else str(k)
                if SECRET_KEY.search(str(k)) and isinstance(item, str) and item and item != REDACTED:
                    found.append(here)
                    out[k] = None
                else:
                    out[k] = walk(item, here)
            return out
        if isinstance(v, (list, tuple)):
            return type(v)(walk(item, f"{where}[{i}]") for i, item in enumerate(v))
        if isinstance(v, str):
            cleaned = URL_PASSWORD.sub(lambda m: m.group(1) + REDACTED + m.group(3), SECRET_VALUE.sub(REDACTED, v))
            if cleaned != v:
                found.append(where or "value")
            return cleaned
        return v

    return walk(value, ""), found


def redacted_header(found: list[str]) -> str:
    """A YAML comment saying which values were left out of a file (empty if none)."""
    if not found:
        return ""
    return (f"# credentials are never written to files: {', '.join(found)} "
            "left out (pass them again, or use the environment: HF_TOKEN, ...)\n")


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
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(names, list):
        return None
    return {n for n in names if isinstance(n, str) and is_safe_name(n) and n not in (MANIFEST, LOCK_NAME)}


def record_written(folder: Path, add: list[str] | set[str] = (), forget: list[str] | set[str] = ()) -> None:
    """Update `folder`'s manifest (atomically): `add` names the tool wrote, `forget` removed ones."""
    names = ((read_manifest(folder) or set()) | set(add)) - set(forget) - {MANIFEST}
    write_json(Path(folder) / MANIFEST, {"tool": "hydralora", "files": sorted(names)})


def not_ours(folder: Path, names: Iterable[str]) -> list[str]:
    """The `names` that exist in `folder` (a link counts) but are not listed in its manifest:
    entries this tool did not write, which it never replaces or removes."""
    ours = read_manifest(folder) or set()
    return sorted(n for n in set(names) if os.path.lexists(Path(folder) / n) and n not in ours)


def foreign_inside(path: Path) -> list[Path]:
    """What a folder of ours holds that its manifests (recursively) do not list; [] for a file,
    and for a folder without a manifest (written before every folder got one: all ours)."""
    if not path.is_dir() or path.is_symlink():
        return []
    ours = read_manifest(path)
    if ours is None:
        return []
    found: list[Path] = []
    for p in sorted(path.iterdir()):
        if p.name in (MANIFEST, LOCK_NAME):
            continue
        found += foreign_inside(p) if p.name in ours else [p]
    return found


def remove_owned(path: Path) -> None:
    """Remove `path`, an entry of ours: a folder with what its manifest lists (what else it holds
    stays, and the folder with it), a file or link as it is."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    ours = read_manifest(path)
    if ours is None:  # written before every folder got a manifest: all ours
        shutil.rmtree(path)
        return
    for name in sorted(ours):
        if os.path.lexists(path / name):
            remove_owned(path / name)
    if any(p.name != MANIFEST for p in path.iterdir()):
        record_written(path, forget=ours)
    else:
        (path / MANIFEST).unlink(missing_ok=True)
        path.rmdir()


def make_readable(path: Path) -> None:
    """A file this tool wrote gets the permissions of the umask (libraries that save through a
    private temporary file leave 0600; the docs promise outputs others can read)."""
    if path.is_file() and not path.is_symlink():
        os.chmod(path, 0o666 & ~_umask())


def stamp_tree(folder: Path, top: bool = False) -> None:
    """A tree this tool has just written: every folder below `folder` (and `folder` itself if
    `top`) gets a manifest listing what it holds, every file and folder the permissions of the
    umask (others may read)."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(Path(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(Path(root, name), 0o666 & ~mask)
        if top or Path(root) != Path(folder):
            record_written(Path(root), add=[n for n in dirs + files if n != MANIFEST])
