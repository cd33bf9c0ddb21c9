"""Data: --data entries -> records (`sources`: files, globs, saved datasets, hub ids), records ->
examples (`records`: the shapes), examples -> tokens with response-only labels and packed rows
(`tokenize`), and the built-in offline mixture (`builtin`)."""

from ..commands.common import DEFAULT_MAX_LENGTH
from ..errors import DataError
from .records import Example, load_examples
from .tokenize import (
    IGNORE_INDEX,
    Collator,
    TokenizedDataset,
    TokenizeReport,
    bos_ids,
    group_by_domain,
    render_prompt,
    tokenize_example,
    tokenize_examples,
)

__all__ = [
    "DEFAULT_MAX_LENGTH", "IGNORE_INDEX", "Collator", "DataError", "Example", "TokenizeReport",
    "TokenizedDataset", "bos_ids", "group_by_domain", "load_examples",
    "render_prompt", "tokenize_example", "tokenize_examples",
]
