"""Choose the number of HydraLoRA heads k from the training data (HydraLoRA paper, App. B).

The paper picks k without domain knowledge: TF-IDF features of the training instructions,
k-means for k = 1..k_max and the elbow of the SSE (inertia) curve, with silhouette scores
reported beside it. The clusters only choose k; for the LoRA-Split baseline they also route
each prompt to the adapter of its cluster (nearest TF-IDF centroid, see `ClusterModel`).

TF-IDF settings (`DEFAULT_TFIDF`) and why:

* the token pattern keeps every word *and* every punctuation character as a token, and no
  stop words are removed. Instruction sources differ most in form (code has `(`, `:`, `>>>`
  and `def`; math word problems have `$`, `?`, "how many"; news has quotes and "said"), and
  those tokens are exactly what a content-word-only vocabulary throws away;
* `max_features=300` keeps the 300 most frequent tokens. Rare words make every document
  nearly orthogonal to every other one, which flattens the SSE curve until no elbow is left
  (with 1000 or all terms the elbow of a 3-source mixture often lands on 4);
* `sublinear_tf=True` (1 + log tf) so a long text or a repeated token does not dominate;
* `norm="l2"`, so the squared Euclidean distances of k-means are 2 - 2 cos.

No dimensionality reduction is applied: on the real data the elbow is as clear without it,
and the saved `ClusterModel` stays a plain vocabulary, idf vector and centroid matrix.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import sparse
from sklearn.metrics import silhouette_score

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..base_models import load_model
from ..commands.analyze import ClusterOptions
from ..commands.common import K_MAX
from .kmeans import DEFAULT_TFIDF, MODEL_JSON, MODEL_TENSORS, ClusterModel, check_texts, kmeans, tfidf_features
from ..data import load_examples
from ..data.words import names_a_mixture, resolve_words
from ..dist import progress
from ..errors import ClusterModelError, ConfigError
from ..files import atomic_write, write_json
from ..folders import owned_folder

__all__ = [
    "DEFAULT_TFIDF",
    "ClusterModel",
    "ClusterModelError",
    "KSelection",
    "choose_k",
    "domain_cluster_table",
    "embedding_features",
    "find_elbow",
    "plot_sse",
    "purity",
    "tfidf_features",
]

#: An elbow counts only if SSE falls this many times faster per cluster before it than after.
MIN_ELBOW_RATIO = 3.5
#: Silhouette scores use at most this many examples (the score is quadratic in n).
SILHOUETTE_SAMPLE = 3000


def embedding_features(
    texts: Sequence[str],
    model: torch.nn.Module,
    tokenizer: Any,
    batch_size: int = 8,
    max_length: int = 256,
) -> np.ndarray:
    """Mean-pooled, L2-normalized last hidden states of a Hugging Face causal LM.

    Padding tokens are excluded from the mean (attention-mask weighted). The model runs under
    `torch.no_grad()` in eval mode (its previous mode is restored). A tokenizer without a pad
    token borrows its EOS token for the duration of the call. Returns float32 `(n, hidden)`.
    """
    texts = check_texts(texts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
    device = next(model.parameters()).device
    old_pad, was_training = tokenizer.pad_token, model.training
    if old_pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in progress(range(0, len(texts), batch_size), "embedding", unit="batch"):
                batch = tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                out = model(**batch, output_hidden_states=True)
                mask = batch["attention_mask"].unsqueeze(-1).float()
                summed = (out.hidden_states[-1].float() * mask).sum(dim=1)  # a bf16 model sums in float32
                chunks.append((summed / mask.sum(dim=1).clamp(min=1)).float().cpu())
    finally:
        model.train(was_training)
        if old_pad is None:
            tokenizer.pad_token = old_pad
    pooled = torch.cat(chunks).numpy()
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------- choosing k


@dataclass
class KSelection:
    """The outcome of `choose_k`: the SSE/silhouette curves and the chosen k.

    `elbow_candidate` is the k farthest below the chord and `elbow_ratio` its slope ratio
    (see `find_elbow`); `k` is the candidate if the ratio reaches the threshold, else 1.
    Both are None when fewer than 3 values of k could be tried.
    """

    k: int
    k_values: list[int]
    sse: list[float]
    silhouette: list[float | None]
    method: str
    labels: list[int] = field(repr=False)
    elbow_candidate: int | None = None
    elbow_ratio: float | None = None
    n_examples: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (everything but the per-example labels)."""
        data = asdict(self)
        data.pop("labels")
        return data


def _elbow_candidate(k_values: Sequence[int], sse: Sequence[float]) -> tuple[int, float]:
    """Interior k farthest below the chord of the normalized curve, and its slope ratio."""
    x = np.asarray(k_values, dtype=float)
    y = np.asarray(sse, dtype=float)
    span = y[0] - y[-1]
    if len(x) < 3 or span <= 0:
        return int(x[0]), 0.0
    xn = (x - x[0]) / (x[-1] - x[0])
    yn = (y - y[-1]) / span
    gap = (1.0 - xn) - yn  # vertical distance below the chord from (0, 1) to (1, 0)
    i = int(np.argmax(gap[1:-1])) + 1
    before = (y[0] - y[i]) / (x[i] - x[0])
    after = (y[i] - y[-1]) / (x[-1] - x[i])
    ratio = float("inf") if after <= 0 else float(before / after)
    return int(x[i]), ratio


def find_elbow(
    k_values: Sequence[int], sse: Sequence[float], min_ratio: float = MIN_ELBOW_RATIO
) -> int:
    """Pick k at the elbow of an SSE curve; return the first k if there is no clear elbow.

    Rule ("max distance to chord", as in Kneedle): scale k and SSE to [0, 1] and take the k
    whose point lies farthest below the straight line (chord) from the first point to the
    last. That point is accepted only if the bend is pronounced: the mean SSE decrease per
    added cluster up to it must be at least `min_ratio` times the mean decrease per cluster
    after it. A curve without structure (one homogeneous source) still bends gently, but its
    slopes differ by a factor of 2-3 only, so it gets the first k (normally 1). Measured with
    `DEFAULT_TFIDF` and k = 1..10: 1.8-2.9 on 300 GSM8K, HumanEval or BBC texts alone, 5.8-6.1
    on a mixture of all three. With fewer than 3 points, or a flat curve, the answer is the
    first k.
    """
    if len(k_values) != len(sse):
        raise ValueError(f"{len(k_values)} k values but {len(sse)} SSE values")
    if not k_values:
        raise ValueError("empty SSE curve")
    if any(b <= a for a, b in zip(k_values, k_values[1:])):
        raise ValueError(f"k values must be increasing, got {list(k_values)}")
    k, ratio = _elbow_candidate(k_values, sse)
    return k if ratio >= min_ratio else int(k_values[0])


def _n_distinct_rows(features: Any) -> int:
    if sparse.issparse(features):
        csr = sparse.csr_matrix(features).sorted_indices()
        rows = {(tuple(r.indices), tuple(np.round(r.data, 12))) for r in csr}
        return len(rows)
    return len(np.unique(np.round(np.asarray(features), 12), axis=0))


def choose_k(
    features: Any, k_max: int = K_MAX, seed: int = 0, min_ratio: float = MIN_ELBOW_RATIO
) -> KSelection:
    """Run k-means for k = 1..k_max on `features` and choose k at the elbow of the SSE curve.

    `features` is an (n, d) matrix (sparse TF-IDF from `tfidf_features`, or dense embeddings
    from `embedding_features`; `min_ratio` was calibrated on TF-IDF only); a list of texts is
    turned into TF-IDF features with the default settings first.
    k-means uses `n_init=10` restarts with a fixed `seed`, so the result is deterministic.
    k_max larger than the number of examples is an error; otherwise it is capped at the
    number of distinct examples minus one (k = n fits every point exactly and says nothing).
    The rule is `find_elbow`'s; silhouette scores (on at most `SILHOUETTE_SAMPLE` examples)
    are computed for every k >= 2 and only reported.
    """
    if isinstance(features, (list, tuple)):
        if not features:
            raise ValueError("no examples given: clustering needs at least one example")
        if isinstance(features[0], str):
            features, _ = tfidf_features(features)
        else:
            features = np.asarray(features, dtype=np.float64)
    n = features.shape[0]
    if n == 0:
        raise ValueError("no examples given: clustering needs at least one example")
    if k_max < 1:
        raise ValueError(f"k_max must be at least 1, got {k_max}")
    if k_max > n:
        raise ValueError(
            f"k_max={k_max} but there are only {n} examples; pass k_max <= {n} "
            "or cluster more examples"
        )
    top = max(1, min(k_max, _n_distinct_rows(features) - 1))
    k_values = list(range(1, top + 1))
    fits = [kmeans(features, k, seed) for k in progress(k_values, "k-means", unit="k")]
    sse = [float(f.inertia_) for f in fits]
    sil: list[float | None] = [None]
    sample = min(n, SILHOUETTE_SAMPLE)
    sil += [
        float(silhouette_score(features, f.labels_, sample_size=sample, random_state=seed))
        for f in fits[1:]
    ]
    candidate, ratio = _elbow_candidate(k_values, sse) if len(k_values) >= 3 else (None, None)
    k = find_elbow(k_values, sse, min_ratio)
    return KSelection(
        k=k,
        k_values=k_values,
        sse=sse,
        silhouette=sil,
        method=(
            "elbow: max distance below the chord of the min-max normalized SSE curve, "
            f"accepted if SSE falls >= {min_ratio:g}x faster per cluster before it than after "
            "(else k=1)"
        ),
        labels=[int(v) for v in fits[k - 1].labels_],
        elbow_candidate=candidate,
        elbow_ratio=None if ratio is None or np.isinf(ratio) else round(ratio, 4),
        n_examples=n,
    )


# --------------------------------------------------------------------------- reporting


def _check_pairs(labels: Sequence[int], domains: Sequence[str]) -> None:
    if len(labels) != len(domains):
        raise ValueError(f"{len(labels)} labels but {len(domains)} domains")
    if len(labels) == 0:
        raise ValueError("no labels given")


def purity(labels: Sequence[int], domains: Sequence[str]) -> float:
    """Fraction of examples whose domain is the most common domain of their cluster."""
    _check_pairs(labels, domains)
    per_cluster: dict[int, Counter] = {}
    for label, domain in zip(labels, domains):
        per_cluster.setdefault(int(label), Counter())[domain] += 1
    majority = sum(c.most_common(1)[0][1] for c in per_cluster.values())
    return majority / len(labels)


def domain_cluster_table(labels: Sequence[int], domains: Sequence[str]) -> str:
    """Markdown table of counts: one row per domain, one column per cluster, plus totals."""
    _check_pairs(labels, domains)
    counts = Counter((d, int(c)) for c, d in zip(labels, domains))
    clusters = sorted({int(c) for c in labels})
    names = sorted(set(domains), key=str)
    lines = [
        "| domain | " + " | ".join(f"c{c}" for c in clusters) + " | total |",
        "|---|" + "---:|" * (len(clusters) + 1),
    ]
    for name in names:
        row = [counts[(name, c)] for c in clusters]
        lines.append(f"| {name} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
    totals = [sum(counts[(d, c)] for d in names) for c in clusters]
    lines.append("| total | " + " | ".join(map(str, totals)) + f" | {sum(totals)} |")
    return "\n".join(lines) + "\n"


def plot_sse(selection: KSelection, path: str | os.PathLike) -> None:
    """Save a PNG of the SSE curve (chosen k marked) with silhouette scores on a second axis."""
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(selection.k_values, selection.sse, "o-", color="tab:blue", label="SSE (inertia)")
    chosen = selection.k_values.index(selection.k)
    ax.plot(
        [selection.k],
        [selection.sse[chosen]],
        "*",
        markersize=16,
        color="tab:red",
        label=f"chosen k = {selection.k}",
    )
    ax.set_xlabel("k (number of clusters)")
    ax.set_ylabel("SSE", color="tab:blue")
    ax.set_xticks(selection.k_values)
    sil = [(k, s) for k, s in zip(selection.k_values, selection.silhouette) if s is not None]
    if sil:
        ax2 = ax.twinx()
        ax2.plot(*zip(*sil), "s--", color="tab:green", label="silhouette")
        ax2.set_ylabel("silhouette", color="tab:green")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("k-means elbow")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(os.fspath(tmp), format="png")


def select_num_heads(texts: Sequence[str], k_max: int = K_MAX, seed: int = 0) -> dict[str, Any]:
    """`choose_k` on TF-IDF of the instructions, as the record stored in adapter_config.json."""
    selection = choose_k(list(texts), k_max=min(k_max, len(texts)), seed=seed)
    return {**selection.to_dict(), "features": "tfidf", "k_max": k_max, "seed": seed}


# --------------------------------------------------------------------------- the command


CLUSTER_FILES = ("clusters.json", "labels.jsonl", "sse.png")


def run_cluster(opts: ClusterOptions) -> dict[str, Any]:
    """The `hydralora cluster` command: choose k, write the results, print the curves. Files of
    those names that the tool did not write are never replaced; its own only with --overwrite."""
    out = Path(opts.output)
    names = [*CLUSTER_FILES, *((MODEL_JSON, MODEL_TENSORS) if opts.features == "tfidf" else ()),
             *(("data",) if names_a_mixture(opts.data) else ())]
    with owned_folder(out, names, opts.overwrite):
        return _run_cluster(opts, out)


def _run_cluster(opts: ClusterOptions, out: Path) -> dict[str, Any]:
    examples = load_examples(resolve_words(opts.data, out / "data", "train"))
    texts = [e.instruction for e in examples]
    if opts.k_max > len(texts):
        raise ConfigError(
            f"--k-max {opts.k_max} is more clusters than the {len(texts)} examples; "
            f"pass --k-max {len(texts)} or less"
        )
    features: Any = texts
    if opts.features == "embeddings":
        model, tokenizer = load_model(opts.model, dtype=opts.dtype, device=opts.device)
        features = embedding_features(texts, model, tokenizer)
    selection = choose_k(features, k_max=opts.k_max, seed=opts.seed)
    result = {**selection.to_dict(), "features": opts.features, "examples": len(texts)}
    domains = [e.domain for e in examples]
    has_domains = all(d is not None for d in domains)
    if has_domains:
        result["purity"] = purity(selection.labels, domains)
    write_json(out / "clusters.json", result)
    with atomic_write(out / "labels.jsonl") as tmp:
        with open(tmp, "w") as f:
            for e, label in zip(examples, selection.labels):
                f.write(json.dumps({"source": e.source, "domain": e.domain, "cluster": label}) + "\n")
    plot_sse(selection, out / "sse.png")
    if opts.features == "tfidf":
        ClusterModel.fit(texts, selection.k, seed=opts.seed).save(out)
    print(f"k = {selection.k}  ({selection.method})")
    print("k:          " + " ".join(f"{k:>7d}" for k in selection.k_values))
    print("SSE:        " + " ".join(f"{v:7.1f}" for v in selection.sse))
    print("silhouette: " + " ".join("      -" if v is None else f"{v:7.3f}" for v in selection.silhouette))
    if has_domains:
        print(f"purity against the 'domain' field: {result['purity']:.3f}")
        print(domain_cluster_table(selection.labels, domains))
    print(f"wrote {out / 'clusters.json'}, {out / 'labels.jsonl'}, {out / 'sse.png'}")
    return result
