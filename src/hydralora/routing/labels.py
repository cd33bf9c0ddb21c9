"""The head each example stands for, for oracle routing and the guide loss: its domain, or the
k-means cluster of its instruction."""

from __future__ import annotations

from typing import Any

from ..clustering.kmeans import ClusterModel
from ..errors import DataError


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
