"""Router statistics and head diversity: what the gates do and whether the heads differ.

- usage: mean gate per head and share of tokens whose top head it is (per layer)
- gate entropy: mean over tokens of -sum_i g_i log g_i (log k = uniform, 0 = one head)
- head similarity: mean pairwise cosine similarity of the flattened B heads of a layer
  (1 = the heads are copies of each other, 0 = unrelated)
The balance loss itself lives on the layers (HydraLoraLinear._balance_loss) and is summed by
`hydralora.model.balance_loss`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .cluster_model import ClusterModel
from .data import IGNORE_INDEX, Collator, group_by_domain
from .dist import progress
from .errors import DataError
from .model import hydralora_layers, set_forced_gates, set_prompt_mask, set_token_mask
from .router import RouterStats


def route_batch(model: nn.Module, batch: dict[str, Any] | None) -> None:
    """Tell the layers about the next batch (None: forget it): its real tokens (statistics and
    balance loss skip padding), its prompt tokens (what sequence routing pools) and, for
    oracle routing, each example's head from its `route_labels`."""
    if batch is None:
        set_token_mask(model, None)
        set_prompt_mask(model, None)
        set_forced_gates(model, None)
        return
    real = batch["attention_mask"].bool()  # (B, T)
    set_token_mask(model, real)
    labels = batch.get("labels")
    set_prompt_mask(model, real if labels is None else real & (labels == IGNORE_INDEX))
    layers = list(hydralora_layers(model).values())
    if layers and layers[0].config.routing == "oracle":
        if "route_labels" not in batch:
            raise DataError("oracle routing needs each example's label (its domain or cluster): "
                            "give route labels, or use a model with a router")
        gates = torch.nn.functional.one_hot(batch["route_labels"], layers[0].num_heads).float()
        set_forced_gates(model, gates)


def route_label_names(examples_domains: list[str | None], source: str, k: int) -> list[str]:
    """The label each head stands for: the sorted domains (source 'domain') or cluster_<i>."""
    if source == "cluster":
        return [f"cluster_{i}" for i in range(k)]
    domains = sorted({d for d in examples_domains if d})
    if not domains or any(d is None for d in examples_domains):
        raise DataError("routing by domain needs a 'domain' field on every example")
    if len(domains) != k:
        raise DataError(f"routing by domain: {len(domains)} domains ({', '.join(domains)}) for "
                        f"{k} heads; pass --num-heads {len(domains)} (or auto)")
    return domains


def attach_route_labels(features: list[dict[str, Any]], names: list[str],
                        clusters: ClusterModel | None = None) -> None:
    """Give every tokenized example its `route_label` (the index of its head): by domain, or
    by the cluster of its instruction when `clusters` is given."""
    if clusters is not None:
        for f, c in zip(features, clusters.predict([f["instruction"] for f in features])):
            f["route_label"] = c
        return
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({f.get("domain") or "(none)" for f in features} - set(index))
    if unknown:
        raise DataError(f"examples of domain(s) {unknown} have no head; the heads stand for {names}")
    for f in features:
        f["route_label"] = index[f["domain"]]


def start_router_stats(model: nn.Module) -> None:
    """Begin (or restart) accumulating gate statistics on every layer."""
    for layer in hydralora_layers(model).values():
        layer.stats = RouterStats(layer.num_heads)


@torch.no_grad()
def gate_statistics(model: nn.Module, features: list[dict[str, Any]], pad_token_id: int,
                    batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """Router statistics per layer (mean gate, top-1 share, entropy) over the real tokens of
    tokenized `features`, computed in eval mode."""
    was_training = model.training
    model.eval()
    start_router_stats(model)
    collate = Collator(pad_token_id)
    device = next(model.parameters()).device
    try:
        for i in progress(range(0, len(features), batch_size), "router statistics", unit="batch"):
            batch = {k: v.to(device) if torch.is_tensor(v) else v
                     for k, v in collate(features[i : i + batch_size]).items()}
            route_batch(model, batch)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return collect_router_stats(model)
    finally:
        route_batch(model, None)
        stop_router_stats(model)
        model.train(was_training)


def stop_router_stats(model: nn.Module) -> None:
    for layer in hydralora_layers(model).values():
        layer.stats = None


def collect_router_stats(model: nn.Module, reset: bool = True) -> dict[str, dict[str, Any]]:
    """Per-layer summaries of the gates seen since the last reset."""
    out = {}
    for name, layer in hydralora_layers(model).items():
        if layer.stats is not None and layer.stats.tokens:
            out[name] = layer.stats.summary()
            if reset:
                layer.stats = RouterStats(layer.num_heads)
    return out


@torch.no_grad()
def head_similarity(lora_b: torch.Tensor, num_heads: int) -> float | None:
    """Mean pairwise cosine similarity of the B heads stored in `lora_b` (out x k*r).

    None for one head, or while a head is all zeros (at init it has no direction).
    """
    k = num_heads
    if k < 2:
        return None
    out, kr = lora_b.shape
    heads = lora_b.detach().float().view(out, k, kr // k).permute(1, 0, 2).reshape(k, -1)
    norms = heads.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        return None
    unit = heads / norms
    cos = unit @ unit.T  # (k, k)
    return float(cos[~torch.eye(k, dtype=torch.bool)].mean())


def diversity_report(model: nn.Module, stats: dict[str, dict[str, Any]] | None = None) -> dict:
    """Scalars for logs and summaries: head similarity, gate entropy (normalized), usage."""
    layers = hydralora_layers(model)
    sims = [head_similarity(layer.lora_B, layer.num_heads) for layer in layers.values()
            # skip FSDP shards (DTensor) and ZeRO-3 placeholders (empty): no whole B here
            if layer.lora_B.dim() == 2 and layer.lora_B.numel() and not hasattr(layer.lora_B, "placements")]
    sims = [s for s in sims if s is not None]
    report: dict[str, float] = {}
    if sims:
        report["head_cos_sim"] = sum(sims) / len(sims)
    if stats:
        k = next(iter(layers.values())).num_heads
        entropies = [s["entropy"] for s in stats.values()]
        report["gate_entropy"] = sum(entropies) / len(entropies)
        if k > 1:
            report["gate_entropy_norm"] = report["gate_entropy"] / math.log(k)
        # how unevenly the heads are used: the largest mean gate, averaged over layers
        report["top_head_share"] = sum(max(s["mean_gate"]) for s in stats.values()) / len(stats)
    return report


def domain_gate_spread(per_domain_gates: dict[str, torch.Tensor]) -> float:
    """How much the mean gates differ between domains for one layer: the mean over domain
    pairs of the total-variation distance between their mean gate vectors (0 = identical
    routing for every domain, 1 = disjoint heads)."""
    means = list(per_domain_gates.values())
    if len(means) < 2:
        return 0.0
    dists = [
        0.5 * float((means[i] - means[j]).abs().sum())
        for i in range(len(means))
        for j in range(i + 1, len(means))
    ]
    return sum(dists) / len(dists)


def gates_by_domain(model, features, pad_token_id: int) -> dict[str, dict[str, dict[str, Any]]]:
    """{domain: {layer: stats}} for the examples of each domain."""
    groups = group_by_domain(features)
    return {d: gate_statistics(model, groups[d], pad_token_id) for d in sorted(groups)}


def router_report(per_domain: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    domains = list(per_domain)
    layers = list(next(iter(per_domain.values())))
    k = len(next(iter(next(iter(per_domain.values())).values()))["mean_gate"])
    mean = {d: np.mean([per_domain[d][l]["mean_gate"] for l in layers], axis=0).tolist() for d in domains}
    entropy = {d: float(np.mean([per_domain[d][l]["entropy"] for l in layers])) for d in domains}
    spread = {l: domain_gate_spread({d: torch.tensor(per_domain[d][l]["mean_gate"]) for d in domains})
              for l in layers}
    return {"domains": domains, "layers": layers, "num_heads": k, "mean_gate_by_domain": mean,
            "entropy_by_domain": entropy, "max_entropy": math.log(k) if k > 1 else 0.0,
            "domain_spread_by_layer": spread,
            "domain_spread_mean": float(np.mean(list(spread.values()))),
            "per_layer": {l: {d: per_domain[d][l]["mean_gate"] for d in domains} for l in layers}}
