"""Fixed gates for a HydraLoRA model: from a spec (uniform, mean, domain=NAME, a JSON file),
per group of examples, and folded into (or out of) the base weights.

HydraLoRA's gates depend on the token, so no static weight reproduces it exactly. With a fixed
gate vector g per layer the heads collapse: sum_i g_i B_i A = B_eff A, a rank-r LoRA (shared A)
or, with one A per head, the rank-k*r LoRA [g_1 B_1 ... g_k B_k] [A_1; ...; A_k].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from torch import nn

from ..data import group_by_domain
from ..errors import ConfigError
from ..readers import read_json_object
from ..model import hydralora_layers
from .stats import gate_statistics


def gates_from_file(path: str | Path, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Read and validate a gates JSON file; every problem is reported with the key."""
    path = Path(path)
    try:
        data = read_json_object(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such gates file") from None
    unknown = sorted(set(data) - set(layers) - {"*"})
    if unknown:
        raise ConfigError(f"{path}: unknown layer(s) {unknown[:5]}; layers are e.g. {sorted(layers)[:3]}")
    gates = {}
    for name, layer in layers.items():
        if name not in data and "*" not in data:
            raise ConfigError(f"{path}: no gates for layer {name!r} (add it or a '*' entry)")
        key = name if name in data else "*"
        gates[name] = check_gate_vector(data[key], layer.num_heads, f"{path}: {key!r}")
    return gates


def check_gate_vector(values: Any, k: int, where: str) -> torch.Tensor:
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise ConfigError(f"{where}: gates must be a list of {k} numbers")
    g = torch.tensor(values, dtype=torch.float32)
    if g.numel() != k:
        raise ConfigError(f"{where}: {g.numel()} gate values for {k} heads")
    if not torch.isfinite(g).all() or (g < 0).any():
        raise ConfigError(f"{where}: gates must be finite and non-negative, got {values}")
    if abs(float(g.sum()) - 1.0) > 1e-3:
        raise ConfigError(f"{where}: gates must sum to 1 (as the router's do), they sum to {float(g.sum()):.4f}")
    return g


def mean_gates(model: nn.Module, features: list[dict[str, Any]], pad_token_id: int,
               batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per layer, the router's mean gate vector over the real tokens of `features`; a layer
    without a router (one head, uniform router) gets its fixed uniform gates."""
    if not features:
        raise ConfigError("no examples to average the gates over (check --data and the domain name)")
    stats = gate_statistics(model, features, pad_token_id, batch_size)
    gates = {name: torch.tensor(s["mean_gate"], dtype=torch.float32) for name, s in stats.items()}
    for name, layer in hydralora_layers(model).items():
        gates.setdefault(name, torch.full((layer.num_heads,), 1.0 / layer.num_heads))
    return gates


def resolve_gates(model: nn.Module, spec: str, features: list[dict[str, Any]] | None = None,
                  pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Fixed gates for every layer from a spec: uniform, mean, domain=NAME or a JSON file."""
    layers = hydralora_layers(model)
    if spec == "uniform":
        return {n: torch.full((l.num_heads,), 1.0 / l.num_heads) for n, l in layers.items()}
    if spec == "mean" or spec.startswith("domain="):
        if features is None:
            raise ConfigError(f"--gates {spec} needs a calibration file: give --data FILE")
        if spec.startswith("domain="):
            domain = spec.split("=", 1)[1]
            groups = group_by_domain(features)
            if domain not in groups:
                raise ConfigError(f"--gates {spec}: no examples of domain {domain!r} in --data "
                                  f"(domains there: {', '.join(sorted(groups))})")
            features = groups[domain]
        return mean_gates(model, features, pad_token_id)
    return gates_from_file(spec, layers)


def fixed_gate_lora_config(layers: dict[str, nn.Module]) -> LoraConfig:
    """The PEFT LoRA that a HydraLoRA layer with fixed gates is: rank r (shared A) or k*r (one A
    per head), the same scaling, on the same modules (fixed_gate_factors gives its weights)."""
    cfg = next(iter(layers.values())).config
    rank = cfg.r if cfg.shared_a else cfg.r * cfg.num_heads
    return LoraConfig(r=rank, lora_alpha=cfg.scaling * rank, lora_dropout=0.0,
                      target_modules=sorted(layers), bias="none", task_type="CAUSAL_LM",
                      fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()))


def merge_fixed(model: nn.Module, gates: dict[str, torch.Tensor]) -> None:
    for name, layer in hydralora_layers(model).items():
        layer.merge(gates[name])


def unmerge_all(model: nn.Module) -> None:
    for layer in hydralora_layers(model).values():
        if layer.merged:
            layer.unmerge()
