"""Router statistics and head diversity: what the gates do and whether the heads differ.

- usage: mean gate per head and share of tokens whose top head it is (per layer)
- gate entropy: mean over tokens of -sum_i g_i log g_i (log k = uniform, 0 = one head)
- head similarity: mean pairwise cosine similarity of the flattened B heads of a layer
  (1 = the heads are copies of each other, 0 = unrelated)
The statistics are gathered by a `GateStats` carried in the routing context of each forward.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Collator, group_by_domain
from ..dist import progress
from ..info import head_similarity
from ..model import hydralora_layers
from .context import GateStats, RoutingContext


@torch.no_grad()
def gate_statistics(model: nn.Module, features: list[dict[str, Any]], pad_token_id: int,
                    batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """Router statistics per layer (mean gate, top-1 share, entropy) over the real tokens of
    tokenized `features`, computed in eval mode."""
    was_training = model.training
    model.eval()
    stats = GateStats()
    collate = Collator(pad_token_id)
    device = next(model.parameters()).device
    try:
        for i in progress(range(0, len(features), batch_size), "router statistics", unit="batch"):
            batch = {k: v.to(device) if torch.is_tensor(v) else v
                     for k, v in collate(features[i : i + batch_size]).items()}
            with RoutingContext.from_batch(batch, stats=stats):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return stats.summary(model)
    finally:
        model.train(was_training)


def diversity_report(model: nn.Module, stats: dict[str, dict[str, Any]] | None = None) -> dict:
    """Scalars for logs and summaries: head similarity, gate entropy (normalized), usage."""
    layers = hydralora_layers(model)
    sims = [head_similarity(layer.lora_B.detach().float().cpu().numpy(), layer.num_heads)
            for layer in layers.values()
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
