"""Command-line flags and YAML config files generated from typed dataclasses.

Each dataclass field becomes `--field-name` with its type, its default and, as help, the
docstring written under the field. Precedence: built-in defaults < YAML file < flags given on
the command line. One source of defaults: the dataclasses.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

from .config import ConfigError

REGEX_CHARS = set("*^$|()[]\\+?")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (litgpt's convention)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _kind(tp: Any) -> str:
    """Classify an annotation: 'bool', 'int', 'float', 'str', 'list', 'list|str', 'dict'."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        kinds = {_kind(a) for a in args}
        if kinds == {"list", "str"}:
            return "list|str"
        return _kind(args[0])
    if origin is list:
        return "list"
    if origin is dict or tp is dict:
        return "dict"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(tp, "str")


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] = (),
    types_override: dict[str, Any] | None = None,
    aliases: dict[str, list[str]] | None = None,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add one flag per field; defaults are SUPPRESSed so only flags given show up. `defaults`
    names values that the command uses instead of the dataclass's (shown in the help)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = _kind(hints[f.name])
        if kind == "dict":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        if defaults and f.name in defaults:
            default = f"{defaults[f.name]}; {cls.__name__}'s own default: {default}"
        help_text = docs.get(f.name, "") + f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if types_override and f.name in types_override:
            kwargs["type"] = types_override[f.name]
        elif kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in ("list", "list|str"):
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[kind]
        group.add_argument(flag, *(aliases or {}).get(f.name, []), **kwargs)


def normalize_targets(value: Any) -> Any:
    """A single flag value with regex characters is a regex; otherwise a list of names."""
    if isinstance(value, list) and len(value) == 1 and REGEX_CHARS & set(value[0]):
        return value[0]
    return value


def read_yaml_config(path: str | Path, known: set[str]) -> dict[str, Any]:
    """Flat YAML mapping of field names (dashes or underscores); unknown keys are an error."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(
                f"{path}: unknown option {key!r}; known options: {', '.join(sorted(known))}"
            )
        out[name] = value
    return out


def split_fields(values: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """Partition a flat dict of values into one dict per dataclass (by field name)."""
    parts = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        parts.append({k: v for k, v in values.items() if k in names})
    return parts


def known_fields(*classes: type) -> set[str]:
    return {f.name for cls in classes for f in dataclasses.fields(cls)}
