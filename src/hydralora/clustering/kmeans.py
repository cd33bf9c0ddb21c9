"""The cluster model: TF-IDF features and k-means centroids, saved without pickle.

Used to choose k (`clustering.choose_k`) and, for the LoRA-Split baseline and per-cluster
exports, to send each prompt to the cluster of its nearest centroid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from scipy import sparse
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import pairwise_distances_argmin
from threadpoolctl import threadpool_limits

from ..errors import ClusterModelError
from ..files import atomic_write

#: Words and single punctuation characters, lower-cased, most frequent 300, 1 + log tf, L2.
DEFAULT_TFIDF: dict[str, Any] = {
    "token_pattern": r"(?u)\b\w+\b|[^\w\s]",
    "lowercase": True,
    "max_features": 300,
    "sublinear_tf": True,
    "norm": "l2",
}

N_INIT = 10
MODEL_JSON = "cluster_model.json"
MODEL_TENSORS = "cluster_model.safetensors"
_FORMAT_VERSION = 1
# Vectorizer parameters that are saved; all must be JSON values.
_SAVED_TFIDF_PARAMS = (
    "analyzer", "binary", "lowercase", "max_df", "max_features", "min_df", "ngram_range",
    "norm", "smooth_idf", "stop_words", "strip_accents", "sublinear_tf", "token_pattern",
    "use_idf",
)  # fmt: skip


def check_texts(texts: Sequence[str]) -> list[str]:
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
    texts = check_texts(texts)
    vectorizer = TfidfVectorizer(**{**DEFAULT_TFIDF, **kwargs})
    try:
        features = vectorizer.fit_transform(texts)
    except ValueError as err:  # e.g. "empty vocabulary" when every text is blank
        raise ValueError(
            f"cannot build TF-IDF features from these {len(texts)} texts: {err}"
        ) from err
    return features.tocsr(), vectorizer


def kmeans(features: Any, k: int, seed: int) -> KMeans:
    """k-means with `N_INIT` restarts, single-threaded.

    On instruction-sized data (thousands of texts, 300 features) one fit takes milliseconds;
    OpenMP thread start-up and spin-waiting then cost far more than they save (20x slower on
    a busy 2-core machine), and one thread also keeps results identical across machines.
    """
    with threadpool_limits(limits=1):
        return KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(features)


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
        texts = check_texts(texts)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if k > len(texts):
            raise ValueError(
                f"k={k} clusters but there are only {len(texts)} examples; "
                f"pass k <= {len(texts)} or cluster more examples"
            )
        features, vectorizer = tfidf_features(texts, **tfidf_kwargs)
        km = kmeans(features, k, seed)
        return cls(vectorizer, km.cluster_centers_, seed, [int(v) for v in km.labels_])

    def transform(self, texts: Sequence[str]) -> sparse.csr_matrix:
        """TF-IDF features of `texts` in this model's vocabulary."""
        return self.vectorizer.transform(check_texts(texts)).tocsr()

    def predict(self, texts: Sequence[str]) -> list[int]:
        """Index of the nearest centroid (Euclidean, as in k-means) for each text."""
        nearest = pairwise_distances_argmin(self.transform(texts), self.centroids)
        return [int(v) for v in nearest]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `cluster_model.json` and `cluster_model.safetensors` into `directory`."""
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
