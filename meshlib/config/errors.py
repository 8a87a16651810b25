"""Validation errors that say what was wrong and where: key, field path, value, reason.

A bad policy or instance record is refused as a whole (the way Envoy NACKs an xDS update)
and *every* problem found is reported at once, one per line::

    /meshlib/v1/services/orders/policy: retries.attempts=9: must be <= 5
    /meshlib/v1/services/orders/policy: routes[1].split[0].subset='v3': no subset named 'v3' ...

Field paths use dots for mapping keys and ``[i]`` for list positions. An empty path means
the document itself (syntax error, wrong top-level type).

:func:`field_errors_from_pydantic` turns a pydantic ``ValidationError`` into
:class:`FieldError` values. It reads the offending value back from the raw input (so a bad
duration shows as the operator wrote it, not as a converted float) and rewrites pydantic's
messages into short reasons, adding the list of allowed field names to "unknown field"
errors (silently ignored config is a top complaint about meshes: istio#7674).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MISSING",
    "ConfigError",
    "FieldError",
    "PolicyError",
    "RecordError",
    "field_errors_from_pydantic",
    "format_path",
]


class _Missing:
    """Stands for the value of a required field that was not given."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()

_MAX_VALUE_REPR = 80


def _short_repr(value: Any) -> str:
    text = repr(value)
    if len(text) > _MAX_VALUE_REPR:
        text = text[: _MAX_VALUE_REPR - 3] + "..."
    return text


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem: ``field`` is a dotted path (``"routes[1].split[0].weight"``, ``""`` for the
    whole document), ``value`` what was found there (:data:`MISSING` if absent)."""

    field: str
    value: Any
    reason: str

    def describe(self, key: str) -> str:
        """``key: field=value: reason`` (``key: <document>=...`` for document-level errors)."""
        where = self.field or "<document>"
        return f"{key}: {where}={_short_repr(self.value)}: {self.reason}"


class ConfigError(ValueError):
    """A document refused as a whole; ``errors`` lists every problem found."""

    kind = "config"

    def __init__(self, key: str, errors: Iterable[FieldError]) -> None:
        self.key = key
        self.errors: list[FieldError] = list(errors)
        super().__init__("\n".join(e.describe(key) for e in self.errors) or f"{key}: invalid")

    def fields(self) -> list[str]:
        """The field paths of all errors, in report order (handy in tests and logs)."""
        return [e.field for e in self.errors]


class PolicyError(ConfigError):
    """An invalid policy document (etcd key or file name in ``key``)."""

    kind = "policy"


class RecordError(ConfigError):
    """An invalid instance record (etcd key in ``key``)."""

    kind = "record"


def format_path(loc: Sequence[Any]) -> str:
    """``("routes", 1, "split", 0, "weight")`` -> ``"routes[1].split[0].weight"``."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _lookup(raw: Any, loc: Sequence[Any]) -> Any:
    """The value at ``loc`` in the raw input, or MISSING."""
    cur = raw
    for part in loc:
        if isinstance(cur, Mapping):
            if part in cur:
                cur = cur[part]
                continue
            return MISSING
        if isinstance(cur, list | tuple) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
            continue
        return MISSING
    return cur


def _allowed_fields(root: Any, loc: Sequence[Any]) -> list[str] | None:
    """Field names of the pydantic model that holds ``loc[-1]``, found by walking the schema
    of ``root`` along ``loc[:-1]``; None when the walk does not end on a model."""
    from pydantic import BaseModel

    model: Any = root
    for part in loc[:-1]:
        model = _unwrap(model)
        if isinstance(model, type) and issubclass(model, BaseModel):
            info = model.model_fields.get(str(part))
            if info is None:
                return None
            model = info.annotation
        elif isinstance(model, _Container):
            model = model.item
        else:
            return None
    model = _unwrap(model)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return None


@dataclass(frozen=True)
class _Container:
    item: Any


def _unwrap(tp: Any) -> Any:
    """Strip Optional/Annotated; map list/tuple/dict/Mapping to a _Container of the item type."""
    import types
    import typing

    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
            continue
        break
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (list, tuple) and args:
        return _Container(args[0])
    if origin is not None and args and origin in (dict, Mapping):
        return _Container(args[-1])
    return tp


_REASONS = {
    "missing": "required field is missing",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "invalid_key": "mapping keys must be strings",
    "finite_number": "must be a finite number",
}


def _num(x: Any) -> Any:
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _reason(err: Mapping[str, Any], root: Any, value: Any) -> str:
    etype = err["type"]
    ctx = err.get("ctx") or {}
    loc = err["loc"]
    if etype == "extra_forbidden":
        allowed = _allowed_fields(root, loc) if root is not None else None
        if not allowed:
            return "unknown field"
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown field{hint} (allowed: {', '.join(allowed)})"
    if etype == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    if etype == "greater_than":
        return f"must be > {_num(ctx['gt'])}"
    if etype == "greater_than_equal":
        return f"must be >= {_num(ctx['ge'])}"
    if etype == "less_than":
        return f"must be < {_num(ctx['lt'])}"
    if etype == "less_than_equal":
        return f"must be <= {_num(ctx['le'])}"
    if etype == "string_too_short":
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 else f"must have at least {n} characters"
    if etype == "string_too_long":
        return f"must have at most {ctx.get('max_length')} characters"
    if etype == "too_short":
        n = ctx.get("min_length", 1)
        return f"must have at least {n} item{'s' if n != 1 else ''}"
    if etype == "too_long":
        n = ctx.get("max_length")
        return f"must have at most {n} item{'s' if n != 1 else ''}"
    if etype == "string_type" and isinstance(value, bool):
        # YAML turns unquoted true/yes/on into booleans.
        word = "true" if value else "false"
        return f'must be a string (YAML read an unquoted {word} as a boolean: write "{word}")'
    if etype in ("int_type", "float_type") and isinstance(value, str):
        return f"{_REASONS[etype]}, not a string"
    if etype in _REASONS:
        return _REASONS[etype]
    if "reason" in ctx:
        return str(ctx["reason"])
    msg = str(err.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def field_errors_from_pydantic(exc: Any, raw: Any, root: Any = None) -> list[FieldError]:
    """Convert a pydantic ``ValidationError`` raised while validating ``raw`` (against model
    class ``root``, used to list allowed field names) into FieldErrors.

    Validators may raise ``PydanticCustomError("cross_field", ..., {"errors": [FieldError]})``
    with paths relative to the model they check; those are expanded with the model's path.
    """
    out: list[FieldError] = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p != "[key]")
        if err["type"] == "cross_field":
            for fe in err["ctx"]["errors"]:
                rel = fe.field
                base = format_path(loc)
                path = base + ("" if not rel else (rel if rel.startswith("[") or not base
                                                   else "." + rel))
                out.append(FieldError(path, fe.value, fe.reason))
            continue
        if err["type"] == "invalid_key" or (err["loc"] and err["loc"][-1] == "[key]"):
            # A bad mapping key: the path names the key as text, never as a list index.
            bad_key = err.get("input", loc[-1] if loc else MISSING)
            parent = format_path(loc[:-1])
            path = f"{parent}.{bad_key}" if parent else str(bad_key)
            if err["type"] == "invalid_key" or not isinstance(bad_key, str):
                reason = _REASONS["invalid_key"]
                if isinstance(bad_key, bool):
                    reason += " (YAML reads unquoted on/off/yes/no/true/false as booleans)"
            else:
                reason = f"invalid key: {_reason(err, None, bad_key)}"
            out.append(FieldError(path, bad_key, reason))
            continue
        value = _lookup(raw, loc)
        if value is MISSING and err["type"] != "missing":
            value = err.get("input", MISSING)
        out.append(FieldError(format_path(loc), value, _reason(err, root, value)))
    return out
