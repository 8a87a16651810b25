"""Classify the result of one attempt, for the retry policy, the breaker and outlier detection.

Every attempt ends as exactly one :class:`Outcome`. Drivers turn what they saw (an HTTP
status, a transport error, a gRPC status code) into an outcome with :func:`classify_http` or
:func:`classify_grpc`; everything downstream decides on outcomes only.

What is retried follows Envoy's ``retry_on`` vocabulary (Envoy docs, "x-envoy-retry-on";
``source/common/router/retry_state_impl.cc``):

============================ =====================================================
``connect-failure``          the connection could not be made
``refused-stream``           HTTP/2 REFUSED_STREAM: the server did not process it
``reset``                    any reset or no response at all, including a connect
                             failure, a refused stream and a per-try timeout
``5xx``                      any 5xx response, and everything ``reset`` covers
``gateway-error``            502, 503, 504, and everything ``reset`` covers
``retriable-status-codes``   the status is in ``retriable_status_codes``
``retriable-4xx``            409 Conflict
============================ =====================================================

Envoy counts a reset as a 5xx "since it will result in one" (``wouldRetryFromReset``), and a
per-try timeout as a 504, which is why ``5xx`` and ``gateway-error`` include them here.

Health accounting follows Envoy outlier detection with ``split_external_local_origin_errors``
off: 5xx responses and locally originated errors (connect failure, reset, refused stream,
timeout) count as failures; any other response (2xx-4xx) resets the consecutive counters; a
LOCAL outcome (the caller cancelled, or the application raised before a response) is neutral.
gRPC status codes are mapped to HTTP statuses as Envoy and the gRPC HTTP mapping do
(``UNAVAILABLE`` -> 503, ``DEADLINE_EXCEEDED`` -> 504, ``INTERNAL``/``UNKNOWN`` -> 500, ...).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "ERR_CANCELLED",
    "ERR_CONNECT",
    "ERR_LOCAL",
    "ERR_REFUSED_STREAM",
    "ERR_RESET",
    "ERR_TIMEOUT",
    "GATEWAY_STATUSES",
    "GRPC_TO_HTTP",
    "Outcome",
    "classify_grpc",
    "classify_http",
    "counts_as_failure_for_breaker",
    "counts_as_gateway_failure",
    "counts_as_5xx_for_outlier",
    "grpc_code_key",
    "grpc_status_for_http",
    "is_retryable_grpc",
    "is_retryable_http",
    "is_success_for_health",
]


class Outcome(enum.Enum):
    """How one attempt ended. Values are stable strings for logs and metric labels."""

    SUCCESS = "success"
    CONNECT_FAILURE = "connect_failure"
    RESET = "reset"
    REFUSED_STREAM = "refused_stream"
    TIMEOUT = "timeout"  # the per-try timeout fired (no response)
    HTTP_5XX = "http_5xx"  # a 5xx other than 502/503/504
    GATEWAY_ERROR = "gateway_error"  # 502, 503, 504
    HTTP_4XX = "http_4xx"
    LOCAL = "local"  # cancelled by the caller, or an application error before a response


# Transport error kinds a driver reports to classify_http (it maps its exceptions to these).
ERR_CONNECT = "connect-failure"
ERR_RESET = "reset"
ERR_REFUSED_STREAM = "refused-stream"
ERR_TIMEOUT = "timeout"
ERR_CANCELLED = "cancelled"
ERR_LOCAL = "local"

_ERROR_KINDS: Mapping[str, Outcome] = MappingProxyType({
    ERR_CONNECT: Outcome.CONNECT_FAILURE,
    ERR_RESET: Outcome.RESET,
    ERR_REFUSED_STREAM: Outcome.REFUSED_STREAM,
    ERR_TIMEOUT: Outcome.TIMEOUT,
    ERR_CANCELLED: Outcome.LOCAL,
    ERR_LOCAL: Outcome.LOCAL,
})

GATEWAY_STATUSES = frozenset({502, 503, 504})

#: gRPC status code (canonical name, as ``grpc.StatusCode.X.name``) -> HTTP status, following
#: the gRPC HTTP mapping (google.rpc.Code comments) that Envoy's grpc_http1_bridge also uses.
GRPC_TO_HTTP: Mapping[str, int] = MappingProxyType({
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
})


def grpc_code_key(name: str) -> str:
    """Canonical gRPC code name: ``"deadline-exceeded"`` / ``"Unavailable"`` -> ``"DEADLINE_EXCEEDED"``."""
    return name.strip().upper().replace("-", "_")


def _grpc_outcomes() -> dict[str, Outcome]:
    out: dict[str, Outcome] = {}
    for code, status in GRPC_TO_HTTP.items():
        if code == "OK":
            out[code] = Outcome.SUCCESS
        elif code == "CANCELLED":
            out[code] = Outcome.LOCAL
        elif code == "DEADLINE_EXCEEDED":
            out[code] = Outcome.TIMEOUT
        elif status in GATEWAY_STATUSES:
            out[code] = Outcome.GATEWAY_ERROR
        elif status >= 500:
            out[code] = Outcome.HTTP_5XX
        else:
            out[code] = Outcome.HTTP_4XX
    return out


_GRPC_OUTCOME: Mapping[str, Outcome] = MappingProxyType(_grpc_outcomes())


def classify_http(status: int | None, error_kind: str | None = None) -> Outcome:
    """Outcome of an HTTP attempt from its response status or transport error kind.

    ``error_kind`` (one of the ``ERR_*`` constants) wins over ``status``; an unknown error
    kind, or neither a status nor an error, is LOCAL (not retried, not counted against the
    endpoint). 1xx-3xx are SUCCESS.
    """
    if error_kind is not None:
        return _ERROR_KINDS.get(error_kind, Outcome.LOCAL)
    if status is None:
        return Outcome.LOCAL
    if status < 400:
        return Outcome.SUCCESS
    if status < 500:
        return Outcome.HTTP_4XX
    if status in GATEWAY_STATUSES:
        return Outcome.GATEWAY_ERROR
    return Outcome.HTTP_5XX


def classify_grpc(code_name: str) -> Outcome:
    """Outcome of a gRPC attempt from its status code name (``"UNAVAILABLE"``,
    ``"unavailable"`` and ``"deadline-exceeded"`` spellings all work).

    UNAVAILABLE is a gateway error (503), DEADLINE_EXCEEDED a timeout (504), INTERNAL,
    UNKNOWN, DATA_LOSS and UNIMPLEMENTED are 5xx, CANCELLED is LOCAL, the rest are 4xx.
    An unknown name is UNKNOWN (a 5xx), as gRPC treats unknown codes.
    """
    outcome = _GRPC_OUTCOME.get(code_name)
    if outcome is None:
        outcome = _GRPC_OUTCOME.get(grpc_code_key(code_name), Outcome.HTTP_5XX)
    return outcome


def grpc_status_for_http(code_name: str) -> int:
    """The HTTP status a gRPC code maps to (unknown names: 500)."""
    return GRPC_TO_HTTP.get(grpc_code_key(code_name), 500)


_NO_RESPONSE = frozenset({
    Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.REFUSED_STREAM, Outcome.TIMEOUT,
})
_5XX_RETRY = _NO_RESPONSE | {Outcome.HTTP_5XX, Outcome.GATEWAY_ERROR}
_GATEWAY_RETRY = _NO_RESPONSE | {Outcome.GATEWAY_ERROR}


def is_retryable_http(
    outcome: Outcome,
    status: int | None,
    retry_on: frozenset[str],
    retriable_codes: frozenset[int] = frozenset(),
) -> bool:
    """Whether Envoy's ``retry_on`` conditions select this attempt for a retry.

    This says nothing about idempotency, attempts, budget or deadline: see
    :meth:`meshlib.core.retry.RetryPolicy.decide`.
    """
    if outcome is Outcome.SUCCESS or outcome is Outcome.LOCAL:
        return False
    if outcome is Outcome.CONNECT_FAILURE and "connect-failure" in retry_on:
        return True
    if outcome is Outcome.REFUSED_STREAM and "refused-stream" in retry_on:
        return True
    if outcome in _NO_RESPONSE and "reset" in retry_on:
        return True
    if outcome in _5XX_RETRY and "5xx" in retry_on:
        return True
    if outcome in _GATEWAY_RETRY and "gateway-error" in retry_on:
        return True
    if status is not None:
        if "retriable-status-codes" in retry_on and status in retriable_codes:
            return True
        if status == 409 and "retriable-4xx" in retry_on:
            return True
    return False


def is_retryable_grpc(code_name: str, grpc_retry_on: frozenset[str]) -> bool:
    """Whether a gRPC status is in ``grpc_retry_on`` (gRPC A6 ``retryableStatusCodes``).

    Both the policy spelling (``"deadline-exceeded"``) and the canonical name
    (``"DEADLINE_EXCEEDED"``) are accepted on either side. ``RetryPolicy`` precomputes the
    canonical set so its hot path is one set lookup.
    """
    if code_name in grpc_retry_on:
        return True
    key = grpc_code_key(code_name)
    return key in grpc_retry_on or key.lower().replace("_", "-") in grpc_retry_on


_BREAKER_FAILURES = _5XX_RETRY
_GATEWAY_FAILURES = _GATEWAY_RETRY
_HEALTH_SUCCESS = frozenset({Outcome.SUCCESS, Outcome.HTTP_4XX})


def counts_as_failure_for_breaker(outcome: Outcome) -> bool:
    """5xx, gateway errors and locally originated errors (connect failure, reset, refused
    stream, per-try timeout) count; 4xx, success and LOCAL do not."""
    return outcome in _BREAKER_FAILURES


def counts_as_5xx_for_outlier(outcome: Outcome) -> bool:
    """Envoy ``consecutive_5xx``: 5xx responses and local-origin errors mapped to 5xx."""
    return outcome in _BREAKER_FAILURES


def counts_as_gateway_failure(outcome: Outcome) -> bool:
    """Envoy ``consecutive_gateway_failure``: 502/503/504 and local-origin errors (which Envoy
    turns into 503 or 504)."""
    return outcome in _GATEWAY_FAILURES


def is_success_for_health(outcome: Outcome) -> bool:
    """A response that proves the endpoint works (2xx-4xx): resets consecutive counters."""
    return outcome in _HEALTH_SUCCESS
