"""Options of `hydralora demo` (run by demo.py) and `hydralora data builtin` (data/builtin.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import check_ranges
from .common import MAX_SEED, TEST_PER_DOMAIN, TRAIN_PER_DOMAIN, check_int_bounds


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
        check_int_bounds(self)


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
    overwrite: bool = False
    """Allow replacing the train.jsonl and test.jsonl of an earlier `data builtin` (never files it did not write)."""

    def __post_init__(self) -> None:
        check_ranges(self, {"train_per_domain": ">=1", "test_per_domain": ">=1", "seed": ">=0"})
        check_int_bounds(self, {"seed": MAX_SEED})
