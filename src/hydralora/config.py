"""HydraLoraConfig and the named presets: the one source of HydraLoRA's defaults, their
validation and the JSON form.

The field defaults are the method as published (rank 8, alpha 16, dropout 0.05, 4 heads on the
MLP projections, a dense softmax router on the layer input x, one shared A, zero heads, no
balance loss). A preset names a whole recipe on top of them, adapter and training together:

    paper        the authors' recipe: alpha 32 for every rank (their scripts), router lr x1,
                 max length 1024, lr 2e-4 cosine with 3% warmup, weight decay 0, one epoch
    recommended  what `hydralora train` uses: random heads (A = 0) and the router at 10x the
                 learning rate, the best setting of the head-diversity study (docs/results.md)

`HydraLoraConfig.from_preset(name, **changes)` builds one from Python, `--preset NAME` from the
command line; the name is saved with the adapter (`preset` in adapter_config.json) and with the
run (train_config.yaml), so resuming or reloading never guesses a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, short
from .readers import read_json_object

ROUTERS = ("softmax", "topk", "uniform")
ROUTER_INPUTS = ("x", "a")
HEAD_INITS = ("zero", "random")
ROUTER_INITS = ("kaiming", "zero")
ROUTINGS = ("token", "sequence", "oracle")


@dataclass(frozen=True)
class Preset:
    """A named recipe: HydraLoraConfig values and training values (TrainConfig fields) that
    differ from the fields' own defaults."""

    name: str
    adapter: dict[str, Any]
    training: dict[str, Any]


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("paper", adapter={"alpha": 32.0, "init_heads": "zero"},
           training={"router_lr_multiplier": 1.0, "max_length": 1024}),
    Preset("recommended", adapter={"init_heads": "random"},
           training={"router_lr_multiplier": 10.0, "max_length": 512}),
)}
DEFAULT_PRESET = "recommended"  # hydralora train's
LEGACY_PRESET = "paper"  # what a run or adapter recorded before presets existed was trained with


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"preset {short(name)}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]

DROPOUT_MASKS = ("shared", "per_head")

# Keys that `save_adapter` adds to adapter_config.json beside the config fields.
METADATA_KEYS = ("peft_type", "base_model_name_or_path", "hydralora_version", "format_version")
# Keys PEFT writes into adapter_config.json when it saves a HydraLoRA model (peft_method.py):
# bookkeeping, read and ignored here; and PEFT-only settings, accepted while unset (what our own
# loader cannot apply, it refuses, naming PeftModel.from_pretrained).
PEFT_KEYS = ("task_type", "inference_mode", "revision", "peft_version", "auto_mapping")
PEFT_ONLY_KEYS = ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
                  "trainable_token_indices")
# adapter_config.json format: files without `format_version` (written before it existed) fill
# missing keys with today's defaults; a file of format 2 or more must hold every key of its
# format below (the ones that change the computation). A key added later joins the next
# format's list, and the value every earlier file was trained with goes into EARLIER_VALUES.
FORMAT_VERSION = 3
REQUIRED_KEYS = {2: ("r", "alpha", "num_heads", "target_modules", "dropout", "router", "top_k",
                     "shared_a", "router_input", "balance_loss_weight", "router_temperature",
                     "init_heads", "router_init", "head_dropout", "routing", "route_labels")}
REQUIRED_KEYS[3] = (*REQUIRED_KEYS[2], "dropout_masks")
EARLIER_VALUES = {"dropout_masks": "shared"}  # what files before format 3 were trained with


@dataclass
class HydraLoraConfig:
    """Configuration of HydraLoRA adapters: one shared A, `num_heads` B heads, a router.

    y = W0 x + (alpha / r) * sum_i g_i(x) B_i A dropout(x),  g(x) = softmax(W_g x / temperature)
    """

    r: int = field(default=8, metadata={"aliases": ("adapter_rank", "lora_rank", "lora_r")})
    """Rank of the shared low-rank matrix A (and of each head B_i)."""
    alpha: float = field(default=16.0, metadata={"aliases": ("lora_alpha",)})
    """Scaling numerator: the adapter output is multiplied by alpha / r."""
    num_heads: int = 4
    """Number of B heads (k in the paper). 1 gives plain LoRA (no router)."""
    target_modules: list[str] | str = field(
        default_factory=lambda: ["gate_proj", "up_proj", "down_proj"]
    )
    """A list of module names (exact, or a dotted suffix) or one regex string (full match)."""
    dropout: float = field(default=0.05, metadata={"aliases": ("lora_dropout",)})
    """Dropout on the adapter input (see dropout_masks)."""
    dropout_masks: str = "shared"
    """'shared': one dropout mask on x for every head (one pass over x); 'per_head': each head
    draws its own mask, as the authors' loop does (sum_i g_i B_i A drop_i(x); k passes over x in
    training). The router reads the clean x either way."""
    router: str = "softmax"
    """'softmax' (dense, the paper), 'topk' (renormalized over the top_k), 'uniform' (1/k)."""
    top_k: int = 1
    """Heads kept per token when router='topk'."""
    shared_a: bool = True
    """False gives one A per head (the paper's w/o-Hydra ablation, MoLoRA-style)."""
    router_input: str = "x"
    """'x' routes on the layer input (the authors' code); 'a' routes on A x (the paper's text)."""
    balance_loss_weight: float = 0.0
    """Weight of the switch-style load-balancing loss (0 in the paper's LLM experiments)."""
    router_temperature: float = 1.0
    """Softmax temperature of the router; above 1 flattens the gates, below 1 sharpens them."""
    init_heads: str = "zero"
    """'zero': every B_i = 0 (the paper). 'random': A = 0 and distinct random heads B_i."""
    router_init: str = "kaiming"
    """'kaiming' (the authors' code) or 'zero' (exactly uniform gates at step 0)."""
    head_dropout: float = 0.0
    """Probability of dropping a whole head for a token during training (gates renormalized)."""
    routing: str = "token"
    """'token': gates per token (the paper). 'sequence': one gate vector per example from the
    mean of the layer's input over the prompt, shared by all its tokens (with router='topk' and
    top_k=1 each request uses one head: exactly k LoRAs). 'oracle': a diagnostic; the gates
    are one-hot by each example's label (route_labels), no router."""
    route_labels: list[str] | None = None
    """routing='oracle': the label (a domain, or cluster_<i>) that each head stands for
    (filled in by the trainer from the data's domains or k-means clusters)."""
    k_selection: dict[str, Any] | None = None
    """How num_heads was chosen when it was chosen automatically (written by the trainer)."""
    preset: str | None = None
    """The preset these values started from (paper, recommended), or None: set by from_preset
    and recorded with the adapter; integrations read the preset's training values from it."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key and the accepted values."""

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"HydraLoraConfig.{key}={short(getattr(self, key))}: {why}")

        for key in ("alpha", "dropout", "head_dropout", "balance_loss_weight", "router_temperature"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(key, "must be a finite number")

        for key in ("r", "num_heads", "top_k"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(key, "must be an integer")
        if self.r < 1:
            raise bad("r", "the rank must be >= 1")
        if self.num_heads < 1:
            raise bad("num_heads", "the number of heads must be >= 1")
        if not self.alpha > 0:
            raise bad("alpha", "alpha must be > 0")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "dropout must be in [0, 1)")
        if not 0 <= self.head_dropout < 1:
            raise bad("head_dropout", "head_dropout must be in [0, 1)")
        if self.router not in ROUTERS:
            raise bad("router", f"unknown router; choose one of {', '.join(ROUTERS)}")
        if self.router == "topk" and not 1 <= self.top_k <= self.num_heads:
            raise bad("top_k", f"top_k must be between 1 and num_heads={self.num_heads}")
        if self.router_input not in ROUTER_INPUTS:
            raise bad("router_input", f"unknown router input; choose one of {ROUTER_INPUTS}")
        if self.init_heads not in HEAD_INITS:
            raise bad("init_heads", f"unknown head init; choose one of {HEAD_INITS}")
        if self.router_init not in ROUTER_INITS:
            raise bad("router_init", f"unknown router init; choose one of {ROUTER_INITS}")
        if (
            self.has_router
            and self.init_heads == "zero"
            and self.router_init == "zero"
            and self.head_dropout == 0
        ):
            raise bad(
                "router_init",
                "with init_heads='zero' a zero router gives every head the same update forever; "
                "use router_init='kaiming', init_heads='random' or head_dropout > 0",
            )
        if self.preset is not None:
            get_preset(self.preset)
        if self.dropout_masks not in DROPOUT_MASKS:
            raise bad("dropout_masks", f"choose one of {', '.join(DROPOUT_MASKS)}")
        if self.routing not in ROUTINGS:
            raise bad("routing", f"unknown routing; choose one of {', '.join(ROUTINGS)}")
        if self.route_labels is not None and (
            not isinstance(self.route_labels, list) or len(self.route_labels) != self.num_heads
        ):
            raise bad("route_labels", f"give one label per head ({self.num_heads})")
        if not self.balance_loss_weight >= 0:
            raise bad("balance_loss_weight", "must be >= 0")
        if not self.router_temperature > 0:
            raise bad("router_temperature", "must be > 0")
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as err:
                raise bad("target_modules", f"not a valid regular expression ({err})") from None
        elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise bad("target_modules", "give a non-empty list of module names or one regex")
        elif len(targets) > 1 and "all-linear" in (t.lower() for t in targets):
            raise bad("target_modules", "'all-linear' already selects every linear layer: give it alone, "
                      "or list only the names you want")

    @classmethod
    def from_preset(cls, name: str, **changes: Any) -> HydraLoraConfig:
        """The preset's values, then `changes` on top (HydraLoraConfig.from_preset("paper", r=4))."""
        return cls(**{**get_preset(name).adapter, **changes, "preset": name})

    def preset_training(self, key: str, default: Any) -> Any:
        """A training value of this config's preset (router_lr_multiplier, ...), else `default`."""
        return get_preset(self.preset).training.get(key, default) if self.preset else default

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def has_router(self) -> bool:
        """A learned router exists only when there is something to route."""
        return self.num_heads > 1 and self.router != "uniform" and self.routing != "oracle"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> HydraLoraConfig:
        """Build a config from a dict; unknown keys are an error that names them and `source`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - set(METADATA_KEYS) - set(PEFT_KEYS) - set(PEFT_ONLY_KEYS))
        if unknown:
            raise ConfigError(
                f"{source}: unknown HydraLoRA config key(s) {unknown}; known keys: {sorted(names)}"
            )
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path, peft: bool = False) -> HydraLoraConfig:
        """The config of an adapter_config.json (ours, or one PEFT wrote for HydraLoRA). A PEFT-only
        setting (modules_to_save, exclude_modules, ...) is an error unless `peft` (PEFT applies it)."""
        data = read_json_object(path, "no such file (is this an adapter directory?)")
        peft_only = [k for k in PEFT_ONLY_KEYS if data.get(k) not in (None, [], {}, "")]
        if peft_only and not peft:
            raise ConfigError(f"{path}: written by PEFT with {', '.join(f'{k}={short(data[k])}' for k in peft_only)}, "
                              "which hydralora's own loader does not apply: load it with "
                              "peft.PeftModel.from_pretrained (after `import hydralora`)")
        if data.get("peft_type", "HYDRALORA") != "HYDRALORA":
            raise ConfigError(
                f"{path}: peft_type is {data['peft_type']!r}, not 'HYDRALORA'; "
                "load a PEFT adapter with peft.PeftModel.from_pretrained instead"
            )
        version = data.get("format_version")
        if version is not None:
            if version not in REQUIRED_KEYS:
                raise ConfigError(f"{path}: format_version {short(version)} is not one this version of "
                                  f"hydralora reads ({', '.join(map(str, REQUIRED_KEYS))}); upgrade hydralora")
            missing = [k for k in REQUIRED_KEYS[version] if k not in data]
            if missing:
                raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}; an adapter_config.json "
                                  f"of format {version} records every setting (restore the file)")
        if version is None or version < FORMAT_VERSION:  # keys added since: what it was trained with
            data = {**{k: v for k, v in EARLIER_VALUES.items() if k not in REQUIRED_KEYS.get(version, ())},
                    **data}
        return cls.from_dict(data, source=str(path))


__all__ = ["PRESETS", "HydraLoraConfig", "Preset", "get_preset"]
