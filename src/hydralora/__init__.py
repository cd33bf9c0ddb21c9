"""HydraLoRA: one shared A, k B heads and a per-token router, for Hugging Face models.

    from hydralora import HydraLoraConfig, add_hydralora, save_adapter, load_adapter, RoutingContext

The names below load on first use (PEP 562, as transformers does), so that `import hydralora`
and the command line's `--help` do not pay for torch and transformers.

HydraLoRA is also a PEFT method (`peft_method`: `get_peft_model(model, HydraLoraPeftConfig(...))`,
`PeftModel.from_pretrained(base, folder)`, TRL's `peft_config=`). PEFT has no plugin entry
points, so the method must be registered in every process before PEFT meets a HydraLoRA config
or folder, yet importing PEFT here would cost every `hydralora --help` torch and transformers.
So `import hydralora` registers at once when PEFT is already imported, and otherwise leaves a
one-shot import hook (`_PeftImportHook`) that registers right after `peft` itself finishes
importing, whoever imports it. The hook only watches the name `peft`, hands the import to the
normal finders, and removes itself once it ran.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
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
    "HydraLoraPeftConfig": "peft_method",
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
    from .peft_method import HydraLoraPeftConfig
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


# ---------------------------------------------------------------------------- PEFT registration
def _register_with_peft() -> None:
    """Register HydraLoRA as a PEFT method (peft_method.register); a failure never breaks the
    `import peft` that triggered it: it becomes one warning, and hydralora's own API still works."""
    module = sys.modules.get(f"{__name__}.peft_method")
    if module is not None and not hasattr(module, "register"):
        return  # peft_method is importing peft right now: it registers itself when it is done
    try:
        from .peft_method import register

        register()
    except Exception as err:  # noqa: BLE001 - any error here must not break someone's `import peft`
        warnings.warn(f"hydralora: could not register HydraLoRA as a PEFT method ({err}); "
                      "hydralora.add_hydralora and load_adapter still work", stacklevel=2)


class _PeftImportHook:
    """A sys.meta_path finder for the name `peft` only: the normal finders locate it, and its
    loader's exec_module is wrapped to register HydraLoRA once the module has run."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "peft":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_with_peft()

        loader.exec_module = exec_module
        return spec


if "peft" in sys.modules:
    _register_with_peft()
elif not any(isinstance(f, _PeftImportHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _PeftImportHook())
