"""Per-request adapters for serving engines: one PEFT LoRA per group of requests, and a router.

No serving engine routes per token; every one (vLLM, TGI, SGLang) serves a PEFT LoRA per
request. `export --gates per-domain` (the domains of --data) or `--gates per-cluster` (k-means
clusters of its instructions) fixes the gates of each group to the router's mean over the
group's examples, writes each group as an ordinary PEFT LoRA, and saves a request router: the
TF-IDF nearest-centroid model of the groups (domain centroids, or the k-means model), small
enough to run in front of the engine. The folder has the layout of a LoRA-Split folder
(`lora_split.json`, `cluster_model.*`, one PEFT LoRA per subfolder), so `hydralora eval`,
`generate`, `info` and `route` take it as an adapter.

    OUTPUT/lora_split.json                       groups, ranks, alpha, base model, how made
    OUTPUT/cluster_model.json, .safetensors      the request router
    OUTPUT/<group>/adapter_config.json, adapter_model.safetensors
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import get_peft_model
from torch import nn

from .cluster_model import ClusterModel, tfidf_features
from .errors import ConfigError
from .files import safe_name, staged_dir, write_json
from .gates import fixed_gate_lora_config, mean_gates
from .methods.lora_split import SPLIT_FILE, SplitRouter
from .model import hydralora_layers, remove_hydralora

GROUPINGS = ("per-domain", "per-cluster")


def domain_router(instructions: list[str], domains: list[str], names: list[str]) -> ClusterModel:
    """A nearest-centroid router whose centroids are the mean TF-IDF vector of each domain's
    instructions (in the order of `names`)."""
    features, vectorizer = tfidf_features(instructions)
    rows = np.asarray([names.index(d) for d in domains])
    dense = features.toarray()
    centroids = np.stack([dense[rows == i].mean(0) for i in range(len(names))])
    return ClusterModel(vectorizer, centroids)


def group_examples(features: list[dict[str, Any]], grouping: str, k: int,
                   seed: int = 0) -> tuple[list[str], list[list[dict[str, Any]]], ClusterModel]:
    """(group names, the examples of each group, the request router) for `grouping`."""
    instructions = [f["instruction"] for f in features]
    taken: set[str] = set()
    if grouping == "per-domain":
        domains = [f.get("domain") for f in features]
        if any(d is None for d in domains):
            raise ConfigError("--gates per-domain needs a 'domain' field on every example of --data")
        labels = sorted(set(domains))
        if len(labels) < 2:
            raise ConfigError("--gates per-domain needs examples of at least two domains in --data")
        router = domain_router(instructions, domains, labels)
        groups = [[f for f in features if f["domain"] == d] for d in labels]
        return [safe_name(d, taken) for d in labels], groups, router
    if k > len(features):
        raise ConfigError(f"--gates per-cluster: {k} clusters need at least {k} examples in --data")
    router = ClusterModel.fit(instructions, k, seed=seed)
    groups = [[f for f, c in zip(features, router.labels) if c == i] for i in range(k)]
    return [safe_name(f"cluster_{i}", taken) for i in range(k)], groups, router


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
    return output


def per_group_gates(model: nn.Module, groups: list[list[dict[str, Any]]],
                    pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """For each group: per layer, the router's mean gates over the group's tokens."""
    return [mean_gates(model, group, pad_token_id) for group in groups]


# ---------------------------------------------------------------------------- the route command
@dataclass
class RouteOptions:
    """Name the adapter of a per-request export (or LoRA-Split folder) that serves each prompt."""

    adapter: str = field(default="", metadata={"required": True})
    """Folder written by `export --gates per-domain|per-cluster` (or `train --method lora-split`)."""
    prompt: list[str] = field(default_factory=list, metadata={"required": True})
    """One or more prompts."""
    json: bool = False
    """Print JSON: [{"prompt": ..., "adapter": ..., "path": ...}]."""


def route_prompts(folder: str | Path, prompts: list[str]) -> list[str]:
    """The adapter name (a subfolder of `folder`) for each prompt."""
    folder = Path(folder)
    if not (folder / SPLIT_FILE).exists():
        raise ConfigError(f"{folder}: no {SPLIT_FILE}; give a folder written by "
                          "`export --gates per-domain|per-cluster` or `train --method lora-split`")
    return SplitRouter.load(folder).route(prompts)


def run_route(opts: RouteOptions) -> list[str]:
    names = route_prompts(opts.adapter, opts.prompt)
    if opts.json:
        print(json.dumps([{"prompt": p, "adapter": n, "path": str(Path(opts.adapter) / n)}
                          for p, n in zip(opts.prompt, names)], indent=2))
    else:
        for p, n in zip(opts.prompt, names):
            print(f"{n}\t{p}")
    return names
