"""HydraLoRA through this package's own layers: build, save, load, describe, name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cluster_model import ClusterModel
from ..config import HydraLoraConfig
from ..data import Example
from ..files import write_json
from ..model import CONFIG_NAME, add_hydralora, load_adapter, read_adapter, save_adapter
from ..routing import head_similarity
from .base import Built, Method, one_part

ROUTER_STATS = "router_stats.json"
ROUTE_CLUSTERS = "route_clusters"  # oracle routing by cluster: the k-means model of the labels


def build(model: nn.Module, adapter: HydraLoraConfig, seed: int, examples: list[Example],
          options: dict[str, Any]) -> Built:
    torch.manual_seed(seed)
    return Built(add_hydralora(model, adapter), one_part(variant(adapter, options)))


def save(built: Built, output: Path, base_model: str) -> None:
    save_adapter(built.model, output)
    stats = built.state.get("router_stats")
    if stats:
        write_json(output / ROUTER_STATS, stats, indent=1)
    if built.state.get("route_clusters") is not None:
        built.state["route_clusters"].save(output / ROUTE_CLUSTERS)


def load(model: nn.Module, path: Path) -> tuple[nn.Module, None]:
    return load_adapter(model, path), None


def describe(path: Path) -> dict[str, Any]:
    """Config, parameter counts, head similarity, and the run's summary if present."""
    config, tensors = read_adapter(path)
    meta = json.loads((path / CONFIG_NAME).read_text())
    layers: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        module, _, name = key.rpartition(".")
        layers.setdefault(module, {})[name] = tensor
    sims = [head_similarity(p["lora_B"], config.num_heads) for p in layers.values()]
    sims = [s for s in sims if s is not None]
    info: dict[str, Any] = dict(
        config=config.to_dict(),
        base_model=meta.get("base_model_name_or_path"),
        version=meta.get("hydralora_version"),
        layers=len(layers),
        parameters=sum(t.numel() for t in tensors.values()),
        head_cos_sim_mean=sum(sims) / len(sims) if sims else None,
        head_cos_sim_max=max(sims) if sims else None,
    )
    for extra in ("summary.json", ROUTER_STATS):
        if (path / extra).exists():
            info[extra.removesuffix(".json")] = json.loads((path / extra).read_text())
    return info


def format_info(info: dict[str, Any]) -> str:
    c = info["config"]
    lines = [
        f"{info['path']}: HydraLoRA adapter (hydralora {info['version']})",
        f"base model: {info['base_model']}",
        f"r={c['r']} alpha={c['alpha']} heads={c['num_heads']} router={c['router']} "
        f"router_input={c['router_input']} shared_a={c['shared_a']} targets={c['target_modules']}",
        f"layers: {info['layers']}, parameters: {info['parameters']:,}",
    ]
    if c.get("k_selection"):
        ks = c["k_selection"]
        lines.append(f"num_heads chosen automatically: k={ks['k']} ({ks.get('method')})")
    if info["head_cos_sim_mean"] is not None:
        lines.append(
            f"head similarity (mean pairwise cosine of B heads): mean {info['head_cos_sim_mean']:.3f}, "
            f"max {info['head_cos_sim_max']:.3f}"
        )
    stats = info.get("router_stats")
    if stats:
        ent = [s["entropy"] for s in stats.values()]
        share = [max(s["mean_gate"]) for s in stats.values()]
        lines.append(
            f"router (last logging window): gate entropy {sum(ent) / len(ent):.3f}, "
            f"top head share {sum(share) / len(share):.3f}"
        )
    summary = info.get("summary")
    if summary:
        lines.append(
            f"training: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
            f"{summary['tokens_per_second']:.0f} tokens/s"
        )
        div = summary.get("diversity") or {}
        if "domain_gate_spread" in div:
            lines.append(
                f"mean gates differ between domains by {div['domain_gate_spread']:.3f} "
                "(mean pairwise total-variation distance; 0 = same routing for every domain)"
            )
    return "\n".join(lines)


def variant(adapter: HydraLoraConfig, options: dict[str, Any]) -> str:
    """A short description of the variant, naming the paper's ablations."""
    parts = [f"HydraLoRA r={adapter.r}, k={adapter.num_heads}"]
    if adapter.num_heads == 1:
        parts.append("one head: w/o MoE")
    elif adapter.router == "uniform":
        parts.append("uniform router: w/o gate")
    elif adapter.router == "topk":
        parts.append(f"top-{adapter.top_k} router")
    if not adapter.shared_a:
        parts.append("one A per head: w/o Hydra")
    if adapter.router_input == "a" and adapter.has_router:
        parts.append("routing on A x")
    if adapter.routing == "sequence":
        parts.append("sequence routing")
    elif adapter.routing == "oracle":
        parts.append("oracle routing (diagnostic)")
    if adapter.init_heads != "zero":
        parts.append(f"{adapter.init_heads} head init")
    if adapter.has_router and adapter.router_init != "kaiming":
        parts.append(f"{adapter.router_init} router init")
    if adapter.head_dropout > 0 and adapter.num_heads > 1:
        parts.append(f"head dropout {adapter.head_dropout:g}")
    if adapter.has_router and adapter.router_temperature != 1.0:
        parts.append(f"router temperature {adapter.router_temperature:g}")
    if adapter.has_router and adapter.balance_loss_weight > 0:
        parts.append(f"balance loss {adapter.balance_loss_weight:g}")
    guide = options.get("guide_loss_weight", 0.0)
    if adapter.has_router and guide > 0:
        schedule = options.get("guide_schedule", "constant")
        parts.append(f"{options.get('route_labels_from', 'cluster')}-guided {guide:g}"
                     + ("" if schedule == "constant" else f" ({schedule})"))
    multiplier = options.get("router_lr_multiplier", 1.0)
    if adapter.has_router and multiplier != 1.0:
        parts.append(f"router lr x{multiplier:g}")
    return ", ".join(parts)


METHOD = Method(name="hydralora",
                files=(CONFIG_NAME, "adapter_model.safetensors", ROUTER_STATS, ROUTE_CLUSTERS),
                build=build, save=save, load=load, describe=describe, format=format_info,
                variant=variant, trains_router=True)


def oracle_labeler(model: nn.Module, path: Path):
    """For an adapter with oracle routing: (head names, cluster model or None) to label
    examples with (`routing.attach_route_labels`); None for any other adapter."""
    config = getattr(model, "hydralora_config", None)
    if config is None or config.routing != "oracle":
        return None
    clusters = ClusterModel.load(path / ROUTE_CLUSTERS) if (path / ROUTE_CLUSTERS).is_dir() else None
    return config.route_labels, clusters
