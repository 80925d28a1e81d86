"""Method options as frozen dataclasses, and the one parser that turns ``key=value`` text into them.

Every defence and attack declares its settings as a frozen dataclass; the CLI's ``--option
key=value`` (dotted keys reach a nested dataclass: ``weights.alone=0.1``) is read against the field
types, so a new method needs no new CLI code; numbers are held to the bounds of the command-line
option of the same name (``validation.check_method_option``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from trojanscan.errors import TrojanscanError
from trojanscan.validation import check_method_option


def option_fields(options_type: type) -> dict[str, Any]:
    """Field name → resolved type hint of an options dataclass."""
    hints = typing.get_type_hints(options_type)
    return {f.name: hints[f.name] for f in dataclasses.fields(options_type)}


def _convert(text: str, hint: Any, key: str) -> Any:
    """``text`` as a value of type ``hint`` (int, float, str, bool, Optional/Union of those)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if type(None) in typing.get_args(hint) and text.strip().lower() in ("none", "null", ""):
            return None
        for arg in sorted(args, key=lambda a: a is str):  # try str last
            try:
                return _convert(text, arg, key)
            except TrojanscanError:
                continue
        raise TrojanscanError(f"option {key}={text!r}: expected {hint}")
    if origin in (tuple, list):
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else str
        return tuple(_convert(t.strip(), inner, key) for t in text.split("/") if t.strip())
    if hint is bool:
        if text.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if text.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise TrojanscanError(f"option {key}={text!r}: expected true or false")
    if hint in (int, float):
        try:
            value = hint(text)
        except ValueError:
            raise TrojanscanError(f"option {key}={text!r}: expected {hint.__name__}") from None
        if hint is float and not math.isfinite(value):
            raise TrojanscanError(f"option {key}={text!r}: expected a finite number")
        return value
    if hint is str or hint is Any:
        return text
    raise TrojanscanError(f"option {key}: cannot be set from the command line")


def parse_options(options_type: type, pairs: list[str], *, what: str = "method") -> dict[str, Any]:
    """``["steps=60", "weights.alone=0.1"]`` → keyword changes for ``options_type`` (nested dataclasses
    are rebuilt from their defaults); unknown keys are a one-line error listing the known ones."""
    fields = option_fields(options_type)
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, str]] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise TrojanscanError(f"option {pair!r}: expected KEY=VALUE")
        head, _, rest = key.partition(".")
        if head not in fields:
            raise TrojanscanError(f"{what} has no option {head!r}; its options are: "
                                  f"{', '.join(describe_options(options_type))}")
        if rest:
            nested.setdefault(head, {})[rest] = text
        else:
            changes[head] = check_method_option(key, _convert(text.strip(), fields[head], key))
    for head, sub in nested.items():
        inner = fields[head]
        if not dataclasses.is_dataclass(inner):
            raise TrojanscanError(f"option {head} has no sub-options")
        changes[head] = inner(**parse_options(inner, [f"{k}={v}" for k, v in sub.items()], what=head))
    return changes


def describe_options(options_type: type) -> list[str]:
    """``name=default`` for every option (nested dataclasses as ``name.sub=default``)."""
    out = []
    for f in dataclasses.fields(options_type):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            out += [f"{f.name}.{d}" for d in describe_options(type(default))]
        else:
            out.append(f"{f.name}={default}")
    return out
