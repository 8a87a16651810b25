"""Duration strings ("250ms", "2s", "1m30s") to float seconds and back.

The syntax follows Go's ``time.ParseDuration``, which etcd, Envoy's YAML tooling and most
operators already know: one or more ``<number><unit>`` terms, units ``ns``, ``us`` (also
``µs``), ``ms``, ``s``, ``m``, ``h``; terms add up (``"1m30s"`` is 90 seconds). Differences
from Go, chosen for policy files:

* A plain number (``int`` or ``float``, as YAML/JSON produce for ``timeout: 2``) means
  seconds. A unit-less *string* other than ``"0"`` is refused: ``"250"`` is far more often
  meant as milliseconds than as four minutes, so the operator is asked to write the unit.
* Negative values, ``NaN``, infinities, booleans and empty strings are refused.

Parsing is exact: the digits are read as :class:`decimal.Decimal` and scaled before the one
conversion to ``float``, so ``"250ms"`` is exactly ``0.25`` and :func:`format_duration`
followed by :func:`parse_duration` returns the same float.

:data:`Duration` and :data:`PositiveDuration` are pydantic (v2) annotated types: they accept
``str | int | float``, hold ``float`` seconds and serialise back to the shortest exact string
(``0.25`` -> ``"250ms"``, ``90`` -> ``"90s"``, ``3600`` -> ``"1h"``).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer
from pydantic_core import PydanticCustomError

__all__ = [
    "Duration",
    "DurationError",
    "PositiveDuration",
    "format_duration",
    "parse_duration",
]

_UNITS: dict[str, Decimal] = {
    "ns": Decimal("0.000000001"),
    "us": Decimal("0.000001"),
    "µs": Decimal("0.000001"),
    "μs": Decimal("0.000001"),  # Greek mu, as well as the micro sign
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_UNIT_NAMES = "ns, us, ms, s, m, h"
# Longest units first so "ms" is not read as "m" followed by garbage.
_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)$")
# format_duration tries these from the largest unit down and uses the first that is exact.
_FORMAT_UNITS: tuple[tuple[str, Decimal], ...] = (
    ("h", Decimal(3600)),
    ("m", Decimal(60)),
    ("s", Decimal(1)),
    ("ms", Decimal("0.001")),
    ("us", Decimal("0.000001")),
    ("ns", Decimal("0.000000001")),
)


class DurationError(ValueError):
    """A value that is not a valid duration; the message says why."""


def parse_duration(value: str | int | float) -> float:
    """Return ``value`` as float seconds.

    >>> parse_duration("250ms"), parse_duration("1m30s"), parse_duration(2)
    (0.25, 90.0, 2.0)
    """
    if isinstance(value, bool):
        raise DurationError(f"expected a duration such as '250ms' or '2s', got boolean {value}")
    if isinstance(value, int | float):
        seconds = float(value)
        if math.isnan(seconds) or math.isinf(seconds):
            raise DurationError(f"duration must be a finite number of seconds, got {value!r}")
        if seconds < 0:
            raise DurationError(f"duration must not be negative, got {value!r}")
        return seconds
    if not isinstance(value, str):
        raise DurationError(
            f"expected a duration string such as '250ms' or a number of seconds, "
            f"got {type(value).__name__}"
        )
    text = value.strip()
    if not text:
        raise DurationError("duration is empty; write a number with a unit, e.g. '250ms' or '2s'")
    if text.startswith("-"):
        raise DurationError(f"duration must not be negative, got {value!r}")
    if text.startswith("+"):
        text = text[1:]
    if _NUMBER.match(text):
        if Decimal(text) == 0:
            return 0.0
        raise DurationError(
            f"duration {value!r} has no unit; write e.g. '{text}s' or '{text}ms' "
            f"(units: {_UNIT_NAMES}), or give a plain number of seconds"
        )
    total = Decimal(0)
    pos = 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if m is None:
            raise DurationError(_explain_bad_term(value, text, pos))
        try:
            total += Decimal(m.group(1)) * _UNITS[m.group(2)]
        except InvalidOperation as exc:  # pragma: no cover - the regex admits only digits
            raise DurationError(f"invalid number in duration {value!r}") from exc
        pos = m.end()
    return float(total)


def _explain_bad_term(value: str, text: str, pos: int) -> str:
    rest = text[pos:]
    num = re.match(r"\d+(?:\.\d*)?|\.\d+", rest)
    if num is None:
        return (
            f"invalid duration {value!r}: expected a number at {rest!r} "
            f"(examples: '250ms', '2s', '1m30s')"
        )
    unit = re.match(r"[^\d.]*", rest[num.end():])
    unit_text = unit.group(0) if unit else ""
    if not unit_text:
        return f"invalid duration {value!r}: the number {num.group(0)!r} has no unit ({_UNIT_NAMES})"
    return f"invalid duration {value!r}: unknown unit {unit_text!r} (use one of {_UNIT_NAMES})"


def format_duration(seconds: float) -> str:
    """The shortest exact string for ``seconds`` in the largest whole unit.

    >>> format_duration(0.25), format_duration(1.5), format_duration(300), format_duration(0)
    ('250ms', '1500ms', '5m', '0s')
    """
    if seconds == 0:
        return "0s"
    exact = Decimal(repr(float(seconds)))
    for name, size in _FORMAT_UNITS:
        n = exact / size
        if n == n.to_integral_value():
            return f"{int(n)}{name}"
    # Finer than a nanosecond: seconds with as many decimals as the float needs.
    return f"{format(exact, 'f')}s"


def _validate(value: Any, *, positive: bool) -> float:
    try:
        seconds = parse_duration(value)
    except DurationError as exc:
        raise PydanticCustomError("duration", "{reason}", {"reason": str(exc)}) from None
    if positive and seconds <= 0:
        raise PydanticCustomError(
            "duration", "{reason}", {"reason": "duration must be greater than 0"}
        )
    return seconds


def _validate_any(value: Any) -> float:
    return _validate(value, positive=False)


def _validate_positive(value: Any) -> float:
    return _validate(value, positive=True)


_serialise = PlainSerializer(format_duration, return_type=str)

#: Float seconds >= 0, written as "250ms", "2s", ... or a plain number of seconds.
Duration = Annotated[float, BeforeValidator(_validate_any), _serialise]
#: Like :data:`Duration` but must be > 0.
PositiveDuration = Annotated[float, BeforeValidator(_validate_positive), _serialise]
