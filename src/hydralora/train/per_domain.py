"""One PEFT LoRA per domain, for `hydralora analyze`'s A-vs-B comparison (the paper's Fig. 3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..data import load_examples
from ..dist import progress
from ..files import safe_name
from .config import TrainConfig
from .run import run_training


def train_domain_loras(model_name: str, data: list[str], output: Path, steps: int, seed: int,
                       target_modules: list[str] | str, r: int, extra: dict[str, Any]) -> dict[str, Path]:
    """One PEFT LoRA per domain of `data`, same seed (so the same initial A), saved under
    output/per_domain/<domain>, the domain made one safe folder name (it comes from data:
    `../x` or `/x` must not write outside)."""
    examples = load_examples(data)
    domains = sorted({e.domain for e in examples if e.domain})
    if len(domains) < 2:
        raise ConfigError("the A/B comparison needs examples of at least two domains in --data")
    dirs = {}
    taken: set[str] = set()
    for domain in progress(domains, "per-domain LoRAs", unit="domain"):
        name = safe_name(domain, taken)
        subset = output / "per_domain" / f"{name}.jsonl"
        subset.parent.mkdir(parents=True, exist_ok=True)
        with open(subset, "w") as f:
            for e in examples:
                if e.domain == domain:
                    f.write(json.dumps({"messages": e.messages, "domain": domain}) + "\n")
        out = output / "per_domain" / name
        cfg = TrainConfig(model=model_name, data=[str(subset)], output=str(out), method="lora",
                          max_steps=steps, seed=seed, save_steps=0, overwrite=True,
                          adapter={"r": r, "target_modules": target_modules}, **extra)
        run_training(cfg)
        dirs[domain] = out
    return dirs
