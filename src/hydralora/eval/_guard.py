"""Runner of the code sandbox (`sandbox.py`), a plain module file copied into each run's
directory and started as `python -I _guard.py PROGRAM REPORT_FD UID GUARD ENTRY_POINT`.

It reads the run's token from stdin (then stdin is /dev/null), drops to UID if it is not -1,
sets PR_SET_NO_NEW_PRIVS, optionally installs the Python guard, writes "started" to the
report fd, runs PROGRAM as __main__, calls `check(ENTRY_POINT)` if one is given, and writes
the token to the report fd only when all of that returned normally.

Before `check` runs, what the program changed in `builtins` is undone and trace/profile hooks
are removed, and the tests see the entry point's results as plain values (`plain`): a copy
made of built-in numbers, strings and containers, so an object of the program's whose `__eq__`
says yes to everything cannot pass a test. Not covered: modules the test imports (`math`,
import hooks) stay as the program left them.
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
import threading

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


_HEAPTYPE, _IMMUTABLETYPE = 1 << 9, 1 << 8
# built-in types whose values the tests compare: subclasses become the base type through the
# base's own methods (a program's override is never called)
_PLAIN = (
    (int, int.__int__), (float, float.__float__), (str, str.__str__),
    (complex, getattr(complex, "__complex__", complex)), (bytes, getattr(bytes, "__bytes__", bytes)),
)


def plain(value, depth: int = 0):
    """`value` rebuilt from built-in types only: numbers, strings, bytes, None, and lists,
    tuples, dicts, sets of such values; an iterator yields plain values. A class the program
    made (or could have changed: a Python-level class) is refused with TypeError."""
    if depth > 200:
        raise TypeError("the result is nested too deeply to compare")
    kind = type(value)
    if value is None or kind in (bool, int, float, complex, str, bytes):
        return value
    for base, make in _PLAIN:
        if issubclass(kind, base):
            return make(value)
    if issubclass(kind, (list, tuple, set, frozenset)):
        base = next(b for b in (list, tuple, frozenset, set) if issubclass(kind, b))
        return base(plain(v, depth + 1) for v in base.__iter__(value))
    if issubclass(kind, dict):
        return {plain(k, depth + 1): plain(v, depth + 1) for k, v in dict.items(value)}
    if kind.__flags__ & _HEAPTYPE and not kind.__flags__ & _IMMUTABLETYPE:
        raise TypeError(f"the function returned an object of class {kind.__qualname__}, which the "
                        "program can define: the tests compare plain values (numbers, strings, "
                        "lists, dicts, ...)")
    if getattr(getattr(value, "dtype", None), "kind", None) == "O":  # numpy's object arrays
        raise TypeError("the function returned an array of Python objects; return plain values")
    if hasattr(kind, "__next__"):  # a generator, map, ...: its items are checked as they come
        return (plain(v, depth + 1) for v in value)
    return value  # a built-in or extension type (numpy): its comparison is not the program's


def plain_results(function):
    """`function` with every result made `plain`: what the tests compare."""

    def candidate(*args, **kwargs):
        return plain(function(*args, **kwargs))

    candidate.__name__ = candidate.__qualname__ = str(getattr(function, "__name__", "candidate"))
    candidate.__doc__ = getattr(function, "__doc__", None)
    return candidate


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
    table = vars(builtins)
    builtin_names = dict(table)
    os.write(report_fd, b"started\n")
    sys.argv = [program]
    try:
        namespace = runpy.run_path(program, run_name="__main__")
        if entry:
            sys.settrace(None)  # a trace function could skip the tests' asserts
            sys.setprofile(None)
            threading.settrace(None)
            table.clear()  # `builtins.abs = ...` and the like, undone
            table.update(builtin_names)
            namespace["check"](plain_results(namespace[entry]))
    except SystemExit as exc:
        if not entry and exc.code in (0, None):
            os.write(report_fd, token)
        raise
    os.write(report_fd, token)


if __name__ == "__main__":
    main(sys.argv)
