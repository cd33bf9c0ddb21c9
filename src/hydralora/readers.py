"""Reading the small JSON and YAML files the tool takes (options, adapter configs, run records).

Every error names the file (and the line where there is one) and is a `ConfigError`: a file
that is not valid JSON/YAML, a key given twice in one object (a reader would silently keep
one of them), a YAML alias (a 367-byte file could name billions of values), a file over
`YAML_MAX_BYTES`, an integer of more than `MAX_DIGITS` digits, or nesting deeper than Python
can read. `files.py` re-exports these readers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, short

YAML_MAX_BYTES = 1 << 20
MAX_DIGITS = 100  # no option or record of ours needs a longer integer (Python refuses > 4300)


class DuplicateKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(key)
        seen[key] = value
    return seen


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_DIGITS} are read)")
    return int(text)


def _line_of_second(text: str, key: str) -> str:
    found = [m.start() for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text)]
    return f", line {text.count(chr(10), 0, found[1]) + 1}" if len(found) > 1 else ""


def parse_json(text: str, source: str | os.PathLike) -> Any:
    """`text` (the content of `source`) as JSON; errors as ConfigErrors naming `source`."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_parse_int)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}, line {err.lineno}: not valid JSON ({err.msg})") from None
    except DuplicateKeyError as err:
        raise ConfigError(f"{source}{_line_of_second(text, err.key)}: key {short(err.key)} is given "
                          "twice in one object; keep one of them") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to read") from None
    except ValueError as err:  # an integer too long
        raise ConfigError(f"{source}: {err}") from None


def read_json(path: str | os.PathLike, missing: str = "no such file") -> Any:
    """Any JSON value from `path`, read with `parse_json`'s checks."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {missing}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a JSON file") from None
    return parse_json(text, path)


def read_json_object(path: str | os.PathLike, missing: str = "no such file") -> dict[str, Any]:
    """A JSON object from `path`; errors name the file (and line) and what is wrong."""
    data = read_json(path, missing)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


class _OptionsLoader(yaml.SafeLoader):
    """SafeLoader without aliases, without duplicate keys, with exponent floats such as 2e-4
    (YAML 1.1 needs a dot: `2.0e-4`) and with integers of at most MAX_DIGITS digits."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted in option files; write the value out",
                self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {short(key)} is given twice in one mapping; keep one of them",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):  # type: ignore[override]
        digits = len(re.sub(r"[^0-9a-fA-F]", "", str(node.value)))
        if digits > MAX_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits (at most {MAX_DIGITS} are read)", node.start_mark)
        return super().construct_yaml_int(node)


_OptionsLoader.add_constructor("tag:yaml.org,2002:int", _OptionsLoader.construct_yaml_int)
_OptionsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from `path` ({} for an empty file); errors name the file and line.
    Files over YAML_MAX_BYTES, aliases and duplicate keys are refused."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > YAML_MAX_BYTES:
            raise ConfigError(f"{path}: {size} bytes; option files are limited to {YAML_MAX_BYTES} bytes")
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_OptionsLoader)  # noqa: S506 (safe loader)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return data
