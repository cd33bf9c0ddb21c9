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
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from scipy import sparse
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import pairwise_distances_argmin, silhouette_score
from threadpoolctl import threadpool_limits

if TYPE_CHECKING:  # pragma: no cover
    import torch

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

#: Words and single punctuation characters, lower-cased, most frequent 300, 1 + log tf, L2.
DEFAULT_TFIDF: dict[str, Any] = {
    "token_pattern": r"(?u)\b\w+\b|[^\w\s]",
    "lowercase": True,
    "max_features": 300,
    "sublinear_tf": True,
    "norm": "l2",
}

#: An elbow counts only if SSE falls this many times faster per cluster before it than after.
MIN_ELBOW_RATIO = 3.5
N_INIT = 10
#: Silhouette scores use at most this many examples (the score is quadratic in n).
SILHOUETTE_SAMPLE = 3000
MODEL_JSON = "cluster_model.json"
MODEL_TENSORS = "cluster_model.safetensors"
_FORMAT_VERSION = 1
# Vectorizer parameters that are saved; all must be JSON values.
_SAVED_TFIDF_PARAMS = (
    "analyzer", "binary", "lowercase", "max_df", "max_features", "min_df", "ngram_range",
    "norm", "smooth_idf", "stop_words", "strip_accents", "sublinear_tf", "token_pattern",
    "use_idf",
)  # fmt: skip


class ClusterModelError(ValueError):
    """A saved cluster model is unreadable, or a model cannot be saved as JSON/safetensors."""


# --------------------------------------------------------------------------- features


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got a single string")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts given: clustering needs at least one example")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts


def tfidf_features(
    texts: Sequence[str], **kwargs: Any
) -> tuple[sparse.csr_matrix, TfidfVectorizer]:
    """Fit a `TfidfVectorizer` on `texts` and return (sparse features, fitted vectorizer).

    `kwargs` override `DEFAULT_TFIDF` and are passed to `TfidfVectorizer`.
    """
    texts = _check_texts(texts)
    vectorizer = TfidfVectorizer(**{**DEFAULT_TFIDF, **kwargs})
    try:
        features = vectorizer.fit_transform(texts)
    except ValueError as err:  # e.g. "empty vocabulary" when every text is blank
        raise ValueError(
            f"cannot build TF-IDF features from these {len(texts)} texts: {err}"
        ) from err
    return features.tocsr(), vectorizer


def embedding_features(
    texts: Sequence[str],
    model: "torch.nn.Module",
    tokenizer: Any,
    batch_size: int = 8,
    max_length: int = 256,
) -> np.ndarray:
    """Mean-pooled, L2-normalized last hidden states of a Hugging Face causal LM.

    Padding tokens are excluded from the mean (attention-mask weighted). The model runs under
    `torch.no_grad()` in eval mode (its previous mode is restored). A tokenizer without a pad
    token borrows its EOS token for the duration of the call. Returns float32 `(n, hidden)`.
    """
    import torch

    texts = _check_texts(texts)
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
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                out = model(**batch, output_hidden_states=True)
                mask = batch["attention_mask"].unsqueeze(-1).to(out.hidden_states[-1].dtype)
                summed = (out.hidden_states[-1] * mask).sum(dim=1)
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


def _kmeans(features: Any, k: int, seed: int) -> KMeans:
    """k-means with `N_INIT` restarts, single-threaded.

    On instruction-sized data (thousands of texts, 300 features) one fit takes milliseconds;
    OpenMP thread start-up and spin-waiting then cost far more than they save (20x slower on
    a busy 2-core machine), and one thread also keeps results identical across machines.
    """
    with threadpool_limits(limits=1):
        return KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(features)


def choose_k(
    features: Any, k_max: int = 10, seed: int = 0, min_ratio: float = MIN_ELBOW_RATIO
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
    fits = [_kmeans(features, k, seed) for k in k_values]
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


# --------------------------------------------------------------------------- cluster model


class ClusterModel:
    """TF-IDF vectorizer + k-means centroids; assigns texts to the nearest centroid.

    Saved without pickle: `cluster_model.json` holds the vectorizer parameters and vocabulary,
    `cluster_model.safetensors` the idf vector and the centroid matrix.
    """

    def __init__(
        self,
        vectorizer: TfidfVectorizer,
        centroids: np.ndarray,
        seed: int = 0,
        labels: list[int] | None = None,
    ) -> None:
        self.vectorizer = vectorizer
        self.centroids = np.asarray(centroids, dtype=np.float64)
        self.seed = seed
        self.labels = labels  # training labels (only after `fit`; not saved)

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.centroids.shape[0])

    @classmethod
    def fit(
        cls, texts: Sequence[str], k: int, seed: int = 0, **tfidf_kwargs: Any
    ) -> "ClusterModel":
        """TF-IDF (`DEFAULT_TFIDF` updated with `tfidf_kwargs`) and k-means with k clusters."""
        texts = _check_texts(texts)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if k > len(texts):
            raise ValueError(
                f"k={k} clusters but there are only {len(texts)} examples; "
                f"pass k <= {len(texts)} or cluster more examples"
            )
        features, vectorizer = tfidf_features(texts, **tfidf_kwargs)
        km = _kmeans(features, k, seed)
        return cls(vectorizer, km.cluster_centers_, seed, [int(v) for v in km.labels_])

    def transform(self, texts: Sequence[str]) -> sparse.csr_matrix:
        """TF-IDF features of `texts` in this model's vocabulary."""
        return self.vectorizer.transform(_check_texts(texts)).tocsr()

    def predict(self, texts: Sequence[str]) -> list[int]:
        """Index of the nearest centroid (Euclidean, as in k-means) for each text."""
        nearest = pairwise_distances_argmin(self.transform(texts), self.centroids)
        return [int(v) for v in nearest]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `cluster_model.json` and `cluster_model.safetensors` into `directory`."""
        from safetensors.numpy import save_file

        from .model import atomic_write

        params = self.vectorizer.get_params()
        for name in ("tokenizer", "preprocessor", "analyzer"):
            if callable(params.get(name)):
                raise ClusterModelError(
                    f"cannot save a vectorizer with a custom {name} (a function) as JSON"
                )
        meta = {
            "format_version": _FORMAT_VERSION,
            "k": self.k,
            "seed": self.seed,
            "tfidf": {name: params[name] for name in _SAVED_TFIDF_PARAMS},
            "vocabulary": {term: int(i) for term, i in self.vectorizer.vocabulary_.items()},
        }
        try:
            text = json.dumps(meta, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        except TypeError as err:
            raise ClusterModelError(f"TF-IDF parameters are not JSON values: {err}") from err
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "centroids": self.centroids,
            "idf": np.asarray(self.vectorizer.idf_, dtype=np.float64),
        }
        with atomic_write(directory / MODEL_TENSORS) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "np"})
        with atomic_write(directory / MODEL_JSON) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ClusterModel":
        """Read a model written by `save`; missing or corrupt files raise an error naming them."""
        directory = Path(directory)
        meta = _read_meta(directory / MODEL_JSON)
        tensors = _read_tensors(directory / MODEL_TENSORS)
        vocab = meta["vocabulary"]
        n_terms = len(vocab)
        centroids, idf = tensors["centroids"], tensors["idf"]
        if idf.shape != (n_terms,) or centroids.shape != (meta["k"], n_terms):
            raise ClusterModelError(
                f"{directory / MODEL_TENSORS}: centroids {centroids.shape} and idf {idf.shape} "
                f"do not match k={meta['k']} and the {n_terms}-term vocabulary in {MODEL_JSON}"
            )
        tfidf = dict(meta["tfidf"])
        if tfidf.get("ngram_range") is not None:
            tfidf["ngram_range"] = tuple(tfidf["ngram_range"])
        vectorizer = TfidfVectorizer(**tfidf, vocabulary=vocab)
        vectorizer.idf_ = idf
        return cls(vectorizer, centroids, int(meta.get("seed", 0)))


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; save a ClusterModel there first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ClusterModelError(f"{path}: not valid JSON ({err}); the file is corrupt") from err
    keys = set(meta) if isinstance(meta, dict) else set()
    missing = {"format_version", "k", "tfidf", "vocabulary"} - keys
    if missing:
        raise ClusterModelError(f"{path}: not a cluster model file (missing {sorted(missing)})")
    if meta["format_version"] != _FORMAT_VERSION:
        raise ClusterModelError(f"{path}: unsupported format_version {meta['format_version']}")
    return meta


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; save a ClusterModel there first")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ClusterModelError(f"{path}: not a readable safetensors file ({err})") from err
    missing = {"centroids", "idf"} - set(tensors)
    if missing:
        raise ClusterModelError(f"{path}: missing tensors {sorted(missing)}")
    return tensors


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    fig.savefig(os.fspath(path), format="png")


def select_num_heads(texts: Sequence[str], k_max: int = 10, seed: int = 0) -> dict[str, Any]:
    """`choose_k` on TF-IDF of the instructions, as the record stored in adapter_config.json."""
    selection = choose_k(list(texts), k_max=min(k_max, len(texts)), seed=seed)
    return {**selection.to_dict(), "features": "tfidf", "k_max": k_max, "seed": seed}
