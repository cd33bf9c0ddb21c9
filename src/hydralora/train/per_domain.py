"""One PEFT LoRA per domain, for `hydralora analyze`'s A-vs-B comparison (the paper's Fig. 3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..data import load_examples
from ..dist import progress
from ..files import atomic_write, safe_name
from ..folders import owned_folder
from ..options import canonical_names, field_aliases
from .config import TrainConfig
from .run import run_training


def train_domain_loras(model_name: str, data: list[str], output: Path, steps: int, seed: int,
                       target_modules: list[str] | str, r: int, extra: dict[str, Any],
                       overwrite: bool = False) -> dict[str, Path]:
    """One PEFT LoRA per domain of `data`, same seed (so the same initial A), saved under
    output/per_domain/<domain>, the domain made one safe folder name (it comes from data:
    `../x` or `/x` must not write outside). Files and folders of those names that the tool did
    not write are never replaced; its own only with `overwrite`."""
    examples = load_examples(data)
    domains = sorted({e.domain for e in examples if e.domain})
    if len(domains) < 2:
        raise ConfigError("the A/B comparison needs examples of at least two domains in --data")
    taken: set[str] = set()
    names = {domain: safe_name(domain, taken) for domain in domains}
    folder = output / "per_domain"
    with owned_folder(folder, [f"{n}{ext}" for n in names.values() for ext in ("", ".jsonl")], overwrite):
        return {domain: _train_one(model_name, examples, domain, folder, names[domain], steps, seed,
                                   target_modules, r, extra, overwrite)
                for domain in progress(domains, "per-domain LoRAs", unit="domain")}


def _train_one(model_name: str, examples: list, domain: str, folder: Path, name: str, steps: int,
               seed: int, target_modules: list[str] | str, r: int, extra: dict[str, Any],
               overwrite: bool) -> Path:
    subset = folder / f"{name}.jsonl"
    with atomic_write(subset) as tmp:
        tmp.write_text("".join(json.dumps({"messages": e.messages, "domain": domain}) + "\n"
                               for e in examples if e.domain == domain))
    out = folder / name
    cfg = TrainConfig(model=model_name, data=[str(subset)], output=str(out), method="lora",
                      max_steps=steps, seed=seed, save_steps=0, overwrite=overwrite,
                      adapter={"r": r, "target_modules": target_modules},
                      **canonical_names(extra, field_aliases(TrainConfig), "per-domain LoRA options"))
    run_training(cfg)
    return out
