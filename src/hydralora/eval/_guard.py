"""Runner of the code sandbox (`sandbox.py`), a plain module file copied into each run's
directory and started as `python -I _guard.py PROGRAM REPORT_FD UID GUARD ENTRY_POINT`.

It reads the run's token from stdin (then stdin is /dev/null), drops to UID if it is not -1,
sets PR_SET_NO_NEW_PRIVS, optionally installs the Python guard, writes "started" to the
report fd, runs PROGRAM as __main__, calls `check(ENTRY_POINT)` if one is given, and writes
the token to the report fd only when all of that returned normally.
"""

from __future__ import annotations

import builtins
import ctypes
import io
import os
import runpy
import socket
import subprocess
import sys

_PROCESS_FUNCS = (
    "fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle", "execlp",
    "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv",
    "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg",
)  # fmt: skip
_PATH_FUNCS = (
    "remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "truncate", "utime",
    "mkfifo", "mknod", "rename", "replace", "link", "symlink",
)  # fmt: skip


def _deny(what: str):
    def denied(*args, **kwargs):
        raise PermissionError(f"{what} is disabled in the sandbox")

    return denied


def install_guard(root: str) -> None:
    """Last, bypassable (ctypes) layer: no new processes, no signals, no sockets, no writes
    or removals outside `root`."""
    root = os.path.realpath(root)
    for name in _PROCESS_FUNCS:
        if hasattr(os, name):
            setattr(os, name, _deny(f"os.{name}"))
    subprocess.Popen = _deny("subprocess")
    import _posixsubprocess

    _posixsubprocess.fork_exec = _deny("process creation")
    socket.socket = socket._socket.socket = _deny("network access")  # type: ignore[misc]

    def check(path, dir_fd=None) -> None:
        if isinstance(path, int):
            return
        p = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(p):
            p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
        real = os.path.realpath(p)
        if real not in (root, os.devnull) and not real.startswith(root + os.sep):
            raise PermissionError(f"writing outside the sandbox directory is disabled: {path!r}")

    real_open, real_os_open = io.open, os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & writing:
            check(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    for name in _PATH_FUNCS:
        if hasattr(os, name):
            setattr(os, name, _guard_paths(getattr(os, name), check))


def _guard_paths(real, check):
    """Wrap an os function so that every path argument (positional or keyword) is checked."""

    def guarded(*args, **kwargs):
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
        for key in ("path", "src", "dst"):
            if key in kwargs:
                paths.append(kwargs[key])
        fds = [
            kwargs[k] for k in ("dir_fd", "src_dir_fd", "dst_dir_fd") if kwargs.get(k) is not None
        ]
        for path in paths[-1:] if real.__name__ == "symlink" else paths:
            for dir_fd in fds or [None]:
                check(path, dir_fd)
        return real(*args, **kwargs)

    return guarded


def _drop_privileges(uid: int) -> None:
    """Become uid/gid `uid` for good, with no supplementary groups and no way back."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getresuid() != (uid,) * 3 or os.getresgid() != (uid,) * 3 or os.getgroups():
        raise RuntimeError("privileges were not dropped")


def main(argv: list[str]) -> None:
    program, report_fd, uid, guard, entry = argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5]
    token = os.read(0, 256)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if uid >= 0:
        _drop_privileges(uid)
    if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    os.set_inheritable(report_fd, False)
    if guard == "1":
        install_guard(os.getcwd())
    os.write(report_fd, b"started\n")
    sys.argv = [program]
    try:
        namespace = runpy.run_path(program, run_name="__main__")
        if entry:
            namespace["check"](namespace[entry])
    except SystemExit as exc:
        if not entry and exc.code in (0, None):
            os.write(report_fd, token)
        raise
    os.write(report_fd, token)


if __name__ == "__main__":
    main(sys.argv)
