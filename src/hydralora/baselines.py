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
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .config import HydraLoraConfig
from .model import AdapterError, atomic_write

SPLIT_FILE = "lora_split.json"


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


def adapter_name(i: int) -> str:
    return f"cluster_{i}"


class SplitRouter:
    """Routes prompts to the adapter of their nearest TF-IDF centroid."""

    def __init__(self, cluster_model: Any):
        self.cluster_model = cluster_model

    def route(self, instructions: list[str]) -> list[str]:
        return [adapter_name(c) for c in self.cluster_model.predict(instructions)]

    @classmethod
    def load(cls, path: str | os.PathLike) -> SplitRouter:
        from .clustering import ClusterModel

        return cls(ClusterModel.load(path))


def train_lora_split(cfg, adapter: HydraLoraConfig, model: nn.Module, examples, features,
                     tokenizer, use_bf16: bool) -> tuple[nn.Module, dict[str, Any]]:
    """Cluster the training examples, train one PEFT LoRA per cluster, save them together."""
    from peft import LoraConfig, get_peft_model

    from .clustering import ClusterModel
    from .train import CHECKPOINTS, fit, is_main_process, log

    k = adapter.num_heads
    instructions = [e.instruction for e in examples]
    if k > len(instructions):
        raise AdapterError(f"LoRA-Split with k={k} clusters needs at least {k} examples")
    clusters = ClusterModel.fit(instructions, k, seed=cfg.seed)
    label_of = dict(zip((e.source for e in examples), clusters.labels))
    ranks = split_ranks(adapter.r, k, cfg.split_ranks)
    # Every LoRA of a comparison gets the same alpha, whatever its rank (the authors fix alpha=32):
    # a cluster's adapter is an ordinary LoRA of its rank, scaled alpha / r_i like any other.
    groups = [[f for f in features if label_of[f["source"]] == i] for i in range(k)]
    sizes = [len(g) for g in groups]
    log(f"LoRA-Split: {k} clusters of {sizes} examples, ranks {ranks}")
    total_examples = sum(sizes)
    output = Path(cfg.output)
    peft_model = None
    run: dict[str, Any] = {"steps": 0, "tokens": 0, "seconds": 0.0, "train_loss": 0.0}
    for i in range(k):
        lora = LoraConfig(r=ranks[i], lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                          target_modules=adapter.target_modules, task_type="CAUSAL_LM")
        if peft_model is None:
            peft_model = get_peft_model(model, lora, adapter_name=adapter_name(i))
        else:
            peft_model.add_adapter(adapter_name(i), lora)
        peft_model.set_adapter(adapter_name(i))  # only this adapter trains
        if not groups[i]:
            continue
        steps = -1 if cfg.max_steps < 0 else max(1, round(cfg.max_steps * sizes[i] / total_examples))
        part = fit(cfg, peft_model, groups[i], tokenizer, output / CHECKPOINTS / adapter_name(i),
                   steps, use_bf16, label=f"LoRA-Split adapter {i} (r={ranks[i]}, {sizes[i]} examples)")
        peft_model = part["model"]
        run["steps"] += part["steps"]
        run["tokens"] += part["tokens"]
        run["seconds"] += part["seconds"]
        run["train_loss"] += part["train_loss"] * sizes[i] / total_examples
        run["final_loss"] = part["final_loss"]
    trainable = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    total = sum(p.numel() for p in peft_model.parameters())
    run.update(trainable=trainable, total=total, router=SplitRouter(clusters),
               clusters={"k": k, "sizes": sizes, "ranks": ranks})
    if is_main_process():
        save_lora_split(peft_model, clusters, output, ranks, sizes, cfg.model, adapter.alpha)
    peft_model.eval()
    return peft_model, run


def save_lora_split(peft_model, clusters, output: Path, ranks, sizes, base_model: str,
                    alpha: float) -> None:
    """PEFT's files of every adapter, the cluster model and lora_split.json (written last)."""
    clusters.save(output)
    tmp = Path(tempfile.mkdtemp(prefix=".lora-split-", dir=output))
    try:
        peft_model.save_pretrained(tmp)
        for i in range(len(ranks)):
            target = output / adapter_name(i)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp / adapter_name(i), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {"peft_type": "LORA_SPLIT", "k": len(ranks), "ranks": ranks, "cluster_sizes": sizes,
            "alpha": alpha, "scaling": [alpha / r for r in ranks],
            "adapters": [adapter_name(i) for i in range(len(ranks))],
            "base_model_name_or_path": base_model}
    with atomic_write(output / SPLIT_FILE) as f:
        f.write_text(json.dumps(meta, indent=2) + "\n")


def load_lora_split(model: nn.Module, path: str | os.PathLike) -> tuple[nn.Module, SplitRouter]:
    """The base model with every cluster adapter loaded (eval mode) and the prompt router."""
    from peft import PeftModel

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
