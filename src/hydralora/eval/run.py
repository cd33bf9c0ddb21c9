"""The `eval` and `generate` commands: their options and what they run."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..commands.evaluate import EvalOptions, GenerateOptions
from ..data import Example, load_examples, tokenize_examples
from ..data.builtin import BUILTIN, resolve_builtin
from ..errors import ConfigError
from ..files import write_text
from ..methods import load_model_with_adapter
from ..methods.hydralora import oracle_labeler
from ..routing.labels import attach_route_labels
from .generation import generate
from .loss import domain_losses
from .metrics import eval_table, task_metrics


def limit_per_domain(examples: list[Example], limit: int) -> list[Example]:
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for ex in examples:
        seen[ex.domain or "all"] += 1
        if seen[ex.domain or "all"] <= limit:
            kept.append(ex)
    return kept


def run_eval(opts: EvalOptions, name: str | None = None) -> dict[str, Any]:
    """Evaluate a base model or an adapter on held-out files; print a table, optionally save JSON."""
    if opts.output and Path(opts.output).is_dir():
        raise ConfigError(f"--output {opts.output} is a folder; give a file name for the JSON results")
    if opts.output and Path(opts.output).exists() and not opts.overwrite:
        raise ConfigError(f"{opts.output} exists; choose another --output or pass --overwrite")
    data = opts.data
    if BUILTIN in data:
        if not opts.output:
            raise ConfigError("--data builtin needs --output: the test split is written beside it")
        out = Path(opts.output)
        data = resolve_builtin(data, out.parent / f"{out.stem}-data", "test")
    examples = load_examples(data)
    if opts.limit:
        examples = limit_per_domain(examples, opts.limit)
    model, tokenizer, router = load_model_with_adapter(opts.model, opts.adapter, dtype=opts.dtype,
                                                       with_router=True, device=opts.device,
                                                       quantize=opts.quantize)
    features, _ = tokenize_examples(examples, tokenizer, opts.max_length, skip_overlong=True)
    oracle = oracle_labeler(model, Path(opts.adapter)) if opts.adapter else None
    if oracle is not None:  # a diagnostic adapter: the gates come from each example's label
        if opts.generate:
            raise ConfigError(f"{opts.adapter} routes by oracle labels (a diagnostic): its "
                              "held-out loss is what it measures; pass --no-generate")
        attach_route_labels(features, *oracle)
    if router:
        for f, route in zip(features, router.route([f["instruction"] for f in features])):
            f["adapter_name"] = route
    result: dict[str, Any] = {"model": opts.model, "adapter": opts.adapter, "data": data,
                              "loss": domain_losses(model, features, tokenizer.pad_token_id,
                                                    batch_size=opts.batch_size)}
    if opts.generate:
        tasks = task_metrics(model, tokenizer, examples, router=router, batch_size=opts.batch_size,
                             max_new_tokens=opts.max_new_tokens, keep_outputs=True)
        result["outputs"] = tasks.pop("_outputs")
        result["tasks"] = tasks
    label = name or (f"{opts.model} + {opts.adapter}" if opts.adapter else opts.model)
    print(eval_table({label: result}))
    if opts.output:
        path = Path(opts.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(result, indent=2))
    return result


def run_generate(opts: GenerateOptions) -> list[str]:
    """Print (and return) the answer to every prompt."""
    model, tokenizer, router = load_model_with_adapter(opts.model, opts.adapter, dtype=opts.dtype,
                                                       with_router=True, device=opts.device,
                                                       quantize=opts.quantize)
    conversations = [[{"role": "user", "content": p}] for p in opts.prompt]
    names = router.route(opts.prompt) if router else None
    answers = generate(model, tokenizer, conversations, max_new_tokens=opts.max_new_tokens,
                       do_sample=opts.sample, temperature=opts.temperature, adapter_names=names)
    for prompt, answer in zip(opts.prompt, answers):
        if len(opts.prompt) > 1:
            print(f"### {prompt}")
        print(answer)
    return answers
