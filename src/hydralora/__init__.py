"""HydraLoRA: one shared A, k B heads and a per-token router, for Hugging Face models.

    from hydralora import HydraLoraConfig, add_hydralora, save_adapter, load_adapter, RoutingContext

The names below load on first use (PEP 562, as transformers does), so that `import hydralora`
and the command line's `--help` do not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

# bitsandbytes (imported by PEFT when installed) warns on every import on CPUs with AVX512-BF16
# that an optional kernel package is missing; its own fallback works, so keep the CLI quiet.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_EXPORTS = {
    "HydraLoraConfig": "config",
    "PRESETS": "config",
    "AdapterError": "errors",
    "ConfigError": "errors",
    "UserError": "errors",
    "HydraLoraLinear": "layer",
    "RoutingContext": "routing.context",
    "RoutingError": "routing.context",
    "GateStats": "routing.context",
    "add_hydralora": "model",
    "adapter_state_dict": "model",
    "count_parameters": "model",
    "disable_adapter": "model",
    "hydralora_layers": "model",
    "load_adapter": "model",
    "remove_hydralora": "model",
    "save_adapter": "model",
    "trainable_summary": "model",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from .config import PRESETS, HydraLoraConfig
    from .errors import AdapterError, ConfigError, UserError
    from .layer import HydraLoraLinear
    from .model import (
        adapter_state_dict,
        add_hydralora,
        count_parameters,
        disable_adapter,
        hydralora_layers,
        load_adapter,
        remove_hydralora,
        save_adapter,
        trainable_summary,
    )
    from .routing.context import GateStats, RoutingContext, RoutingError


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("hydralora")
        except PackageNotFoundError:  # running from a source tree that was not installed
            return "unknown"
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hydralora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
