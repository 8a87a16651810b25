"""What the httpx transports do around each attempt: headers, timeouts, results, telemetry.

The hot path avoids httpx's URL machinery (``url.copy_with`` alone costs ~37 us, see the
field notes): an attempt sends the original request's raw target and headers to the
endpoint's address through meshlib's own connections (``meshlib.http.backends``). The ``Host``
header stays the mesh service name (``Host: orders``), as a sidecar would send it.
"""

from __future__ import annotations

import time
from time import perf_counter
from typing import Any, Final

import httpx

from meshlib.config.policy import IDEMPOTENT_METHODS

# current_deadline and CALLER_HEADER live in meshlib.context (shared with meshlib.server);
# re-exported here for the transports and meshlib.grpc.
from meshlib.context import CALLER_HEADER as CALLER_HEADER
from meshlib.context import current_deadline as current_deadline
from meshlib.core.call import Attempt, AttemptResult, CallEnd, FailureKind
from meshlib.core.deadline import HTTP_TIMEOUT_HEADER, Deadline, encode_timeout
from meshlib.core.outcome import (
    ERR_CONNECT,
    ERR_LOCAL,
    ERR_RESET,
    ERR_TIMEOUT,
    Outcome,
    classify_http,
)
from meshlib.core.retry import FailReason, parse_retry_after
from meshlib.http.errors import BY_FAILURE, RetryBudgetExhaustedError
from meshlib.telemetry.recorders import error_type_of

_TIMEOUT_HEADER = HTTP_TIMEOUT_HEADER.encode()
_RETRY_AFTER_STATUSES = frozenset({429, 503})
_OUTCOME_BY_STATUS = [classify_http(s, None) for s in range(600)]


def error_kind(exc: BaseException) -> str:
    """Map an httpx transport exception to an Envoy-style error kind (core.outcome)."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return ERR_CONNECT  # never reached the application: safe to retry any method
    if isinstance(exc, httpx.TimeoutException):
        return ERR_TIMEOUT
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return ERR_RESET
    return ERR_LOCAL


def request_deadline(request: httpx.Request, now: float) -> Deadline | None:
    """Per-request deadline: ``extensions={"mesh_timeout": seconds}``, else the inherited one."""
    t = request.extensions.get("mesh_timeout")
    inherited = current_deadline.get() if current_deadline.ever_set else None
    if t is None:
        return inherited
    own = Deadline(now + float(t))
    return own if inherited is None else own.earliest(inherited)


def replayable(request: httpx.Request) -> bool:
    """Only an in-memory body can be sent twice (httpx raises StreamConsumed otherwise)."""
    return isinstance(request.stream, httpx.ByteStream)


def attempt_headers_and_timeouts(
    request: httpx.Request, action: Attempt, extra_headers: list[tuple[bytes, bytes]], now: float
) -> tuple[list[tuple[bytes, bytes]], dict[str, float | None] | None]:
    """The attempt's header list (the request's, the mesh's, the remaining deadline) and
    its httpx-style timeouts (each phase capped by the per-try timeout)."""
    headers = request.headers.raw + extra_headers
    remaining = action.deadline.remaining(now)
    if remaining is not None:
        headers.append((_TIMEOUT_HEADER, encode_timeout(max(remaining, 0.0)).encode()))
    timeout = request.extensions.get("timeout")
    per_try = action.timeout
    if per_try is not None:
        if timeout:
            timeout = {k: (per_try if v is None or v > per_try else v) for k, v in timeout.items()}
        else:
            timeout = {"connect": per_try, "read": per_try, "write": per_try, "pool": per_try}
    return headers, timeout


def result_from_response(resp: httpx.Response) -> AttemptResult:
    status = resp.status_code
    retry_after = None
    if status in _RETRY_AFTER_STATUSES:
        retry_after = parse_retry_after(resp.headers.get("retry-after"), time.time())
    outcome = _OUTCOME_BY_STATUS[status] if status < 600 else Outcome.HTTP_5XX
    return AttemptResult(outcome, status, resp, retry_after_s=retry_after)


def result_from_error(exc: httpx.HTTPError) -> AttemptResult:
    return AttemptResult(classify_http(None, error_kind(exc)), None, exc)


def record_attempt(recorder: Any, span: Any, number: int, result: AttemptResult,
                   seconds: float) -> None:
    """Per-attempt series and the attempt's span."""
    recorder.attempt(number, result.outcome, seconds)
    status = result.status
    span.end(status, None if status is not None else error_type_of(result.value))


#: ``error.type`` of an attempt span abandoned because another hedged copy won.
HEDGE_CANCELLED: Final = "cancelled"


def record_cancelled(recorder: Any, span: Any, number: int, seconds: float) -> None:
    """An attempt abandoned because another hedged copy won (or the caller went away): its
    series gets outcome ``local`` (cancelled; never held against the endpoint) and its span
    ``error.type`` :data:`HEDGE_CANCELLED`."""
    recorder.attempt(number, Outcome.LOCAL, seconds)
    span.end(None, HEDGE_CANCELLED)


def finish(request: httpx.Request, route: Any, end: CallEnd, span: Any,
           started: float) -> httpx.Response:
    """Record the logical request, then return its response or raise its error."""
    recorder = route.recorder
    try:
        response = _outcome(request, route, end)
    except httpx.HTTPError as exc:
        failure = end.failure
        if failure in _NO_USABLE_ENDPOINT:
            recorder.no_endpoints()
        elif failure == FailureKind.CONCURRENCY:
            recorder.concurrency_rejected()
        etype = getattr(exc, "reason", None) or error_type_of(exc)
        recorder.request(request.method, None, etype, perf_counter() - started)
        span.end(None, etype)
        raise
    status = response.status_code
    recorder.request(request.method, status, None, perf_counter() - started)
    span.end(status, None)
    return response


_NO_USABLE_ENDPOINT = frozenset({FailureKind.NO_ENDPOINTS, FailureKind.CIRCUIT_OPEN})


def _outcome(request: httpx.Request, route: Any, end: CallEnd) -> httpx.Response:
    """Turn the call's end into the response to return or the exception to raise."""
    service = route.service
    if end.failure is not None:
        if end.failure == FailureKind.FAULT_ABORT:
            return httpx.Response(
                int(end.status or 503),
                headers={"content-type": "text/plain", "x-mesh-fault": "abort"},
                content=b"fault filter abort",
                request=request,
            )
        cause = end.result.value if end.result is not None else None
        exc = BY_FAILURE[end.failure](end.message, service=service, request=request)
        if isinstance(cause, BaseException):
            raise exc from cause
        raise exc
    result = end.result
    assert result is not None
    value = result.value
    if isinstance(value, BaseException):
        if end.stopped == "budget_exhausted":
            raise RetryBudgetExhaustedError(
                f"service {service!r}: {value.__class__.__name__} and the retry budget is "
                f"exhausted ({end.attempts} attempt(s))",
                service=service, request=request,
            ) from value
        note = f"meshlib: service {service!r}, {end.attempts} attempt(s)"
        why = not_retried(request, service, end, route.dest.plan().retry)
        value.add_note(f"{note}; {why}" if why else note)
        raise value
    return value  # type: ignore[no-any-return]


def not_retried(request: httpx.Request, service: str, end: CallEnd, retry: Any) -> str | None:
    """Why a call that failed without a response was not retried (again), and how to opt in,
    for the note on the re-raised httpx error. ``retry`` is the plan's
    :class:`~meshlib.core.retry.RetryPolicy`; ``end.stopped`` the :class:`FailReason`. Reads
    only ``request.method`` (the shim hands :func:`finish` a method-only request)."""
    stopped = end.stopped
    policy = f"the policy of {service!r}"
    if stopped == FailReason.NOT_IDEMPOTENT:
        method = request.method.upper()
        if method in IDEMPOTENT_METHODS:
            return (f"not retried: {method} is not in retries.methods of {policy} "
                    "(docs/policy.md)")
        why = (f"not retried: {method} is not idempotent (RFC 9110 9.2.2) and the request "
               "may have reached the service")
        if method != "POST":
            return f"{why}; only failures to connect are retried for it"
        if retry.allow_post_with_idempotency_key:  # so this POST had no key
            return (f"{why}; {policy} retries a POST only when it carries an Idempotency-Key "
                    "header")
        return (f"{why}; to allow retrying it, send an Idempotency-Key header and set "
                f"retries.allow_post_with_idempotency_key: true in {policy} (docs/policy.md)")
    if stopped == FailReason.NOT_REPLAYABLE:
        return ("not retried: the request body is a stream, which is sent only once (pass "
                "it as bytes, e.g. content=b'...', to allow retries)")
    if stopped == FailReason.ATTEMPTS_EXHAUSTED:
        return f"retries.attempts of {policy} used up"
    if stopped is None and end.result is not None:
        return (f"not retried: retries.retry_on of {policy} does not select this failure "
                f"({end.result.outcome.value})")
    return None
