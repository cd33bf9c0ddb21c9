"""`hydralora info`: what an adapter directory holds, and how different its heads are."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .methods import describe, format_description


@dataclass
class InfoOptions:
    """Summarize an adapter directory."""

    adapter: str = field(default="", metadata={"positional": True})
    """Adapter directory (HydraLoRA, PEFT LoRA or LoRA-Split)."""
    json: bool = False
    """Print JSON."""


def adapter_info(path: str) -> dict:
    """Config, parameter counts, head similarity per layer, and the run's summary if present."""
    return describe(path)


def run_info(opts: InfoOptions) -> dict:
    info = describe(opts.adapter)
    print(json.dumps(info, indent=2) if opts.json else format_description(info))
    return info
