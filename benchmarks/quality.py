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
Runs go to runs/quality/<variant>-s<seed>/ and are reused when their summary exists
(--fresh to retrain).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import date
from pathlib import Path

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
}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hydralora", *args]


THREADS: int | None = None  # torch threads per training run when runs share the machine (--jobs)


def run(cmd: list[str], log: Path, threads: int | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\nsee {log}")


def train_variant(name: str, seed: int, preset: dict, root: Path, fresh: bool) -> dict:
    out = root / f"{name}-s{seed}"
    if fresh or not (out / "summary.json").exists():
        cmd = cli("train", "--model", "smollm2-135m", "--data", "builtin", "--eval-data", "builtin",
                  "--output", str(out), "--seed", str(seed), "--overwrite", *TARGETS,
                  *preset["train"], *VARIANTS[name])
        print(f"[quality] train {name} seed {seed}", flush=True)
        run(cmd, root / "logs" / f"{name}-s{seed}.train.log", THREADS)
    return json.loads((out / "summary.json").read_text())


def eval_variant(name: str, seed: int, preset: dict, root: Path, test_file: Path, fresh: bool) -> dict:
    out = root / f"{name}-s{seed}"
    result = out / "eval.json"
    if fresh or not result.exists():
        out.mkdir(parents=True, exist_ok=True)
        adapter = [] if VARIANTS[name] is None else ["--adapter", str(out)]
        print(f"[quality] eval {name} seed {seed}", flush=True)
        tasks = ["--max-new-tokens", str(preset["max_new_tokens"])] if preset["task_seeds"] else ["--no-generate"]
        run(cli("eval", "--model", "smollm2-135m", *adapter, "--data", str(test_file),
                "--output", str(result), "--overwrite", *tasks),
            root / "logs" / f"{name}-s{seed}.eval.log")
    return json.loads(result.read_text())


def train_all(jobs: list[tuple[str, int]], preset: dict, root: Path, args) -> dict:
    """Train every (variant, seed), args.jobs at a time; on a failure, start nothing more, let the
    running ones finish, and stop naming every failed run."""
    summaries, failed = {}, []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(train_variant, name, seed, preset, root, args.fresh): (name, seed)
                   for name, seed in jobs}
        for future in as_completed(futures):
            try:
                summaries[futures[future]] = future.result()
            except SystemExit as err:
                failed.append(str(err))
                for other in futures:
                    other.cancel()
    if failed:
        raise SystemExit("\n".join(failed))
    return summaries


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
    started = time.time()
    rows: dict[str, dict] = {}
    test_file = None
    args.explicit = bool(args.variants)
    outside = [v for v in args.variants or [] if v not in SETS[args.set]]
    if outside:
        parser.error(f"{outside} are not rows of --set {args.set} ({', '.join(SETS[args.set])})")
    args.variants = list(dict.fromkeys(args.variants or SETS[args.set]))
    jobs = [(name, seed) for name in args.variants if VARIANTS[name] is not None for seed in seeds]
    summaries = train_all(jobs, preset, root, args)
    # the section shows the whole set: rows not asked for this time come from runs on disk
    for name in SETS[args.set]:
        if VARIANTS[name] is not None and name not in args.variants:
            for seed in seeds:
                path = root / f"{name}-s{seed}" / "summary.json"
                if path.exists():
                    summaries[(name, seed)] = json.loads(path.read_text())
    for name in SETS[args.set]:
        done = [seed for seed in seeds if (name, seed) in summaries]
        if VARIANTS[name] is None or done:
            rows[name] = {"summaries": [summaries[(name, seed)] for seed in done], "seeds": done, "evals": []}
    if jobs:
        test_file = root / f"{jobs[0][0]}-s{jobs[0][1]}" / "data" / "test.jsonl"
    if test_file is None:
        raise SystemExit("train at least one variant: the held-out split is written by training")
    for name in rows:
        task_seeds = [0] if VARIANTS[name] is None else [s for s in preset["task_seeds"] if s in rows[name]["seeds"]]
        for seed in task_seeds:
            if name in args.variants or (root / f"{name}-s{seed}" / "eval.json").exists():
                rows[name]["evals"].append(eval_variant(name, seed, preset, root, test_file, args.fresh))
    wall = time.time() - started
    write_report(rows, args, preset, seeds, wall)


def write_report(rows: dict, args, preset: dict, seeds: list[int], wall: float) -> None:
    """Write this run's section of the results file (other sections are kept) and its plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    domains = ["math", "code", "topic", "headline"]
    section = f"{args.set}-{args.preset}"  # --variants picks rows within the set's section
    out = Path(args.output)
    png = out.with_name(f"{out.stem}-{section}.png")
    lines = [
        f"## {SECTION_TITLES[args.set]}: preset `{args.preset}`",
        "",
        f"Made by `python benchmarks/quality.py --preset {args.preset} "
        + f"--set {args.set}" + (f" --variants {' '.join(args.variants)}" if args.explicit else "")
        + (" --no-tasks" if args.no_tasks else "") + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
        + f"` on {date.today()} ({platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, no GPU); {wall / 60:.0f} min of work in the last invocation "
        "(runs found on disk are reused and cost nothing)"
        + (f"; {args.jobs} runs trained at once, so the time, tokens/s and memory columns "
           "measure runs sharing the machine." if args.jobs > 1 else "."),
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
                  "heads": "Head diversity: options that give the heads a reason to differ"}


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
    refs = [r for r in ("lora-r8", "lora-r16", "lora-r32", "lora-r32-alpha64") if r in rows and rows[r]["summaries"]]
    hydras = [n for n in rows if n.startswith("hydra") and rows[n]["summaries"]]
    if refs and hydras:
        out += ["", "Loss below each LoRA, paired by seed (LoRA's loss minus this row's; positive = "
                "this row is better; one value per seed):", "",
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
