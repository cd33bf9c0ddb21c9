"""Export a HydraLoRA adapter for serving: a standard PEFT LoRA, or a merged full model.

HydraLoRA's gates depend on the token, so no static weight reproduces it exactly. With a
fixed gate vector g per layer the heads collapse: sum_i g_i B_i A = B_eff A, a rank-r LoRA
(shared A) or, with one A per head, the rank-k*r LoRA [g_1 B_1 ... g_k B_k] [A_1; ...; A_k].
That LoRA is what PEFT, vLLM and plain transformers load. Gates:

    uniform          1/k for every head
    mean             the mean router gates over the tokens of a calibration file (--data)
    domain=NAME      the mean over the examples of one domain of --data
    FILE             a JSON file: {"<layer path>": [g_1, ..., g_k], ...}; a "*" entry applies
                     to every layer not listed

`export` also reports what fixing the gates costs: the held-out loss of the fixed-gate model
next to the dynamic one on --data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from .base_models import DEFAULT_MODEL
from .data import DEFAULT_MAX_LENGTH, group_by_domain, load_examples, tokenize_examples
from .errors import ConfigError
from .eval.loss import domain_losses
from .files import check_output_dir, read_json_object, staged_dir
from .methods import adapter_kind, load_model_with_adapter
from .model import hydralora_layers, remove_hydralora
from .options import check_ranges
from .routing import gate_statistics

FORMATS = ("peft-lora", "merged")


@dataclass
class ExportOptions:
    """Export a HydraLoRA adapter as a PEFT LoRA or a merged model."""

    adapter: str = field(default="", metadata={"required": True})
    """HydraLoRA adapter directory."""
    output: str = field(default="", metadata={"required": True})
    """Directory to write (refused if it exists and is not empty, unless --overwrite)."""
    model: str = DEFAULT_MODEL
    """Base model: hub id, local directory, .gguf file, or built-in name."""
    format: str = field(default="peft-lora", metadata={"choices": FORMATS})
    """peft-lora (a PEFT LoRA directory) or merged (a full transformers model)."""
    gates: str = "uniform"
    """uniform | mean | domain=NAME (both need --data) | a JSON file {layer: [g...]}."""
    data: list[str] | None = None
    """Calibration / held-out file(s)."""
    overwrite: bool = False
    """Allow replacing a non-empty --output."""
    max_length: int = DEFAULT_MAX_LENGTH
    """Tokens per calibration example."""

    def __post_init__(self) -> None:
        check_ranges(self, {"max_length": ">=1"})


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
    """Per layer, the router's mean gate vector over the real tokens of `features`."""
    if not features:
        raise ConfigError("no examples to average the gates over (check --data and the domain name)")
    stats = gate_statistics(model, features, pad_token_id, batch_size)
    return {name: torch.tensor(s["mean_gate"], dtype=torch.float32) for name, s in stats.items()}


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
        gates = mean_gates(model, features, pad_token_id)
        for name, layer in layers.items():  # layers without a router have fixed gates already
            gates.setdefault(name, torch.full((layer.num_heads,), 1.0 / layer.num_heads))
        return gates
    return gates_from_file(spec, layers)


def merge_fixed(model: nn.Module, gates: dict[str, torch.Tensor]) -> None:
    for name, layer in hydralora_layers(model).items():
        layer.merge(gates[name])


def unmerge_all(model: nn.Module) -> None:
    for layer in hydralora_layers(model).values():
        if layer.merged:
            layer.unmerge()


def export_peft_lora(model: nn.Module, gates: dict[str, torch.Tensor], output: str | Path,
                     base_model_name: str | None = None, overwrite: bool = False,
                     report: dict[str, Any] | None = None) -> Path:
    """Write a standard PEFT LoRA directory equal to `model` with fixed `gates`.

    Consumes the HydraLoRA layers: `model` becomes a PeftModel-free base model again afterwards
    (the caller should reload if it needs the HydraLoRA model).
    """
    layers = hydralora_layers(model)
    cfg = next(iter(layers.values())).config
    factors = {name: layer.fixed_gate_factors(gates[name]) for name, layer in layers.items()}
    rank = cfg.r if cfg.shared_a else cfg.r * cfg.num_heads
    scaling = cfg.scaling
    output = Path(output)
    with staged_dir(output, overwrite) as tmp:
        remove_hydralora(model)
        lora = LoraConfig(r=rank, lora_alpha=scaling * rank, lora_dropout=0.0,
                          target_modules=sorted(layers), bias="none", task_type="CAUSAL_LM",
                          fan_in_fan_out=any(l.fan_in_fan_out for l in layers.values()))
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():
            for name, (b_eff, a_eff) in factors.items():
                module = peft_model.base_model.model.get_submodule(name)
                module.lora_A["default"].weight.copy_(a_eff)
                module.lora_B["default"].weight.copy_(b_eff)
        if base_model_name:
            peft_model.peft_config["default"].base_model_name_or_path = base_model_name
        peft_model.save_pretrained(tmp)
        peft_model.unload()
        _write_report(tmp, report, gates)
    return output


def export_merged(model: nn.Module, gates: dict[str, torch.Tensor], tokenizer, output: str | Path,
                  overwrite: bool = False, report: dict[str, Any] | None = None) -> Path:
    """Fold the fixed-gate update into the base weights and save a plain transformers model."""
    output = Path(output)
    with staged_dir(output, overwrite) as tmp:
        merge_fixed(model, gates)
        remove_hydralora(model, keep_merged=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_report(tmp, report, gates)
    return output


def _write_report(folder: Path, report: dict[str, Any] | None, gates: dict[str, torch.Tensor]) -> None:
    with open(folder / "hydralora_export.json", "w") as f:
        json.dump({**(report or {}), "gates_per_layer": {n: g.tolist() for n, g in gates.items()}},
                  f, indent=1)


def run_export(opts: ExportOptions) -> dict:
    """The `hydralora export` command: resolve gates, report the cost of fixing them, export."""
    if opts.format not in FORMATS:
        raise ConfigError(f"--format {opts.format!r}: choose one of {', '.join(FORMATS)}")
    if adapter_kind(opts.adapter) != "hydralora":
        raise ConfigError(f"{opts.adapter}: export takes a HydraLoRA adapter (PEFT adapters need no export)")
    output = Path(opts.output)
    base = Path(opts.model)
    if base.is_dir() and output.exists() and output.resolve() == base.resolve():
        raise ConfigError(f"--output {output} is the base model's own folder; write the export elsewhere")
    check_output_dir(output, opts.overwrite, keep=Path(opts.adapter))
    model, tokenizer = load_model_with_adapter(opts.model, opts.adapter)
    features = None
    if opts.data:
        features, _ = tokenize_examples(load_examples(opts.data), tokenizer, opts.max_length,
                                        skip_overlong=True)
    gates = resolve_gates(model, opts.gates, features, tokenizer.pad_token_id)
    report: dict[str, Any] = {"format": opts.format, "gates": opts.gates, "source_adapter": str(opts.adapter)}
    if features:
        dynamic = domain_losses(model, features, tokenizer.pad_token_id)
        merge_fixed(model, gates)
        fixed = domain_losses(model, features, tokenizer.pad_token_id)
        unmerge_all(model)
        report.update(dynamic=dynamic, fixed=fixed)
        print("held-out loss with dynamic routing vs the exported fixed gates "
              f"(--gates {opts.gates}):")
        for domain in dynamic:
            d, f = dynamic[domain]["loss"], fixed[domain]["loss"]
            print(f"  {domain:>10}: dynamic {d:.4f}  fixed {f:.4f}  ({f - d:+.4f})")
    if opts.format == "peft-lora":
        export_peft_lora(model, gates, output, base_model_name=opts.model, overwrite=opts.overwrite,
                         report=report)
    else:
        export_merged(model, gates, tokenizer, output, overwrite=opts.overwrite, report=report)
    print(f"wrote {opts.format} export to {output}")
    return report
