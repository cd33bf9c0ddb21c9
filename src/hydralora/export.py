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

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from torch import nn

from .clustering.kmeans import ClusterModel
from .commands.common import EXPORT_FORMATS, GROUPINGS
from .commands.export import ExportOptions
from .data import load_examples, tokenize_examples
from .errors import ConfigError
from .eval.loss import domain_losses
from .files import SPLIT_FILE, write_json, write_text
from .folders import check_output_dir, staged_dir
from .cards import export_card
from .hub import resolve_adapter
from .info import adapter_kind
from .methods import load_model_with_adapter
from .methods.lora_split import load as load_routed
from .model import hydralora_layers, remove_hydralora
from .routing.fixed import (
    fixed_gate_lora_config,
    mean_gates,
    merge_fixed,
    resolve_gates,
    unmerge_all,
)
from .routing.requests import group_examples


def export_peft_lora(model: nn.Module, gates: dict[str, torch.Tensor], output: str | Path,
                     base_model_name: str | None = None, overwrite: bool = False,
                     report: dict[str, Any] | None = None) -> Path:
    """Write a standard PEFT LoRA directory equal to `model` with fixed `gates`.

    Consumes the HydraLoRA layers: `model` becomes a PeftModel-free base model again afterwards
    (the caller should reload if it needs the HydraLoRA model).
    """
    layers = hydralora_layers(model)
    factors = {name: layer.fixed_gate_factors(gates[name]) for name, layer in layers.items()}
    lora = fixed_gate_lora_config(layers)
    output = Path(output)
    with staged_dir(output, overwrite) as tmp:
        remove_hydralora(model)
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
        _write_card(tmp, output, base_model_name or _base_name(model), "peft-lora", report)
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
        _write_card(tmp, output, (report or {}).get("base_model") or _base_name(model), "merged", report)
    return output


def _base_name(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "name_or_path", "") or "unknown")


def base_model_name(model: str) -> str:
    """The base model as the export records it: a local folder as an absolute path (the export
    loads from anywhere), anything else as given."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def _write_card(folder: Path, output: Path, base: str, fmt: str, report: dict[str, Any] | None) -> None:
    """Our model card in place of PEFT's blank one (also in each per-request adapter's folder);
    `folder` is where the export is built, `output` where it goes."""
    report = report or {}
    gates, source = str(report.get("gates", "?")), str(report.get("source_adapter", "?"))
    write_text(folder / "README.md", export_card(folder, base, fmt, gates, source, output.name))
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "adapter_config.json").exists()):
        write_text(sub / "README.md", export_card(sub, base, "peft-lora", gates, source,
                                                  f"{output.name}/{sub.name}"))


def _write_report(folder: Path, report: dict[str, Any] | None, gates: dict[str, torch.Tensor]) -> None:
    with open(folder / "hydralora_export.json", "w") as f:
        json.dump({**(report or {}), "gates_per_layer": {n: g.tolist() for n, g in gates.items()}},
                  f, indent=1)


def run_export(opts: ExportOptions) -> dict:
    """The `hydralora export` command: resolve gates, report the cost of fixing them, export."""
    opts = dataclasses.replace(opts, adapter=str(resolve_adapter(opts.adapter)))  # a hub id: its snapshot
    if opts.format not in EXPORT_FORMATS:
        raise ConfigError(f"--format {opts.format!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if adapter_kind(opts.adapter) != "hydralora":
        raise ConfigError(f"{opts.adapter}: export takes a HydraLoRA adapter (PEFT adapters need no export)")
    if opts.gates in GROUPINGS and (opts.format != "peft-lora" or not opts.data):
        raise ConfigError(f"--gates {opts.gates} writes one PEFT LoRA per group of --data: give "
                          "--data FILE and --format peft-lora")
    output = Path(opts.output)
    base = Path(opts.model)
    if base.is_dir() and output.exists() and output.resolve() == base.resolve():
        raise ConfigError(f"--output {output} is the base model's own folder; write the export elsewhere")
    if opts.quantize != "none" and opts.format == "merged":
        raise ConfigError(f"--format merged cannot fold the adapter into a --quantize {opts.quantize} "
                          "base: drop --quantize (or export --format peft-lora)")
    check_output_dir(output, opts.overwrite, keep=Path(opts.adapter))
    model, tokenizer = load_model_with_adapter(opts.model, opts.adapter, dtype=opts.dtype,
                                               device=opts.device, quantize=opts.quantize)
    features = None
    if opts.data:
        features, _ = tokenize_examples(load_examples(opts.data), tokenizer, opts.max_length,
                                        skip_overlong=True)
    if opts.gates in GROUPINGS:
        return export_per_group(opts, model, tokenizer.pad_token_id, features, output)
    gates = resolve_gates(model, opts.gates, features, tokenizer.pad_token_id)
    report: dict[str, Any] = {"format": opts.format, "gates": opts.gates, "source_adapter": str(opts.adapter),
                              "base_model": base_model_name(opts.model)}
    if features and opts.quantize != "none":
        print("note: the held-out loss of the fixed gates needs merging, which a quantized base cannot do")
    elif features:
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
        export_peft_lora(model, gates, output, base_model_name=base_model_name(opts.model),
                         overwrite=opts.overwrite, report=report)
    else:
        export_merged(model, gates, tokenizer, output, overwrite=opts.overwrite, report=report)
    print(f"wrote {opts.format} export to {output}")
    return report


def export_per_group(opts: ExportOptions, model: nn.Module, pad_token_id: int,
                     features: list[dict[str, Any]], output: Path) -> dict:
    """`--gates per-domain|per-cluster`: one PEFT LoRA per group and a request router (see
    `routed`); reports the held-out loss of dynamic routing, of the per-request adapters (each
    example sent by the router) and of one uniform export, on --data."""
    names, groups, router = group_examples(features, opts.gates, model.hydralora_config.num_heads)
    gates = per_group_gates(model, groups, pad_token_id)
    dynamic = domain_losses(model, features, pad_token_id)
    merge_fixed(model, resolve_gates(model, "uniform"))
    uniform = domain_losses(model, features, pad_token_id)
    unmerge_all(model)
    report: dict[str, Any] = {"format": "peft-lora", "gates": opts.gates, "groups": names,
                              "group_sizes": [len(g) for g in groups],
                              "source_adapter": str(opts.adapter), "dynamic": dynamic, "uniform": uniform}
    export_routed(model, names, gates, router, output, base_model_name(opts.model),
                  f"hydralora export --gates {opts.gates}", opts.overwrite, report)
    routed, request_router = load_routed(model, output)  # the written folder, as a server sees it
    sent = request_router.route([f["instruction"] for f in features])
    report["per_request"] = domain_losses(routed, [{**f, "adapter_name": n} for f, n in zip(features, sent)],
                                          pad_token_id)
    if opts.gates == "per-domain":
        name_of = dict(zip(sorted({f["domain"] for f in features}), names))  # group_examples' order
        right = [n == name_of[f["domain"]] for f, n in zip(features, sent)]
        report["router_accuracy"] = sum(right) / len(right)
    with open(output / "hydralora_export.json") as f:
        saved = json.load(f)
    write_json(output / "hydralora_export.json", {**saved, **report}, indent=1)
    print(f"held-out loss on --data (dynamic routing | per-request adapters, --gates {opts.gates} "
          "| one uniform export):")
    for domain in dynamic:
        print(f"  {domain:>10}: {dynamic[domain]['loss']:.4f} | "
              f"{report['per_request'][domain]['loss']:.4f} | {uniform[domain]['loss']:.4f}")
    if "router_accuracy" in report:
        print(f"the request router sends {100 * report['router_accuracy']:.1f}% of the examples to "
              "their own domain's adapter")
    print(f"wrote {len(names)} PEFT LoRAs ({', '.join(names)}) and the request router to {output}")
    return report


# ---------------------------------------------------------------------------- per-request exports
def export_routed(model: nn.Module, names: list[str], gates: list[dict[str, torch.Tensor]],
                  router: ClusterModel, output: Path, base_model_name: str, how: str,
                  overwrite: bool = False, report: dict[str, Any] | None = None) -> Path:
    """Write one PEFT LoRA per group (its fixed gates) and the router. Consumes the HydraLoRA
    layers: `model` is the plain base model afterwards."""
    layers = hydralora_layers(model)
    factors = [{n: layer.fixed_gate_factors(g[n]) for n, layer in layers.items()} for g in gates]
    lora = fixed_gate_lora_config(layers)
    rank, scaling = lora.r, lora.lora_alpha / lora.r  # the HydraLoRA scaling alpha / r
    with staged_dir(output, overwrite) as tmp:
        remove_hydralora(model)
        peft_model = get_peft_model(model, lora, adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, lora)
        with torch.no_grad():
            for name, group in zip(names, factors):
                for module_name, (b_eff, a_eff) in group.items():
                    module = peft_model.base_model.model.get_submodule(module_name)
                    module.lora_A[name].weight.copy_(a_eff)
                    module.lora_B[name].weight.copy_(b_eff)
        for name in names:
            peft_model.peft_config[name].base_model_name_or_path = base_model_name
        peft_model.save_pretrained(tmp)  # one subfolder per adapter (none is named 'default')
        peft_model.unload()
        router.save(tmp)
        write_json(tmp / SPLIT_FILE, {
            "peft_type": "LORA_SPLIT", "made_by": how, "k": len(names), "ranks": [rank] * len(names),
            "cluster_sizes": (report or {}).get("group_sizes"), "alpha": lora.lora_alpha,
            "scaling": [scaling] * len(names), "adapters": names,
            "base_model_name_or_path": base_model_name})
        with open(tmp / "hydralora_export.json", "w") as f:
            json.dump({**(report or {}), "gates_per_group": {
                n: {layer: g[layer].tolist() for layer in g} for n, g in zip(names, gates)}}, f, indent=1)
        _write_card(tmp, output, base_model_name, "peft-lora", {"gates": how.rsplit(" ", 1)[-1], **(report or {})})
    return output


def per_group_gates(model: nn.Module, groups: list[list[dict[str, Any]]],
                    pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """For each group: per layer, the router's mean gates over the group's tokens."""
    return [mean_gates(model, group, pad_token_id) for group in groups]
