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

from ..clustering.kmeans import ClusterModel, tfidf_features
from ..commands.export import RouteOptions
from ..errors import ConfigError
from ..files import SPLIT_FILE, safe_name


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
        names = None
        if (Path(path) / SPLIT_FILE).exists():
            try:
                names = json.loads((Path(path) / SPLIT_FILE).read_text()).get("adapters")
            except (OSError, json.JSONDecodeError, AttributeError):
                names = None
        return cls(ClusterModel.load(path), names)


# ---------------------------------------------------------------------------- the route command
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
