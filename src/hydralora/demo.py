"""`hydralora demo`: fine-tune SmolLM2-135M on the built-in mixture in a few minutes, show the
per-domain held-out loss before and after, and one generated answer per domain."""

from __future__ import annotations

import json
from pathlib import Path

from .commands.common import DEFAULT_MODEL
from .commands.demo import DemoOptions
from .data import Example, load_examples
from .eval.generation import generate
from .eval.loss import loss_table
from .train.config import TrainConfig
from .train.run import run_training

DEMO_SETTINGS = {
    "model": DEFAULT_MODEL,
    "data": ["builtin"],
    "eval_data": ["builtin"],
    "builtin_train_per_domain": 100,
    "builtin_test_per_domain": 8,
    "per_device_train_batch_size": 8,
    "max_length": 256,
    "learning_rate": 1e-3,
    "warmup_ratio": 0.05,
    "logging_steps": 4,
    "save_steps": 0,
    "overwrite": True,
    "skip_overlong": True,
}


def run_demo(opts: DemoOptions | None = None) -> dict:
    opts = opts or DemoOptions()
    cfg = TrainConfig(**DEMO_SETTINGS, output=opts.output, max_steps=opts.max_steps, method=opts.method)
    summary, model, tokenizer = run_training(cfg)
    print("\nHeld-out loss per domain (mean cross-entropy per response token, lower is better):")
    print(loss_table({"base model": summary["eval"]["base"],
                      summary["variant"]: summary["eval"]["fine-tuned"]}))
    print_samples(cfg, model, tokenizer)
    return summary


def print_samples(cfg: TrainConfig, model, tokenizer) -> None:
    """Generate one answer per domain of the held-out split with the trained adapter."""
    test = load_examples([Path(cfg.output) / "data" / "test.jsonl"])
    first: dict[str | None, Example] = {}
    for ex in test:
        first.setdefault(ex.domain, ex)
    examples = list(first.values())
    answers = generate(model, tokenizer, [ex.prompt_messages for ex in examples], max_new_tokens=48)
    print("\nOne held-out example per domain (greedy, 48 new tokens at most):")
    for ex, answer in zip(examples, answers):
        prompt = ex.prompt_messages[-1]["content"]
        print(f"\n--- {ex.domain} ---")
        print(f"prompt:    {_short(prompt, 160)}")
        print(f"reference: {_short(ex.response, 160)}")
        print(f"model:     {_short(answer, 240)}")


def _short(text: str, limit: int) -> str:
    text = json.dumps(text, ensure_ascii=False)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."
