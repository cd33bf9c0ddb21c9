"""A second built-in mixture: tasks that share their inputs and need conflicting outputs.

The same short sentences (the first sentence of BBC News articles, 6 to 14 words) appear under
four instructions, and only the instruction says which output is wanted:

    upper     the sentence in upper case
    reverse   its words in reverse order
    count     how many words it has
    topic     its BBC News topic, one word

One LoRA update has to serve four incompatible maps of the same sentences; heads routed by the
instruction could each learn one. This is where HydraLoRA's heads should pay if they pay
anywhere. Train and test use disjoint sentences; every record carries its task as `domain`
(for per-task losses and oracle routing). `--data builtin-conflict` stands for it in `train`,
`eval`, `compare`, `analyze` and `cluster` (data/words.py).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from ..folders import owned_folder
from .builtin import BBC_LABELS, bbc_articles, write_records

CONFLICT = "builtin-conflict"  # the word that stands for this mixture in a list of data files
TRAIN_SENTENCES, TEST_SENTENCES = 48, 12  # per task: each sentence appears under every task
TOPICS = sorted(set(BBC_LABELS.values()))
TASKS = {
    "upper": "Rewrite this sentence in upper case.",
    "reverse": "Write the words of this sentence in reverse order.",
    "count": "How many words does this sentence have? Answer with a number.",
    "topic": f"Which topic is this sentence about? Answer with one word: {', '.join(TOPICS)}.",
}


def answer(task: str, sentence: str, topic: str) -> str:
    words = sentence.split()
    return {"upper": sentence.upper(), "reverse": " ".join(reversed(words)),
            "count": str(len(words)), "topic": topic}[task]


def sentences(min_words: int = 6, max_words: int = 14) -> list[tuple[str, str]]:
    """(sentence, topic) pairs: the first sentence of each BBC article, when it is short."""
    out, seen = [], set()
    for topic, _, body in bbc_articles():
        first = re.split(r"(?<=[.!?])\s", " ".join(body.split()), maxsplit=1)[0].strip()
        words = first.split()
        if min_words <= len(words) <= max_words and first not in seen and first.isascii():
            seen.add(first)
            out.append((first, topic))
    return out


def conflict_mixture(train_sentences: int = TRAIN_SENTENCES, test_sentences: int = TEST_SENTENCES,
                     seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) records: every sentence under every task; disjoint sentences in the splits."""
    pool = sentences()
    random.Random(seed).shuffle(pool)
    test_pool, train_pool = pool[:test_sentences], pool[test_sentences : test_sentences + train_sentences]

    def records(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return [{"prompt": f"{TASKS[task]}\n\n{sentence}", "completion": answer(task, sentence, topic),
                 "domain": task} for sentence, topic in pairs for task in TASKS]

    train, test = records(train_pool), records(test_pool)
    random.Random(seed).shuffle(train)
    return train, test


def write_conflict(output_dir: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write train.jsonl and test.jsonl of this mixture; returns their paths. Files of that name
    the tool did not write are never replaced; its own only with `overwrite`."""
    out = Path(output_dir)
    names = ["train.jsonl", "test.jsonl"]
    with owned_folder(out, names, overwrite):
        for name, records in zip(names, conflict_mixture()):
            write_records(out / name, records)
    return out / names[0], out / names[1]
