"""Records -> examples: the record shapes, detected per file (or dataset) from its first record.

    {"instruction", "input"?, "output", "system"?, "history"?}    Alpaca (LLaMA-Factory's keys too)
    {"prompt": str, "completion": str}                            prompt / completion
    {"prompt": [messages], "completion": [messages]}              TRL's conversational prompt/completion
    {"messages": [{"role", "content"}, ...]}                      chat (OpenAI / TRL), ends with the assistant
    {"conversations": [{"from", "value"}, ...], "system"?}        ShareGPT (human, gpt, system, observation, ...)
    {"text": str}                                                 plain text: no template, every token learned

Roles: system, user, assistant and tool (a tool's result; an assistant turn may carry
`tool_calls` and no text). The loss covers every assistant turn, except in TRL's conversational
prompt/completion, where it covers the completion only (as TRL does). An optional "domain" (or
"task") field is kept for per-domain evaluation and analysis; other fields travel in `meta`.
Where the records come from (files, globs, saved datasets, hub ids) is `sources`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, short
from .sources import describe, read_source, resolve_sources

SHAPES = {  # shape: the fields that mark it (in detection order)
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "conversational": ("prompt", "completion"),  # the same fields, lists of messages
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "observation": "tool", "tool": "tool",
                  "function_call": "assistant"}
MESSAGE_EXTRAS = ("tool_calls", "tool_call_id", "name")  # kept on a message for the chat template


@dataclass
class Example:
    """One conversation whose assistant turns (from message `learn_from` on) are learned; the
    last one is the reference answer. `text`: plain text, no template, every token learned."""

    messages: list[dict[str, Any]]
    domain: str | None = None
    source: str = ""  # "file, line N", for messages
    meta: dict[str, Any] = field(default_factory=dict)
    learn_from: int = 0
    text: bool = False

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]

    @property
    def instruction(self) -> str:
        """The last user turn: the text that clustering and routing look at."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else self.messages[0]["content"]


def _has(record: dict, key: str) -> bool:
    return record.get(key) is not None


def detect_shape(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if _has(record, "instruction") and _has(record, "output"):
        return "alpaca"
    if _has(record, "prompt") and _has(record, "completion"):
        return "conversational" if isinstance(record["prompt"], list) else "prompt-completion"
    for shape in ("chat", "sharegpt", "text"):
        if _has(record, SHAPES[shape][0]):
            return shape
    return None


def _require_text(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        got = ("missing" if key not in record else
               "null (the field is there, this record has no value)" if value is None else
               f"a {type(value).__name__} {short(value)}")
        raise DataError(f"{where}: field {key!r} must be a string, it is {got}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    _check_encodable(value, key, where)
    return value


def _check_encodable(value: str, key: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where}: field {key!r} holds a lone surrogate "
                        f"({value[err.start]!r} at character {err.start + 1}); not valid text") from None


def _optional_text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string (or absent), it is "
                        f"{type(value).__name__} {short(value)}")
    _check_encodable(value, key, where)
    return value


def _alpaca(record: dict, where: str) -> list[dict[str, Any]]:
    instruction = _require_text(record, "instruction", where)
    extra = _optional_text(record, "input", where)
    messages = [{"role": "system", "content": s} for s in [_optional_text(record, "system", where)] if s.strip()]
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise DataError(f"{where}: field 'history' must be a list of [instruction, answer] pairs")
    for i, (query, answer) in enumerate(history):
        pair = {"user": query, "assistant": answer}
        messages += [{"role": role, "content": _require_text(pair, role, f"{where}: history[{i}]")}
                     for role in ("user", "assistant")]
    messages.append({"role": "user", "content": instruction + (f"\n\n{extra}" if extra.strip() else "")})
    messages.append({"role": "assistant", "content": _require_text(record, "output", where)})
    return messages


def _sharegpt(record: dict, where: str) -> list[dict[str, Any]]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}}")
    messages = [{"role": "system", "content": s} for s in [_optional_text(record, "system", where)] if s.strip()]
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: conversations[{i}] must be an object {{from, value}}, got {short(turn)}")
        speaker = turn.get("from", turn.get("role"))
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{i}] needs 'from' of {', '.join(SHAREGPT_ROLES)}, "
                            f"got {short(speaker)}")
        key = "value" if "value" in turn else "content"
        messages.append({"role": SHAREGPT_ROLES[speaker],
                         "content": _require_text(turn, key, f"{where}: conversations[{i}]",
                                                  allow_empty=speaker == "system")})
    return messages


def record_to_example(record: Any, shape: str, where: str) -> Example:
    """Validate one record of the file's shape and turn it into an Example."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object (a record with fields), got "
                        f"{type(record).__name__} {short(record)}")
    if detect_shape(record) != shape and not all(k in record for k in SHAPES[shape]):  # null: said below
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(
            f"{where}: this file's records have the {shape} shape (fields "
            f"{' + '.join(SHAPES[shape])}), but this record has the fields: {keys}"
        )
    learn_from, text = 0, False
    if shape == "alpaca":
        messages = _check_messages(_alpaca(record, where), where)
        used = {"instruction", "input", "output", "system", "history"}
    elif shape == "prompt-completion":
        messages = [
            {"role": "user", "content": _require_text(record, "prompt", where)},
            {"role": "assistant", "content": _require_text(record, "completion", where)},
        ]
        used = {"prompt", "completion"}
    elif shape == "conversational":
        prompt = _check_messages(record["prompt"], f"{where}: prompt", whole=False)
        completion = _check_messages(record["completion"], f"{where}: completion", whole=False)
        messages, learn_from = _check_messages(prompt + completion, where), len(prompt)
        if not any(m["role"] == "assistant" for m in completion):
            raise DataError(f"{where}: 'completion' holds no assistant message to learn")
        used = {"prompt", "completion"}
    elif shape == "chat":
        messages, used = _check_messages(record["messages"], where), {"messages"}
    elif shape == "sharegpt":
        messages, used = _check_messages(_sharegpt(record, where), where), {"conversations", "system"}
    else:
        messages, used, text = [{"role": "assistant", "content": _require_text(record, "text", where)}], {"text"}, True
    domain = record.get("domain", record.get("task"))
    if domain is not None and not isinstance(domain, str):
        raise DataError(f"{where}: field 'domain' must be a string")
    meta = {k: v for k, v in record.items() if k not in used | {"domain", "task"}}
    return Example(messages=messages, domain=domain, source=where, meta=meta, learn_from=learn_from, text=text)


def _check_messages(messages: Any, where: str, whole: bool = True) -> list[dict[str, Any]]:
    """Validated {role, content} messages (tool calls kept); `whole`: a conversation to learn
    (at least one turn before the final assistant answer)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(
                f"{where}: messages[{i}] needs a 'role' of {', '.join(ROLES)}, got {short(m, 80)}"
            )
        calls = m["role"] == "assistant" and bool(m.get("tool_calls"))
        content = "" if calls and m.get("content") is None else m.get("content")
        _require_text({**m, "content": content}, "content", f"{where}: messages[{i}]",
                      allow_empty=m["role"] == "system" or calls)
        clean.append({"role": m["role"], "content": content, **{k: m[k] for k in MESSAGE_EXTRAS if m.get(k)}})
    if not whole:
        return clean
    if clean[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message must be the assistant's answer to learn, it is "
            f"{clean[-1]['role']!r}"
        )
    if len(clean) < 2:
        raise DataError(f"{where}: 'messages' needs at least one turn before the assistant's")
    return clean


def load_examples(paths: Iterable[str | Path]) -> list[Example]:
    """Read and validate every record of every --data entry before any training starts."""
    examples: list[Example] = []
    for source in resolve_sources([str(p) for p in paths]):
        shape = None
        count = 0
        for location, record in read_source(source):
            where = f"{describe(source)}, {location}"
            if shape is None:
                shape = detect_shape(record)
                if shape is None:
                    what = (f"fields: {', '.join(sorted(record)) or 'none'}" if isinstance(record, dict)
                            else f"not an object but a {type(record).__name__}: {short(record)}")
                    raise DataError(
                        f"{where}: unrecognized record ({what}); expected instruction/output, "
                        "prompt/completion, messages, conversations (ShareGPT) or text"
                    )
            examples.append(record_to_example(record, shape, where))
            count += 1
        if count == 0:
            raise DataError(f"{describe(source)}: the file holds no records")
    if not examples:
        raise DataError("no data files given")
    return examples
