"""The words that stand for the built-in mixtures in a list of data files.

`builtin` (the four-domain mixture, data/builtin.py) and `builtin-conflict` (four tasks over the
same sentences, data/conflict.py) are accepted by `train`, `eval`, `compare`, `analyze` and
`cluster` in place of data files; this module turns them into files, the same way for each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..commands.common import BUILTIN
from .builtin import write_builtin
from .conflict import CONFLICT, write_conflict

WORDS = (BUILTIN, CONFLICT)


def names_a_mixture(paths: list[str]) -> bool:
    """Does a list of data files name a built-in mixture (by its exact word)?"""
    return any(str(p) in WORDS for p in paths)


def resolve_words(paths: list[str], directory: str | Path, split: str, overwrite: bool = True,
                  **builtin_kwargs: Any) -> list[str]:
    """Each word replaced by its mixture's `split` ('train' or 'test') file, written under
    `directory` (builtin: DIRECTORY/{train,test}.jsonl; builtin-conflict: DIRECTORY/conflict/).
    Files of ours there are replaced (with `overwrite`), never another's. `builtin_kwargs` size
    the built-in mixture (train_per_domain, test_per_domain, seed)."""
    out = [str(p) for p in paths]
    files: dict[str, Path] = {}
    if BUILTIN in out:
        train, test = write_builtin(directory, overwrite=overwrite, **builtin_kwargs)
        files[BUILTIN] = train if split == "train" else test
    if CONFLICT in out:
        train, test = write_conflict(Path(directory) / "conflict", overwrite=overwrite)
        files[CONFLICT] = train if split == "train" else test
    return [str(files[p]) if p in files else p for p in out]


__all__ = ["WORDS", "names_a_mixture", "resolve_words"]
