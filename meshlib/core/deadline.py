"""Deadlines on a monotonic clock, and the ``grpc-timeout`` wire format.

A logical call has one overall deadline (``policy.timeout``); each attempt gets
``min(per_try_timeout, remaining)`` (Envoy ``per_try_timeout``, gRPC A6). Deadlines are
absolute times on the injected monotonic clock, so arithmetic never sees wall-clock jumps.

Propagation uses the gRPC ``grpc-timeout`` format (gRPC over HTTP/2 spec, "Requests"):
``TimeoutValue TimeoutUnit`` where the value is a positive integer of at most 8 ASCII digits
and the unit one of ``H`` (hour), ``M`` (minute), ``S`` (second), ``m`` (millisecond),
``u`` (microsecond), ``n`` (nanosecond). :func:`encode_timeout` picks the finest unit whose
value fits in 8 digits and rounds up, so the receiver never sees a shorter budget than the
sender had (at most one unit longer). gRPC calls carry it in ``grpc-timeout``; HTTP calls
carry the same format in ``x-mesh-timeout`` (Envoy sends ``x-envoy-expected-rq-timeout-ms``,
Finagle a deadline context header; one format for both protocols keeps one parser).

Parsing is robust: a malformed value is ignored and reported (never raises into the call
path): :func:`parse_timeout` returns ``(None, reason)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "GRPC_TIMEOUT_HEADER",
    "HTTP_TIMEOUT_HEADER",
    "MAX_TIMEOUT_SECONDS",
    "Deadline",
    "decode_timeout",
    "encode_timeout",
    "parse_timeout",
]

GRPC_TIMEOUT_HEADER = "grpc-timeout"
HTTP_TIMEOUT_HEADER = "x-mesh-timeout"

_MAX_VALUE = 99_999_999  # at most 8 digits
_UNIT_NS: Mapping[str, int] = MappingProxyType({
    "n": 1,
    "u": 1_000,
    "m": 1_000_000,
    "S": 1_000_000_000,
    "M": 60_000_000_000,
    "H": 3_600_000_000_000,
})
_ENCODE_ORDER = ("n", "u", "m", "S", "M", "H")
MAX_TIMEOUT_SECONDS = _MAX_VALUE * 3600.0
_WIRE = re.compile(r"([0-9]{1,8})([HMSmun])")


def encode_timeout(seconds: float) -> str:
    """Encode a duration for ``grpc-timeout`` / ``x-mesh-timeout``.

    The finest unit that fits in 8 digits, rounded up. Durations <= 0 encode as ``"1n"``
    (the format has no zero; callers should not send an already expired call at all);
    durations beyond the format's range clamp to ``"99999999H"``.

    >>> encode_timeout(0.25), encode_timeout(1.5), encode_timeout(3600)
    ('250000u', '1500000u', '3600000m')
    """
    if not seconds > 0:  # also catches NaN
        return "1n"
    if seconds >= MAX_TIMEOUT_SECONDS:
        return f"{_MAX_VALUE}H"
    # round() first: 0.1 * 1e9 must give 100000000, not 100000000.00000001 -> ...01.
    ns = math.ceil(round(seconds * 1e9, 3))
    for unit in _ENCODE_ORDER:
        size = _UNIT_NS[unit]
        value = -(-ns // size)
        if value <= _MAX_VALUE:
            return f"{value}{unit}"
    return f"{_MAX_VALUE}H"  # pragma: no cover - unreachable after the clamp above


def decode_timeout(value: str) -> float:
    """Decode a ``grpc-timeout`` value to seconds; ``ValueError`` says what is wrong."""
    m = _WIRE.fullmatch(value.strip())
    if m is None:
        raise ValueError(
            f"invalid timeout {value!r}: expected 1-8 digits followed by one of H M S m u n"
        )
    return int(m.group(1)) * _UNIT_NS[m.group(2)] / 1e9


def parse_timeout(value: str | bytes | None) -> tuple[float | None, str | None]:
    """Lenient decoding for received headers: ``(seconds, None)`` or ``(None, reason)``.

    ``None`` (header absent) gives ``(None, None)``. A zero value is valid and means
    "already expired".
    """
    if value is None:
        return None, None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None, f"invalid timeout {value!r}: not ASCII"
    try:
        return decode_timeout(value), None
    except ValueError as exc:
        return None, str(exc)


class Deadline:
    """An absolute point on the monotonic clock, or none (``at is None``: unbounded).

    Cheap to create (one slot) and immutable by convention.
    """

    __slots__ = ("at",)

    def __init__(self, at: float | None) -> None:
        self.at = at

    @classmethod
    def after(cls, timeout: float | None, now: float) -> Deadline:
        """The deadline ``timeout`` seconds after ``now`` (``None``: no deadline)."""
        return cls(None if timeout is None else now + timeout)

    def remaining(self, now: float) -> float | None:
        """Seconds left (may be negative), or ``None`` when unbounded."""
        return None if self.at is None else self.at - now

    def expired(self, now: float) -> bool:
        return self.at is not None and now >= self.at

    def per_try(self, now: float, per_try_timeout: float | None) -> float | None:
        """``min(per_try_timeout, remaining)``; ``None`` only when both are unbounded."""
        if self.at is None:
            return per_try_timeout
        left = self.at - now
        if per_try_timeout is None or left < per_try_timeout:
            return left
        return per_try_timeout

    def earliest(self, other: Deadline) -> Deadline:
        """The earlier of two deadlines (e.g. the policy's and one received from upstream)."""
        if other.at is None:
            return self
        if self.at is None or other.at < self.at:
            return other
        return self

    def encode(self, now: float) -> str | None:
        """The header value for the remaining time, or ``None`` when unbounded."""
        return None if self.at is None else encode_timeout(self.at - now)

    def __repr__(self) -> str:
        return f"Deadline(at={self.at!r})"
