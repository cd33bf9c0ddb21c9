"""`hydralora info`: what an adapter folder holds, and how different its heads are.

It reads the files only (JSON, and safetensors through numpy): no model is loaded and neither
torch nor transformers is imported, so the command answers at once. The same readers tell the
other commands which method wrote a folder (`adapter_kind`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .commands.info import InfoOptions
from .config import HydraLoraConfig
from .errors import AdapterError
from .files import CONFIG_NAME, ROUTER_STATS, SPLIT_FILE, WEIGHTS_NAME
from .readers import read_json
from .hub import resolve_adapter

PEFT_TYPES = {"HYDRALORA": "hydralora", "LORA": "lora"}


def adapter_kind(path: str | os.PathLike) -> str:
    """The method that wrote an adapter folder: 'hydralora', 'lora' (PEFT) or 'lora-split'
    (a hub id is fetched first)."""
    path = resolve_adapter(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter directory")
    if (path / SPLIT_FILE).exists():
        return "lora-split"
    config_file = path / CONFIG_NAME
    if not config_file.exists():
        raise AdapterError(f"{path}: missing {CONFIG_NAME}; is this an adapter directory?")
    data = _read_json(config_file)
    if not isinstance(data, dict):
        raise AdapterError(f"{config_file}: not a JSON object")
    peft_type = data.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise AdapterError(f"{config_file}: unsupported peft_type {peft_type!r}")
    return PEFT_TYPES[peft_type]


def head_similarity(lora_b: np.ndarray, num_heads: int) -> float | None:
    """Mean pairwise cosine similarity of the B heads stored in `lora_b` (out x k*r).

    None for one head, or while a head is all zeros (at init it has no direction).
    """
    k = num_heads
    if k < 2:
        return None
    out, kr = lora_b.shape
    heads = np.asarray(lora_b, dtype=np.float64).reshape(out, k, kr // k).transpose(1, 0, 2).reshape(k, -1)
    norms = np.linalg.norm(heads, axis=1, keepdims=True)
    if (norms == 0).any():
        return None
    unit = heads / norms
    cos = unit @ unit.T  # (k, k)
    return float(cos[~np.eye(k, dtype=bool)].mean())


def _read_json(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError) as err:  # ConfigError included: it names the file and line
        raise AdapterError(str(err) if str(err).startswith(str(path))
                           else f"{path}: not readable JSON ({err}); restore the file or remove it") from None


def describe_hydralora(path: Path) -> dict[str, Any]:
    """Config, parameter counts, head similarity, and the run's summary if present."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config = HydraLoraConfig.from_json_file(path / CONFIG_NAME)
    meta = _read_json(path / CONFIG_NAME)
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise AdapterError(f"{path / WEIGHTS_NAME}: not a readable safetensors file ({err})") from None
    layers: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        module, _, name = key.rpartition(".")
        layers.setdefault(module, {})[name] = tensor
    sims = [head_similarity(p["lora_B"], config.num_heads) for p in layers.values() if "lora_B" in p]
    sims = [s for s in sims if s is not None]
    info: dict[str, Any] = dict(
        config=config.to_dict(),
        base_model=meta.get("base_model_name_or_path"),
        version=meta.get("hydralora_version"),
        layers=len(layers),
        parameters=int(sum(t.size for t in tensors.values())),
        head_cos_sim_mean=sum(sims) / len(sims) if sims else None,
        head_cos_sim_max=max(sims) if sims else None,
    )
    for extra in ("summary.json", ROUTER_STATS):  # a run's records: broken ones are skipped
        if (path / extra).exists():
            try:
                info[extra.removesuffix(".json")] = _read_json(path / extra)
            except AdapterError as err:
                info.setdefault("skipped", []).append(str(err))
    return info


def format_hydralora(info: dict[str, Any]) -> str:
    c = info["config"]
    lines = [
        f"{info['path']}: HydraLoRA adapter (hydralora {info['version']})",
        f"base model: {info['base_model']}",
        f"r={c['r']} alpha={c['alpha']} heads={c['num_heads']} router={c['router']} "
        f"router_input={c['router_input']} shared_a={c['shared_a']} targets={c['target_modules']}"
        + (f" preset={c['preset']}" if c.get("preset") else ""),
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
    lines += [f"skipped: {note}" for note in info.get("skipped", [])]
    stats = info.get("router_stats")
    if isinstance(stats, dict) and stats:
        try:
            ent = [s["entropy"] for s in stats.values()]
            share = [max(s["mean_gate"]) for s in stats.values()]
            lines.append(f"router (last logged step): gate entropy {sum(ent) / len(ent):.3f}, "
                         f"top head share {sum(share) / len(share):.3f}")
        except (TypeError, KeyError, ValueError, AttributeError):
            lines.append(f"router statistics: {ROUTER_STATS} is not in the expected form (skipped)")
    summary = info.get("summary")
    if isinstance(summary, dict) and summary:
        try:
            lines.append(f"training: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
                         f"{summary['tokens_per_second']:.0f} tokens/s")
            div = summary.get("diversity") or {}
            if "domain_gate_spread" in div:
                lines.append(f"mean gates differ between domains by {div['domain_gate_spread']:.3f} "
                             "(mean pairwise total-variation distance; 0 = same routing for every domain)")
        except (TypeError, KeyError, ValueError, AttributeError):
            lines.append("training: summary.json is not in the expected form (skipped)")
    return "\n".join(lines)


def describe_lora(path: Path) -> dict[str, Any]:
    return {"config": _read_json(path / CONFIG_NAME)}


def format_lora(info: dict[str, Any]) -> str:
    c = info["config"]
    return (f"{info['path']}: PEFT LoRA adapter, r={c.get('r')}, alpha={c.get('lora_alpha')}, "
            f"targets={c.get('target_modules')}, base={c.get('base_model_name_or_path')}")


def describe_split(path: Path) -> dict[str, Any]:
    return {"config": _read_json(path / SPLIT_FILE)}


def format_split(info: dict[str, Any]) -> str:
    c = info["config"]
    return (f"{info['path']}: LoRA-Split, {c.get('k')} PEFT LoRA adapters (ranks {c.get('ranks')}), "
            f"cluster sizes {c.get('cluster_sizes')}, base={c.get('base_model_name_or_path')}; "
            "prompts go to the adapter of their nearest TF-IDF centroid")


READERS = {"hydralora": (describe_hydralora, format_hydralora), "lora": (describe_lora, format_lora),
           "lora-split": (describe_split, format_split)}


def describe(path: str | os.PathLike) -> dict:
    """What `hydralora info` shows: the folder's method and its facts."""
    kind = adapter_kind(path)
    return {"path": str(path), "kind": kind, **READERS[kind][0](resolve_adapter(path))}


def format_description(info: dict) -> str:
    return READERS[info["kind"]][1](info)


def adapter_info(path: str) -> dict:
    """Config, parameter counts, head similarity per layer, and the run's summary if present."""
    return describe(path)


def run_info(opts: InfoOptions) -> dict:
    info = describe(opts.adapter)
    print(json.dumps(info, indent=2) if opts.json else format_description(info))
    return info
