"""Request routing for serving: which exported adapter answers each prompt.

No serving engine routes per token; every one (vLLM, TGI, SGLang) serves a PEFT LoRA per
request. `export --gates per-domain|per-cluster` (export.py) writes one PEFT LoRA per group of
requests and a request router: the TF-IDF nearest-centroid model of the groups (domain
centroids, or the k-means model), small enough to run in front of the engine. The folder has
the layout of a LoRA-Split folder, so the same router serves both:

    OUTPUT/lora_split.json                       groups, ranks, alpha, base model, how made
    OUTPUT/cluster_model.json, .safetensors      the request router
    OUTPUT/<group>/adapter_config.json, adapter_model.safetensors

This module holds the grouping and the router, and `hydralora route`; it imports neither torch
nor PEFT, so routing a prompt needs only scikit-learn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..cards import vllm_max_lora_rank
from ..clustering.kmeans import ClusterModel, tfidf_features
from ..commands.export import RouteOptions
from ..errors import ClusterModelError, ConfigError
from ..files import CONFIG_NAME, SPLIT_FILE, is_safe_name, safe_name
from ..readers import read_json_object


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


def adapter_name(i: int) -> str:
    return f"cluster_{i}"


class SplitRouter:
    """Routes prompts to the adapter of their nearest TF-IDF centroid (centroid i serves the
    adapter names[i]: cluster_<i> unless the folder names them, as per-domain exports do)."""

    def __init__(self, cluster_model: ClusterModel, names: list[str] | None = None):
        self.cluster_model = cluster_model
        self.names = names or [adapter_name(i) for i in range(cluster_model.k)]

    def route(self, instructions: list[str]) -> list[str]:
        return [self.names[c] for c in self.cluster_model.predict(instructions)]

    @classmethod
    def load(cls, path: str | os.PathLike) -> SplitRouter:
        """The router of a folder; its adapter names must be folders inside it (an edited
        lora_split.json cannot send a prompt to `../elsewhere`), its centroids finite."""
        path, names = Path(path), None
        if (path / SPLIT_FILE).exists():
            names = read_json_object(path / SPLIT_FILE).get("adapters")
            if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
                raise ConfigError(f"{path / SPLIT_FILE}: 'adapters' must be a list of folder names")
            bad = [n for n in names or [] if not is_safe_name(n) or n.startswith(".") or (path / n).is_symlink()]
            if bad:
                raise ConfigError(f"{path / SPLIT_FILE}: adapter {bad[0]!r} is not the name of a folder "
                                  f"inside {path}; restore the file (export again)")
        model = ClusterModel.load(path)
        if not (np.isfinite(model.centroids).all() and np.isfinite(model.vectorizer.idf_).all()):
            raise ClusterModelError(f"{path}: the cluster model holds NaN or infinite values; it is "
                                    "broken: export (or train) again")
        if names is not None and len(names) != model.k:
            raise ConfigError(f"{path / SPLIT_FILE}: {len(names)} adapters for the {model.k} clusters of "
                              "the cluster model; restore the file (export again)")
        return cls(model, names)


# ---------------------------------------------------------------------------- the route command
def route_prompts(folder: str | Path, prompts: list[str]) -> list[str]:
    """The adapter name (a subfolder of `folder`) for each prompt."""
    folder = Path(folder)
    if not (folder / SPLIT_FILE).exists():
        raise ConfigError(f"{folder}: no {SPLIT_FILE}; give a folder written by "
                          "`export --gates per-domain|per-cluster` or `train --method lora-split`")
    return SplitRouter.load(folder).route(prompts)


def adapter_rank(folder: Path) -> int:
    """The LoRA rank of an adapter folder (k*r for a `--no-shared-a` export), 0 if unreadable."""
    try:
        return int(read_json_object(folder / CONFIG_NAME).get("r") or 0)
    except (OSError, ValueError, TypeError):
        return 0


def run_route(opts: RouteOptions) -> list[str]:
    names = route_prompts(opts.adapter, opts.prompt)
    if opts.json:
        folder = Path(opts.adapter).resolve()
        rows = []
        for p, n in zip(opts.prompt, names):
            path = folder / n
            rank = adapter_rank(path)
            rows.append({"prompt": p, "adapter": n, "path": str(path), "lora_module": f"{n}={path}",
                         "max_lora_rank": vllm_max_lora_rank(rank) if rank else None})
        print(json.dumps(rows, indent=2))
    else:
        for p, n in zip(opts.prompt, names):
            print(f"{n}\t{p}")
    return names
