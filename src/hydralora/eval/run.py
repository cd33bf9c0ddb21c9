"""The `eval` and `generate` commands: their options and what they run."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base_models import DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_MODEL, QUANTIZE_MODES, check_placement
from ..data import DEFAULT_MAX_LENGTH, Example, load_examples, tokenize_examples
from ..data.builtin import BUILTIN, resolve_builtin
from ..errors import ConfigError
from ..files import write_text
from ..options import check_ranges
from ..methods import load_model_with_adapter
from ..methods.hydralora import oracle_labeler
from ..routing import attach_route_labels
from .generation import generate
from .loss import domain_losses
from .metrics import eval_table, task_metrics


@dataclass
class EvalOptions:
    """Per-domain held-out loss and task metrics of a base model or an adapter."""

    data: list[str] = field(default_factory=list, metadata={"required": True})
    """Held-out files, or 'builtin' (the built-in mixture's test split)."""
    model: str = DEFAULT_MODEL
    """Base model: hub id, local directory, .gguf file, or built-in name."""
    adapter: str | None = None
    """HydraLoRA, PEFT LoRA or LoRA-Split directory (none: the base model)."""
    output: str | None = None
    """Write the results here as JSON (refused if it exists)."""
    overwrite: bool = False
    """Allow replacing --output."""
    batch_size: int = 8
    """Examples per forward pass."""
    max_length: int = DEFAULT_MAX_LENGTH
    """Tokens per example; longer ones are truncated."""
    max_new_tokens: int | None = None
    """Cap on new tokens per answer (defaults per metric: number/pass@1 256, label 8, rouge-l 32)."""
    limit: int | None = None
    """At most N examples per domain."""
    generate: bool = True
    """Task metrics by generation (--no-generate: losses only)."""
    dtype: str = DEFAULT_DTYPE
    """Dtype of the base weights: auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16."""
    device: str = DEFAULT_DEVICE
    """Where the model runs: auto (the GPU when there is one), cpu, cuda or cuda:N."""
    quantize: str = field(default="none", metadata={"choices": QUANTIZE_MODES})
    """Load the base quantized by bitsandbytes: none, 4bit (nf4, as QLoRA) or 8bit."""

    def __post_init__(self) -> None:
        check_ranges(self, {"batch_size": ">=1", "max_length": ">=1", "max_new_tokens": "?>=1",
                            "limit": "?>=1"})
        check_placement(self.device, self.dtype, self.quantize)


@dataclass
class GenerateOptions:
    """Answer prompts with a base model and an optional adapter."""

    prompt: list[str] = field(default_factory=list, metadata={"required": True})
    """One or more prompts."""
    model: str = DEFAULT_MODEL
    """Base model: hub id, local directory, .gguf file, or built-in name."""
    adapter: str | None = None
    """Adapter directory (HydraLoRA, PEFT LoRA or LoRA-Split)."""
    max_new_tokens: int = 128
    """New tokens per answer at most."""
    sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 0.7
    """Sampling temperature (with --sample)."""
    dtype: str = DEFAULT_DTYPE
    """Dtype of the base weights: auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16."""
    device: str = DEFAULT_DEVICE
    """Where the model runs: auto (the GPU when there is one), cpu, cuda or cuda:N."""
    quantize: str = field(default="none", metadata={"choices": QUANTIZE_MODES})
    """Load the base quantized by bitsandbytes: none, 4bit (nf4, as QLoRA) or 8bit."""

    def __post_init__(self) -> None:
        check_ranges(self, {"max_new_tokens": ">=1", "temperature": ">0"})
        check_placement(self.device, self.dtype, self.quantize)


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
