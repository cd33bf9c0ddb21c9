"""Quality table: HydraLoRA against LoRA, LoRA-Split and the ablations on the built-in mixture.

Every variant trains on the same data (the built-in mixture, fixed split), with the same steps,
batch, schedule, learning rate and target modules (gate/up/down_proj), and the same seeds; only
the adapter differs. Each run is a `hydralora train` subprocess (so peak memory is its own),
followed by `hydralora eval` for task metrics. Learning-rate rule: one learning rate for every
method (the preset's), no per-method tuning.

    python benchmarks/quality.py --preset reduced          # ~1 h on a 2-core CPU
    python benchmarks/quality.py --preset gpu              # the larger preset for a GPU machine
    python benchmarks/quality.py --preset reduced --variants lora-r8 hydra-auto --seeds 0
    python benchmarks/quality.py --preset reduced --set heads --no-tasks --jobs 2

--jobs N trains N runs at once, each with cpu_count/N threads: more runs per hour on a small
CPU, but the time, tokens/s and memory columns then measure runs that share the machine (the
report says so); use --jobs 1 (the default) for speed figures.

Writes docs/results.md (the table, the command, the machine, the date) and docs/results.png.
Runs go to runs/quality/<preset>/<variant>-s<seed>-<hash>/, the hash (sha256, 10 hex characters)
being that of the run's full training flags (preset, variant, seed, model, data); a run is reused
only when the folder with that exact hash is complete (summary.json, flags.json, machine.json) and
its train_config.yaml agrees with the flags (--fresh to retrain). Evals go to eval-<hash>.json in
the run's folder, keyed by the eval flags, the training hash and the held-out file's contents.
Folders without a hash (made before runs were keyed) are never reused. Each run records the
machine it ran on in machine.json, and the report names the machines of the runs it shows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

from hydralora.compare.runs import (  # the engine `hydralora compare` runs on
    MACHINE_FILE,
    eval_machine_path,
    Runs,
    canonical_flags,
    cli,
    describe_machine,
    file_sha256,
    flags_hash,
    recorded_config_problems,
    run_command,
)
from hydralora.compare.runs import read_json as read_machine
from hydralora.errors import TrainingError

PRESETS = {
    "reduced": {
        "train": ["--builtin-train-per-domain", "64", "--builtin-test-per-domain", "16",
                  "--max-steps", "24", "--batch-size", "4", "--max-length", "192",
                  "--skip-overlong", "--lr", "1e-3", "--warmup-ratio", "0.05",
                  "--logging-steps", "6", "--save-steps", "0", "--no-eval-base"],
        "seeds": [0, 1],
        "task_seeds": [0],
        "max_new_tokens": 128,
    },
    "reduced-3x": {  # the reduced preset with three times the steps
        "train": ["--builtin-train-per-domain", "128", "--builtin-test-per-domain", "16",
                  "--max-steps", "72", "--batch-size", "4", "--max-length", "192",
                  "--skip-overlong", "--lr", "1e-3", "--warmup-ratio", "0.05",
                  "--logging-steps", "12", "--save-steps", "0", "--no-eval-base"],
        "seeds": [0, 1],
        "task_seeds": [],
        "max_new_tokens": 128,
    },
    "reduced-6x": {  # six times the reduced preset's steps: the long budget a 2-core CPU allows
        "train": ["--builtin-train-per-domain", "200", "--builtin-test-per-domain", "16",
                  "--max-steps", "144", "--batch-size", "4", "--max-length", "192",
                  "--skip-overlong", "--lr", "1e-3", "--warmup-ratio", "0.05",
                  "--logging-steps", "24", "--save-steps", "0", "--no-eval-base"],
        "seeds": [0, 1],
        "task_seeds": [],
        "max_new_tokens": 128,
    },
    "paper": {  # the authors' recipe at our scale: one epoch, lr 2e-4 cosine, 3% warmup (issue 23)
        "train": ["--builtin-train-per-domain", "64", "--builtin-test-per-domain", "16",
                  "--epochs", "1", "--batch-size", "8", "--max-length", "1024",
                  "--lr", "2e-4", "--lr-scheduler", "cosine", "--warmup-ratio", "0.03",
                  "--weight-decay", "0", "--logging-steps", "8", "--save-steps", "0", "--no-eval-base"],
        "seeds": [0, 1],
        "task_seeds": [],
        "max_new_tokens": 128,
    },
    "paper-short": {  # the paper's recipe on half the data and 512 tokens: 16 steps, a 2-core CPU's hour
        "train": ["--builtin-train-per-domain", "32", "--builtin-test-per-domain", "16",
                  "--epochs", "1", "--batch-size", "8", "--max-length", "512", "--skip-overlong",
                  "--lr", "2e-4", "--lr-scheduler", "cosine", "--warmup-ratio", "0.03",
                  "--weight-decay", "0", "--logging-steps", "4", "--save-steps", "0", "--no-eval-base"],
        "seeds": [0, 1],
        "task_seeds": [],
        "max_new_tokens": 128,
    },
    "smoke": {  # a minutes-long check that the script runs end to end
        "train": ["--builtin-train-per-domain", "30", "--builtin-test-per-domain", "2",
                  "--max-steps", "2", "--batch-size", "2", "--max-length", "160",
                  "--skip-overlong", "--lr", "1e-3", "--save-steps", "0", "--no-eval-base"],
        "seeds": [0],
        "task_seeds": [0],
        "max_new_tokens": 16,
    },
    "gpu": {
        "train": ["--builtin-train-per-domain", "1000", "--builtin-test-per-domain", "100",
                  "--epochs", "2", "--batch-size", "16", "--max-length", "512",
                  "--lr", "5e-4", "--logging-steps", "20", "--save-steps", "0", "--no-eval-base"],
        "seeds": [0, 1, 2],
        "task_seeds": [0, 1, 2],
        "max_new_tokens": 256,
    },
}

TARGETS = ["--target-modules", "gate_proj", "up_proj", "down_proj"]
# HydraLoRA r=8 with k from the automatic choice and the paper's router learning rate; PAPER
# pins the paper's initialization (B = 0), RANDOM the random heads (A = 0). Every setting that
# `hydralora train` sets differently from the paper is pinned, so runs stay comparable.
HYDRA = ["--method", "hydralora", "--r", "8", "--num-heads", "auto", "--router-lr-multiplier", "1"]
PAPER = [*HYDRA, "--init-heads", "zero"]
RANDOM = [*HYDRA, "--init-heads", "random"]
DEFAULT = [*RANDOM, "--router-lr-multiplier", "10"]  # `hydralora train`'s defaults before issue 16
GUIDED = ["--guide-loss-weight", "1", "--route-labels-from", "cluster"]
VARIANTS = {
    "base": None,
    "lora-r8": ["--method", "lora", "--r", "8"],
    "lora-r16": ["--method", "lora", "--r", "16"],
    "lora-r32": ["--method", "lora", "--r", "32"],
    "lora-split-4x8": ["--method", "lora-split", "--r", "32", "--num-heads", "4"],
    "lora-r32-alpha64": ["--method", "lora", "--r", "32", "--alpha", "64"],
    "hydra-auto": PAPER,
    "hydra-uniform": [*PAPER, "--router", "uniform"],
    "hydra-no-shared-a": [*PAPER, "--no-shared-a"],
    "hydra-one-head": [*PAPER, "--num-heads", "1"],
    # head diversity (issue 8): options that give the heads a reason to differ
    "hydra-head-dropout": [*PAPER, "--head-dropout", "0.3"],
    "hydra-temperature": [*PAPER, "--router-temperature", "0.3"],
    "hydra-balance": [*PAPER, "--balance-loss-weight", "0.05"],
    "hydra-route-a": [*PAPER, "--router-input", "a"],
    "hydra-router-lr10": [*PAPER, "--router-lr-multiplier", "10"],
    "hydra-r11": [*PAPER, "--r", "11"],
    "hydra-random-init": RANDOM,
    "hydra-random-init-zero-router": [*RANDOM, "--router-init", "zero"],
    "hydra-random-init-head-dropout": [*RANDOM, "--head-dropout", "0.3"],
    "hydra-random-init-balance": [*RANDOM, "--balance-loss-weight", "0.05"],
    "hydra-random-init-router-lr10": [*RANDOM, "--router-lr-multiplier", "10"],
    # control: is random init's gain the heads' or the initialization's? (k = 1: a LoRA, A = 0)
    "hydra-one-head-random-init": [*RANDOM, "--num-heads", "1"],
    # routing that separates the domains (issue 16): an upper bound and two ways without labels
    "lora-r24": ["--method", "lora", "--r", "24"],
    # (k = 4, the mixture's domains and the automatic choice on it, pinned: small splits give 1)
    "hydra-default-k4": [*DEFAULT, "--num-heads", "4"],
    # issue 23: the paper's protocol: alpha 32 for every rank (the preset), then equal scale
    "paper-hydra-r8": ["--method", "hydralora", "--preset", "paper", "--r", "8", "--num-heads", "4"],
    "paper-lora-r8": ["--method", "lora", "--r", "8", "--alpha", "32"],
    "paper-lora-r32": ["--method", "lora", "--r", "32", "--alpha", "32"],
    "paper-lora-r32-scale4": ["--method", "lora", "--r", "32", "--alpha", "128"],
    # issue 23: the authors' training noise, a dropout mask per head
    "hydra-default-k4-per-head-masks": [*DEFAULT, "--num-heads", "4", "--dropout-masks", "per_head"],
    "hydra-oracle-domain": [*RANDOM, "--routing", "oracle", "--route-labels-from", "domain",
                            "--num-heads", "4"],
    "hydra-oracle-cluster": [*RANDOM, "--routing", "oracle", "--route-labels-from", "cluster",
                             "--num-heads", "4"],
    "hydra-guided": [*DEFAULT, "--num-heads", "4", *GUIDED],
    "hydra-guided-decay": [*DEFAULT, "--num-heads", "4", *GUIDED, "--guide-schedule", "decay"],
    "hydra-sequence": [*DEFAULT, "--num-heads", "4", "--routing", "sequence"],
    "hydra-sequence-top1-guided": [*DEFAULT, "--num-heads", "4", "--routing", "sequence",
                                   "--router", "topk", "--top-k", "1", *GUIDED],
}
SETS = {
    "main": ["base", "lora-r8", "lora-r16", "lora-r32", "lora-split-4x8", "hydra-auto",
             "hydra-uniform", "hydra-no-shared-a", "hydra-one-head"],
    # head diversity (issue 8): every option once (seed 0) against the LoRAs, then the best
    # options with every seed, at the reduced budget and at three times it
    "heads-screen": ["lora-r8", "lora-r16", "lora-r32", "lora-r32-alpha64", "hydra-auto",
                     "hydra-random-init", "hydra-r11", "hydra-router-lr10", "hydra-temperature",
                     "hydra-head-dropout", "hydra-balance", "hydra-route-a",
                     "hydra-random-init-zero-router", "hydra-random-init-router-lr10",
                     "hydra-random-init-head-dropout", "hydra-random-init-balance",
                     "hydra-one-head-random-init"],
    "heads": ["lora-r8", "lora-r16", "lora-r32", "lora-r32-alpha64", "hydra-auto",
              "hydra-random-init", "hydra-random-init-router-lr10", "hydra-one-head-random-init"],
    # issue 16: routing that separates the domains, against LoRAs of equal parameters and scale
    # issue 23: the paper's protocol (alpha 32 at every rank), and LoRA r=32 at HydraLoRA's scale
    "paper-protocol": ["paper-lora-r8", "paper-lora-r32", "paper-hydra-r8", "paper-lora-r32-scale4"],
    # issue 23: one dropout mask for every head (ours) or one per head (the authors')
    "masks": ["lora-r24", "hydra-default-k4", "hydra-default-k4-per-head-masks"],
    "routing": ["lora-r8", "lora-r24", "lora-r32", "hydra-one-head-random-init",
                "hydra-default-k4", "hydra-oracle-domain", "hydra-oracle-cluster",
                "hydra-guided", "hydra-guided-decay", "hydra-sequence", "hydra-sequence-top1-guided"],
}
LABELS = {
    "base": "base model (no training)",
    "lora-r8": "LoRA r=8",
    "lora-r16": "LoRA r=16",
    "lora-r32": "LoRA r=32",
    "lora-r32-alpha64": "LoRA r=32, alpha 64 (scaling 2 like r=8)",
    "lora-split-4x8": "LoRA-Split 4 x r=8",
    "hydra-auto": "HydraLoRA r=8, auto k (paper init: B = 0)",
    "hydra-uniform": "w/o gate (uniform router)",
    "hydra-no-shared-a": "w/o Hydra (one A per head)",
    "hydra-one-head": "w/o MoE (one head)",
    "hydra-random-init": "HydraLoRA, random heads (A = 0)",
    "hydra-random-init-zero-router": "HydraLoRA, random heads + zero router",
    "hydra-head-dropout": "HydraLoRA, head dropout 0.3",
    "hydra-temperature": "HydraLoRA, router temperature 0.3",
    "hydra-balance": "HydraLoRA, balance loss 0.05",
    "hydra-route-a": "HydraLoRA, routing on A x",
    "hydra-router-lr10": "HydraLoRA, router lr x10",
    "hydra-r11": "HydraLoRA r=11 (LoRA r=32 budget)",
    "hydra-random-init-router-lr10": "HydraLoRA, random heads + router lr x10",
    "hydra-random-init-head-dropout": "HydraLoRA, random heads + head dropout 0.3",
    "hydra-random-init-balance": "HydraLoRA, random heads + balance loss 0.05",
    "hydra-one-head-random-init": "control: one head, A = 0, B random (a LoRA)",
    "lora-r24": "LoRA r=24 (about HydraLoRA k=4's parameters)",
    "hydra-default-k4": "HydraLoRA k=4, random heads + router lr x10 (train's defaults)",
    "hydra-default-k4-per-head-masks": "HydraLoRA k=4, train's defaults + a dropout mask per head (the authors')",
    "paper-hydra-r8": "HydraLoRA r=8, k=4, the paper's recipe (alpha 32: scale 4)",
    "paper-lora-r8": "LoRA r=8, alpha 32 (scale 4)",
    "paper-lora-r32": "LoRA r=32, alpha 32 (scale 1)",
    "paper-lora-r32-scale4": "LoRA r=32, alpha 128 (scale 4, HydraLoRA's)",
    "hydra-oracle-domain": "HydraLoRA, oracle routing by domain (diagnostic)",
    "hydra-oracle-cluster": "HydraLoRA, oracle routing by k-means cluster (diagnostic)",
    "hydra-guided": "HydraLoRA, cluster-guided router (weight 1)",
    "hydra-guided-decay": "HydraLoRA, cluster-guided router (weight 1, decaying)",
    "hydra-sequence": "HydraLoRA, sequence-level routing",
    "hydra-sequence-top1-guided": "HydraLoRA, sequence-level top-1, cluster-guided",
}


THREADS: int | None = None  # torch threads per training run when runs share the machine (--jobs)
MODEL = "smollm2-135m"
VAL_PER_DOMAIN = 16  # examples per domain carved from the train split to choose learning rates


def run(cmd: list[str], log: Path, threads: int | None = None) -> None:
    try:
        run_command(cmd, log, threads)
    except TrainingError as err:
        raise SystemExit(str(err)) from None


def runs(root: Path, fresh: bool = False) -> Runs:
    return Runs(root, fresh=fresh, threads=THREADS, log=lambda message: print(f"[quality] {message}", flush=True))


def adapter_rank(name: str) -> int:
    """The rank of each LoRA (or of A) of a variant: --r, divided among LoRA-Split's adapters."""
    flags = canonical_flags(VARIANTS[name])
    r = int(flags.get("--r", ["8"])[0])
    if flags.get("--method", [""])[0] == "lora-split":
        r //= int(flags["--num-heads"][0])
    return r


def scaling_flags(name: str, rule: str) -> list[str]:
    """--alpha for a rank-independent update scale: '2r' (alpha = 2r: scaling 2 at every rank,
    as LoRA r=8 with alpha 16), 'rslora' (alpha / sqrt(r) = 2 sqrt(8) / sqrt(r): rsLoRA, equal
    to the others at r=8), 'fixed' (alpha 16 for every rank: the paper's habit). A variant that
    sets --alpha itself keeps it."""
    if rule == "fixed" or "--alpha" in VARIANTS[name]:
        return []
    r = adapter_rank(name)
    alpha = 2 * r if rule == "2r" else 2 * (8 ** 0.5) * (r ** 0.5)
    return ["--alpha", f"{alpha:g}"]


def strip_flags(argv: list[str], drop: tuple[str, ...]) -> list[str]:
    """`argv` without the flags in `drop` (and their values)."""
    out, skipping = [], False
    for token in argv:
        if token.startswith("--"):
            skipping = token in drop
        if not skipping:
            out.append(token)
    return out


def train_argv(name: str, seed: int, preset: dict) -> list[str]:
    """Every flag of a variant's training run except --output/--overwrite (which do not change
    what is trained). With carved data (--lr-grid) the run trains on the fit split and reports
    the test split; the learning rate is the preset's or the one chosen for the variant."""
    data = ["--data", "builtin", "--eval-data", "builtin"]
    train = preset["train"]
    if preset.get("carved"):
        data = ["--data", preset["carved"]["fit"], "--eval-data", preset["carved"]["test"]]
        train = strip_flags(train, ("--builtin-train-per-domain", "--builtin-test-per-domain"))
    lr = preset.get("lr_of", {}).get(name)
    return ["--model", MODEL, *data, "--seed", str(seed), *TARGETS, *train, *VARIANTS[name],
            *scaling_flags(name, preset.get("scaling", "fixed")), *(["--lr", lr] if lr else [])]


def carve_splits(root: Path, preset: dict) -> dict[str, str]:
    """The built-in mixture's train split cut into fit and validation parts (the last
    VAL_PER_DOMAIN examples of each domain, in file order), beside its test split: learning
    rates are chosen on validation, results reported on test."""
    flags = canonical_flags(preset["train"])
    sizes = [flags["--builtin-train-per-domain"][0], flags["--builtin-test-per-domain"][0]]
    folder = root / f"data-{flags_hash(sizes + [VAL_PER_DOMAIN])}"
    files = {k: str(folder / f"{k}.jsonl") for k in ("fit", "val", "test")}
    if all(Path(f).exists() for f in files.values()):
        return files
    run(cli("data", "builtin", "--output", str(folder), "--train-per-domain", sizes[0],
            "--test-per-domain", sizes[1]), root / "logs" / f"{folder.name}.log")
    records = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    by_domain: dict[str, list[dict]] = {}
    for record in records:
        by_domain.setdefault(record["domain"], []).append(record)
    val = [r for rs in by_domain.values() for r in rs[-VAL_PER_DOMAIN:]]
    fit = [r for r in records if not any(r is v for v in val)]
    for name, part in (("fit", fit), ("val", val)):
        Path(files[name]).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    return files


def val_loss(name: str, seed: int, preset: dict, root: Path) -> float:
    """Mean held-out loss of a trained run on the validation split (cached beside the run)."""
    out = run_dir(root, name, seed, preset)
    result = out / f"val-{flags_hash(file_sha256(Path(preset['carved']['val'])))}.json"
    if not result.exists():
        run(cli("eval", "--model", MODEL, "--adapter", str(out), "--data", preset["carved"]["val"],
                "--no-generate", "--output", str(result), "--overwrite"),
            root / "logs" / f"{out.name}.val.log")
    return json.loads(result.read_text())["loss"]["mean"]["loss"]


def choose_lrs(names: list[str], preset: dict, root: Path, args) -> dict[str, dict[str, float]]:
    """For every variant: train at each learning rate of the grid (first seed), measure the
    validation loss, keep the lowest. Returns {variant: {lr: validation loss}}."""
    grid: dict[str, dict[str, float]] = {}
    jobs = []
    for lr in args.lr_grid:
        trial = {**preset, "lr_of": {n: lr for n in names}}
        jobs += [(n, args.seeds_used[0], trial) for n in names]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda j: train_variant(j[0], j[1], j[2], root, args.fresh), jobs))
    for name, seed, trial in jobs:
        grid.setdefault(name, {})[trial["lr_of"][name]] = val_loss(name, seed, trial, root)
    return grid


def run_dir(root: Path, name: str, seed: int, preset: dict) -> Path:
    """A training run's folder: <variant>-s<seed>-<hash of its full flags>."""
    return runs(root).run_dir(name, seed, train_argv(name, seed, preset))


def is_complete(out: Path) -> bool:
    """A finished run: training wrote its summary and we recorded its flags and machine."""
    return runs(out.parent).is_complete(out)


def legacy_run_dirs(root: Path) -> list[Path]:
    """Training folders named <variant>-s<seed> with no flags hash (made before runs were keyed):
    their flags are unknown, so they are never reused. (base-s<seed>/ holds the base model's evals,
    keyed by file name; an old eval.json there is never read.)"""
    pattern = re.compile(r"(?P<name>.+)-s\d+")
    return sorted(p for p in root.glob("*-s*") if p.is_dir()
                  and (m := pattern.fullmatch(p.name)) and VARIANTS.get(m["name"]) is not None)


def warn_legacy(root: Path) -> None:
    old = legacy_run_dirs(root)
    if old:
        print(f"[quality] ignoring {len(old)} run folder(s) in {root} without a flags hash "
              f"({', '.join(p.name for p in old)}): their flags are unknown, so they are not "
              "reused; delete them once no longer needed", flush=True)


# --------------------------------------------------------------------------- training and eval
def train_variant(name: str, seed: int, preset: dict, root: Path, fresh: bool) -> dict:
    """Train (name, seed) into its flags-keyed folder, or reuse that folder when it is complete
    and its train_config.yaml agrees with the flags (hydralora.compare.runs)."""
    try:
        return runs(root, fresh).train(name, seed, train_argv(name, seed, preset))[1]
    except TrainingError as err:
        raise SystemExit(str(err)) from None


def eval_argv(preset: dict) -> list[str]:
    """The eval flags that change its result, but the adapter and the data (keyed separately)."""
    tasks = ["--max-new-tokens", str(preset["max_new_tokens"])] if preset["task_seeds"] else ["--no-generate"]
    return ["--model", MODEL, *tasks]


def eval_folder(name: str, seed: int, preset: dict, root: Path) -> tuple[Path, Path | None]:
    """(where the eval of (name, seed) is cached, the adapter: None for the base model)."""
    if VARIANTS[name] is None:
        return root / f"{name}-s{seed}", None
    folder = run_dir(root, name, seed, preset)
    return folder, folder


def eval_path(name: str, seed: int, preset: dict, root: Path, test_file: Path) -> Path:
    folder, adapter = eval_folder(name, seed, preset, root)
    return runs(root).eval_path(folder, eval_argv(preset), test_file, adapter)


def eval_variant(name: str, seed: int, preset: dict, root: Path, test_file: Path, fresh: bool) -> dict:
    folder, adapter = eval_folder(name, seed, preset, root)
    try:
        return runs(root, fresh).evaluate(folder, eval_argv(preset), test_file, adapter)
    except TrainingError as err:
        raise SystemExit(str(err)) from None


def train_all(jobs: list[tuple[str, int]], preset: dict, root: Path, args) -> dict:
    """Train every (variant, seed), args.jobs at a time; on a failure, start nothing more, let the
    running ones finish, and stop naming every failed run."""
    try:
        done = runs(root, args.fresh).train_all([(n, s, train_argv(n, s, preset)) for n, s in jobs], args.jobs)
    except TrainingError as err:
        raise SystemExit(str(err)) from None
    return {(name, seed): summary for (name, seed, _), (_, summary) in done.items()}


def mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = mean_sd(values)
    if m != m:
        return "-"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reduced")
    parser.add_argument("--set", choices=sorted(SETS), default="main",
                        help="main: the methods and ablations; heads: the head-diversity study")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="run these rows instead of the whole set (the report goes to the set's section)")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--root", default="runs/quality")
    parser.add_argument("--output", default="docs/results.md")
    parser.add_argument("--fresh", action="store_true", help="retrain even if a run exists")
    parser.add_argument("--no-tasks", action="store_true",
                        help="held-out loss only: skip the generation-based task metrics")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train this many runs at once (timings then share the machine)")
    parser.add_argument("--scaling", choices=["fixed", "2r", "rslora"], default="fixed",
                        help="update scale of every adapter: fixed alpha 16 (the paper's habit), "
                        "alpha = 2r, or rsLoRA's alpha/sqrt(r) (equal at r=8)")
    parser.add_argument("--lr-grid", nargs="+", metavar="LR",
                        help="choose each variant's learning rate from these on a validation split "
                        "carved from the training data (first seed), then report the test split")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    global THREADS
    THREADS = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    preset = dict(PRESETS[args.preset])
    if args.no_tasks:
        preset["task_seeds"] = []
    seeds = list(dict.fromkeys(args.seeds or preset["seeds"]))
    root = Path(args.root) / args.preset
    preset["scaling"] = args.scaling
    args.seeds_used = seeds
    started = time.time()
    rows: dict[str, dict] = {}
    test_file = None
    args.explicit = bool(args.variants)
    outside = [v for v in args.variants or [] if v not in SETS[args.set]]
    if outside:
        parser.error(f"{outside} are not rows of --set {args.set} ({', '.join(SETS[args.set])})")
    args.variants = list(dict.fromkeys(args.variants or SETS[args.set]))
    jobs = [(name, seed) for name in args.variants if VARIANTS[name] is not None for seed in seeds]
    warn_legacy(root)
    args.lr_choice = {}
    if args.lr_grid:
        root.mkdir(parents=True, exist_ok=True)
        preset["carved"] = carve_splits(root, preset)
        args.lr_choice = choose_lrs(list(dict.fromkeys(n for n, _ in jobs)), preset, root, args)
        preset["lr_of"] = {n: min(g, key=g.get) for n, g in args.lr_choice.items()}
    summaries = train_all(jobs, preset, root, args)
    # the section shows the whole set: rows not asked for this time come from runs on disk, when
    # a finished run with these exact flags is there
    for name in SETS[args.set]:
        if VARIANTS[name] is not None and name not in args.variants:
            for seed in seeds:
                out = run_dir(root, name, seed, preset)
                if is_complete(out) and not recorded_config_problems(out, train_argv(name, seed, preset)):
                    summaries[(name, seed)] = json.loads((out / "summary.json").read_text())
    for name in SETS[args.set]:
        done = [seed for seed in seeds if (name, seed) in summaries]
        if VARIANTS[name] is None or done:
            rows[name] = {"summaries": [summaries[(name, seed)] for seed in done], "seeds": done,
                          "evals": [], "eval_seeds": []}
    if preset.get("carved"):
        test_file = Path(preset["carved"]["test"])
    elif jobs:
        test_file = run_dir(root, *jobs[0], preset) / "data" / "test.jsonl"
    if test_file is None:
        raise SystemExit("train at least one variant: the held-out split is written by training")
    for name in rows:
        task_seeds = [0] if VARIANTS[name] is None else [s for s in preset["task_seeds"] if s in rows[name]["seeds"]]
        for seed in task_seeds:
            if name in args.variants or eval_path(name, seed, preset, root, test_file).exists():
                rows[name]["evals"].append(eval_variant(name, seed, preset, root, test_file, args.fresh))
                rows[name]["eval_seeds"].append(seed)
    wall = time.time() - started
    write_report(rows, args, preset, seeds, wall, run_machines(rows, preset, root, test_file))


def run_machines(rows: dict, preset: dict, root: Path, test_file: Path) -> dict[str, dict | None]:
    """{run label: its recorded machine} for every training run and eval the report shows."""
    machines: dict[str, dict | None] = {}
    for name, r in rows.items():
        if VARIANTS[name] is not None:
            for seed in r["seeds"]:
                machines[f"{name} s{seed}"] = read_machine(run_dir(root, name, seed, preset) / MACHINE_FILE)
        for seed in r["eval_seeds"]:
            result = eval_path(name, seed, preset, root, test_file)
            machines[f"{name} s{seed} eval"] = read_machine(eval_machine_path(result))
    return machines


def machines_text(machines: dict[str, dict | None]) -> tuple[str, list[str]]:
    """The machine the reported runs ran on, for the 'Made by' line; when they ran on several,
    a short note there and a list of the machines with their runs to follow it."""
    groups: dict[str, list[str]] = {}
    for label, machine in machines.items():
        groups.setdefault(describe_machine(machine), []).append(label)
    if len(groups) <= 1:
        return f"runs on {next(iter(groups), 'no machine (no runs)')}", []
    listing = [f"- {desc}: {', '.join(labels)}" for desc, labels in groups.items()]
    return f"runs came from {len(groups)} different machines, listed below", ["", *listing]


def write_report(rows: dict, args, preset: dict, seeds: list[int], wall: float,
                 machines: dict[str, dict | None]) -> None:
    """Write this run's section of the results file (other sections are kept) and its plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = ["math", "code", "topic", "headline"]
    section = (f"{args.set}-{args.preset}"  # --variants picks rows within the set's section
               + ("" if args.scaling == "fixed" else f"-{args.scaling}") + ("-lrgrid" if args.lr_grid else ""))
    out = Path(args.output)
    png = out.with_name(f"{out.stem}-{section}.png")
    where, machine_list = machines_text(machines)
    lines = [
        f"## {SECTION_TITLES[args.set]}: preset `{args.preset}`"
        + (f", scaling `{args.scaling}`" if args.scaling != "fixed" else "")
        + (", learning rate chosen per method" if args.lr_grid else ""),
        "",
        f"Made by `python benchmarks/quality.py --preset {args.preset} "
        + f"--set {args.set}" + (f" --variants {' '.join(args.variants)}" if args.explicit else "")
        + (f" --scaling {args.scaling}" if args.scaling != "fixed" else "")
        + (f" --lr-grid {' '.join(args.lr_grid)}" if args.lr_grid else "")
        + (" --no-tasks" if args.no_tasks else "") + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
        + f"` on {date.today()} ({where}); {wall / 60:.0f} min of work in the last invocation "
        "(runs found on disk with the same flags are reused and cost nothing)"
        + (f"; {args.jobs} runs trained at once, so the time, tokens/s and memory columns "
           "measure runs sharing the machine." if args.jobs > 1 else "."),
        *machine_list,
        "",
        f"Setup: SmolLM2-135M-Instruct, the built-in mixture (train/test split fixed), targets "
        f"gate/up/down_proj, training options `{' '.join(preset['train'])}` for every method; "
        f"seeds {seeds}. Held-out loss: mean cross-entropy per response token on the test split "
        f"(lower is better), mean ± sample standard deviation over seeds. "
        + (f"Task metrics (greedy, at most {preset['max_new_tokens']} new tokens): math exact "
           "match of the final number, code pass@1 (sandboxed), topic label accuracy, headline "
           f"ROUGE-L; on seeds {preset['task_seeds']}. " if preset["task_seeds"] else "")
        + "Head cos sim: mean pairwise cosine similarity of the B heads (1 = copies); domain "
        "spread: mean total-variation distance between the domains' mean gates (0 = same routing).",
        "",
    ]
    header = (["method", "trainable params", "% of model"] + [f"{d} loss" for d in domains]
              + ["mean loss"])
    if preset["task_seeds"]:
        header += [f"{d} score" for d in domains] + ["mean score"]
    header += ["head cos sim", "domain spread", "train s", "tokens/s", "peak RSS GiB"]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    plot_names, plot_means, plot_sds = [], [], []
    for name, r in rows.items():
        sums, evals = r["summaries"], r["evals"]
        if sums:
            losses = {d: [s["eval"]["fine-tuned"][d]["loss"] for s in sums] for d in domains + ["mean"]}
            params = sums[0]["trainable_params"]
            share = 100 * sums[0]["trainable_share"]
            extra = [fmt([s["diversity"]["head_cos_sim"] for s in sums if "head_cos_sim" in s.get("diversity", {})]),
                     fmt([s["diversity"]["domain_gate_spread"] for s in sums
                          if "domain_gate_spread" in s.get("diversity", {})]),
                     fmt([s["train_seconds"] for s in sums], 0),
                     fmt([s["tokens_per_second"] for s in sums], 0),
                     fmt([s["peak_memory_mb"] / 1024 for s in sums], 2)]
        else:
            losses = {d: [e["loss"][d]["loss"] for e in evals] for d in domains + ["mean"]}
            params, share, extra = 0, 0.0, ["-"] * 5
        cells = [LABELS[name], f"{params:,}", f"{share:.3f}"] + [fmt(losses[d]) for d in domains]
        cells.append(f"**{fmt(losses['mean'])}**")
        if preset["task_seeds"]:
            scores = {d: [e["tasks"][d]["score"] for e in evals if d in e.get("tasks", {})]
                      for d in domains + ["mean"]}
            cells += [fmt(scores[d]) for d in domains] + [fmt(scores["mean"])]
        lines.append("| " + " | ".join(cells + extra) + " |")
        m, sd = mean_sd(losses["mean"])
        plot_names.append(LABELS[name])
        plot_means.append(m)
        plot_sds.append(sd)
        r["mean_loss"] = losses["mean"]
        r["params"] = params
    if args.lr_choice:
        lines += ["", f"Learning rate per method: trained at each of {', '.join(args.lr_grid)} on the fit "
                  f"split (seed {seeds[0]}), chosen by the mean loss on {VAL_PER_DOMAIN} validation "
                  "examples per domain carved from the training data (the test split is not "
                  "used to choose); validation losses:", "",
                  "| method | " + " | ".join(f"lr {lr}" for lr in args.lr_grid) + " | chosen |",
                  "|---" * (len(args.lr_grid) + 2) + "|"]
        for name, grid in args.lr_choice.items():
            chosen = min(grid, key=grid.get)
            lines.append(f"| {LABELS[name]} | " + " | ".join(f"{grid[lr]:.4f}" for lr in args.lr_grid)
                         + f" | {chosen} |")
    lines += ["", verdict(rows), "", f"![mean held-out loss]({png.name})", ""]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(plot_names) + 1.2))
    ax.barh(plot_names[::-1], plot_means[::-1], xerr=plot_sds[::-1], color="tab:blue", alpha=0.8)
    ax.set_xlabel("mean held-out loss over the 4 domains (lower is better)")
    finite = [m for m in plot_means if m == m]
    if finite:
        ax.set_xlim(min(finite) * 0.95, max(finite) * 1.03)
    ax.set_title(f"{section}: mean ± sd over seeds {seeds}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    text = "\n".join(lines)
    replace_section(out, section, text)
    print(text)


SECTION_TITLES = {"main": "HydraLoRA against LoRA, LoRA-Split and the ablations",
                  "heads-screen": "Head diversity, screening: every option on one seed",
                  "heads": "Head diversity: options that give the heads a reason to differ",
                  "routing": "Routing that separates the domains: oracle, guided, sequence-level",
                  "paper-protocol": "The paper's protocol at our scale: alpha 32 at every rank, then equal scale",
                  "masks": "The authors' training noise: one dropout mask per head"}


def replace_section(path: Path, name: str, text: str) -> None:
    """Put `text` between this section's markers in `path`, keeping everything else."""
    begin, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    block = f"{begin}\n{text}\n{end}"
    old = path.read_text() if path.exists() else "# Results\n\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def paired(rows: dict, name: str, ref: str) -> list[float]:
    """Per-seed differences ref - name of the mean held-out loss (positive: `name` is lower).
    The same seed means the same data order, so these differences cancel the order's effect."""
    a = dict(zip(rows[name]["seeds"], rows[name]["mean_loss"]))
    b = dict(zip(rows[ref]["seeds"], rows[ref]["mean_loss"]))
    return [b[seed] - a[seed] for seed in sorted(a) if seed in b]


def verdict(rows: dict) -> str:
    """Sentences comparing HydraLoRA with each baseline on the mean held-out loss, and a table of
    differences paired by seed for every HydraLoRA row against the LoRA rows."""
    out = []
    if "hydra-auto" in rows and len(rows["hydra-auto"]["summaries"]) >= 2:
        hm, hs = mean_sd(rows["hydra-auto"]["mean_loss"])
        out.append(f"HydraLoRA r=8 (auto k, {rows['hydra-auto']['params']:,} parameters): mean held-out "
                   f"loss {hm:.3f} ± {hs:.3f}.")
        for name in rows:
            if name == "hydra-auto" or not rows[name]["summaries"]:
                continue
            m, s = mean_sd(rows[name]["mean_loss"])
            gap = m - hm
            word = ("within the seed spread of" if abs(gap) <= max(hs, s)
                    else "better than" if gap > 0 else "worse than")
            diffs = paired(rows, "hydra-auto", name)
            same = ("lower on every seed" if diffs and all(d > 0 for d in diffs)
                    else "higher on every seed" if diffs and all(d < 0 for d in diffs) else "mixed across seeds")
            out.append(f"- vs {LABELS[name]} ({rows[name]['params']:,} parameters, {m:.3f} ± {s:.3f}): "
                       f"HydraLoRA is {word} it (difference {gap:+.3f}; paired by seed "
                       f"{', '.join(f'{d:+.3f}' for d in diffs)}: HydraLoRA's loss {same}).")
    refs = [r for r in ("lora-r8", "lora-r16", "lora-r24", "lora-r32", "lora-r32-alpha64",
                        "hydra-one-head-random-init") if r in rows and rows[r]["summaries"]]
    hydras = [n for n in rows if n.startswith("hydra") and rows[n]["summaries"] and n not in refs]
    if refs and hydras:
        out += ["", "Loss below each LoRA and the one-head control, paired by seed (its loss minus "
                "this row's; positive = this row is better; one value per seed):", "",
                "| method | params | " + " | ".join(f"vs {LABELS[r]}" for r in refs) + " |",
                "|---|---|" + "---|" * len(refs)]
        for n in hydras:
            cells = []
            for r in refs:
                d = paired(rows, n, r)
                mark = " (better on every seed)" if len(d) > 1 and all(x > 0 for x in d) else ""
                cells.append(", ".join(f"{x:+.4f}" for x in d) + mark)
            out.append(f"| {LABELS[n]} | {rows[n]['params']:,} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
