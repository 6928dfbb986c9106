"""Declared option fields: convert a value (a CLI string or a Python value) to a field's type, and name that type.

Options arrive as `--opt key=value` strings or as a Python dict; one converter for both means a method never
sees "0.5" where it expects 0.5, and a wrong type is refused by name before any data is read.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import Field, fields
from typing import Any

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_NONE = ("none", "null")


class Mismatch(Exception):
    """A value that is not of the declared type; its message is the expected type, for the caller's error."""


def hints(cls: type) -> dict[str, Any]:
    """Each declared field of the dataclass `cls` and its resolved type."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in fields(cls)}


def help_of(f: Field) -> str:
    return str(f.metadata.get("help", ""))


def describe(hint: Any) -> str:
    """A type as a user reads it: float, int | None, list[str]."""
    if hint is type(None):
        return "None"
    if _is_union(hint):
        return " | ".join(describe(a) for a in typing.get_args(hint))
    origin = typing.get_origin(hint)
    if origin is not None:
        args = typing.get_args(hint)
        inner = ", ".join("..." if a is Ellipsis else describe(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(hint, "__name__", str(hint))


def convert(value: Any, hint: Any) -> Any:
    """`value` as type `hint`; Mismatch (naming the expected type) when it is not one."""
    if hint is Any:
        return value
    if _is_union(hint):
        args = typing.get_args(hint)
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(value, arg)
            except Mismatch:
                continue
        raise Mismatch(describe(hint))
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        return _bool(value)
    if origin is int:
        return _int(value)
    if origin is float:
        return _float(value)
    if origin is str:
        if isinstance(value, str):
            return value
        raise Mismatch("str")
    if origin in (list, tuple):
        items = _sequence(value)
        (item, *_) = typing.get_args(hint) or (Any,)
        out = [convert(v, item) for v in items]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        parsed = _json(value) if isinstance(value, str) else value
        if not isinstance(parsed, dict):
            raise Mismatch(f"{describe(hint)} (a JSON object)")
        return dict(parsed)
    if isinstance(value, origin):
        return value
    raise Mismatch(describe(hint))


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise Mismatch("bool (true or false)")


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise Mismatch("int")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                number = 0.5
            if number.is_integer():
                return int(number)
    raise Mismatch("int")


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise Mismatch("float")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise Mismatch("float")


def _sequence(value: Any) -> list[Any]:
    """A list from a list/tuple, a JSON list, or comma-separated text ("a,b" -> ["a", "b"])."""
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            parsed = _json(text)
            if isinstance(parsed, list):
                return parsed
        return [v.strip() for v in text.split(",") if v.strip()]
    return [value]


def _json(text: str) -> Any:
    """Parsed JSON, or None where the text is not JSON (the caller then refuses it by type)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
