"""HydraLoRA: one shared A, k B heads and a per-token router, for Hugging Face models."""

import logging

# bitsandbytes (imported by PEFT when installed) warns on every import on CPUs with AVX512-BF16
# that an optional kernel package is missing; its own fallback works, so keep the CLI quiet.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .config import HydraLoraConfig
from .errors import AdapterError, ConfigError, UserError
from .layer import HydraLoraLinear
from .model import (
    add_hydralora,
    adapter_state_dict,
    balance_loss,
    count_parameters,
    disable_adapter,
    hydralora_layers,
    load_adapter,
    remove_hydralora,
    save_adapter,
    set_token_mask,
    package_version,
    trainable_summary,
)

__version__ = package_version()
__all__ = [
    "AdapterError",
    "ConfigError",
    "HydraLoraConfig",
    "HydraLoraLinear",
    "__version__",
    "adapter_state_dict",
    "add_hydralora",
    "balance_loss",
    "count_parameters",
    "disable_adapter",
    "hydralora_layers",
    "load_adapter",
    "remove_hydralora",
    "save_adapter",
    "set_token_mask",
    "trainable_summary",
    "UserError",
]
