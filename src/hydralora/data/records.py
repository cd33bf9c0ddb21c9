"""Local instruction data -> examples -> token ids with labels on the response only.

Accepted files: JSONL (read line by line, so errors name the line), JSON, CSV and Parquet
(through `datasets`). Accepted record shapes, detected per file from its first record:

    {"instruction": ..., "input": ..., "output": ...}          Alpaca (input optional)
    {"prompt": ..., "completion": ...}                           prompt / completion
    {"messages": [{"role": ..., "content": ...}, ...]}         chat, ends with the assistant

An optional "domain" (or "task") field is kept for per-domain evaluation and analysis; training
never needs it. Other fields (e.g. "answer", "label", "test", "metric") travel along in `meta`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, short

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SHAPES = {
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "chat": ("messages",),
}
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One conversation whose assistant turns are learned; the last one is the reference answer."""

    messages: list[dict[str, str]]
    domain: str | None = None
    source: str = ""  # "file:line", for messages
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]

    @property
    def instruction(self) -> str:
        """The last user turn: the text that clustering and routing look at."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else self.messages[0]["content"]


# ---------------------------------------------------------------------------- reading files
def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text file; anything not UTF-8 is a DataError naming the file,
    the line and the encoding it looks like."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise DataError(f"{path}, line 1: the file is UTF-16 text; save it as UTF-8")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}, line {line_no}: not UTF-8 text (byte {err.start + 1} of the line: "
                    f"{err.reason}; Latin-1 or another legacy encoding?); save the file as UTF-8"
                ) from None
            yield line_no, text.removeprefix("\ufeff") if line_no == 1 else text


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    for line_no, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            yield f"line {line_no}", json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {line_no}: not valid JSON ({err.msg} at column {err.colno}); "
                "each line of a .jsonl file must be one JSON object"
            ) from None


def _csv_string_features(path: Path):

    import datasets

    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def _iter_with_datasets(path: Path, kind: str) -> Iterator[tuple[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    if kind in ("csv", "json"):
        for _ in _utf8_lines(path):  # a clear error for files that are not UTF-8
            pass
    try:
        # CSV cells are text: keep "5" a string instead of letting pandas make it an int
        extra = {"features": _csv_string_features(path)} if kind == "csv" else {}
        table = datasets.load_dataset(kind, data_files=str(path), split="train", **extra)
    except Exception as err:  # datasets raises many types; all mean "cannot read this file"
        raise DataError(f"{path}: could not read it as {kind.upper()} ({err})") from None
    offset = 2 if kind == "csv" else 1  # CSV: line 1 is the header
    where = "line" if kind == "csv" else "record"
    for i, record in enumerate(table):
        yield f"{where} {i + offset}", record


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) for every record of a data file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give the data files in it (e.g. {path}/train.jsonl)")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}"
        )
    if kind == "jsonl":
        yield from _iter_jsonl(path)
    else:
        yield from _iter_with_datasets(path, kind)


def detect_shape(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    for shape, keys in SHAPES.items():
        if all(k in record and record[k] is not None for k in keys):
            return shape
    return None


def _require_text(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
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


def record_to_example(record: Any, shape: str, where: str) -> Example:
    """Validate one record of the file's shape and turn it into an Example."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if detect_shape(record) != shape:
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(
            f"{where}: this file's records have the {shape} shape (fields "
            f"{' + '.join(SHAPES[shape])}), but this record has the fields: {keys}"
        )
    if shape == "alpaca":
        instruction = _require_text(record, "instruction", where)
        extra = record.get("input")
        if extra is None:
            extra = ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string (or absent), it is "
                            f"{type(extra).__name__} {short(extra)}")
        _check_encodable(extra, "input", where)
        user = instruction + (f"\n\n{extra}" if extra.strip() else "")
        messages = [{"role": "user", "content": user}]
        messages.append({"role": "assistant", "content": _require_text(record, "output", where)})
        used = {"instruction", "input", "output"}
    elif shape == "prompt-completion":
        messages = [
            {"role": "user", "content": _require_text(record, "prompt", where)},
            {"role": "assistant", "content": _require_text(record, "completion", where)},
        ]
        used = {"prompt", "completion"}
    else:
        messages = _check_messages(record["messages"], where)
        used = {"messages"}
    domain = record.get("domain", record.get("task"))
    if domain is not None and not isinstance(domain, str):
        raise DataError(f"{where}: field 'domain' must be a string")
    meta = {k: v for k, v in record.items() if k not in used | {"domain", "task"}}
    return Example(messages=messages, domain=domain, source=where, meta=meta)


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(
                f"{where}: messages[{i}] needs a 'role' of {', '.join(ROLES)}, got {m!r:.80}"
            )
        _require_text(m, "content", f"{where}: messages[{i}]", allow_empty=m["role"] == "system")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message must be the assistant's answer to learn, it is "
            f"{clean[-1]['role']!r}"
        )
    if len(clean) < 2:
        raise DataError(f"{where}: 'messages' needs at least one turn before the assistant's")
    return clean


def load_examples(paths: Iterable[str | Path]) -> list[Example]:
    """Read and validate every record of every file before any training starts."""
    examples: list[Example] = []
    for path in paths:
        shape = None
        count = 0
        for location, record in read_records(path):
            where = f"{path}, {location}"
            if shape is None:
                shape = detect_shape(record)
                if shape is None:
                    keys = ", ".join(sorted(record)) if isinstance(record, dict) else "not an object"
                    raise DataError(
                        f"{where}: unrecognized record (fields: {keys}); expected "
                        "instruction/input/output, prompt/completion or messages"
                    )
            examples.append(record_to_example(record, shape, where))
            count += 1
        if count == 0:
            raise DataError(f"{path}: the file holds no records")
    if not examples:
        raise DataError("no data files given")
    return examples
