"""Task metrics by generation: exact match of the final number (math), label accuracy
(classification), pass@1 in the sandbox (code), ROUGE-L (headline)."""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from typing import Any

from rouge_score import rouge_scorer

from ..data.builtin import METRICS
from ..errors import DataError
from .generation import generate
from .sandbox import check_program

# New tokens allowed per metric keep generation affordable.
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
    if metric not in MAX_NEW_TOKENS:
        raise DataError(f"{example.source}: unknown metric {metric!r}; use number, label, pass@1 or rouge-l")
    if metric == "pass@1" and not {"test", "entry_point"} <= set(example.meta):
        raise DataError(f"{example.source}: pass@1 needs 'test' and 'entry_point' fields")


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
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
        meta = example.meta
        result = check_program(code_program(generated, meta), meta["test"], meta["entry_point"],
                               timeout_s=timeout_s)
        return float(result.passed)
    return _rouge_scorer().score(example.response, generated)["rougeL"].fmeasure  # rouge-l


def metric_of(example) -> str | None:
    return example.meta.get("metric") or METRICS.get(example.domain or "")


def answer_budget(metric: str, max_new_tokens: int | None) -> int:
    """Tokens generated for an answer of `metric`: its own cap (MAX_NEW_TOKENS), lowered by
    --max-new-tokens where given."""
    return min(MAX_NEW_TOKENS.get(metric, 128), max_new_tokens or 10**6)


def task_metrics(model, tokenizer, examples, router=None, batch_size: int = 8,
                 max_new_tokens: int | None = None, keep_outputs: bool = False) -> dict[str, Any]:
    """{domain: {"metric", "score", "examples"}} by batched greedy generation; examples without
    a metric are skipped. `router` (LoRA-Split) picks each prompt's adapter. `max_new_tokens`
    caps the per-metric generation length (MAX_NEW_TOKENS)."""
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
                           max_new_tokens=answer_budget(metric, max_new_tokens),
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
