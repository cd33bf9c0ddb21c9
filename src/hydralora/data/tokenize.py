"""Examples -> token ids with labels on the assistant turns only; packing; batching.

The tokenizer's chat template is used when it has one, a plain `### Instruction / ###
Response` template otherwise. Every assistant turn is learned (from `Example.learn_from` on);
everything else is labeled -100; plain-text examples are learned whole, without a template.

Why not TRL's or transformers' masking: `assistant_only_loss` needs a chat template written
with `{% generation %}` tags, which most models' templates (SmolLM2's, Llama's, Qwen's) lack.
Here the mask comes from rendering the conversation's growing prefixes, which works with any
template that renders them as prefixes (and says so when one does not), and every error names
the example's file and line.

Size: an example whose prompt is longer than `max_length` tokens can only be rejected (or
dropped with --skip-overlong); `char_bound` tells that from its length in characters, without
tokenizing it (a 10 MB line took 46 s to tokenize before it was refused), and no segment is
tokenized beyond what `max_length` tokens can cover.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import json
from bisect import bisect_left, insort

import torch

from ..errors import DataError
from .records import Example

IGNORE_INDEX = -100
PLAIN_ROLE_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n",
                      "tool": "### Tool result:\n"}
SIZE_MARGIN = 4  # a normalizer may shrink text (accents stripped): chars per token up to this x the longest token


# ---------------------------------------------------------------------------- templates
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(messages: list[dict[str, str]], tokenizer) -> str:
    """The text a model continues to answer `messages` (the chat template's generation prompt)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    eos = tokenizer.eos_token or ""
    text = "".join(
        f"{PLAIN_ROLE_HEADERS[m['role']]}{_plain(m)}{eos if m['role'] == 'assistant' else ''}\n\n"
        for m in messages
    )
    return text + PLAIN_ROLE_HEADERS["assistant"]


def _plain(message: dict[str, Any]) -> str:
    """A message's text for the plain template (an assistant's tool calls as JSON)."""
    if not message["content"] and message.get("tool_calls"):
        return json.dumps(message["tool_calls"], ensure_ascii=False)
    return message["content"]


def _segments(messages: list[dict[str, str]], tokenizer, learn_from: int = 0) -> list[tuple[str, bool]]:
    """Split a conversation's text into (piece, is_learned) with every assistant turn from
    message `learn_from` on learned."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < learn_from:
            continue
        prefix = render_prompt(messages[:i], tokenizer)
        if has_chat_template(tokenizer):
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        else:
            full = prefix + _plain(m) + (tokenizer.eos_token or "") + "\n\n"
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


def char_bound(tokenizer, tokens: int) -> int:
    """Characters that `tokens` tokens can cover at most: beyond it, text is surely longer."""
    longest = getattr(tokenizer, "_hydralora_longest_token", None)
    if longest is None:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        try:
            tokenizer._hydralora_longest_token = longest
        except AttributeError:  # a tokenizer that takes no attributes: measured each time
            pass
    return SIZE_MARGIN * max(longest, 1) * tokens


def prompt_chars(example: Example) -> int:
    """Characters before the first learned assistant turn (0 for plain text)."""
    if example.text:
        return 0
    first = next((i for i, m in enumerate(example.messages)
                  if m["role"] == "assistant" and i >= example.learn_from), len(example.messages))
    return sum(len(m["content"]) for m in example.messages[:first])


def tokenize_example(example: Example, tokenizer, max_length: int) -> dict[str, Any]:
    """input_ids and labels (-100 outside the assistant turns), truncated to max_length. Text
    past what max_length tokens can cover (`char_bound`) is not tokenized."""
    bos = bos_ids(tokenizer)
    ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    budget = char_bound(tokenizer, max_length + 1)
    if example.text:
        eos = tokenizer.eos_token or ""
        segments = [(example.messages[0]["content"] + eos, True)]
    else:
        segments = _segments(example.messages, tokenizer, example.learn_from)
    cut = False
    for text, learned in segments:
        if len(text) > budget:
            text, cut = text[:budget], True
        budget -= len(text)
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids.extend(piece)
        labels.extend(piece if learned else [IGNORE_INDEX] * len(piece))
        if budget <= 0:
            break
    truncated = len(ids) > max_length or cut
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
    too_long = char_bound(tokenizer, max_length)
    for ex in examples:
        if prompt_chars(ex) > too_long:  # its prompt alone fills max_length: no need to tokenize it
            overlong.append(ex.source)
            truncated += 1
            continue
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


def pack_features(features: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Whole examples packed into rows of at most max_length tokens (best fit, longest first),
    each row with `position_ids` that restart at every example: transformers then masks
    attention per example (block-diagonal), so packing changes no example's loss, only the
    padding spent. Examples are never split (each is already at most max_length)."""
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        n = len(features[i]["input_ids"])
        at = bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            insort(free, (room - n, row))
    packed = []
    for members in rows:
        parts = [features[i] for i in members]
        packed.append({
            "input_ids": [t for f in parts for t in f["input_ids"]],
            "labels": [t for f in parts for t in f["labels"]],
            "position_ids": [p for f in parts for p in range(len(f["input_ids"]))],
            "domain": None,
            "sources": [f["source"] for f in parts],
        })
    return packed


class PackedRows:
    """The model as `response_nll` calls it, for a batch of packed rows (--packing): no 2-D
    attention mask, no cache and per-example position ids, from which transformers builds a
    block-diagonal causal mask (each example attends to itself only; padding is a sequence of
    its own). The batch keeps its attention_mask for the routing context and token counts."""

    def __init__(self, model: torch.nn.Module, position_ids: torch.Tensor):
        self.model, self.position_ids = model, position_ids

    def __call__(self, **kwargs: Any) -> Any:
        return self.model(**{**kwargs, "attention_mask": None, "position_ids": self.position_ids,
                             "use_cache": False})


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
        packed = all("position_ids" in f for f in batch)
        positions = torch.arange(longest).repeat(len(batch), 1) if packed else None
        for i, f in enumerate(batch):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
            if positions is not None:  # padding: a sequence of its own, positions from 0
                positions[i, :n] = torch.tensor(f["position_ids"])
                positions[i, n:] = torch.arange(longest - n)
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if positions is not None:  # packed rows: the model takes these instead of the mask
            out["position_ids"] = positions
        if all("adapter_name" in f for f in batch):  # LoRA-Split: each row's PEFT adapter
            out["adapter_names"] = [f["adapter_name"] for f in batch]
        if all("route_label" in f for f in batch):  # oracle routing / guide loss: each row's head
            out["route_labels"] = torch.tensor([f["route_label"] for f in batch], dtype=torch.long)
        return out
