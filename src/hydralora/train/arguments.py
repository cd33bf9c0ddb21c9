"""The values of `--trainer-arg KEY=VALUE` (and a YAML config's `trainer:` mapping), checked
against TrainingArguments before any slow work.

Values that transformers or torch would refuse only later, with a traceback (a list where a
number goes, a negative worker count, a NaN gradient norm, a reporting backend that is not
installed, a DeepSpeed or FSDP config file that is not JSON), are one `ConfigError` naming the
argument. Two readings are fixed rather than refused: a number written as text (`1e-6`: YAML
1.1 reads it as a string) becomes the number, and YAML 1.1's `no`/`off` (read as false) is
the strategy 'no' where a field takes one. Light: transformers is imported when it runs.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import math
import types
import typing
from functools import cache
from typing import Any

from ..commands.common import MAX_SEED
from ..errors import ConfigError, short
from ..readers import read_json_object

# train does not upload: `hydralora push` sends only the files it wrote, never a token
NO_HUB = ("push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
          "hub_always_push", "hub_revision")
# (low, high, low included, high included); None: no bound
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "dataloader_num_workers": (0, None, True, False),
    "dataloader_prefetch_factor": (1, None, True, False),
    "per_device_eval_batch_size": (1, None, True, False),
    "eval_accumulation_steps": (1, None, True, False),
    "torch_empty_cache_steps": (1, None, True, False),
    "ddp_timeout": (1, None, True, False),
    "ddp_bucket_cap_mb": (1, None, True, False),
    "data_seed": (0, MAX_SEED, True, True),
    "max_grad_norm": (0, None, True, False),
    "adam_beta1": (0, 1, True, False),
    "adam_beta2": (0, 1, True, False),
    "adam_epsilon": (0, None, False, False),
    "label_smoothing_factor": (0, 1, True, False),
    "eval_steps": (0, None, False, False),
    "eval_delay": (0, None, True, False),
    "neftune_noise_alpha": (0, None, False, False),
}
CONFIG_FILES = ("deepspeed", "fsdp_config")  # a path must name a JSON object
# types TrainingArguments takes beyond its annotations (`fsdp=true`: full_shard; a list of options)
LENIENT: dict[str, tuple[type, ...]] = {"fsdp": (bool, list)}
EXTRAS = {"deepspeed": "pip install 'hydralora[deepspeed]'",
          "tensorboard": "pip install 'hydralora[tensorboard]'", "wandb": "pip install 'hydralora[wandb]'"}


@cache
def _hints() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init}


def _members(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(tp) for m in _members(a)]
    return [tp]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _as_number(value: Any, kind: type) -> Any:
    """Text that is a number, as the number (YAML 1.1 reads `1e-6` and `nan` as strings)."""
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return value
        if kind is float or number.is_integer():
            return kind(number)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _fits(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp} or isinstance(value, tp)
    if origin is list or tp is list:
        args = typing.get_args(tp)
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    return True  # a type we do not check (accelerate's objects): TrainingArguments will


def _describe(tp: Any) -> str:
    names = []
    for m in _members(tp):
        if isinstance(m, type) and issubclass(m, enum.Enum):
            names.append("one of " + ", ".join(repr(x.value) for x in m))
        elif m is type(None):
            names.append("null")
        else:
            names.append(getattr(m, "__name__", str(m)).replace("NoneType", "null"))
    return " or ".join(dict.fromkeys(names))


def _normalize(key: str, value: Any) -> Any:
    if key in LENIENT and isinstance(value, LENIENT[key]):
        return value
    tp = _hints()[key]
    members = _members(tp)
    for kind in (float, int):
        if kind in members and bool not in members:
            value = _as_number(value, kind)
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    if isinstance(value, bool) and bool not in members:
        if value is False and any("no" in {m.value for m in e} for e in enums):
            return "no"  # YAML 1.1 read `no` (or `off`, `false`) as false: the strategy 'no'
        raise ConfigError(f"trainer argument {key}={value}: YAML reads an unquoted yes/no/on/off as "
                          f"true/false; {key} takes {_describe(tp)}: quote the value ({key}='...')")
    if not any(_fits(value, m) for m in members):
        raise ConfigError(f"trainer argument {key}={short(value)}: expected {_describe(tp)}")
    return value


def _check_range(key: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"trainer argument {key}={value}: must be a finite number")
    if key not in RANGES or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, low_in, high_in = RANGES[key]
    ok = (low is None or (value >= low if low_in else value > low)) and \
         (high is None or (value <= high if high_in else value < high))
    if not ok:
        left = "" if low is None else f"{'>=' if low_in else '>'} {low:g}"
        right = "" if high is None else f"{'<=' if high_in else '<'} {high:g}"
        raise ConfigError(f"trainer argument {key}={short(value)}: must be {' and '.join(filter(None, (left, right)))}")


def _check_backends(key: str, value: Any) -> None:
    if key == "report_to" and value not in (None, "none", "all", []):
        from transformers.integrations import get_available_reporting_integrations
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        for name in [value] if isinstance(value, str) else value:
            if name == "none":
                continue
            if name not in INTEGRATION_TO_CALLBACK:
                raise ConfigError(f"trainer argument report_to={short(name)}: not a reporting backend "
                                  f"transformers knows ({', '.join(sorted(INTEGRATION_TO_CALLBACK))})")
            if name not in get_available_reporting_integrations():
                raise ConfigError(f"trainer argument report_to={name}: {name} is not installed: "
                                  f"{EXTRAS.get(name, f'pip install {name}')} (or report_to=none)")
    if key == "deepspeed" and value and not _installed("deepspeed"):
        raise ConfigError(f"trainer argument deepspeed=...: DeepSpeed is not installed: {EXTRAS['deepspeed']}")
    if key in CONFIG_FILES and isinstance(value, str) and value:
        try:
            read_json_object(value, f"no such file (trainer argument {key})")
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
        except ConfigError as err:
            raise ConfigError(f"trainer argument {key}: {err}") from None


def normalize_trainer_args(values: dict[str, Any], backends: bool = True) -> dict[str, Any]:
    """`values` checked and in the types TrainingArguments takes (see the module's docstring);
    unknown keys are left to `config.check_trainer_args`. `backends`: also check what depends
    on this machine (reporting backends and DeepSpeed installed, config files readable)."""
    hints = _hints()
    out = {}
    for key, value in values.items():
        if key in NO_HUB:
            raise ConfigError(f"trainer argument {key}: hydralora train does not upload; after training "
                              "run `hydralora push OUTPUT owner/name` (it sends only the files it wrote, "
                              "and takes the token from `hf auth login` or HF_TOKEN)")
        if key not in hints:
            out[key] = value
            continue
        value = _normalize(key, value)
        _check_range(key, value)
        if backends:
            _check_backends(key, value)
        out[key] = value
    return out
