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
import math
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

from .errors import ConfigError, short
from .readers import read_yaml_mapping

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
    """Add one flag per field; defaults are SUPPRESSed so only flags given show up, and the
    dataclass supplies the rest (its defaults are the only ones). `defaults` names values that
    the command uses instead of the dataclass's (shown in the help). Field metadata:
    `positional` (an argument, not a flag), `required`, `choices`, `aliases` (other names of
    the option, e.g. ("lr",) for learning_rate: each one a flag too, `--lr`; YAML keys as well,
    see `field_aliases`). A flag with other names records which one was given, so that
    `check_given_once` can refuse the same option under two names."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("skip"):  # `skip`: filled by the caller, not a flag
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
        meta = f.metadata
        required = bool(meta.get("required") or meta.get("positional"))
        help_text = docs.get(f.name, "") + ("" if required else f" (default: {default})")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        if types_override and f.name in types_override:
            kwargs["type"] = types_override[f.name]
        elif kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in ("list", "list|str"):
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[kind]
        if meta.get("positional"):
            if kind in ("list", "list|str"):
                kwargs["nargs"] = "+"
            group.add_argument(f.name, **kwargs)
            continue
        if meta.get("required"):
            kwargs["required"] = True
        others = ["--" + a.replace("_", "-") for a in meta.get("aliases", ())]
        names = [flag, *(aliases or {}).get(f.name, []), *others]
        action = group.add_argument(*names, dest=f.name, **kwargs)
        if len(names) > 1:
            action.__class__ = _recording(type(action))


GIVEN = "_option_names_given"  # {dest: {flag, ...}} of the options given under several names


def _recording(cls: type) -> type:
    """`cls` (an argparse Action) that also notes the name it was given under."""

    class Recording(cls):  # type: ignore[misc,valid-type]
        def __call__(self, parser, namespace, values, option_string=None):
            name = (option_string or "").replace("--no-", "--", 1)
            namespace.__dict__.setdefault(GIVEN, {}).setdefault(self.dest, set()).add(name)
            super().__call__(parser, namespace, values, option_string)

    Recording.__name__ = cls.__name__
    return Recording


def check_given_once(args: argparse.Namespace) -> None:
    """An option given under two of its names (--lr 1e-3 --learning-rate 2e-4) is an error."""
    for dest, names in sorted(getattr(args, GIVEN, {}).items()):
        if len(names) > 1:
            raise ConfigError(f"{' and '.join(sorted(names))} name the same option ({dest}): give it once")


def field_aliases(*classes: type) -> dict[str, str]:
    """{other name: field name} from the fields' `aliases` metadata (e.g. lr -> learning_rate)."""
    return {alias: f.name for cls in classes for f in dataclasses.fields(cls)
            for alias in f.metadata.get("aliases", ())}


def option_label(cls: type, name: str) -> str:
    """The flag of field `name` of `cls`, with its other names: '--learning-rate (--lr)'."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    others = fields[name].metadata.get("aliases", ()) if name in fields else ()
    return flag(name) + (f" ({', '.join(map(flag, others))})" if others else "")


def canonical_names(values: dict[str, Any], aliases: dict[str, str], source: str) -> dict[str, Any]:
    """`values` with every other name replaced by its field's name; an option given under two
    names is a ConfigError naming both and `source`."""
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in values.items():
        name = aliases.get(key, key)
        if name in out:
            raise ConfigError(f"{source}: {given_as[name]!r} and {key!r} name the same option "
                              f"({name}); give it once")
        out[name], given_as[name] = value, key
    return out


def options_from_args(cls: type, args: argparse.Namespace) -> Any:
    """An instance of the dataclass `cls` from the flags given (the rest: its defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def normalize_targets(value: Any) -> Any:
    """A single flag value with regex characters is a regex; otherwise a list of names."""
    if isinstance(value, list) and len(value) == 1 and REGEX_CHARS & set(value[0]):
        return value[0]
    return value


def read_yaml_config(path: str | Path, known: set[str],
                     aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """Flat YAML mapping of field names (dashes or underscores) or their other names
    (`aliases`: {other name: field name}), returned under the field names; unknown keys and an
    option given twice (under two names) are an error."""
    path = Path(path)
    data = read_yaml_mapping(path)
    aliases = aliases or {}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known and name not in aliases:
            raise ConfigError(
                f"{path}: unknown option {short(key)}; known options: {', '.join(sorted(known))}"
            )
        out[name] = value
    return canonical_names(out, aliases, str(path))


def split_fields(values: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """Partition a flat dict of values into one dict per dataclass (by field name)."""
    parts = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        parts.append({k: v for k, v in values.items() if k in names})
    return parts


def known_fields(*classes: type) -> set[str]:
    return {f.name for cls in classes for f in dataclasses.fields(cls)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def coerce_values(values: dict[str, Any], *classes: type) -> dict[str, Any]:
    """Values read from YAML as the fields' types: number strings ('2e-4', '10') become
    numbers for float/int fields, a single string becomes a one-item list for list fields
    (a string with regex characters stays a regex where the field takes one). A value of the
    wrong type is a ConfigError naming the option and a short prefix of the value."""
    out = dict(values)
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in out or out[f.name] is None:
                continue
            kind, value = _kind(hints[f.name]), out[f.name]
            label = option_label(cls, f.name)
            if kind in ("int", "float") and isinstance(value, str) and not _is_int_or_auto(f.name, value):
                try:
                    value = float(value) if kind == "float" else int(value)
                except ValueError:
                    raise ConfigError(f"{label}: expected {'an integer' if kind == 'int' else 'a number'}, "
                                      f"got {short(value)}") from None
            if kind == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if (kind in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float)))
                    and not _is_int_or_auto(f.name, value)):
                raise ConfigError(f"{label}: expected a number, got {short(value)}")
            if kind == "list" and isinstance(value, str):
                value = [value]
            if kind == "list|str" and isinstance(value, str) and not REGEX_CHARS & set(value):
                value = [value]
            if kind in ("list", "list|str") and isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{label}: expected a list of names, got {short(value)}")
            if kind == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{label}: expected true or false, got {short(value)}")
            out[f.name] = value
    return out


def _is_int_or_auto(name: str, value: Any) -> bool:
    return name == "num_heads" and value == "auto"


def check_ranges(obj: Any, rules: dict[str, str]) -> None:
    """Range checks that argparse cannot make, one ConfigError naming the flag. Rules:
    '>=1' / '>=0' integers, '>0' / '>=0.0' finite numbers; a leading '?' also allows None."""
    for name, rule in rules.items():
        value = getattr(obj, name)
        if rule.startswith("?"):
            if value is None:
                continue
            rule = rule[1:]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        what = {">=1": "an integer >= 1", ">=0": "an integer >= 0", ">0": "a finite number > 0",
                ">=0.0": "a finite number >= 0"}[rule]
        if rule in (">=1", ">=0"):
            ok = number and isinstance(value, int) and value >= int(rule[2:])
        else:
            ok = number and math.isfinite(value) and (value > 0 if rule == ">0" else value >= 0)
        if not ok:
            label = option_label(type(obj), name) if dataclasses.is_dataclass(obj) else flag(name)
            raise ConfigError(f"{label} must be {what}, got {short(value)}")
