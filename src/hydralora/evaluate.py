"""Per-domain held-out loss and perplexity (token-weighted over the response tokens)."""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections import defaultdict
from typing import Any

import torch

from .data import Collator
from .loss import response_nll


def autocast_context(model: torch.nn.Module, bf16: bool):
    device = next(model.parameters()).device.type
    if bf16:
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def domain_losses(
    model: torch.nn.Module,
    features: list[dict[str, Any]],
    pad_token_id: int,
    batch_size: int = 8,
    bf16: bool = False,
) -> dict[str, dict[str, float]]:
    """{domain: {"loss", "ppl", "tokens", "examples"}} plus "mean": the macro mean over domains.

    Loss is the mean cross-entropy per response token of each domain (examples without a
    domain are grouped as "all").
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = Collator(pad_token_id)
    sums: dict[str, float] = defaultdict(float)
    tokens: dict[str, int] = defaultdict(int)
    examples: dict[str, int] = defaultdict(int)
    # longest first so padding waste is small and memory peaks early
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        chunk = [features[i] for i in order[start : start + batch_size]]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(chunk).items()}
        with autocast_context(model, bf16):
            nll, rows = response_nll(model, batch)
        per_row = torch.zeros(len(chunk)).index_add_(0, rows.cpu(), nll.cpu())
        counts = torch.bincount(rows.cpu(), minlength=len(chunk))
        for f, total, n in zip(chunk, per_row.tolist(), counts.tolist()):
            domain = f.get("domain") or "all"
            sums[domain] += total
            tokens[domain] += n
            examples[domain] += 1
    model.train(was_training)
    out: dict[str, dict[str, float]] = {}
    for domain in sorted(sums):
        loss = sums[domain] / max(tokens[domain], 1)
        out[domain] = {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": tokens[domain],
                       "examples": examples[domain]}
    if out:
        mean = sum(v["loss"] for v in out.values()) / len(out)
        out["mean"] = {"loss": mean, "ppl": math.exp(min(mean, 50)),
                       "tokens": sum(tokens.values()), "examples": sum(examples.values())}
    return out


def loss_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per model/run, one column per domain (held-out loss)."""
    domains = sorted({d for r in results.values() for d in r if d != "mean"})
    cols = domains + ["mean"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, res in results.items():
        cells = [f"{res[d]['loss']:.3f}" if d in res else "-" for d in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- task metrics
# The metric of a domain comes from each record's "metric" field; these are the defaults for
# the built-in mixture's domains. New tokens allowed per metric keep generation affordable.
DOMAIN_METRICS = {"math": "number", "code": "pass@1", "topic": "label", "headline": "rouge-l"}
MAX_NEW_TOKENS = {"number": 256, "pass@1": 256, "label": 8, "rouge-l": 32}
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer of a math solution: the number after '####', else the last number."""
    after = _NUMBER.findall(text.rsplit("####", 1)[1]) if "####" in text else []
    found = after[:1] or _NUMBER.findall(text)[-1:]
    return found[0].replace(",", "").rstrip(".") if found else None


def same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a.strip() == b.strip()


def normalize_label(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def code_program(generated: str, meta: dict[str, Any]) -> str:
    """The program to test: the prompt's code (imports, helpers, signature + docstring) followed
    by the generated body; when the model rewrote the whole function, its definition simply
    replaces the prompt's docstring-only one, and the prompt's helpers stay available."""
    fenced = re.findall(r"```(?:python)?\n(.*?)(?:```|$)", generated, flags=re.S)
    code = fenced[0] if fenced else generated
    prefix = meta.get("code_prefix", "")
    entry = meta.get("entry_point", "")
    if entry and re.search(rf"^def {re.escape(entry)}\(", code, flags=re.M):
        return f"{prefix}\n    pass\n\n{code}"  # the prompt's function gets a body, then is redefined
    return prefix + code


def check_metric(metric: str, example) -> None:
    """A DataError naming the example when `metric` cannot score it."""
    from .data import DataError

    if metric not in MAX_NEW_TOKENS:
        raise DataError(f"{example.source}: unknown metric {metric!r}; use number, label, pass@1 or rouge-l")
    if metric == "pass@1" and not {"test", "entry_point"} <= set(example.meta):
        raise DataError(f"{example.source}: pass@1 needs 'test' and 'entry_point' fields")


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def score(metric: str, generated: str, example, timeout_s: float = 10.0) -> float:
    """One example's score in [0, 1] under `metric`."""
    check_metric(metric, example)
    if metric == "number":
        return float(same_number(final_number(generated), example.meta.get("answer")
                                 or final_number(example.response)))
    if metric == "label":
        reference = example.meta.get("label") or example.response
        return float(normalize_label(generated) == normalize_label(reference))
    if metric == "pass@1":
        from .eval.sandbox import check_program

        meta = example.meta
        result = check_program(code_program(generated, meta), meta["test"], meta["entry_point"],
                               timeout_s=timeout_s)
        return float(result.passed)
    return _rouge_scorer().score(example.response, generated)["rougeL"].fmeasure  # rouge-l


def metric_of(example) -> str | None:
    return example.meta.get("metric") or DOMAIN_METRICS.get(example.domain or "")


def task_metrics(model, tokenizer, examples, router=None, batch_size: int = 8,
                 max_new_tokens: int | None = None, keep_outputs: bool = False) -> dict[str, Any]:
    """{domain: {"metric", "score", "examples"}} by batched greedy generation; examples without
    a metric are skipped. `router` (LoRA-Split) picks each prompt's adapter. `max_new_tokens`
    caps the per-metric generation length (MAX_NEW_TOKENS)."""
    from .generation import generate

    by_metric: dict[str, list] = defaultdict(list)
    for ex in examples:  # check every example before any (slow) generation
        metric = metric_of(ex)
        if metric is None:
            continue
        check_metric(metric, ex)
        by_metric[metric].append(ex)
    scores: dict[str, list[float]] = defaultdict(list)
    metric_name: dict[str, str] = {}
    outputs = []
    for metric, group in by_metric.items():
        names = router.route([e.instruction for e in group]) if router else None
        answers = generate(model, tokenizer, [e.prompt_messages for e in group],
                           max_new_tokens=min(MAX_NEW_TOKENS.get(metric, 128), max_new_tokens or 10**6),
                           batch_size=batch_size, adapter_names=names)
        for ex, answer in zip(group, answers):
            value = score(metric, answer, ex)
            domain = ex.domain or "all"
            scores[domain].append(value)
            metric_name[domain] = metric
            if keep_outputs:
                outputs.append({"source": ex.source, "domain": domain, "metric": metric,
                                "output": answer, "score": value})
    result: dict[str, Any] = {
        d: {"metric": metric_name[d], "score": sum(v) / len(v), "examples": len(v)}
        for d, v in sorted(scores.items())
    }
    if result:
        result["mean"] = {"metric": "mean", "score": sum(r["score"] for r in result.values()) / len(result),
                          "examples": sum(r["examples"] for r in result.values())}
    if keep_outputs:
        result["_outputs"] = outputs
    return result


def eval_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: per model, held-out loss and task score per domain."""
    domains = sorted({d for r in rows.values() for d in r.get("loss", {}) if d != "mean"}
                     | {d for r in rows.values() for d in r.get("tasks", {}) if not d.startswith(("mean", "_"))})
    header = ["model"] + [f"{d} loss" for d in domains] + ["mean loss"]
    metrics = {d: r["tasks"][d]["metric"] for r in rows.values() for d in r.get("tasks", {})
               if not d.startswith(("mean", "_"))}
    header += [f"{d} {metrics[d]}" for d in domains if d in metrics] + (["mean score"] if metrics else [])
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, r in rows.items():
        loss, tasks = r.get("loss", {}), r.get("tasks", {})
        cells = [f"{loss[d]['loss']:.3f}" if d in loss else "-" for d in domains + ["mean"]]
        cells += [f"{tasks[d]['score']:.3f}" if d in tasks else "-" for d in domains if d in metrics]
        if metrics:
            cells.append(f"{tasks['mean']['score']:.3f}" if "mean" in tasks else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_eval(model_name: str, adapter: str | None, data: list[str], output: str | None = None,
             batch_size: int = 8, max_length: int = 512, max_new_tokens: int | None = None,
             limit: int | None = None, generate_tasks: bool = True, dtype: str = "float32",
             name: str | None = None) -> dict[str, Any]:
    """Evaluate a base model or an adapter on held-out files; print a table, optionally save JSON."""
    import json
    from pathlib import Path

    from .config import ConfigError
    from .data import load_examples, tokenize_examples
    from .models import load_model_with_adapter

    if "builtin" in data:
        from .mixtures import resolve_builtin

        if not output:
            raise ConfigError("--data builtin needs --output: the test split is written beside it")
        data = resolve_builtin(data, Path(output).parent / f"{Path(output).stem}-data", "test")
    examples = load_examples(data)
    if limit:
        seen: dict[str, int] = defaultdict(int)
        kept = []
        for ex in examples:
            seen[ex.domain or "all"] += 1
            if seen[ex.domain or "all"] <= limit:
                kept.append(ex)
        examples = kept
    model, tokenizer, router = load_model_with_adapter(model_name, adapter, dtype=dtype, with_router=True)
    features, _ = tokenize_examples(examples, tokenizer, max_length, skip_overlong=True)
    if router:
        for f, route in zip(features, router.route([f["instruction"] for f in features])):
            f["adapter_name"] = route
    result: dict[str, Any] = {"model": model_name, "adapter": adapter, "data": data,
                              "loss": domain_losses(model, features, tokenizer.pad_token_id,
                                                    batch_size=batch_size)}
    if generate_tasks:
        tasks = task_metrics(model, tokenizer, examples, router=router, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, keep_outputs=True)
        result["outputs"] = tasks.pop("_outputs")
        result["tasks"] = tasks
    label = name or (f"{model_name} + {adapter}" if adapter else model_name)
    print(eval_table({label: result}))
    if output:
        from .model import atomic_write

        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
    return result
