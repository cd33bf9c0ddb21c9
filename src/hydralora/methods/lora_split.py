"""LoRA-Split through PEFT: k LoRA adapters, each trained on one k-means cluster of the data.

The paper's LoRA-Split baseline splits one LoRA of rank r into k adapters of rank r/k (the
same parameter budget), trains each on one cluster of the training data and, at inference,
sends every prompt to the adapter of its cluster. Here the clusters come from the same TF-IDF
+ k-means as `--num-heads auto`, and a prompt goes to the nearest TF-IDF centroid; one batch
may mix clusters through PEFT's mixed-batch `adapter_names`.

Directory layout (`--method lora-split --output DIR`):
    DIR/lora_split.json                          k, ranks, alpha, scalings, cluster sizes, base model
    DIR/cluster_model.json, .safetensors         the TF-IDF vectorizer and centroids (no pickle)
    DIR/cluster_<i>/adapter_config.json, adapter_model.safetensors   PEFT LoRA of cluster i
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from ..clustering.kmeans import ClusterModel
from ..routing.requests import SplitRouter, adapter_name
from ..config import HydraLoraConfig
from ..data import Example
from ..errors import AdapterError
from ..files import SPLIT_FILE, temporary_dir, write_json
from .base import Built, Method, TrainPart
from .peft_lora import lora_config



def split_ranks(r: int, k: int, mode: str = "budget") -> list[int]:
    """Ranks of the k adapters: r/k each for the paper's equal budget ('budget'), or r each."""
    if mode == "each":
        return [r] * k
    if r < k:
        raise AdapterError(
            f"LoRA-Split with rank budget r={r} cannot give {k} adapters rank >= 1; "
            f"raise --r to at least {k} or use --split-ranks each"
        )
    return [r // k] * k


def build(model: nn.Module, adapter: HydraLoraConfig, seed: int, examples: list[Example],
          options: dict[str, Any]) -> Built:
    """Cluster the training examples and attach one PEFT LoRA per cluster; each is trained on
    its cluster's examples, with the run's steps shared in proportion to cluster size.
    Every LoRA of a comparison gets the same alpha whatever its rank (the authors fix
    alpha=32): a cluster's adapter is an ordinary LoRA of its rank, scaled alpha / r_i."""
    k = adapter.num_heads
    instructions = [e.instruction for e in examples]
    if k > len(instructions):
        raise AdapterError(f"LoRA-Split with k={k} clusters needs at least {k} examples")
    clusters = ClusterModel.fit(instructions, k, seed=seed)
    ranks = split_ranks(adapter.r, k, options.get("split_ranks", "budget"))
    members: list[set[str]] = [set() for _ in range(k)]
    for example, label in zip(examples, clusters.labels):
        members[label].add(example.source)
    sizes = [len(m) for m in members]
    torch.manual_seed(seed)
    peft_model = None
    for i in range(k):
        if peft_model is None:
            peft_model = get_peft_model(model, lora_config(adapter, ranks[i]), adapter_name=adapter_name(i))
        else:
            peft_model.add_adapter(adapter_name(i), lora_config(adapter, ranks[i]))
    parts = [TrainPart(adapter_name=adapter_name(i), sources=members[i], share=sizes[i] / len(examples),
                       label=f"LoRA-Split adapter {i} (r={ranks[i]}, {sizes[i]} examples)",
                       checkpoint_subdir=adapter_name(i))
             for i in range(k) if sizes[i]]
    return Built(peft_model, parts, router=SplitRouter(clusters),
                 state={"clusters": clusters, "ranks": ranks, "sizes": sizes, "alpha": adapter.alpha},
                 summary={"clusters": {"k": k, "sizes": sizes, "ranks": ranks}})


def save(built: Built, output: Path, base_model: str) -> None:
    """PEFT's files of every adapter, the cluster model and lora_split.json (written last)."""
    ranks, sizes, alpha = built.state["ranks"], built.state["sizes"], built.state["alpha"]
    built.state["clusters"].save(output)
    with temporary_dir(output, ".lora-split-") as tmp:
        built.model.save_pretrained(tmp)
        for i in range(len(ranks)):
            target = output / adapter_name(i)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp / adapter_name(i), target)
    meta = {"peft_type": "LORA_SPLIT", "k": len(ranks), "ranks": ranks, "cluster_sizes": sizes,
            "alpha": alpha, "scaling": [alpha / r for r in ranks],
            "adapters": [adapter_name(i) for i in range(len(ranks))],
            "base_model_name_or_path": base_model}
    write_json(output / SPLIT_FILE, meta)


def load(model: nn.Module, path: Path) -> tuple[nn.Module, SplitRouter]:
    """The base model with every cluster adapter loaded (eval mode) and the prompt router."""
    path = Path(path)
    try:
        meta = json.loads((path / SPLIT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"{path / SPLIT_FILE}: cannot read it ({err})") from None
    names = meta.get("adapters") or []
    missing = [n for n in names if not (path / n / "adapter_config.json").exists()]
    if not names or missing:
        raise AdapterError(f"{path}: LoRA-Split adapters missing: {missing or 'none listed'}")
    peft_model = PeftModel.from_pretrained(model, str(path / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(path / name), adapter_name=name)
    peft_model.eval()
    return peft_model, SplitRouter.load(path)


def variant(adapter: HydraLoraConfig, options: dict[str, Any]) -> str:
    ranks = split_ranks(adapter.r, adapter.num_heads, options.get("split_ranks", "budget"))
    return f"LoRA-Split {adapter.num_heads} x r={ranks[0]} (PEFT, one LoRA per k-means cluster)"


METHOD = Method(name="lora-split", files=(SPLIT_FILE, "cluster_model.json", "cluster_model.safetensors",
                                          "cluster_*"),
                build=build, save=save, load=load, variant=variant)
