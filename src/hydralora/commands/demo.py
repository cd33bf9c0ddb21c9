"""Options of `hydralora demo` (run by demo.py) and `hydralora data builtin` (data/builtin.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import check_ranges
from .common import TEST_PER_DOMAIN, TRAIN_PER_DOMAIN


@dataclass
class DemoOptions:
    """A short real fine-tune of SmolLM2 on the built-in mixture, with results printed."""

    output: str = "runs/demo"
    """Run directory."""
    max_steps: int = 6
    """Optimizer steps (8 examples each)."""
    method: str = field(default="hydralora", metadata={"choices": ("hydralora", "lora")})
    """hydralora, or lora (the PEFT LoRA baseline)."""

    def __post_init__(self) -> None:
        check_ranges(self, {"max_steps": ">=1"})


@dataclass
class BuiltinDataOptions:
    """Write the built-in mixture as train.jsonl and test.jsonl."""

    output: str = field(default="", metadata={"required": True})
    """Directory to write into."""
    train_per_domain: int = TRAIN_PER_DOMAIN
    """Examples per domain of the train split."""
    test_per_domain: int = TEST_PER_DOMAIN
    """Examples per domain of the test split."""
    seed: int = 0
    """Seed of the shuffle and split."""

    def __post_init__(self) -> None:
        check_ranges(self, {"train_per_domain": ">=1", "test_per_domain": ">=1", "seed": ">=0"})
