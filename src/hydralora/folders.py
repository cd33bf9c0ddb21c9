"""Output folders: who may write where.

Every folder the tool writes into lists what it wrote in `.hydralora-manifest.json`
(files.py); nothing else there is ever replaced or removed. Here: the lock that keeps two
commands out of one folder (`acquire_lock`), the check that a command may write its names
into a folder (`claim`), holding a folder while writing into it (`owned_folder`), and
building a whole output beside its target (`staged_dir`, for exports).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import ConfigError, TrainingError
from .files import (
    CONFIG_NAME,
    LOCK_NAME,
    MANIFEST,
    SPLIT_FILE,
    _umask,
    foreign_inside,
    not_ours,
    read_manifest,
    record_written,
    remove_owned,
    stamp_tree,
    storage_error,
)


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
        except OSError as err:
            if not isinstance(err, FileExistsError):
                raise storage_error(err, path, "nothing was written") from None
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



def check_output_path(output: Path, flag: str = "--output") -> None:
    """Refuse an output that is a symbolic link (what it points to is not named on the command
    line) or that exists and is not a folder."""
    output = Path(output)
    if output.is_symlink():
        raise ConfigError(f"{flag} {output} is a symbolic link (to {os.readlink(output)}); "
                          "give the folder itself")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{flag} {output} exists and is not a directory")


def _some(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def claim(folder: Path, names: Iterable[str], overwrite: bool, flag: str = "--output",
          link_ok: bool = False) -> None:
    """Check, before anything is written, that `names` may be written into `folder`: an entry
    of that name the tool did not write is refused with or without `overwrite`, one of an
    earlier output of ours without it. `link_ok`: `folder` may be a link (it holds an output
    file named on the command line, not the output itself)."""
    folder = Path(folder)
    if not link_ok:
        check_output_path(folder, flag)
    foreign = not_ours(folder, names)
    if foreign:
        raise ConfigError(
            f"{folder}: {_some(foreign)} {'is' if len(foreign) == 1 else 'are'} not written by hydralora "
            f"(not listed in its {MANIFEST}) and would be replaced; it never replaces what it did "
            f"not write, --overwrite or not: move {'it' if len(foreign) == 1 else 'them'} away or "
            f"choose another {flag}")
    earlier = sorted(n for n in set(names) if os.path.lexists(folder / n))
    if earlier and not overwrite:
        raise ConfigError(f"{folder} holds an earlier output ({_some(earlier)}); pass --overwrite to "
                          f"replace it, or choose another {flag}")


def make_dir(folder: Path) -> bool:
    """Create `folder` (and its parents); True if it did not exist. Errors name the folder."""
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(err, folder, "nothing was written") from None
    return created


def _drop_if_empty(folder: Path) -> None:
    """Remove a folder this tool created when it holds nothing (but perhaps its manifest)."""
    with contextlib.suppress(OSError):
        if all(p.name == MANIFEST for p in folder.iterdir()):
            (folder / MANIFEST).unlink(missing_ok=True)
            folder.rmdir()


@contextlib.contextmanager
def owned_folder(folder: Path, names: Iterable[str], overwrite: bool,
                 flag: str = "--output") -> Iterator[Path]:
    """Hold `folder` (its lock) while `names` are written into it: checked by `claim` (again
    once the lock is held) and listed in its manifest before they are written, so a command cut
    short leaves them marked as ours. Afterwards names not written are forgotten, and a folder
    this created and left empty is removed."""
    folder, names = Path(folder), sorted(set(names))
    claim(folder, names, overwrite, flag)
    created = make_dir(folder)
    lock, note = acquire_lock(folder)
    if note:
        print(note, flush=True)
    try:
        claim(folder, names, overwrite, flag)
        record_written(folder, add=names)
        yield folder
    finally:
        release_lock(lock)
        with contextlib.suppress(OSError):
            record_written(folder, forget=[n for n in names if not os.path.lexists(folder / n)])
        if created:
            _drop_if_empty(folder)


def _entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != LOCK_NAME] if folder.is_dir() else []


def check_output_dir(output: Path, overwrite: bool, keep: Path | None = None,
                     keep_what: str = "the adapter") -> None:
    """Refuse an output that is a link or a file, holds files the tool did not write (no
    manifest), holds an earlier output (unless overwriting), or would swallow `keep`
    (`keep_what` names it)."""
    check_output_path(output)
    if keep is not None:
        out, src = output.resolve(), keep.resolve()
        if out == src or out in src.parents:
            raise ConfigError(f"--output {output} would replace {keep_what} {keep} itself")
    if _entries(output):
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
    """Yield a temporary sibling directory to build the output in, holding `output`'s lock (two
    commands never write one output). On success its entries move into `output` (the config
    files last), replacing only entries the manifest lists, removing the manifest's other
    entries and nothing else. On failure the temporary directory is removed and `output` is as
    it was (a folder this created is removed)."""
    check_output_dir(output, overwrite)
    created = make_dir(output)
    lock, note = acquire_lock(output)
    if note:
        print(note, flush=True)
    tmp = None
    try:
        check_output_dir(output, overwrite)  # again, now that the folder is ours to write
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an export is for others to read
        yield tmp
        stamp_tree(tmp)
        names = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)
        ours = read_manifest(output) or set()
        foreign = not_ours(output, names) + [str(p) for n in names if n in ours
                                             for p in foreign_inside(output / n)]
        if foreign:
            raise ConfigError(f"{output}: would replace {_some(foreign)}, which this tool did not "
                              "write; move them away or choose another --output")
        record_written(output, add=names)  # listed first: a crash while moving leaves them ours
        for name in sorted(names, key=lambda n: n in (CONFIG_NAME, SPLIT_FILE)):
            target = output / name
            if target.is_dir() and not target.is_symlink():
                aside = output / f".{name}.old-{os.getpid()}"
                os.replace(target, aside)
                os.replace(tmp / name, target)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                if os.path.lexists(target) and (tmp / name).is_dir():
                    target.unlink()
                os.replace(tmp / name, target)
        for name in sorted(ours - set(names)):
            remove_owned(output / name)
        record_written(output, forget=ours - set(names))
    except BaseException:
        release_lock(lock)
        if created:
            _drop_if_empty(output)
        raise
    finally:
        release_lock(lock)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
