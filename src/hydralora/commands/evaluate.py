"""Options of `hydralora eval` and `hydralora generate` (run by eval/run.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import check_ranges
from .common import (DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_MAX_LENGTH, DEFAULT_MODEL, QUANTIZE_MODES,
                     check_int_bounds, check_placement)


@dataclass
class EvalOptions:
    """Per-domain held-out loss and task metrics of a base model or an adapter."""

    data: list[str] = field(default_factory=list, metadata={"required": True})
    """Held-out files, or 'builtin' / 'builtin-conflict' (a built-in mixture's test split)."""
    model: str = DEFAULT_MODEL
    """Base model: hub id, local directory, .gguf file, or built-in name."""
    adapter: str | None = None
    """HydraLoRA, PEFT LoRA or LoRA-Split directory (none: the base model)."""
    output: str | None = None
    """Write the results here as JSON (refused if it exists)."""
    overwrite: bool = False
    """Allow replacing the --output of an earlier eval (never a file it did not write)."""
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
        check_int_bounds(self)
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
        check_int_bounds(self)
        check_placement(self.device, self.dtype, self.quantize)
