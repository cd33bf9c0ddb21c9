"""Training and evaluation runs keyed by their flags, reused when complete: the engine of
`hydralora compare` and of benchmarks/quality.py.

Every run is a `hydralora train` subprocess (its own memory, several at once with `jobs`) in a
folder named after the sha256 of its full flags, `<name>-s<seed>-<hash>`; a folder is reused
only when the run finished (its summary, flags and machine records exist) and its recorded
train_config.yaml agrees with the flags, so an interrupted comparison resumes where it stopped
and a changed flag never reuses an old run. Evaluations (`hydralora eval --no-generate`) are
cached beside the run, keyed by the eval flags and the held-out file's contents. Each run
records the machine it ran on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from ..errors import TrainingError

HASH_CHARS = 10  # hex characters of the flags hash in a run's folder name
FLAGS_FILE = "flags.json"  # the flags a run was trained with, and their hash
MACHINE_FILE = "machine.json"  # where a run ran, written once it is trained


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hydralora", *args]


def run_command(cmd: list[str], log: Path, threads: int | None = None) -> None:
    """Run one of our commands, its output into `log`; a failure names the command and the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        tail = (log.read_text(errors="replace").strip().splitlines() or [""])[-1]
        raise TrainingError(f"a run failed ({proc.returncode}): {' '.join(cmd[2:])}: {tail} (log: {log})")


def canonical_flags(argv: list[str]) -> dict[str, list[str]]:
    """Flags as {flag: values}, sorted by flag; a repeated flag keeps its last values, as argparse
    does (so the same flags written twice give one key)."""
    flags: dict[str, list[str]] = {}
    current = None
    for token in argv:
        if token.startswith("--"):
            current = token
            flags[current] = []
        elif current is None:
            raise ValueError(f"a value before any flag: {argv}")
        else:
            flags[current].append(token)
    return dict(sorted(flags.items()))


def flags_hash(key: object) -> str:
    """Short sha256 of the JSON of `key` (sorted keys): the same flags, the same hash."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------- train_config.yaml against flags
def _same_scalar(recorded: object, expected: str) -> bool | None:
    if isinstance(recorded, (list, dict)) or recorded is None:
        return None
    if isinstance(recorded, bool) or expected.lower() in ("true", "false"):
        return str(recorded).lower() == expected.lower()
    try:
        return float(recorded) == float(expected)
    except (TypeError, ValueError):
        return str(recorded) == expected


def _same_value(recorded: object, expected: bool | list[str]) -> bool | None:
    if isinstance(expected, bool):
        return recorded is expected if isinstance(recorded, bool) else None
    if isinstance(recorded, list):
        if len(recorded) != len(expected):
            return False
        return all(_same_scalar(r, e) is not False for r, e in zip(recorded, expected))
    return _same_scalar(recorded, expected[0]) if len(expected) == 1 else None


def config_mismatches(config: dict, flags: dict[str, list[str]]) -> list[str]:
    """Flags whose value the run's train_config.yaml contradicts. Lenient: a flag with no field
    there, 'auto' (resolved during training) or a value of another shape is not compared."""
    from ..config import HydraLoraConfig
    from ..options import field_aliases
    from ..train.config import TrainConfig

    aliases = field_aliases(TrainConfig, HydraLoraConfig)  # --lr is learning_rate in the file
    problems = []
    for flag, values in flags.items():
        field = flag[2:].replace("-", "_")
        expected: bool | list[str] = values
        if not values:  # a BooleanOptionalAction: --x is True, --no-x is False
            negated = field.startswith("no_") and field[3:] in config
            field, expected = (field[3:], False) if negated else (field, True)
        field = aliases.get(field, field)
        if field not in config or values == ["auto"]:
            continue
        if _same_value(config[field], expected) is False:
            problems.append(f"{' '.join([flag, *values])} but train_config.yaml has {field}: {config[field]!r}")
    return problems


def recorded_config_problems(out: Path, argv: list[str]) -> list[str]:
    """Contradictions between the run's recorded train_config.yaml and `argv` (none if absent)."""
    import yaml

    path = out / "train_config.yaml"
    if not path.exists():
        return []
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        return [f"unreadable {path}: {err}"]
    if not isinstance(config, dict):
        return [f"{path} is not a mapping"]
    return config_mismatches(config, canonical_flags(argv))


# ---------------------------------------------------------------------------- machine records
@functools.lru_cache(maxsize=1)
def machine_info() -> dict:
    """What this process runs on: CPU model and cores, the CPU's bf16 features, torch, GPU."""
    import torch

    cpu_model, cpu_flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu_model:
                cpu_model = value.strip()
            elif key.strip() == "flags" and not cpu_flags:
                cpu_flags = set(value.split())
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_model": cpu_model or platform.processor() or "unknown CPU", "cpu_cores": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in cpu_flags,
            "amx": sorted(f for f in cpu_flags if f.startswith("amx")), "torch": torch.__version__,
            "gpu": gpu, "machine": platform.machine(), "system": platform.system(),
            "platform": platform.platform(), "python": platform.python_version()}


def describe_machine(m: dict | None) -> str:
    if not m:
        return "an unrecorded machine"
    bf16 = [f for f, on in (("AVX512-BF16", m.get("avx512_bf16")), ("AMX", m.get("amx"))) if on]
    return (f"{m.get('machine')} {m.get('system')}, {m.get('cpu_model')}, {m.get('cpu_cores')} CPU "
            f"cores, {'with ' + ' and '.join(bf16) if bf16 else 'no AVX512-BF16 or AMX'}, torch "
            f"{m.get('torch')}, {'GPU ' + m['gpu'] if m.get('gpu') else 'no GPU'}")


def write_machine(path: Path) -> None:
    path.write_text(json.dumps(machine_info(), indent=2) + "\n")


def eval_machine_path(result: Path) -> Path:
    """Where the machine of an evaluation is recorded, beside its result."""
    return result.with_name(result.stem + "." + MACHINE_FILE)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the runs
class Runs:
    """Trains and evaluates named variants under `root`, reusing finished runs.

    `log` receives one line per event (a run starting, reused, finished), one call at a time
    (with several workers their lines would otherwise run together); `threads` is the torch
    thread count of each subprocess (None: torch's default), set when runs share the machine.
    """

    def __init__(self, root: Path, fresh: bool = False, threads: int | None = None,
                 log: Callable[[str], None] = print):
        self.root, self.fresh, self.threads, self._log = Path(root), fresh, threads, log
        self._log_lock = threading.Lock()

    def log(self, message: str) -> None:
        with self._log_lock:
            self._log(message)

    def run_dir(self, name: str, seed: int, argv: list[str]) -> Path:
        return self.root / f"{name}-s{seed}-{flags_hash(canonical_flags(argv))}"

    def is_complete(self, out: Path) -> bool:
        return all((out / f).exists() for f in ("summary.json", FLAGS_FILE, MACHINE_FILE))

    def train(self, name: str, seed: int, argv: list[str]) -> tuple[Path, dict]:
        """Train `argv` (every flag but --output/--overwrite) into its keyed folder, or reuse it;
        returns (folder, summary.json)."""
        out = self.run_dir(name, seed, argv)
        problems = recorded_config_problems(out, argv) if self.is_complete(out) else []
        for problem in problems:
            self.log(f"not reusing {out}: {problem}")
        if self.fresh or problems or not self.is_complete(out):
            self.log(f"train {name} seed {seed} -> {out.name}")
            # a failed retrain must not look complete, nor the old adapter's evals pass for the new one's
            for stale in [out / FLAGS_FILE, out / MACHINE_FILE, *out.glob("eval-*.json")]:
                stale.unlink(missing_ok=True)
            run_command(cli("train", *argv, "--output", str(out), "--overwrite"),
                        self.root / "logs" / f"{out.name}.train.log", self.threads)
            record = {"hash": flags_hash(canonical_flags(argv)), "argv": argv, "flags": canonical_flags(argv)}
            (out / FLAGS_FILE).write_text(json.dumps(record, indent=2) + "\n")
            write_machine(out / MACHINE_FILE)
        else:
            self.log(f"reuse {out.name}")
        return out, json.loads((out / "summary.json").read_text())

    def eval_path(self, folder: Path, eval_argv: list[str], data: Path, adapter: Path | None) -> Path:
        """eval-<hash>.json in `folder`: the hash covers the eval flags, the adapter's training
        flags (its recorded hash) and the held-out file's contents."""
        trained = read_json(adapter / FLAGS_FILE) if adapter else None
        key = {"eval": canonical_flags(eval_argv), "train": trained and trained.get("hash"),
               "test_data_sha256": file_sha256(data)}
        return Path(folder) / f"eval-{flags_hash(key)}.json"

    def evaluate(self, folder: Path, eval_argv: list[str], data: Path, adapter: Path | None) -> dict:
        """`hydralora eval` of `adapter` (None: the base model) on `data`, cached in `folder`
        (`eval_path`)."""
        result = self.eval_path(folder, eval_argv, data, adapter)
        machine = eval_machine_path(result)
        if self.fresh or not result.exists() or not machine.exists():
            result.parent.mkdir(parents=True, exist_ok=True)
            machine.unlink(missing_ok=True)
            self.log(f"eval {Path(folder).name} on {Path(data).name}")
            run_command(cli("eval", *eval_argv, *(["--adapter", str(adapter)] if adapter else []),
                            "--data", str(data), "--output", str(result), "--overwrite"),
                        self.root / "logs" / f"{Path(folder).name}.{result.stem}.log", self.threads)
            write_machine(machine)
        return json.loads(result.read_text())

    def train_all(self, jobs: list[tuple[str, int, list[str]]], workers: int = 1) -> dict:
        """Train every (name, seed, argv), `workers` at a time: {(name, seed, tuple(argv)): (folder,
        summary)}."""
        return in_parallel({(name, seed, tuple(argv)): functools.partial(self.train, name, seed, argv)
                            for name, seed, argv in jobs}, workers)

    def evaluate_all(self, jobs: dict[Any, tuple[Path, list[str], Path, Path | None]], workers: int = 1) -> dict:
        """`evaluate` each {key: (folder, eval_argv, data, adapter)}, `workers` at a time: {key: result}."""
        return in_parallel({key: functools.partial(self.evaluate, *args) for key, args in jobs.items()}, workers)


def in_parallel(calls: dict[Any, Callable[[], Any]], workers: int) -> dict:
    """Run each {key: call}, `workers` at a time: {key: result}. On a failure start nothing more,
    let the running ones finish, and stop naming every failed call."""
    results, failed = {}, []
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        futures = {pool.submit(call): key for key, call in calls.items()}
        for future in as_completed(futures):
            if future.cancelled():  # not started after an earlier failure
                continue
            try:
                results[futures[future]] = future.result()
            except TrainingError as err:
                failed.append(str(err))
                for other in futures:
                    other.cancel()
    if failed:
        raise TrainingError("; ".join(failed))
    return results
