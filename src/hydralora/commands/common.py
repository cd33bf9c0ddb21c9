"""Defaults and choices shared by several commands, and the placement check they all run.

Everything here is cheap to import: `check_placement` imports torch only when it runs.
"""

from __future__ import annotations

import importlib.util
import re

from ..errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"  # the default --model of every command
DEFAULT_DTYPE = "auto"  # --dtype of the base weights: bfloat16 on a GPU that has it, float32 on a CPU
DEFAULT_DEVICE = "auto"  # --device of every command that runs a model: the GPU when there is one
DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANTIZE_MODES = ("none", "4bit", "8bit")  # --quantize: bitsandbytes nf4 (QLoRA) or int8 base weights
QUANTIZE_HINT = "pip install 'hydralora[quantize]'"
DEFAULT_MAX_LENGTH = 512  # tokens per example
K_MAX = 10  # the largest k tried by --num-heads auto and `cluster`
BUILTIN = "builtin"  # the word that stands for the built-in mixture in a list of data files
TRAIN_PER_DOMAIN = 200  # the built-in mixture's default split sizes
TEST_PER_DOMAIN = 40
METHOD_NAMES = ("hydralora", "lora", "lora-split")  # `methods.METHODS` has one entry each
SPLIT_MODES = ("budget", "each")  # LoRA-Split ranks: r/k each, or r each
EXPORT_FORMATS = ("peft-lora", "merged")
GROUPINGS = ("per-domain", "per-cluster")  # export --gates for per-request serving
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # owner/name[@revision]


MAX_SEED = 2**32 - 1  # numpy's and scikit-learn's seeds are 32-bit
MAX_INT = 2**63 - 1  # what torch and numpy hold; a larger count is a typo


def check_int_bounds(obj: object, limits: dict[str, int] | None = None) -> None:
    """Integers argparse and YAML accept but nothing downstream can hold (a seed of 2**32, a
    5000-digit step count): one ConfigError naming the flag. Every int field of the dataclass
    `obj` is checked against MAX_INT, those in `limits` against their own bound."""
    import dataclasses

    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        limit = (limits or {}).get(f.name, MAX_INT)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            text = str(value) if abs(value) < 10**20 else f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
            raise ConfigError(f"--{f.name.replace('_', '-')} must be at most {limit}, got {text}")


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def check_device_name(name: str) -> tuple[str, int | None]:
    """('auto' | 'cpu' | 'cuda', index or None) of a --device value; an error names the
    accepted forms. Says nothing of what this machine has (see `check_placement`)."""
    if name in ("auto", "cpu"):
        return name, None
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()) or (not index and ":" in name):
        raise ConfigError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N (N = 0, 1, ...)")
    return "cuda", int(index) if index else None


def check_quantize(mode: str | None) -> None:
    """A --quantize value: none, 4bit or 8bit; the modes need bitsandbytes (an optional extra)."""
    if mode in (None, "none"):
        return
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"--quantize {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"--quantize {mode} needs bitsandbytes, which is not installed: {QUANTIZE_HINT}")


def check_placement(device: str | None, dtype: str | None, quantize: str | None = None) -> None:
    """Fail early, before data or models load, on a bad --device, --dtype or --quantize (a GPU
    asked for on a machine without one included)."""
    kind, index = check_device_name(DEFAULT_DEVICE if device is None else str(device))
    if dtype not in (None, "auto", *DTYPE_NAMES):
        raise ConfigError(f"--dtype {dtype!r}: choose one of auto, {', '.join(DTYPE_NAMES)}")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device on this machine; use --device cpu or auto")
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    check_quantize(quantize)
