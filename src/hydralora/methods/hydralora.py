"""HydraLoRA through this package's own layers: build, save, load, name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..clustering.kmeans import ClusterModel
from ..config import HydraLoraConfig
from ..data import Example
from ..files import ROUTER_STATS, write_json
from ..files import CONFIG_NAME
from ..model import add_hydralora, load_adapter, save_adapter
from .base import Built, Method, one_part

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
                build=build, save=save, load=load, variant=variant,
                trains_router=True)


def oracle_labeler(model: nn.Module, path: Path):
    """For an adapter with oracle routing: (head names, cluster model or None) to label
    examples with (`routing.attach_route_labels`); None for any other adapter."""
    config = getattr(model, "hydralora_config", None)
    if config is None or config.routing != "oracle":
        return None
    clusters = ClusterModel.load(path / ROUTE_CLUSTERS) if (path / ROUTE_CLUSTERS).is_dir() else None
    return config.route_labels, clusters
