"""`hydralora compare`: does HydraLoRA pay on this data, on this model?

Trains, with paired seeds and every other flag equal:
  lora       PEFT LoRA whose rank gives HydraLoRA's trainable-parameter count, at the same
             update scale (alpha_L / r_L = alpha / r)
  hydralora  HydraLoRA with the recommended preset (r, k heads)
  control    one head with HydraLoRA's initialization (a LoRA r with A = 0, B random): what
             the heads add beyond the initialization
  oracle     every example routed to the head of its domain (a diagnostic upper bound of
             routing; only when every example has a domain)
and, when asked for by name (`--rows`), two variants of the HydraLoRA row that try to close a
gap between learned and oracle routing:
  sequence   one gate vector per example from its prompt (routing='sequence')
  per-head   each head draws its own dropout mask, as in the authors' code (dropout_masks='per_head')
each at its own learning rate, chosen on a validation split carved from the training data
(the first seed, `--lr-grid`), then every seed at that rate; held-out loss on --eval-data (or a
test split carved from the data). Writes DIR/compare.json (`rows`, `verdict`), compare.md (the
table) and compare.png, and prints the table and a one-line verdict. Runs live in DIR/runs,
keyed by their flags (compare/runs.py): an interrupted compare resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
import statistics
from pathlib import Path
from typing import Any

from ..commands.compare import OWNED_FLAGS, CompareOptions
from ..config import HydraLoraConfig
from ..data import load_examples
from ..data.words import WORDS, resolve_words
from ..errors import ConfigError, DataError
from ..files import write_json, write_text
from ..options import normalize_targets, option_label
from ..train.config import TrainConfig
from .runs import Runs, describe_machine, machine_info

LABELS = {"base": "base model (no training)", "lora": "LoRA, HydraLoRA's parameter count",
          "hydralora": "HydraLoRA (recommended preset)", "control": "control: one head, same init",
          "oracle": "HydraLoRA, oracle routing by domain",
          "sequence": "HydraLoRA, routed per example (prompt)", "per-head": "HydraLoRA, per-head dropout masks"}
VARIANTS = {"sequence": ["--routing", "sequence"], "per-head": ["--dropout-masks", "per_head"]}


def log(message: str) -> None:
    print(f"[compare] {message}", flush=True)


# ------------------------------------------------------------------------------ data
def example_record(example) -> dict[str, Any]:
    record: dict[str, Any] = {"messages": example.messages}
    if example.domain is not None:
        record["domain"] = example.domain
    return record


def write_examples(path: Path, examples: list) -> str:
    write_text(path, "".join(json.dumps(example_record(e), ensure_ascii=False) + "\n" for e in examples))
    return str(path)


def prepare_data(opts: CompareOptions, folder: Path) -> dict[str, Any]:
    """fit / val / test JSONL files (val carved from --data; test from --eval-data, the built-in
    test split, or carved too) and the domains of the training data (None if not all have one)."""
    folder.mkdir(parents=True, exist_ok=True)
    examples = load_examples(resolve_words(opts.data, folder / "builtin", "train"))
    domains = [e.domain for e in examples]
    labeled = all(domains)
    if labeled:
        groups: dict[str, list] = {}
        for e in examples:
            groups.setdefault(e.domain, []).append(e)
        val = [e for g in groups.values() for e in g[-opts.val_per_domain:]]
        rest = {d: g[:-opts.val_per_domain] for d, g in groups.items()}
    else:
        cut = max(1, len(examples) // 10)
        val, rest = examples[-cut:], {"all": examples[:-cut]}
    held_out = opts.eval_data or ([p for p in opts.data if p in WORDS] if set(opts.data) <= set(WORDS) else [])
    if held_out:
        test = load_examples(resolve_words(held_out, folder / "builtin", "test"))
        fit = [e for g in rest.values() for e in g]
    else:  # carve a test split too
        per = opts.test_per_domain if labeled else max(1, len(examples) // 10)
        test = [e for g in rest.values() for e in g[-per:]]
        fit = [e for g in rest.values() for e in g[:-per]]
    if min(len(fit), len(val), len(test)) == 0:
        raise DataError(f"--data {' '.join(opts.data)}: too few examples to carve fit, validation and "
                        f"test splits ({len(fit)}, {len(val)}, {len(test)}); give more data, lower "
                        "--val-per-domain / --test-per-domain, or give --eval-data")
    return {"fit": write_examples(folder / "fit.jsonl", fit), "val": write_examples(folder / "val.jsonl", val),
            "test": write_examples(folder / "test.jsonl", test), "sizes": [len(fit), len(val), len(test)],
            "domains": sorted(set(domains)) if labeled else None}


# ------------------------------------------------------------------------------ parameters
def layer_shapes(model: str, targets: list[str] | str, trust_remote_code: bool = False) -> list[tuple[int, int]]:
    """(in, out) of every layer `targets` selects in `model`, from its config alone (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..base_models import resolve_model_path
    from ..layer import base_io
    from ..model import find_targets

    path, extra = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [base_io(module) for _, module in find_targets(skeleton, targets)]


def parameter_counts(shapes: list[tuple[int, int]], r: int, k: int, domains: int | None) -> dict[str, int]:
    """Trainable parameters of each row, and LoRA's rank for HydraLoRA's count."""
    hydra = sum(r * i + k * o * r + k * i for i, o in shapes)  # A, k heads B, router on x
    per_rank = sum(i + o for i, o in shapes)
    lora_rank = max(1, round(hydra / per_rank))
    counts = {"hydralora": hydra, "lora": lora_rank * per_rank, "lora_rank": lora_rank,
              "control": sum(r * i + o * r for i, o in shapes)}
    if domains:
        counts["oracle"] = sum(r * i + domains * o * r for i, o in shapes)  # no router
    return counts


def row_flags(row: str, opts: CompareOptions, counts: dict[str, int], domains: list[str] | None) -> list[str]:
    r, k, scale = opts.r, opts.num_heads, opts.scale
    if row == "lora":
        rank = counts["lora_rank"]
        return ["--method", "lora", "--r", str(rank), "--alpha", f"{scale * rank:g}"]
    heads = {"control": 1, "oracle": len(domains or [])}.get(row, k)  # the variants keep k
    flags = ["--method", "hydralora", "--preset", "recommended", "--r", str(r), "--num-heads", str(heads),
             "--alpha", f"{scale * r:g}"]
    if row == "oracle":
        flags += ["--routing", "oracle", "--route-labels-from", "domain"]
    return flags + VARIANTS.get(row, [])


# ------------------------------------------------------------------------------ the comparison
def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict_line(rows: dict[str, dict], seeds: list[str]) -> str:
    """One line from the paired held-out losses of HydraLoRA and LoRA of equal size, and of the
    one-head control when HydraLoRA's win over LoRA is its initialization's."""
    hydra, lora = rows["hydralora"]["loss"], rows["lora"]["loss"]
    diffs = [lora[s] - hydra[s] for s in seeds]  # > 0: HydraLoRA lower (better)
    mean, wins = statistics.mean(diffs), sum(d > 0 for d in diffs)
    n = len(seeds)
    every = "every seed" if n > 1 else "the seed"
    if wins == n:
        line = (f"HydraLoRA beats LoRA of equal size by {mean:.3f} held-out loss (mean of {n} paired "
                f"seed{'s' if n > 1 else ''}; lower on {every})")
        if "control" in rows and all(rows["control"]["loss"][s] < hydra[s] for s in seeds):
            # the win is HydraLoRA's initialization, not its heads: one head of it does better
            gap = statistics.mean(hydra[s] - rows["control"]["loss"][s] for s in seeds)
            return (f"{line}, but one head with its initialization is better still by {gap:.3f} on "
                    f"{every}: the heads do not pay here, the initialization does.")
        return line + "."
    if mean > 0:
        return (f"HydraLoRA does not pay here: ahead of LoRA of equal size by {mean:.3f} on average "
                f"but lower on only {wins} of {n} seeds.")
    return (f"HydraLoRA does not pay here: LoRA of equal size is better by {-mean:.3f} held-out loss "
            f"(mean of {n} paired seed{'s' if n > 1 else ''}; HydraLoRA lower on {wins} of {n}).")


def diagnosis(rows: dict[str, dict], seeds: list[str]) -> list[str]:
    """What the control and oracle rows say, in a line each."""
    lines = []
    lora = statistics.mean(rows["lora"]["loss"][s] for s in seeds)
    hydra = statistics.mean(rows["hydralora"]["loss"][s] for s in seeds)
    if "control" in rows:
        control = statistics.mean(rows["control"]["loss"][s] for s in seeds)
        lines.append(f"The heads {'add' if hydra < control else 'do not add'} over one head with the same "
                     f"initialization ({hydra:.3f} against {control:.3f}).")
    if "oracle" in rows:
        oracle = statistics.mean(rows["oracle"]["loss"][s] for s in seeds)
        if oracle < lora <= hydra:
            lines.append(f"Oracle routing beats LoRA ({oracle:.3f} against {lora:.3f}) and the learned "
                         "router does not: the router is the bottleneck here.")
        elif oracle >= lora:
            lines.append(f"Even oracle routing does not beat LoRA of equal size ({oracle:.3f} against "
                         f"{lora:.3f}): separate heads per domain do not pay on this data at this budget.")
        else:
            lines.append(f"Oracle routing: {oracle:.3f}.")
    for name in VARIANTS:
        if name in rows:
            variant = statistics.mean(rows[name]["loss"][s] for s in seeds)
            ahead = sum(rows[name]["loss"][s] < rows["hydralora"]["loss"][s] for s in seeds)
            lines.append(f"{LABELS[name]}: {variant:.3f} against {hydra:.3f} for the recommended preset "
                         f"(lower on {ahead} of {len(seeds)} seeds) and {lora:.3f} for LoRA.")
    return lines


def table(rows: dict[str, dict], seeds: list[str], base: float | None) -> str:
    head = ["method", "trainable params", "lr"] + [f"seed {s}" for s in seeds] + ["mean", "vs LoRA (paired)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    if base is not None:
        lines.append("| " + " | ".join([LABELS["base"], "0", "-"] + ["-"] * len(seeds) + [f"{base:.3f}", "-"]) + " |")
    for name, row in rows.items():
        m, sd = mean_sd([row["loss"][s] for s in seeds])
        paired = "-" if name == "lora" else ", ".join(f"{row['paired_vs_lora'][s]:+.3f}" for s in seeds)
        cells = [LABELS[name], f"{row['trainable_params']:,}", row["lr"], *(f"{row['loss'][s]:.3f}" for s in seeds),
                 f"{m:.3f}" + (f" ± {sd:.3f}" if len(seeds) > 1 else ""), paired]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], seeds: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.6 + 1.4 * len(rows), 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    names = list(rows)
    means = [statistics.mean(rows[n]["loss"][s] for s in seeds) for n in names]
    ax.bar(range(len(names)), means, color="#9ab", width=0.6)
    for i, n in enumerate(names):
        ax.plot([i] * len(seeds), [rows[n]["loss"][s] for s in seeds], "o", color="#234", ms=4)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)  # the row names of --rows (the labels are long and alike)
    low, high = min(min(rows[n]["loss"].values()) for n in names), max(max(rows[n]["loss"].values()) for n in names)
    ax.set_ylim(low - 0.1 * (high - low + 1e-3) - 0.02, high + 0.1 * (high - low + 1e-3) + 0.02)
    ax.set_ylabel("held-out loss (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_compare(opts: CompareOptions) -> dict[str, Any]:
    given = opts.train_values  # the training flags, as train's own parser read them
    owned = sorted(set(OWNED_FLAGS) & set(given))
    if owned:
        names = [option_label(TrainConfig if o in {f.name for f in fields(TrainConfig)} else HydraLoraConfig, o)
                 for o in owned]
        raise ConfigError(f"compare sets {', '.join(names)} itself "
                          "for every run; give the compare flags (--r, --num-heads, --alpha, --lr-grid, "
                          "--seeds, --model, --data, --eval-data) instead")
    if "per-head" in opts.rows and given.get("dropout") == 0:
        raise ConfigError("--rows per-head: per-head dropout masks need --dropout above 0")
    if "sequence" in opts.rows and given.get("packing"):
        raise ConfigError("--rows sequence: routing per example does not work with --packing; drop one")
    targets = normalize_targets(given.get("target_modules") or HydraLoraConfig().target_modules)
    HydraLoraConfig(target_modules=targets)  # checked before any file is written (as train checks it)
    out = Path(opts.output)
    data = prepare_data(opts, out / "data")
    rows = [r for r in opts.rows if r != "oracle" or data["domains"]]
    if "oracle" in opts.rows and not data["domains"]:
        log("no oracle row: not every training example has a domain")
    counts = parameter_counts(layer_shapes(opts.model, targets,
                                           given.get("trust_remote_code", False)),
                              opts.r, opts.num_heads, len(data["domains"] or []) or None)
    common = ["--model", opts.model, "--data", data["fit"], "--eval-data", data["val"], "--no-eval-base",
              *opts.train_args]
    runs = Runs(out / "runs", fresh=opts.fresh, log=log,
                threads=max(1, (os.cpu_count() or 1) // opts.jobs) if opts.jobs > 1 else None)
    argv = {(row, lr, seed): [*common, *row_flags(row, opts, counts, data["domains"]), "--lr", lr, "--seed", seed]
            for row in rows for lr in opts.lr_grid for seed in opts.seeds}
    first = opts.seeds[0]
    log(f"{len(rows)} methods x {len(opts.lr_grid)} learning rates on seed {first}, then "
        f"{len(opts.seeds) - 1} more seed(s) at the chosen rate; data: {data['sizes'][0]} fit, "
        f"{data['sizes'][1]} validation, {data['sizes'][2]} test examples")
    grid = runs.train_all([(f"{row}-lr{lr}", first, argv[row, lr, first]) for row in rows for lr in opts.lr_grid],
                          opts.jobs)
    val = {row: {lr: grid[f"{row}-lr{lr}", first, tuple(argv[row, lr, first])][1]["eval"]["fine-tuned"]["mean"]["loss"]
                 for lr in opts.lr_grid} for row in rows}
    chosen = {row: min(val[row], key=val[row].get) for row in rows}
    for row in rows:
        log(f"{row}: validation loss " + ", ".join(f"lr {lr} {v:.4f}" for lr, v in val[row].items())
            + f" -> lr {chosen[row]}")
    final = runs.train_all([(f"{row}-lr{chosen[row]}", s, argv[row, chosen[row], s])
                            for row in rows for s in opts.seeds], opts.jobs)
    eval_flags = ["--model", opts.model, "--no-generate",
                  *(["--max-length", str(given["max_length"])] if given.get("max_length") else [])]
    test = Path(data["test"])
    trained = {(row, s): final[f"{row}-lr{chosen[row]}", s, tuple(argv[row, chosen[row], s])]
               for row in rows for s in opts.seeds}
    scores = runs.evaluate_all({key: (folder, eval_flags, test, folder) for key, (folder, _) in trained.items()}
                               | {"base": (out / "runs" / "base", eval_flags, test, None)}, opts.jobs)
    result: dict[str, dict] = {}
    for row in rows:
        result[row] = {"label": LABELS[row], "lr": chosen[row], "validation_loss_by_lr": val[row],
                       "trainable_params": trained[row, opts.seeds[0]][1]["trainable_params"],
                       "loss": {s: scores[row, s]["loss"]["mean"]["loss"] for s in opts.seeds}}
    for row, entry in result.items():
        entry["paired_vs_lora"] = {s: result["lora"]["loss"][s] - entry["loss"][s] for s in opts.seeds}
        entry["mean"], entry["sd"] = mean_sd(list(entry["loss"].values()))
    base = scores["base"]["loss"]["mean"]["loss"]
    verdict = verdict_line(result, opts.seeds)
    notes = diagnosis(result, opts.seeds)
    text = table(result, opts.seeds, base)
    report = {"rows": [{"name": n, **e} for n, e in result.items()], "verdict": verdict, "notes": notes,
              "base_loss": base, "data": data, "lora_rank": counts["lora_rank"], "scale": opts.scale,
              "seeds": opts.seeds, "lr_grid": opts.lr_grid, "train_args": opts.train_args,
              "machine": describe_machine(machine_info())}
    write_json(out / "compare.json", report)
    write_text(out / "compare.md", f"{text}\n\n{verdict}\n" + "".join(f"{n}\n" for n in notes))
    plot(result, opts.seeds, out / "compare.png")
    print(f"\n{text}\n\n{verdict}\n" + "\n".join(notes) + f"\n\n(written: {out / 'compare.json'}, "
          f"{out / 'compare.md'}, {out / 'compare.png'})", flush=True)
    return report
