"""HydraLoRA as a PEFT method: `get_peft_model`, `PeftModel.from_pretrained`, `save_pretrained`,
TRL's `SFTTrainer(peft_config=...)`, after `import hydralora`.

    from peft import PeftModel, get_peft_model
    from hydralora import HydraLoraPeftConfig

    model = get_peft_model(base, HydraLoraPeftConfig.from_preset("recommended", r=8, num_heads=4))
    ...                                              # train (any Trainer; TRL: HydraSFTTrainer)
    model.save_pretrained("out")                      # a folder hydralora.load_adapter reads too
    model = PeftModel.from_pretrained(base, "runs/a")  # a `hydralora train` output

How it plugs in (PEFT 0.21, out of its tree; /tmp/research in the issue's notes):
- `PeftType` is a closed enum and `register_peft_method` only takes an existing member, so a
  `HYDRALORA` member is added at run time (`_enum_member`, what `enum` itself does for a member),
  then `register_peft_method` fills PEFT's three mappings.
- The math exists once: the tuner layer *is* a `HydraLoraLinear` (fused path, routing context,
  statistics, merge) with PEFT's `BaseTunerLayer` protocol on top. Its wrapped module is moved
  to PEFT's name `base_layer`, so PEFT's structural rules (what is an adapter tensor, what to
  freeze, `unload`) apply unchanged, and its tensors keep our names (`lora_A`, `lora_B`,
  `router`, plain parameters: one adapter per model, a second is refused).
- Files: PEFT 0.21's state-dict hooks (`_remove_adapter_name_from_key`,
  `_remap_adapter_state_dict_for_load`; internal API, hence the version pin) drop PEFT's
  `base_model.model.` prefix from our keys, so `save_pretrained` writes exactly the keys
  `hydralora.save_adapter` writes, and both loaders read either form. PEFT reports missing keys
  only when they contain the method prefix, which ours do not: loading goes through
  `model.load_adapter_weights`, which refuses a missing, stray, misshapen or non-finite tensor.
- Configs: `HydraLoraPeftConfig` has every `HydraLoraConfig` field (generated from it, so the
  two cannot drift) plus the PEFT-only fields TRL and PEFT read; reading a folder validates it
  with `HydraLoraConfig.from_json_file` (format versions and all).

Limits: one adapter per model; no `merge_and_unload` (the router depends on the token: use
`hydralora export`); no `PeftMixedModel`, hotswap or `inject_adapter_in_model`; transformers'
own adapter API (`model.load_adapter(dir)`) needs PEFT's LoRA names and does not load these.
Supported PEFT: `SUPPORTED_PEFT` (the hooks above appeared in 0.21; before it PEFT picked
adapter tensors by prefix and silently saved none of ours); another version is one error line.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

import peft
from packaging.version import Version
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, TaskType
from torch import nn

from .config import FORMAT_VERSION, HydraLoraConfig
from .errors import ConfigError
from .layer import SUPPORTED_BASE_TYPES, HydraLoraLinear
from .model import is_all_linear, load_adapter_weights, package_version

SUPPORTED_PEFT = ("0.21.0", "0.22.0")  # >= first, < second: pyproject's peft pin
PEFT_NAME = "HYDRALORA"
PREFIX = "hydralora_"  # PEFT's per-method prefix (our tensor names do not contain it)
WRAPPER_PREFIX = "base_model.model."  # what PeftModel puts before the transformers module path
OUR_TENSORS = ("lora_A", "lora_B", "router")


def check_peft_version(found: str) -> None:
    """One ConfigError line unless `found` is a PEFT version this module supports."""
    low, high = SUPPORTED_PEFT
    if not Version(low) <= Version(found) < Version(high):
        raise ConfigError(f"HydraLoRA as a PEFT method needs peft>={low},<{high} (PEFT's state-dict hooks "
                          f"it relies on are internal); found peft {found}: pip install 'peft>={low},<{high}' "
                          "(hydralora.add_hydralora / load_adapter work without it)")


def _enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """`enum_cls.<name>` (value `name`), added to a (str, Enum) class if missing; idempotent."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)  # what EnumType does for a str mix-in
    member._name_, member._value_, member.__objclass__ = name, name, enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)  # before _member_map_: EnumType refuses names in it
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    return member


HYDRALORA = _enum_member(PeftType, PEFT_NAME)


# ---------------------------------------------------------------------------- config
class HydraLoraPeftConfig(PeftConfig):
    """`HydraLoraConfig` as a `peft.PeftConfig`: the same fields and defaults (preset included:
    `HydraLoraPeftConfig.from_preset("recommended", r=8)`), plus PEFT's own settings."""

    exclude_modules: list[str] | str | None = None
    """PEFT: modules not to adapt (hydralora.load_adapter refuses a folder that sets it)."""
    layers_to_transform: list[int] | int | None = None
    """PEFT: adapt only these layer indices (likewise PEFT-only)."""
    layers_pattern: list[str] | str | None = None
    """PEFT: the name of the layer list for layers_to_transform."""
    modules_to_save: list[str] | None = None
    """PEFT: whole modules trained and saved beside the adapter (TRL sets lm_head for new tokens)."""
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """PEFT: token embeddings trained beside the adapter (TRL sets it for new tokens)."""
    hydralora_version: str | None = None
    """The hydralora version that wrote the file."""
    format_version: int | None = None
    """adapter_config.json format (config.FORMAT_VERSION)."""

    def __post_init__(self) -> None:
        check_peft_version(peft.__version__)
        super().__post_init__()
        self.peft_type = HYDRALORA
        if self.task_type is None:
            self.task_type = TaskType.CAUSAL_LM
        if isinstance(self.target_modules, (list, tuple, set)) and is_all_linear(list(self.target_modules)):
            self.target_modules = "all-linear"  # PEFT's shorthand is a string
        self.hydralora_version, self.format_version = package_version(), FORMAT_VERSION
        self.to_hydra()  # validates, naming the bad key

    def to_hydra(self) -> HydraLoraConfig:
        """The HydraLoraConfig of these values (what each layer is built from)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(HydraLoraConfig)}
        if isinstance(values["target_modules"], (set, tuple)):  # PEFT resolves all-linear to a set
            values["target_modules"] = sorted(values["target_modules"])
        return HydraLoraConfig(**values)

    @classmethod
    def from_hydra(cls, config: HydraLoraConfig, **peft_values: Any) -> HydraLoraPeftConfig:
        return cls(**config.to_dict(), **peft_values)

    @classmethod
    def from_preset(cls, name: str, **changes: Any) -> HydraLoraPeftConfig:
        peft_values = {k: changes.pop(k) for k in list(changes) if k not in _HYDRA_FIELDS}
        return cls.from_hydra(HydraLoraConfig.from_preset(name, **changes), **peft_values)

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict[str, Any]:
        """PEFT reads adapter_config.json here: checked as hydralora.load_adapter checks it (format
        versions, required keys, values an older format was trained with)."""
        data = super().from_json_file(path_json_file, **kwargs)
        return {**data, **HydraLoraConfig.from_json_file(Path(path_json_file), peft=True).to_dict()}


_HYDRA_FIELDS = {f.name for f in dataclasses.fields(HydraLoraConfig)}
for _f in dataclasses.fields(HydraLoraConfig):  # every HydraLoraConfig field, default and metadata
    HydraLoraPeftConfig.__annotations__[_f.name] = _f.type
    setattr(HydraLoraPeftConfig, _f.name, dataclasses.field(
        default=_f.default, default_factory=_f.default_factory, metadata=_f.metadata))
HydraLoraPeftConfig = dataclasses.dataclass(HydraLoraPeftConfig)  # type: ignore[misc]


# ---------------------------------------------------------------------------- layer
class HydraLoraPeftLayer(HydraLoraLinear, BaseTunerLayer):
    """A HydraLoraLinear under PEFT's tuner-layer protocol, holding one adapter (`adapter_name`).
    PEFT's per-adapter containers (`adapter_layer_names`) stay empty: the methods below act on
    the layer's own parameters."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, config: HydraLoraConfig, adapter_name: str):
        super().__init__(base_layer, config)
        self._modules["base_layer"] = self._modules.pop("base")  # PEFT's name for the wrapped module
        self.adapter_name = adapter_name
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []

    @property
    def base(self) -> nn.Module:  # HydraLoraLinear's name for it
        return self._modules["base_layer"] if "base_layer" in self._modules else self._modules["base"]

    @property
    def disabled(self) -> bool:
        return self._disable_adapters or self.adapter_name not in self.active_adapters

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self._disable_adapters = bool(value)

    def _trainable(self, flag: bool) -> None:
        for p in self.adapter_params().values():
            p.requires_grad_(flag)

    def _get_available_adapters(self) -> set[str]:
        return {self.adapter_name}

    def _all_available_adapter_names(self) -> list[str]:
        return [self.adapter_name]

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._trainable(self.adapter_name in names and not inference_mode)
        self._active_adapter = names

    def set_requires_grad(self, adapter_names: str | Any, requires_grad: bool = True) -> None:
        if self.adapter_name in ({adapter_names} if isinstance(adapter_names, str) else set(adapter_names)):
            self._trainable(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            self._trainable(False)
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        raise ConfigError("a HydraLoRA PEFT model holds one adapter: use model.unload() to get the base "
                          "model back")

    def unmerge(self) -> None:  # PEFT calls it on every layer, merged or not
        if self.merged:
            super().unmerge()


# ---------------------------------------------------------------------------- tuner
def _ours(key: str) -> bool:
    return key.rpartition(".")[2] in OUR_TENSORS


class HydraLoraPeftModel(BaseTuner):
    """PEFT's tuner for HydraLoRA: wraps each target linear layer in a HydraLoraPeftLayer."""

    prefix: str = PREFIX
    tuner_layer_cls = HydraLoraPeftLayer
    target_module_mapping: dict[str, list[str]] = {}  # the config always names its targets

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        if len(self.peft_config) > 1:
            raise ConfigError("a HydraLoRA PEFT model holds one adapter; load the other one into a fresh "
                              "base model (or use hydralora's per-request export for several)")
        super()._check_new_adapter_config(config)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key,
                            parameter_name=None) -> None:
        if isinstance(target, HydraLoraLinear):
            raise ConfigError(f"{current_key} already holds a HydraLoRA adapter; one adapter per model")
        if not isinstance(target, SUPPORTED_BASE_TYPES):
            raise ConfigError(f"target_modules matched {current_key} ({type(target).__name__}), which is not "
                              "a linear layer; target the linear layers inside it instead")
        layer = HydraLoraPeftLayer(target, peft_config.to_hydra(), adapter_name)
        if adapter_name not in self.active_adapters:
            layer._trainable(False)
        self._replace_module(parent, target_name, layer, target)

    def _check_merge_allowed(self) -> None:
        raise ConfigError("HydraLoRA's router mixes the heads per token, so no single weight merge is "
                          "exact: use `hydralora export --format merged` (a fixed gate mixture) or "
                          "`--format peft-lora`")

    # -- state-dict hooks (peft 0.21): on disk our keys are '<module path>.lora_A|lora_B|router'
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        if _ours(key):  # no adapter name in ours; only PeftModel's prefix goes
            return key.removeprefix(WRAPPER_PREFIX)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = {(k.removeprefix(WRAPPER_PREFIX) if _ours(k) else k): v for k, v in state_dict.items()}
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # PEFT reports no missing key of ours (it looks for its prefix): check every key, shape
        # and value as hydralora.load_adapter does, all problems in one error
        load_adapter_weights(model, {k: v for k, v in remapped.items() if _ours(k)},
                             source=f"HydraLoRA adapter {adapter_name!r}")
        return remapped


def registered() -> bool:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return PEFT_TYPE_TO_TUNER_MAPPING.get(HYDRALORA) is HydraLoraPeftModel and \
        PEFT_TYPE_TO_CONFIG_MAPPING.get(HYDRALORA) is HydraLoraPeftConfig


def register() -> bool:
    """Register HYDRALORA with PEFT (idempotent); False on a PEFT outside SUPPORTED_PEFT, where
    only the config is mapped, so that loading a HydraLoRA folder says which PEFT works."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    if registered():
        return True
    try:
        check_peft_version(peft.__version__)
    except ConfigError:
        PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(HYDRALORA, HydraLoraPeftConfig)
        return False
    if HYDRALORA in PEFT_TYPE_TO_CONFIG_MAPPING:  # a PEFT with a HYDRALORA of its own: leave it
        return False
    register_peft_method(name=PEFT_NAME.lower(), config_cls=HydraLoraPeftConfig, model_cls=HydraLoraPeftModel,
                         prefix=PREFIX)
    return True


register()  # importing this module registers the method (the import hook in __init__ imports it)

__all__ = ["HYDRALORA", "SUPPORTED_PEFT", "HydraLoraPeftConfig", "HydraLoraPeftLayer", "HydraLoraPeftModel",
           "check_peft_version", "register", "registered"]
