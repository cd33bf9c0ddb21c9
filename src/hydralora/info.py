"""`hydralora info`: what an adapter directory holds, and how different its heads are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .model import CONFIG_NAME, read_adapter
from .routing import head_similarity


def adapter_info(path: str | Path) -> dict[str, Any]:
    """Config, parameter counts, head similarity per layer, and the run's summary if present."""
    from .models import adapter_kind

    path = Path(path)
    kind = adapter_kind(path)
    info: dict[str, Any] = {"path": str(path), "kind": kind}
    if kind == "lora":
        info["config"] = json.loads((path / CONFIG_NAME).read_text())
        return info
    if kind == "lora-split":
        info["config"] = json.loads((path / "lora_split.json").read_text())
        return info
    config, tensors = read_adapter(path)
    meta = json.loads((path / CONFIG_NAME).read_text())
    layers: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        module, _, name = key.rpartition(".")
        layers.setdefault(module, {})[name] = tensor
    sims = [head_similarity(p["lora_B"], config.num_heads) for p in layers.values()]
    sims = [s for s in sims if s is not None]
    info.update(
        config=config.to_dict(),
        base_model=meta.get("base_model_name_or_path"),
        version=meta.get("hydralora_version"),
        layers=len(layers),
        parameters=sum(t.numel() for t in tensors.values()),
        head_cos_sim_mean=sum(sims) / len(sims) if sims else None,
        head_cos_sim_max=max(sims) if sims else None,
    )
    for extra in ("summary.json", "router_stats.json"):
        if (path / extra).exists():
            info[extra.removesuffix(".json")] = json.loads((path / extra).read_text())
    return info


def format_info(info: dict[str, Any]) -> str:
    if info["kind"] == "lora-split":
        c = info["config"]
        return (f"{info['path']}: LoRA-Split, {c['k']} PEFT LoRA adapters (ranks {c['ranks']}), "
                f"cluster sizes {c['cluster_sizes']}, base={c.get('base_model_name_or_path')}; "
                "prompts go to the adapter of their nearest TF-IDF centroid")
    if info["kind"] == "lora":
        c = info["config"]
        return (f"{info['path']}: PEFT LoRA adapter, r={c.get('r')}, alpha={c.get('lora_alpha')}, "
                f"targets={c.get('target_modules')}, base={c.get('base_model_name_or_path')}")
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
