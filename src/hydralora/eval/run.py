"""The `eval` and `generate` commands: their options and what they run."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..commands.evaluate import EvalOptions, GenerateOptions
from ..data import Example, bos_ids, load_examples, render_prompt, tokenize_examples
from ..data.tokenize import char_bound
from ..data.words import names_a_mixture, resolve_words
from ..errors import ConfigError
from ..files import atomic_write, check_writable, record_written
from ..folders import claim
from ..methods import load_model_with_adapter
from ..methods.hydralora import oracle_labeler
from ..routing.labels import attach_route_labels
from .generation import generate
from .loss import domain_losses
from .metrics import answer_budget, eval_table, metric_of, task_metrics


def limit_per_domain(examples: list[Example], limit: int) -> list[Example]:
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for ex in examples:
        seen[ex.domain or "all"] += 1
        if seen[ex.domain or "all"] <= limit:
            kept.append(ex)
    return kept


def context_length(model, tokenizer) -> int | None:
    """How many tokens the model reads at most (prompt and answer), where its config says."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else None


def prompt_lengths(tokenizer, prompts: list[list[dict]], limit: int) -> list[int]:
    """Tokens each prompt takes as generation sees it (chat template and BOS included); a text
    longer than `limit` tokens can cover (`char_bound`) counts as limit + 1, untokenized."""
    bos = tokenizer.decode(bos_ids(tokenizer))
    bound = char_bound(tokenizer, limit + 1)
    texts = [bos + render_prompt(c, tokenizer) for c in prompts]
    return [limit + 1 if len(t) > bound else len(tokenizer(t, add_special_tokens=False)["input_ids"])
            for t in texts]


def check_new_tokens(model, tokenizer, max_new_tokens: int | None, prompts: list[list[dict]]) -> None:
    """For prompts the user typed (`generate`): each must leave room in the model's context for
    --max-new-tokens; past it generation runs on for nothing (or fails late, with absolute
    positions). Nothing to check where the model states no context."""
    limit = context_length(model, tokenizer)
    if not max_new_tokens or limit is None:
        return
    if max_new_tokens >= limit:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: the model reads at most {limit} tokens "
                          "(prompt and answer); give fewer")
    longest = max(prompt_lengths(tokenizer, prompts, limit), default=0)
    if longest + max_new_tokens > limit:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: the model reads at most {limit} tokens and "
                          f"the longest prompt takes {longest}; give at most {max(limit - longest, 0)}"
                          + (" or a shorter prompt" if longest < limit else "; shorten the prompt"))


def fitting_for_generation(model, tokenizer, max_new_tokens: int | None,
                           examples: list[Example]) -> tuple[list[Example], int]:
    """The held-out examples whose prompt leaves room in the model's context for their answer
    (the metric's token budget, lowered by --max-new-tokens), and how many did not: they are
    not generated (they still count in the held-out loss where they fit --max-length). Examples
    without a metric are kept (nothing is generated for them). An error when none fits."""
    limit = context_length(model, tokenizer)
    scored = [(i, m) for i, e in enumerate(examples) if (m := metric_of(e)) is not None]  # (position, metric)
    if limit is None or not scored:
        return examples, 0
    lengths = prompt_lengths(tokenizer, [examples[i].prompt_messages for i, _ in scored], limit)
    too_long = {i for (i, m), n in zip(scored, lengths) if n + answer_budget(m, max_new_tokens) > limit}
    kept = [e for i, e in enumerate(examples) if i not in too_long]
    dropped = len(too_long)
    if dropped == len(scored):
        raise ConfigError(f"no held-out prompt leaves room for its answer in the model's context of {limit} "
                          "tokens; give a smaller --max-new-tokens, shorter prompts, or --no-generate")
    return kept, dropped


def check_output_file(opts: EvalOptions) -> None:
    """Before any slow work: --output is a file name in a folder we may write into, not a file
    the tool did not write (with or without --overwrite), not an earlier result without it."""
    out = Path(opts.output)
    if out.is_dir() and not out.is_symlink():
        raise ConfigError(f"--output {opts.output} is a folder; give a file name for the JSON results")
    if out.is_symlink():
        raise ConfigError(f"--output {opts.output} is a symbolic link; give the file itself")
    claim(out.parent, [out.name], opts.overwrite, link_ok=True)
    if names_a_mixture(opts.data):
        claim(out.parent, [f"{out.stem}-data"], True, link_ok=True)
    check_writable(out.parent)


def run_eval(opts: EvalOptions, name: str | None = None) -> dict[str, Any]:
    """Evaluate a base model or an adapter on held-out files; print a table, optionally save JSON."""
    if opts.output:
        check_output_file(opts)
    data = opts.data
    if names_a_mixture(data):
        if not opts.output:
            raise ConfigError(f"--data {' '.join(data)} needs --output: the test split is written beside it")
        out = Path(opts.output)
        data = resolve_words(data, out.parent / f"{out.stem}-data", "test")
        record_written(out.parent, add=[f"{out.stem}-data"])
    examples = load_examples(data)
    if opts.limit:
        examples = limit_per_domain(examples, opts.limit)
    model, tokenizer, router = load_model_with_adapter(opts.model, opts.adapter, dtype=opts.dtype,
                                                       with_router=True, device=opts.device,
                                                       quantize=opts.quantize)
    generated, too_long = examples, 0
    if opts.generate:
        generated, too_long = fitting_for_generation(model, tokenizer, opts.max_new_tokens, examples)
        if too_long:
            print(f"[hydralora] generation: {too_long} of {len(examples)} prompts leave no room for their "
                  "answer in the model's context; scored without them")
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
        tasks = task_metrics(model, tokenizer, generated, router=router, batch_size=opts.batch_size,
                             max_new_tokens=opts.max_new_tokens, keep_outputs=True)
        result["outputs"] = tasks.pop("_outputs")
        result["tasks"] = tasks
        result["prompts_without_room"] = too_long
    label = name or (f"{opts.model} + {opts.adapter}" if opts.adapter else opts.model)
    print(eval_table({label: result}))
    if opts.output:
        path = Path(opts.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, exclusive=not opts.overwrite) as tmp:  # another eval's result: kept
            tmp.write_text(json.dumps(result, indent=2))
        record_written(path.parent, add=[path.name])
    return result


def run_generate(opts: GenerateOptions) -> list[str]:
    """Print (and return) the answer to every prompt."""
    model, tokenizer, router = load_model_with_adapter(opts.model, opts.adapter, dtype=opts.dtype,
                                                       with_router=True, device=opts.device,
                                                       quantize=opts.quantize)
    conversations = [[{"role": "user", "content": p}] for p in opts.prompt]
    check_new_tokens(model, tokenizer, opts.max_new_tokens, conversations)
    names = router.route(opts.prompt) if router else None
    answers = generate(model, tokenizer, conversations, max_new_tokens=opts.max_new_tokens,
                       do_sample=opts.sample, temperature=opts.temperature, adapter_names=names)
    for prompt, answer in zip(opts.prompt, answers):
        if len(opts.prompt) > 1:
            print(f"### {prompt}")
        print(answer)
    return answers
