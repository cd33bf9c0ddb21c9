"""Inject HydraLoRA into a model, take it out again, and move adapters to and from disk.

Files follow PEFT's conventions: `adapter_config.json` (the config plus
`"peft_type": "HYDRALORA"`, the base model name and our version) and
`adapter_model.safetensors`, keys `<module path>.lora_A|lora_B|router`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import FORMAT_VERSION, HydraLoraConfig
from .errors import AdapterError, ConfigError
from .files import CONFIG_NAME, WEIGHTS_NAME, atomic_write
from .cards import same_base_model
from .hub import resolve_adapter
from .layer import SUPPORTED_BASE_TYPES, HydraLoraLinear, base_io

_CONFIG_ATTR = "hydralora_config"
_FROZEN_ATTR = "_hydralora_requires_grad"


def package_version() -> str:
    try:
        return version("hydralora")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "unknown"


ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer except the output head
MAX_ABS_WEIGHT = 1e4  # adapter weights beyond this are broken (trained ones stay far below 10)


def is_all_linear(targets: list[str] | str) -> bool:
    """`targets` is PEFT's 'all-linear' (as a string or a one-item list)."""
    return [t.lower() for t in ([targets] if isinstance(targets, str) else targets)] == [ALL_LINEAR]


def all_linear_names(model: nn.Module) -> list[str]:
    """What 'all-linear' selects, as PEFT resolves it: every linear layer (nn.Linear or
    transformers' Conv1D) except the output embedding (the LM head) and the layers inside
    existing adapters."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inner = {f"{n}.{s}" for n, m in model.named_modules() if isinstance(m, HydraLoraLinear)
             for s, _ in m.named_modules() if s}
    return [n for n, m in model.named_modules()
            if n and isinstance(m, SUPPORTED_BASE_TYPES) and m is not head and n not in inner]


def target_matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry must equal the
    name or be a dotted suffix of it ("q_proj" matches "model.layers.0.self_attn.q_proj")."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def hydralora_layers(model: nn.Module) -> dict[str, HydraLoraLinear]:
    """Every HydraLoraLinear in the model by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, HydraLoraLinear)}


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_BASE_TYPES)]


def _short_list(names: list[str], limit: int = 12) -> str:
    """Collapse layer indices so a 32-layer model lists each distinct pattern once."""
    patterns = list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", n) for n in names))
    shown = ", ".join(patterns[:limit])
    return shown + (f", ... ({len(patterns) - limit} more)" if len(patterns) > limit else "")


def find_targets(model: nn.Module, targets: list[str] | str) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs that `targets` selects; an error if none, or if any is not a
    linear layer (the message lists the linear layers that exist). 'all-linear' selects every
    linear layer but the output head, as PEFT does ('all-linear' beside other names is refused
    by HydraLoraConfig.validate)."""
    if is_all_linear(targets):
        names = set(all_linear_names(model))
        matched = [(n, m) for n, m in model.named_modules() if n in names]
    else:
        matched = [(n, m) for n, m in model.named_modules() if n and target_matches(n, targets)]
    if not matched:
        raise ConfigError(
            f"target_modules={targets!r} matched no module. Linear layers in this model: "
            f"{_short_list(_linear_names(model))}"
        )
    unsupported = [n for n, m in matched if not isinstance(m, SUPPORTED_BASE_TYPES)]
    if unsupported:
        raise ConfigError(
            f"target_modules={targets!r} matched modules that are not linear layers: "
            f"{_short_list(unsupported)}; target the linear layers inside them instead"
        )
    return matched


def add_hydralora(model: nn.Module, config: HydraLoraConfig) -> nn.Module:
    """Wrap every target linear layer of `model` in a HydraLoraLinear, in place; freeze the rest.

    Returns the same model. Raises if the model already has HydraLoRA layers or if no module
    matches `config.target_modules` (the message lists the linear layers that exist).
    """
    if hydralora_layers(model):
        raise ConfigError(
            "this model already has HydraLoRA layers; call remove_hydralora(model) first "
            "(double injection would wrap adapters inside adapters)"
        )
    config.validate()
    matched = find_targets(model, config.target_modules)
    check_adapter_size(model, config, matched)
    setattr(model, _FROZEN_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in matched:
        linear = isinstance(module, nn.Linear)  # a bitsandbytes weight is packed: use the sizes
        smallest = min(module.in_features, module.out_features) if linear else min(module.weight.shape)
        if config.r > smallest:
            warnings.warn(
                f"{name}: r={config.r} exceeds the layer's smaller dimension {smallest}; "
                "the update cannot have more than that rank, the extra rank is wasted",
                stacklevel=2,
            )
        _set_submodule(model, name, HydraLoraLinear(module, config))
    setattr(model, _CONFIG_ATTR, config)
    return model


def check_adapter_size(model: nn.Module, config: HydraLoraConfig, matched: list[tuple[str, nn.Module]]) -> None:
    """Refuse, before allocating, an adapter larger than its base model several times over (a
    mistyped --num-heads or --r): it would exhaust memory, or take minutes to fail."""
    size = 0
    for _, module in matched:
        d_in, d_out = base_io(module)
        a_rows = config.r if config.shared_a else config.r * config.num_heads
        size += a_rows * d_in + config.num_heads * config.r * d_out
        size += config.num_heads * d_in if config.has_router else 0
    base = sum(p.numel() for p in model.parameters())
    if size > max(4 * base, 10**8):
        raise ConfigError(f"the adapter would hold {size:,} parameters, {size / max(base, 1):,.0f} times its "
                          f"base model's {base:,} (r={config.r}, num_heads={config.num_heads} on "
                          f"{len(matched)} layers): lower --num-heads or --r")


def remove_hydralora(model: nn.Module, keep_merged: bool = False) -> nn.Module:
    """Put the original modules back and restore every parameter's requires_grad.

    Merged layers are unmerged first, unless `keep_merged`: then the base layers keep the
    merged weights (merge-and-unload, for exporting a full model).
    """
    layers = hydralora_layers(model)
    if not layers:
        raise ConfigError("this model has no HydraLoRA layers to remove")
    for name, layer in layers.items():
        if layer.merged and not keep_merged:
            layer.unmerge()
        layer._original_weight = None
        _set_submodule(model, name, layer.base)
    flags = getattr(model, _FROZEN_ATTR, {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    for attr in (_CONFIG_ATTR, _FROZEN_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def get_config(model: nn.Module) -> HydraLoraConfig:
    config = getattr(model, _CONFIG_ATTR, None)
    if config is None:
        raise ConfigError("this model has no HydraLoRA adapter; call add_hydralora first")
    return config


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors by on-disk key: `<module path>.lora_A|lora_B|router`."""
    return {
        f"{name}.{pname}": p
        for name, layer in hydralora_layers(model).items()
        for pname, p in layer.adapter_params().items()
    }


def full_adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors as whole CPU tensors, by on-disk key. A parameter sharded by FSDP2
    (a DTensor) is gathered whole: under FSDP every process must call this; one then writes."""
    tensors = {}
    for key, p in adapter_state_dict(model).items():
        value = p.detach()
        if hasattr(value, "full_tensor"):  # torch.distributed.tensor.DTensor
            value = value.full_tensor()
        tensors[key] = value.contiguous().cpu()
    return tensors


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def trainable_summary(model: nn.Module) -> str:
    """One line like PEFT's print_trainable_parameters."""
    trainable, total = count_parameters(model)
    return (
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / max(total, 1):.4f}"
    )


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base model's output. Merged layers are unmerged
    for the block (their original weights come back bit for bit) and merged again after it."""
    layers = list(hydralora_layers(model).values())
    previous = [layer.disabled for layer in layers]
    merged = [(layer, layer.merged_gates) for layer in layers if layer.merged]
    for layer, _ in merged:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was
        for layer, gates in merged:
            layer.merge(gates)


def _base_model_name(model: nn.Module) -> str | None:
    """The model's name as an adapter records it: a local folder as an absolute path (the
    adapter then loads from any working directory), a hub id as it is."""
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name_or_path", None) or None
    return str(Path(name).resolve()) if name and Path(name).is_dir() else name


def save_adapter(model: nn.Module, path: str | os.PathLike, overwrite: bool = True,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `path/adapter_model.safetensors` and `path/adapter_config.json`.

    Each file is written under a temporary name, flushed to disk and then renamed over the old
    one (weights first, config last), so an interrupted or failed save never leaves a
    half-written file and keeps the previous adapter. Other files in `path` (checkpoints,
    logs) are left alone. With `overwrite=False` an existing adapter at `path` is an error.
    `tensors`: the adapter's tensors when already gathered (full_adapter_tensors), e.g. by
    every FSDP process before rank 0 writes.
    """
    config = get_config(model)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterError(f"{path}: exists and is not a directory")
    if not overwrite and (path / CONFIG_NAME).exists():
        raise AdapterError(
            f"{path} already holds an adapter; choose another directory or allow overwriting"
        )
    tensors = full_adapter_tensors(model) if tensors is None else tensors
    meta = config.to_dict()
    meta.update(
        peft_type="HYDRALORA",
        base_model_name_or_path=_base_model_name(model),
        hydralora_version=package_version(),
        format_version=FORMAT_VERSION,
    )
    path.mkdir(parents=True, exist_ok=True)
    with atomic_write(path / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_write(path / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_adapter(path: str | os.PathLike) -> tuple[HydraLoraConfig, dict[str, torch.Tensor]]:
    """Config and tensors of an adapter directory, with errors that name the broken file."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter directory")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.exists():
        raise AdapterError(
            f"{path}: missing {CONFIG_NAME}; an adapter directory holds {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} as written by save_adapter"
        )
    if not weights_file.exists():
        raise AdapterError(f"{path}: missing {WEIGHTS_NAME}")
    config = HydraLoraConfig.from_json_file(config_file)
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(
            f"{weights_file}: not a readable safetensors file ({err}); the file is truncated "
            "or corrupted: save the adapter again or restore it from a checkpoint"
        ) from None
    return config, tensors


def load_adapter(
    model: nn.Module, path: str | os.PathLike, is_trainable: bool = False
) -> nn.Module:
    """Inject HydraLoRA into `model` from the saved config and load the saved weights.

    Every key and shape is checked and all mismatches are reported at once; on any error the
    model is given back untouched. Returns the model (in eval mode unless `is_trainable`).
    `path`: a folder, or a hub id (owner/name[@revision]) fetched with huggingface_hub.
    """
    path = resolve_adapter(path)
    config, tensors = read_adapter(path)
    saved_base = json.loads((Path(path) / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    add_hydralora(model, config)
    try:
        load_adapter_weights(model, tensors, source=str(Path(path) / WEIGHTS_NAME))
    except BaseException:
        remove_hydralora(model)
        raise
    current = _base_model_name(model)
    if saved_base and current and not same_base_model(str(saved_base), current):
        warnings.warn(
            f"{path}: adapter was trained on {saved_base!r}, loading into {current!r}; "
            "its weights may not fit this model",
            stacklevel=2,
        )
    for p in adapter_state_dict(model).values():
        p.requires_grad_(is_trainable)
    if not is_trainable:
        model.eval()
    return model


def load_adapter_weights(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "adapter"
) -> None:
    """Copy `tensors` into the model's adapter parameters after checking every key and shape."""
    params = adapter_state_dict(model)
    problems = []
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}")
    for key in sorted(set(params) & set(tensors)):
        want, got = tuple(params[key].shape), tuple(tensors[key].shape)
        if want != got:
            problems.append(f"{key}: saved shape {got}, model expects {want}")
    if problems:
        raise AdapterError(
            f"{source} does not fit this model ({len(problems)} problem(s)); was it trained on "
            "another base model or config?\n  " + "\n  ".join(problems)
        )
    kinds = [f"{k} ({str(tensors[k].dtype).removeprefix('torch.')})" for k in sorted(params)
             if not tensors[k].is_floating_point()]
    if kinds:
        raise AdapterError(f"{source}: tensor {kinds[0]} is not floating point"
                           + (f" ({len(kinds) - 1} more)" if len(kinds) > 1 else "")
                           + "; adapter weights are float tensors: the file is broken or not an adapter")
    broken = [k for k in sorted(params) if not torch.isfinite(tensors[k]).all()]
    if broken:
        raise AdapterError(
            f"{source}: tensor {broken[0]} holds NaN or infinite values"
            + (f" ({len(broken) - 1} more tensors too)" if len(broken) > 1 else "")
            + "; the adapter is broken (did training diverge?): use an earlier checkpoint"
        )
    huge = [(k, float(tensors[k].abs().max())) for k in sorted(params) if tensors[k].numel()]
    huge = [(k, v) for k, v in huge if v > MAX_ABS_WEIGHT]
    if huge:
        raise AdapterError(
            f"{source}: tensor {huge[0][0]} holds values up to {huge[0][1]:.3g} (adapter weights stay far "
            f"below {MAX_ABS_WEIGHT:g}); the adapter is broken: use an earlier checkpoint")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key].to(p.dtype))
