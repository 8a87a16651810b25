"""Output formatting of ``meshctl``: aligned tables, JSON lines, labels, and validation errors
(``ConfigError.errors``) as lines or JSON objects. Pure functions, no I/O."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def one_line(text: str) -> str:
    return " ".join(str(text).split())



def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
        lines.append(line.rstrip())
    return "\n".join(lines)


def to_json(data: Any) -> str:
    return json.dumps(data, sort_keys=False, default=str)


def labels_text(labels: dict[str, str] | Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(dict(labels or {}).items())) or "-"


def decode(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def error_dicts(exc: Any) -> list[dict[str, Any]]:
    """FieldErrors of a ConfigError as JSON-friendly dicts."""
    out = []
    for e in getattr(exc, "errors", []):
        value = e.value
        if repr(value) == "<missing>":
            value = None
        elif not isinstance(value, str | int | float | bool | type(None) | list | dict):
            value = repr(value)
        out.append({"key": exc.key, "field": e.field, "value": value, "reason": e.reason,
                    "message": e.describe(exc.key)})
    return out


def error_lines(exc: Exception) -> list[str]:
    errors = getattr(exc, "errors", None)
    key = getattr(exc, "key", "")
    if errors:
        return [e.describe(key) for e in errors]
    return [line for line in str(exc).splitlines() if line.strip()] or [str(exc)]

