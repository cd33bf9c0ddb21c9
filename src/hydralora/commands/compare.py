"""Options of `hydralora compare` (run by compare/report.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..options import check_ranges
from .common import DEFAULT_MODEL

ROWS = ("lora", "hydralora", "control", "oracle", "sequence", "per-head")
DEFAULT_ROWS = ROWS[:4]  # the variants (sequence, per-head) are asked for by name
# flags compare sets itself for each run; given among the training flags they are an error
OWNED_FLAGS = ("method", "r", "num_heads", "alpha", "routing", "route_labels_from", "learning_rate",
               "seed", "data", "eval_data", "output", "overwrite", "resume", "model", "eval_base", "preset")


@dataclass
class CompareOptions:
    """Does HydraLoRA pay on your data? LoRA of equal size, HydraLoRA, the one-head control and
    oracle routing, trained with paired seeds, each at its best learning rate: a table and a
    verdict. Any other `hydralora train` flag (--max-steps, --batch-size, ...) reaches every run."""

    data: list[str] = field(default_factory=list, metadata={"required": True})
    """Training files, 'builtin' (the built-in mixture) or 'builtin-conflict' (tasks that need
    conflicting outputs from the same inputs); a validation split is carved from them."""
    output: str = field(default="", metadata={"required": True})
    """Directory of the comparison: runs/, data/, compare.json, compare.md, compare.png."""
    eval_data: list[str] = field(default_factory=list)
    """Held-out files for the final table (default: a test split carved from --data)."""
    model: str = DEFAULT_MODEL
    """Base model: hub id, local directory, .gguf file, or built-in name."""
    seeds: list[str] = field(default_factory=lambda: ["0", "1"])
    """Seeds of the paired runs (initialization, data order, dropout): each method runs each seed."""
    lr_grid: list[str] = field(default_factory=lambda: ["3e-4", "1e-3", "3e-3"])
    """Learning rates tried per method (first seed, validation split); the best one trains every seed."""
    rows: list[str] = field(default_factory=lambda: list(DEFAULT_ROWS))
    """Methods to compare: lora (equal parameters and update scale), hydralora (the recommended
    preset), control (one head, HydraLoRA's initialization), oracle (routing by domain; needs
    domains); also, by name, the variants sequence (HydraLoRA routed once per example, on its
    prompt) and per-head (HydraLoRA with a dropout mask per head, as the authors' code)."""
    r: int = 8
    """HydraLoRA's rank (each head's)."""
    num_heads: int = 4
    """HydraLoRA's heads."""
    alpha: float | None = None
    """HydraLoRA's alpha (default 2r: update scale 2); LoRA gets the same scale, alpha_L = rank_L * alpha / r."""
    val_per_domain: int = 16
    """Examples per domain carved from --data to choose learning rates (without domains: a tenth)."""
    test_per_domain: int = 16
    """Without --eval-data: examples per domain carved from --data for the final table."""
    jobs: int = 1
    """Runs trained (and then evaluated) at once, each with cores/jobs threads: faster on a big
    machine; the timings then share it."""
    fresh: bool = False
    """Retrain runs found complete on disk (default: reuse them: an interrupted compare resumes)."""
    train_args: list[str] = field(default_factory=list, metadata={"skip": True})
    """The other `hydralora train` flags, passed to every run (filled by the CLI)."""
    train_values: dict = field(default_factory=dict, metadata={"skip": True})
    """The same flags as parsed by `hydralora train`'s parser: {option: value} (filled by the CLI)."""

    def __post_init__(self) -> None:
        check_ranges(self, {"r": ">=1", "num_heads": ">=1", "val_per_domain": ">=1",
                            "test_per_domain": ">=1", "jobs": ">=1", "alpha": "?>0"})
        self.seeds = [str(s) for s in self.seeds]
        for s in self.seeds:
            if not s.isdigit() or int(s) >= 2**32:
                raise ConfigError(f"--seeds: expected integers from 0 to 2**32-1, got {s!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds: each seed once, got {' '.join(self.seeds)}")
        for lr in self.lr_grid:
            try:
                ok = math.isfinite(float(lr)) and float(lr) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"--lr-grid: expected positive numbers, got {lr!r}")
        unknown = sorted(set(self.rows) - set(ROWS))
        if unknown or not self.rows:
            raise ConfigError(f"--rows {' '.join(unknown) or '(none)'}: choose from {', '.join(ROWS)}")
        if "lora" not in self.rows or "hydralora" not in self.rows:
            raise ConfigError("--rows: the comparison needs lora and hydralora (the others are optional)")

    @property
    def scale(self) -> float:
        """The update scale alpha / r of every method."""
        return (self.alpha if self.alpha is not None else 2.0 * self.r) / self.r
