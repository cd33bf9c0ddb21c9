"""Run untrusted, model-generated Python (HumanEval pass@1) in a sandboxed subprocess.

`run_python(code)` never raises because of what the code does; it returns a `SandboxResult`
whose status is "passed" (exit 0), "failed", "timeout", "memory" or "error" (the sandbox
itself could not start the code). The code runs behind several independent layers, each of
which is skipped, not fatal, where the machine does not offer it (`sandbox_capabilities()`
says which are active):

1. Process: a fresh `python -I` (isolated mode: no PYTHON* variables, no user site) in a new
   session, a minimal environment (no inherited secrets; HOME and TMPDIR are its own temporary
   directory), stdin at EOF, stdout and stderr into files read back truncated. A wall-time
   limit; on timeout, and after every run, the whole process group is killed (SIGKILL).
2. Resource limits: RLIMIT_AS (memory_mb), RLIMIT_CPU (a bit above the timeout),
   RLIMIT_FSIZE, RLIMIT_NPROC (fork bombs), RLIMIT_NOFILE and RLIMIT_CORE = 0.
3. Identity: as root (RLIMIT_NPROC does not bind root, and root may write anywhere) the code
   runs as a throwaway unprivileged uid/gid drawn per run from `SANDBOX_UID_RANGE`, with no
   supplementary groups; a per-run uid keeps RLIMIT_NPROC from being shared with anything else
   and lets every leftover process of the run be killed with kill(-1) as that uid. Then
   PR_SET_NO_NEW_PRIVS, so no setuid binary can give privileges back.
4. Namespaces (Linux; as root, or through a user namespace otherwise): a network namespace
   with no interface up (no network, not even loopback), a PID namespace (the run cannot see
   or signal other processes, and all of it dies with its init), an IPC namespace and a mount
   namespace in which every mount is read-only, /tmp, /var/tmp, /dev/shm and /run/lock are
   small private tmpfs, and the working directory is a size-limited tmpfs owned by the
   sandbox uid. Directories the sandbox uid may not enter but the interpreter lives in (e.g.
   a pyenv under /root) are covered by a tmpfs into which only the interpreter is bound.
5. A Python guard installed before the code runs: no process creation (os.fork, os.system,
   subprocess, multiprocessing ...), no signals to other processes, no sockets, no writes or
   removals outside the working directory. It is easy to bypass on purpose (ctypes) and is
   only the last layer; the tests check the layers above with the guard off.

The privileged part runs in a small launcher (this interpreter with -I -S, started fresh, so
nothing unsafe happens between fork and exec of a multi-threaded caller): it enters the
namespaces, forks an init process that sets up mounts, limits and identity (and makes itself
non-dumpable, so the code cannot ptrace it), which forks the interpreter that runs the code.
The launcher enforces the timeout and reports the outcome through a pipe; a setup failure
means status "error", never an unprotected run.

Not covered: a memory cgroup (RLIMIT_AS is per process, so MAX_PROCESSES * memory_mb bounds
a run), reading world-readable files, and a program that exits 0 early (status follows the
exit code). As root without a mount namespace the interpreter must be reachable by others
(a pyenv under a 0700 /root is not): every run is then an "error". Without namespaces the
working directory lives on disk, and as a non-root user without user namespaces only the
process group is killed and the file system is protected by the Python guard alone. On
non-POSIX systems only the subprocess, the timeout and the Python guard remain.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass

USE_NAMESPACES = True
"""Set False to skip the namespace layers (debugging, or testing the layers below them)."""
MAX_PROCESSES = 32
"""RLIMIT_NPROC of the sandbox uid (processes and threads); added to the current count when
not root."""
FILE_SIZE_MB = 16
"""RLIMIT_FSIZE: the largest file (stdout and stderr included) the code may write."""
OPEN_FILES = 256
"""RLIMIT_NOFILE."""
WORKDIR_MB = 64
"""Size of the working-directory tmpfs (mount namespace only)."""
TMP_MB = 16
"""Size of each private /tmp, /var/tmp, /dev/shm, /run/lock tmpfs (mount namespace only)."""
SANDBOX_UID_RANGE = (1_900_000_000, 2_000_000_000)
"""Throwaway uids/gids used as root: above systemd's container range, below 2**31."""
MASKED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
"""World-writable directories replaced by private tmpfs in the mount namespace."""

_STARTUP_GRACE_S = 3.0  # the caller's backstop beyond the launcher's own timeout
_LAYER_NAMES = (
    "unprivileged_user",
    "dedicated_uid",
    "no_new_privs",
    "rlimits",
    "user_namespace",
    "pid_namespace",
    "network_namespace",
    "ipc_namespace",
    "mount_namespace",
    "readonly_filesystem",
    "private_tmp",
    "private_proc",
)


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run."""

    status: str
    """One of "passed", "failed", "timeout", "memory", "error"."""
    returncode: int | None
    """Exit code, minus the signal number if killed, None on timeout or error."""
    stdout: str
    """Standard output, truncated to max_output_bytes (head and tail kept)."""
    stderr: str
    """Standard error, truncated the same way."""
    elapsed_s: float
    """Wall time of the whole run, sandbox start-up included."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(
    code: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    max_output_bytes: int = 65536,
    *,
    guard: bool = True,
) -> SandboxResult:
    """Run `code` in a sandboxed Python subprocess; never raises for anything the code does.

    `guard=False` leaves out the in-interpreter Python guard (the OS layers remain).
    """
    result, _ = _run(code, timeout_s, memory_mb, max_output_bytes, guard)
    return result


def check_program(
    completion: str,
    test: str,
    entry_point: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
) -> SandboxResult:
    """HumanEval style: program = completion + "\\n\\n" + test + f"\\n\\ncheck({entry_point})\\n";
    passed iff it exits 0."""
    program = completion + "\n\n" + test + f"\n\ncheck({entry_point})\n"
    return run_python(program, timeout_s=timeout_s, memory_mb=memory_mb)


_CAPABILITIES: dict[bool, dict[str, bool]] = {}


def sandbox_capabilities() -> dict[str, bool]:
    """Which isolation layers are active on this machine, found by running a probe once.

    Also "python_guard" (always available) and "works" (the probe ran and passed).
    """
    if USE_NAMESPACES not in _CAPABILITIES:
        result, layers = _run("pass", 30.0, 1024, 4096, True)
        caps = {name: bool(layers.get(name)) for name in _LAYER_NAMES}
        caps["python_guard"] = True
        caps["works"] = result.passed
        _CAPABILITIES[USE_NAMESPACES] = caps
    return dict(_CAPABILITIES[USE_NAMESPACES])


# --------------------------------------------------------------------------- caller side


def _run(
    code: str, timeout_s: float, memory_mb: int, max_output_bytes: int, guard: bool
) -> tuple[SandboxResult, dict]:
    """Run one program; return the result and the layers the sandbox reported."""
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="hydralora-sandbox-")
    report_r, report_w = os.pipe() if os.name == "posix" else (-1, -1)
    proc = None
    try:
        with (
            tempfile.TemporaryFile() as source,
            tempfile.TemporaryFile() as out,
            tempfile.TemporaryFile() as err,
        ):
            source.write(code.encode("utf-8", "replace"))
            source.seek(0)
            try:
                proc = subprocess.Popen(
                    _command(workdir, timeout_s, memory_mb, guard, report_w),
                    stdin=source,
                    stdout=out,
                    stderr=err,
                    cwd=workdir,
                    env=_minimal_env(workdir),
                    close_fds=True,
                    pass_fds=(report_w,) if report_w >= 0 else (),
                    start_new_session=os.name == "posix",
                )
            except OSError as exc:
                elapsed = time.monotonic() - start
                return SandboxResult("error", None, "", f"sandbox: {exc}", elapsed), {}
            finally:
                if report_w >= 0:
                    os.close(report_w)
            grace = _STARTUP_GRACE_S if os.name == "posix" else 0.0
            finished = _wait_unreaped(proc, timeout_s + grace)
            _kill_group(proc)
            proc.wait()
            elapsed = time.monotonic() - start
            report = _read_report(report_r) if report_r >= 0 else {"layers": {}}
            stdout = _read_output(out, max_output_bytes)
            stderr = _read_output(err, max_output_bytes)
    finally:
        if proc is not None and proc.returncode is None:  # interrupted while waiting
            _kill_group(proc)
            proc.wait()
        if report_r >= 0:
            os.close(report_r)
        shutil.rmtree(workdir, ignore_errors=True)
    status, returncode = _classify(report, proc.returncode, not finished, stderr)
    if "error" in report:
        stderr = f"sandbox: {report['error']}\n{stderr}"
    return SandboxResult(status, returncode, stdout, stderr, elapsed), report.get("layers", {})


def _command(
    workdir: str, timeout_s: float, memory_mb: int, guard: bool, report_fd: int
) -> list[str]:
    """The argv that starts the sandbox: the launcher, or on non-POSIX systems the runner."""
    runner = [sys.executable, "-I", "-B", "-X", "utf8", "-c", _runner_source(), str(guard)]
    if os.name != "posix":
        return runner
    uid = None
    if os.geteuid() == 0:
        import secrets

        low, high = SANDBOX_UID_RANGE
        uid = low + secrets.randbelow(high - low)
    cfg = {
        "argv": runner,
        "workdir": os.path.realpath(workdir),
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "file_size_mb": FILE_SIZE_MB,
        "open_files": OPEN_FILES,
        "nproc": MAX_PROCESSES,
        "workdir_mb": WORKDIR_MB,
        "tmp_mb": TMP_MB,
        "masked_dirs": list(MASKED_DIRS),
        "expose": _interpreter_dirs(),
        "namespaces": USE_NAMESPACES,
        "host_mount_ns": _mount_namespace_id(),
        "uid": uid,
        "gid": uid,
        "report_fd": report_fd,
    }
    return [sys.executable, "-I", "-S", "-B", "-c", _launcher_source(), json.dumps(cfg)]


def _mount_namespace_id() -> str | None:
    """This process's mount namespace (the sandbox refuses to mount anything in it)."""
    try:
        return os.readlink("/proc/self/ns/mnt")
    except OSError:
        return None


def _interpreter_dirs() -> list[str]:
    """The directories the sandboxed interpreter needs, outermost only."""
    exe = os.path.realpath(sys.executable)
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    candidates |= {os.path.dirname(sys.executable), os.path.dirname(exe)}
    dirs = sorted({os.path.realpath(p) for p in candidates if p})
    return [d for d in dirs if not any(d.startswith(o + os.sep) for o in dirs if o != d)]


def _minimal_env(workdir: str) -> dict[str, str]:
    """A fresh environment: nothing inherited but what Windows needs to start Python."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if os.name == "nt" and "SYSTEMROOT" in os.environ:
        env["SYSTEMROOT"] = os.environ["SYSTEMROOT"]
    return env


def _wait_unreaped(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until the launcher exits without reaping it (so its process group id cannot be
    reused before we kill the group); False on timeout."""
    if not hasattr(os, "waitid"):
        try:
            proc.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG):
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox's whole process group (the launcher and whatever stayed in it)."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        elif proc.poll() is None:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


def _read_report(fd: int) -> dict:
    """Merge the JSON lines the launcher wrote to the report pipe."""
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    report: dict = {}
    for line in data.splitlines():
        try:
            report.update(json.loads(line))
        except ValueError:
            pass
    return report


def _read_output(f, limit: int) -> str:
    """Decode a captured stream, keeping its head and tail when it exceeds `limit` bytes."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size <= limit:
        return f.read().decode("utf-8", "replace")
    head = f.read(limit // 2)
    f.seek(size - (limit - limit // 2))
    tail = f.read()
    marker = f"\n... [{size - limit} bytes truncated] ...\n".encode()
    return (head + marker + tail).decode("utf-8", "replace")


_MEMORY_RE = re.compile(r"MemoryError|Cannot allocate memory|bad_alloc")


def _classify(
    report: dict, launcher_rc: int | None, timed_out: bool, stderr: str
) -> tuple[str, int | None]:
    """Map the run to (status, returncode)."""
    if timed_out or report.get("timeout"):
        return "timeout", None
    if "error" in report or "layers" not in report:
        return "error", None
    if "signal" in report:
        rc = -int(report["signal"])
    elif "exit" in report:
        rc = int(report["exit"])
    else:
        rc = launcher_rc
    if rc == 0:
        return "passed", rc
    if rc == -getattr(signal, "SIGKILL", 9):
        return "memory", rc  # the kernel's OOM killer (our own kills are timeouts)
    if rc == -getattr(signal, "SIGXCPU", 24):
        return "timeout", rc  # RLIMIT_CPU
    last = [line for line in stderr.splitlines() if line.strip()][-1:]
    if last and _MEMORY_RE.search(last[0]):
        return "memory", rc
    return "failed", rc


_SOURCES: dict[str, str] = {}


def _program(name: str, funcs: tuple, entry: str) -> str:
    """Python source of a self-contained program made of `funcs` and an entry line."""
    if name not in _SOURCES:
        parts = ["from __future__ import annotations"]
        parts += [textwrap.dedent(inspect.getsource(f)) for f in funcs]
        _SOURCES[name] = "\n\n".join(parts + [entry])
    return _SOURCES[name]


def _launcher_source() -> str:
    funcs = (
        _launcher_main,
        _init_main,
        _enter_namespaces,
        _enter_user_namespace,
        _setup_mounts,
        _remount_readonly,
        _blocked_dir,
        _set_limits,
        _count_tasks,
        _drop_privileges,
        _kill_uid,
        _libc,
        _prctl,
    )
    entry = "import json, sys\n_launcher_main(json.loads(sys.argv[1]))\n"
    return _program("launcher", funcs, entry)


def _runner_source() -> str:
    entry = "import sys\n_runner_main(sys.argv[1] == 'True')\n"
    return _program("runner", (_runner_main, _install_guard), entry)


# ---------------------------------------------------------------------------------------
# Everything below runs in the launcher or in the sandbox, shipped as source (see _program):
# each function imports what it uses and reads no module globals.


def _launcher_main(cfg: dict) -> None:
    """Launcher: enter namespaces, fork the init, enforce the timeout, clean up, report."""
    import json
    import os
    import signal
    import time

    def report(**fields) -> None:
        os.write(cfg["report_fd"], (json.dumps(fields) + "\n").encode())

    libc = _libc()
    cfg["host_tasks"] = 0 if cfg["uid"] is not None else _count_tasks(os.getuid())
    layers = _enter_namespaces(libc, cfg)
    init = os.fork()
    if init == 0:
        try:
            _init_main(libc, cfg, layers)
        finally:
            os._exit(125)
    deadline = time.monotonic() + cfg["timeout_s"]
    while True:
        pid, status = os.waitpid(init, os.WNOHANG)
        if pid:
            break
        if time.monotonic() >= deadline:
            os.kill(init, signal.SIGKILL)
            os.waitpid(init, 0)
            report(timeout=True)
            status = None
            break
        time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))
    if cfg["uid"] is not None and not layers["pid_namespace"]:
        _kill_uid(cfg["uid"], cfg["gid"])
    if status is None:
        os._exit(124)
    if os.WIFSIGNALED(status):  # the init died abnormally (e.g. the OOM killer)
        report(signal=os.WTERMSIG(status))
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


def _init_main(libc: object, cfg: dict, layers: dict) -> None:
    """Init (PID 1 of the PID namespace if there is one): set up the sandbox, fork the
    interpreter, reap everything until it exits, report its status. Never returns."""
    import json
    import os
    import signal

    fd = cfg["report_fd"]

    def report(**fields) -> None:
        os.write(fd, (json.dumps(fields) + "\n").encode())

    PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
    try:
        os.umask(0o022)
        uid, gid = cfg["uid"], cfg["gid"]
        workdir_ready = False
        if layers["mount_namespace"]:
            workdir_ready = _setup_mounts(libc, cfg, layers)
        if not workdir_ready and uid is not None:
            os.chown(cfg["workdir"], uid, gid)
        os.chdir(cfg["workdir"])
        layers["rlimits"] = _set_limits(cfg)
        if uid is not None:
            _drop_privileges(uid, gid)
        layers["dedicated_uid"] = uid is not None
        layers["unprivileged_user"] = os.geteuid() != 0
        layers["no_new_privs"] = _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
        _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
        _prctl(libc, PR_SET_DUMPABLE, 0)  # the code cannot ptrace us to forge the report
    except Exception as exc:  # fail closed: the code does not run
        report(error=f"setup failed: {exc!r}")
        os._exit(125)
    report(layers=layers)
    runner = os.fork()
    if runner == 0:
        _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
        os.set_inheritable(fd, False)
        try:
            os.execv(cfg["argv"][0], cfg["argv"])
        except OSError as exc:
            report(error=f"cannot start {cfg['argv'][0]} as uid {os.getuid()}: {exc}")
        os._exit(126)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(126)
        if pid == runner:
            break
    if os.WIFSIGNALED(status):
        report(signal=os.WTERMSIG(status))
        os._exit(128 + os.WTERMSIG(status))
    report(exit=os.WEXITSTATUS(status))
    os._exit(os.WEXITSTATUS(status))


def _enter_namespaces(libc: object, cfg: dict) -> dict:
    """unshare() the namespaces this process may enter (its children will live in them)."""
    import os

    NEWNS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
    layers = dict.fromkeys(
        ("user_namespace", "mount_namespace", "pid_namespace", "network_namespace",
         "ipc_namespace", "readonly_filesystem", "private_tmp", "private_proc"),
        False,
    )  # fmt: skip
    unshare = getattr(libc, "unshare", None) if libc is not None else None
    if not cfg["namespaces"] or unshare is None:
        return layers
    wanted = {
        "mount_namespace": NEWNS,
        "pid_namespace": NEWPID,
        "network_namespace": NEWNET,
        "ipc_namespace": NEWIPC,
    }
    every = NEWNS | NEWPID | NEWNET | NEWIPC
    if os.geteuid() != 0:  # through a user namespace; tried in a throwaway child first
        probe = os.fork()
        if probe == 0:
            os._exit(0 if _enter_user_namespace(unshare, NEWUSER | every) else 1)
        if os.waitpid(probe, 0)[1] != 0 or not _enter_user_namespace(unshare, NEWUSER | every):
            return layers
        return {**layers, "user_namespace": True, **dict.fromkeys(wanted, True)}
    if unshare(every) == 0:
        return {**layers, **dict.fromkeys(wanted, True)}
    for name, flag in wanted.items():
        layers[name] = unshare(flag) == 0
    return layers


def _enter_user_namespace(unshare, flags: int) -> bool:
    """unshare(flags) with CLONE_NEWUSER, keeping our own uid and gid inside."""
    import os

    uid, gid = os.getuid(), os.getgid()
    try:
        if unshare(flags) != 0:
            return False
        maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))
        for name, text in maps:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        return False
    return True


def _setup_mounts(libc: object, cfg: dict, layers: dict) -> bool:
    """In the new mount namespace: private propagation, a fresh /proc, everything read-only,
    private tmpfs over the world-writable directories and over directories that hide the
    interpreter from the sandbox uid, the interpreter bound back in, a tmpfs working
    directory. Updates `layers`; True if the working directory is ready."""
    import ctypes
    import os

    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
    MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]

    def do(source, target, fstype, flags, data=None) -> bool:
        args = [None if s is None else os.fsencode(s) for s in (source, target, fstype)]
        return mount(*args, flags, None if data is None else data.encode()) == 0

    try:
        own_ns = os.readlink("/proc/self/ns/mnt")
    except OSError:
        own_ns = None
    if own_ns is None or own_ns == cfg["host_mount_ns"]:
        layers["mount_namespace"] = False  # not provably new: never touch the caller's mounts
        return False
    if not do(None, "/", None, MS_REC | MS_PRIVATE):
        return False  # never mount anything that could propagate to the caller's namespace
    if layers["pid_namespace"]:
        layers["private_proc"] = do("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    keep = {p: os.open(p, os.O_PATH) for p in cfg["expose"] if os.path.isdir(p)}
    layers["readonly_filesystem"] = _remount_readonly(do)
    uid = cfg["uid"] if cfg["uid"] is not None else os.getuid()
    gid = cfg["gid"] if cfg["gid"] is not None else os.getgid()
    masks = []
    for d in dict.fromkeys(os.path.realpath(d) for d in cfg["masked_dirs"]):
        if os.path.isdir(d) and not os.path.islink(d):
            opts = f"size={cfg['tmp_mb']}m,nr_inodes=4096,mode=1777"
            if do("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, opts):
                masks.append(d)
    layers["private_tmp"] = "/tmp" in masks

    def under(path: str, dirs: list) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)

    blocked = []  # directories the sandbox uid cannot enter, on the way to the interpreter
    if cfg["uid"] is not None:
        for p in keep:
            d = _blocked_dir(p)
            if d and not under(d, masks + blocked):
                if do("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755"):
                    blocked.append(d)
    for p, fd in keep.items():
        if under(p, masks + blocked):
            os.makedirs(p, exist_ok=True)
            do(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
        os.close(fd)
    workdir = cfg["workdir"]
    os.makedirs(workdir, exist_ok=True)
    opts = f"size={cfg['workdir_mb']}m,nr_inodes=16384,mode=0700,uid={uid},gid={gid}"
    ready = do("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, opts)
    for d in blocked:
        do(None, d, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return ready


def _remount_readonly(do) -> bool:
    """Remount every mount of this namespace read-only (keeping its locked flags); True if
    the root filesystem became read-only."""
    import re

    flag_of = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048,
               "relatime": 1 << 21}  # fmt: skip
    MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    root_ok = False
    for line in lines:
        fields = line.split()
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in fields[5].split(","):
            flags |= flag_of.get(opt, 0)
        ok = do(None, target, None, flags)
        if target == "/":
            root_ok = ok
    return root_ok


def _blocked_dir(path: str) -> str | None:
    """The first directory on the way to `path` that others may not enter, if any."""
    import os

    current = ""
    for part in path.strip("/").split("/"):
        current += "/" + part
        try:
            st = os.stat(current)
        except OSError:
            return None
        if os.path.isdir(current) and not st.st_mode & 0o001:
            return current
    return None


def _set_limits(cfg: dict) -> bool:
    """Apply the resource limits (never above the current hard limits)."""
    try:
        import resource
    except ImportError:
        return False
    mb = 1024 * 1024
    cpu = int(cfg["timeout_s"]) + 2
    nproc = cfg["nproc"] + cfg.get("host_tasks", 0)
    wanted = {
        "RLIMIT_AS": (cfg["memory_mb"] * mb,) * 2,
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_FSIZE": (cfg["file_size_mb"] * mb,) * 2,
        "RLIMIT_NPROC": (nproc, nproc),
        "RLIMIT_NOFILE": (cfg["open_files"],) * 2,
        "RLIMIT_CORE": (0, 0),
    }
    applied = 0
    for name, (soft, hard) in wanted.items():
        which = getattr(resource, name, None)
        if which is None:
            continue
        cur_hard = resource.getrlimit(which)[1]
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        try:
            resource.setrlimit(which, (min(soft, hard), hard))
            applied += 1
        except (ValueError, OSError):
            pass
    return applied == len(wanted)


def _count_tasks(uid: int) -> int:
    """Processes and threads of `uid` now (what RLIMIT_NPROC counts); 0 if unknown."""
    import os

    total = 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields.get("Threads", "1"))
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return total


def _drop_privileges(uid: int, gid: int) -> None:
    """Become uid/gid for good (real, effective and saved), with no supplementary groups."""
    import os

    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getegid() != gid or os.getgroups():
        raise RuntimeError("privileges were not dropped")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise RuntimeError("privileges could be regained")


def _kill_uid(uid: int, gid: int) -> None:
    """SIGKILL every process of the throwaway uid: kill(-1) from a child that became it."""
    import os
    import signal

    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)  # all processes we may signal, except ourselves
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def _libc() -> object:
    """The C library through ctypes, or None."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


def _prctl(libc: object, option: int, value: int) -> bool:
    """prctl(option, value); False where unavailable."""
    import ctypes

    prctl = getattr(libc, "prctl", None) if libc is not None else None
    if prctl is None:
        return False
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    return prctl(option, value, 0, 0, 0) == 0


def _runner_main(guard: bool) -> None:
    """The sandboxed interpreter: read the program from stdin, guard, run it as __main__."""
    import linecache
    import os
    import sys

    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    source = b"".join(chunks)
    filename = "<sandbox>"
    text = source.decode("utf-8", "replace")
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    if guard:
        _install_guard(os.getcwd())
    sys.argv = [filename]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, filename, "exec"), namespace)
    except SystemExit:
        raise
    except BaseException as exc:  # print the traceback without this runner's frame
        exc = exc.with_traceback(exc.__traceback__.tb_next)
        sys.excepthook(type(exc), exc, exc.__traceback__)
        sys.exit(1)


def _install_guard(root: str) -> None:
    """Python-level guard (the last layer, bypassable with ctypes): no new processes, no
    signals to other processes, no sockets, no writes or removals outside `root`."""
    import builtins
    import io
    import os
    import socket
    import subprocess

    root = os.path.realpath(root)

    def deny(what: str):
        def denied(*args, **kwargs):
            raise PermissionError(f"{what} is disabled in the sandbox")

        return denied

    for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle",
                 "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                 "posix_spawnp", "kill", "killpg"):  # fmt: skip
        if hasattr(os, name):
            setattr(os, name, deny(f"os.{name}"))
    subprocess.Popen = deny("subprocess")
    try:
        import _posixsubprocess

        _posixsubprocess.fork_exec = deny("process creation")
    except ImportError:
        pass

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")

    socket.socket = NoSocket
    socket._socket.socket = NoSocket

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            return True
        try:
            p = os.fsdecode(os.fspath(path))
        except TypeError:
            return True  # the real function raises the TypeError
        if dir_fd is not None and not os.path.isabs(p):
            try:
                p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
            except OSError:
                return False
        real = os.path.realpath(p)
        return real == root or real.startswith(root.rstrip(os.sep) + os.sep) or real == os.devnull

    def check(path, dir_fd=None) -> None:
        if not inside(path, dir_fd):
            raise PermissionError(f"writing outside the sandbox directory is disabled: {path!r}")

    real_open, real_os_open = io.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open

    def guard_paths(name: str, params: tuple, fd_keys: tuple) -> None:
        real = getattr(os, name, None)
        if real is None:
            return

        def guarded(*args, **kwargs):
            for pos, (param, key) in enumerate(zip(params, fd_keys)):
                if param:
                    path = args[pos] if pos < len(args) else kwargs.get(param)
                    check(path, kwargs.get(key))
            return real(*args, **kwargs)

        setattr(os, name, guarded)

    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "truncate",
                 "utime", "mkfifo", "mknod"):  # fmt: skip
        guard_paths(name, ("path",), ("dir_fd",))
    for name in ("rename", "replace", "link"):
        guard_paths(name, ("src", "dst"), ("src_dir_fd", "dst_dir_fd"))
    guard_paths("symlink", ("", "dst"), ("", "dir_fd"))
