"""Examples -> token ids with labels on the assistant turns only; batching.

The tokenizer's chat template is used when it has one, a plain `### Instruction / ###
Response` template otherwise. Every assistant turn is learned; everything else is labeled -100.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from ..commands.common import DEFAULT_MAX_LENGTH  # noqa: F401  (re-exported)
from ..errors import DataError
from .records import Example

IGNORE_INDEX = -100
PLAIN_ROLE_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}


# ---------------------------------------------------------------------------- templates
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(messages: list[dict[str, str]], tokenizer) -> str:
    """The text a model continues to answer `messages` (the chat template's generation prompt)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    eos = tokenizer.eos_token or ""
    text = "".join(
        f"{PLAIN_ROLE_HEADERS[m['role']]}{m['content']}{eos if m['role'] == 'assistant' else ''}\n\n"
        for m in messages
    )
    return text + PLAIN_ROLE_HEADERS["assistant"]


def _segments(messages: list[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """Split a conversation's text into (piece, is_learned) with every assistant turn learned."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render_prompt(messages[:i], tokenizer)
        if has_chat_template(tokenizer):
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        else:
            full = prefix + m["content"] + (tokenizer.eos_token or "") + "\n\n"
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise DataError(
                "the tokenizer's chat template does not render conversations as growing "
                "prefixes; cannot mark the response tokens"
            )
        segments.append((prefix[len(done) :], False))
        segments.append((full[len(prefix) :], True))
        done = full
    return segments


def bos_ids(tokenizer) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is None or has_chat_template(tokenizer):
        return []
    probe = tokenizer("a").input_ids
    return [bos] if probe and probe[0] == bos else []


def tokenize_example(example: Example, tokenizer, max_length: int) -> dict[str, Any]:
    """input_ids and labels (-100 outside the assistant turns), truncated to max_length."""
    bos = bos_ids(tokenizer)
    ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    for text, learned in _segments(example.messages, tokenizer):
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids.extend(piece)
        labels.extend(piece if learned else [IGNORE_INDEX] * len(piece))
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {
        "input_ids": ids,
        "labels": labels,
        "truncated": truncated,
        "domain": example.domain,
        "source": example.source,
        "instruction": example.instruction,
    }


@dataclass
class TokenizeReport:
    examples: int
    truncated: int
    dropped: list[str]  # sources of examples whose response was cut away entirely
    tokens: int
    domains: dict[str, int]

    def line(self) -> str:
        doms = ", ".join(f"{d}: {n}" for d, n in sorted(self.domains.items()))
        return (
            f"{self.examples} examples ({doms}), {self.tokens:,} tokens, "
            f"{self.truncated} truncated, {len(self.dropped)} dropped"
        )


def tokenize_examples(
    examples: list[Example], tokenizer, max_length: int, skip_overlong: bool = False
) -> tuple[list[dict[str, Any]], TokenizeReport]:
    """Tokenize all examples. An example whose response is truncated away entirely is an error
    (naming them) unless `skip_overlong`, which drops them with a warning."""
    if max_length < 2:
        raise DataError(f"max_length={max_length} is too small")
    features, overlong = [], []
    truncated = 0
    for ex in examples:
        feat = tokenize_example(ex, tokenizer, max_length)
        truncated += feat["truncated"]
        if all(label == IGNORE_INDEX for label in feat["labels"]):
            overlong.append(ex.source)
            continue
        features.append(feat)
    if overlong and not skip_overlong:
        shown = "; ".join(overlong[:5]) + (f"; and {len(overlong) - 5} more" if len(overlong) > 5 else "")
        raise DataError(
            f"{len(overlong)} example(s) have prompts of {max_length} tokens or more, so their "
            f"response is truncated away entirely: {shown}. Raise --max-length, shorten those "
            "prompts, or pass --skip-overlong to drop them."
        )
    if not features:
        raise DataError("no examples left to train on")
    report = TokenizeReport(
        examples=len(features),
        truncated=truncated,
        dropped=overlong,
        tokens=sum(len(f["input_ids"]) for f in features),
        domains=dict(Counter(f["domain"] or "all" for f in features)),
    )
    return features, report


def group_by_domain(features: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Tokenized examples per domain (in order; examples without one are domain 'all')."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for f in features:
        groups.setdefault(f.get("domain") or "all", []).append(f)
    return groups


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, features: list[dict[str, Any]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


@dataclass
class Collator:
    """Right-pads a batch; labels are -100 on padding."""

    pad_token_id: int
    pad_to_multiple_of: int | None = 8

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(f["input_ids"]) for f in batch)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, f in enumerate(batch):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if all("adapter_name" in f for f in batch):  # LoRA-Split: each row's PEFT adapter
            out["adapter_names"] = [f["adapter_name"] for f in batch]
        if all("route_label" in f for f in batch):  # oracle routing / guide loss: each row's head
            out["route_labels"] = torch.tensor([f["route_label"] for f in batch], dtype=torch.long)
        return out
