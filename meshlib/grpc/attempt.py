"""The gRPC rules of a call: its arguments -> the plan's inputs, an attempt's end -> a result.

The call plan (``meshlib.core.call.run_call``, ``grpc=True``) decides; the call driver
(:mod:`meshlib.grpc.driver`) runs it; this module holds the gRPC-specific pieces both use:

* Routing: gRPC is HTTP/2 ``POST /package.Service/Method`` (gRPC over HTTP/2 spec), so
  routes see ``path`` = the full method name (``match.path_prefix: /pkg.Orders/`` works) and
  ``match.headers`` look at the call's metadata.
* Deadline: the call's ``timeout`` (or the deadline inherited from the request being served,
  :data:`meshlib.context.current_deadline`) combined with ``policy.timeout``; the earlier wins
  and bounds every attempt, which grpcio sends as ``grpc-timeout``.
* Retry eligibility (gRPC A6 "Retry Policy", "When Retries are Valid"): an attempt whose
  server already sent response headers is *committed* and never retried. grpcio does not say
  whether headers arrived, only which metadata they carried, so an error with non-empty
  initial metadata, or a stream that delivered a message, counts as committed. A committed
  result is reported to the plan with ``grpc_code=None`` (so ``grpc_retry_on`` cannot select
  it) while its outcome still counts for breakers and outlier detection.
* Server pushback: ``grpc-retry-pushback-ms`` trailing metadata (A6) replaces the backoff.
* Retries carry ``grpc-previous-rpc-attempts`` (A6 "Retry metadata").

Telemetry (the same recorders and spans as the HTTP transports, ``meshlib.http.attempt``):
:class:`RpcTelemetry` resolves, once per multicallable, the destination's
``RpcClientRecorder`` (also the plan's observer: retries, refused retries, breaker and
ejection events), the method's ``RpcMethodRecorder`` and the span names
(``split_full_method``). Per call the driver opens a call span (``start_rpc_call``), per
attempt a CLIENT span whose context is injected into that attempt's metadata, and closes
both (``CallDriver.end_attempt`` / ``ok`` / ``finish`` / ``abort`` / ``settle_stream``): the
attempt series by outcome, the call duration by the gRPC code name, and, for mesh failures
(``MeshRpcError.reason``), the reason as ``error_type`` with the code it maps to. As in gRFC
A66, a call the application cancels is recorded too (``CANCELLED``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from meshlib.context import current_deadline
from meshlib.core.call import AttemptResult, CallEnd, CallGen, CallObserver, FailureKind, run_call
from meshlib.core.deadline import Deadline
from meshlib.core.destination import DestinationState
from meshlib.core.outcome import GRPC_TO_HTTP, Outcome, classify_grpc
from meshlib.core.retry import PUSHBACK_HEADER, parse_pushback_ms
from meshlib.grpc.errors import code_from_name, mesh_error
from meshlib.grpc.mtls import count_tls_refusal
from meshlib.telemetry.recorders import split_full_method
from meshlib.telemetry.tracing import NOOP_CALL, start_rpc_call

CALLER_KEY = "x-mesh-caller"
PREVIOUS_ATTEMPTS_KEY = "grpc-previous-rpc-attempts"

_SUCCESS = Outcome.SUCCESS
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
#: grpc.StatusCode -> (canonical name, outcome, HTTP status): one dict lookup per result.
_INFO: dict[grpc.StatusCode, tuple[str, Outcome, int]] = {
    c: (c.name, classify_grpc(c.name), GRPC_TO_HTTP.get(c.name, 500)) for c in grpc.StatusCode
}
_UNKNOWN = _INFO[grpc.StatusCode.UNKNOWN]


#: The result of every successful unary attempt. Shared and never mutated: the drivers keep
#: the response in a local variable, which saves an allocation per call on the hot path.
OK_RESULT = AttemptResult(_SUCCESS, 200, None, grpc_code="OK")


def result_from_error(err: Any, committed: bool | None = None) -> AttemptResult:
    """``AttemptResult`` of an attempt that ended in ``err`` (an ``RpcError`` that is also a
    ``grpc.Call``, sync or aio). ``committed`` None: decided from the initial metadata."""
    code = err.code()
    name, outcome, status = _INFO.get(code, _UNKNOWN)
    if committed is None:
        committed = bool(err.initial_metadata())
    if committed:
        return AttemptResult(outcome, status, err)
    pushback = None
    if outcome is not _SUCCESS:
        if code is _UNAVAILABLE:
            count_tls_refusal(err)  # mesh mTLS refusals, counted by reason (meshlib.grpc.mtls)
        trailing = err.trailing_metadata()
        if trailing:
            for k, v in trailing:
                if k == PUSHBACK_HEADER:
                    pushback = parse_pushback_ms(v if isinstance(v, str) else None)
                    break
    return AttemptResult(outcome, status, err, pushback_s=pushback, grpc_code=name)


def result_from_code(code: grpc.StatusCode | None, value: Any) -> AttemptResult:
    """Final result of a committed stream (never retried)."""
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    name, outcome, status = _INFO.get(code, _UNKNOWN)
    return AttemptResult(outcome, status, value, grpc_code=name if outcome is _SUCCESS else None)


def metadata_lookup(md: Sequence[tuple[str, Any]]) -> Callable[[str], str | None]:
    def get(name: str) -> str | None:
        for k, v in md:
            if k == name:
                return v if isinstance(v, str) else None
        return None

    return get


def start_call(
    dest: DestinationState,
    method: str,
    metadata: Any,
    timeout: float | None,
    replayable: bool,
    observer: CallObserver,
) -> CallGen:
    """The plan generator of one logical call."""
    plan = dest.plan()
    deadline = None
    if timeout is not None:
        deadline = Deadline(dest.now() + timeout)
    inherited = current_deadline.get() if current_deadline.ever_set else None
    if inherited is not None:
        deadline = inherited if deadline is None else deadline.earliest(inherited)
    header = None
    if metadata and (plan.has_header_routes or plan.hash_source is not None):
        header = metadata_lookup(metadata)
    return run_call(
        dest, plan, method="POST", path=method if plan.has_header_routes else "/",
        header=header, replayable=replayable, deadline=deadline, grpc=True, observer=observer,
    )


def base_metadata(metadata: Any, extra: tuple[tuple[str, str], ...]) -> Any:
    """The metadata of a first attempt: the caller's plus meshlib's (caller identity)."""
    if not extra:
        return metadata
    if not metadata:
        return extra
    return (*metadata, *extra)


def retry_metadata(md: Any, number: int) -> Any:
    """Metadata of attempt ``number`` (> 1): adds ``grpc-previous-rpc-attempts``."""
    prev = ((PREVIOUS_ATTEMPTS_KEY, str(number - 1)),)
    return (*md, *prev) if md else prev


def end_error(end: CallEnd, service: str, *, aio: bool) -> BaseException | None:
    """The exception a finished call raises, or None when its last result is a response."""
    if end.failure is not None:
        if end.failure == FailureKind.FAULT_ABORT:
            code = code_from_name(str(end.status or "unavailable"))
            return mesh_error(FailureKind.FAULT_ABORT, end.message, service, aio=aio, code=code)
        exc = mesh_error(end.failure, end.message, service, aio=aio)
        cause = end.result.value if end.result is not None else None
        if isinstance(cause, BaseException):
            exc.__cause__ = cause
        return exc
    result = end.result
    assert result is not None
    if not isinstance(result.value, BaseException):
        return None
    value: Any = result.value
    if end.stopped == "budget_exhausted" and hasattr(value, "code"):
        code = value.code()
        exc = mesh_error(
            "retry_budget_exhausted",
            f"service {service!r}: {code.name} ({value.details()}) and the retry budget is "
            f"exhausted ({end.attempts} attempt(s))",
            service, aio=aio, code=code,
            initial_metadata=value.initial_metadata(),
            trailing_metadata=value.trailing_metadata(),
        )
        exc.__cause__ = value
        return exc
    if end.attempts > 1:
        value.add_note(f"meshlib: service {service!r}, {end.attempts} attempt(s)")
    return value


# --------------------------------------------------------------------------- telemetry


class _NullSeries:
    __slots__ = ()

    def observe(self, amount: float) -> None:
        return None


_NULL_SERIES = _NullSeries()


class _NullMethodRecorder:
    __slots__ = ()

    def call(self, status: object, error_type: str | None, seconds: float) -> None:
        return None

    def series(self, status: object, error_type: str | None) -> _NullSeries:
        return _NULL_SERIES


class _NullRecorder:
    """Stands in when the mesh gives no recorder (``call_observer`` without a service)."""

    def attempt(self, attempt: int, outcome: object, seconds: float) -> None:
        return None

    def attempt_series(self, attempt: int, outcome: object) -> _NullSeries:
        return _NULL_SERIES

    def no_endpoints(self) -> None:
        return None

    def concurrency_rejected(self) -> None:
        return None

    def method(self, rpc_service: str, rpc_method: str) -> _NullMethodRecorder:
        return _NullMethodRecorder()


class RpcTelemetry:
    """What one multicallable records through, resolved once at its creation.

    ``ok_attempt`` is the series of the common attempt (a first one that succeeds), observed
    directly by the driver; :meth:`ok` records a call that ended OK (the one OK path);
    ``start()`` opens the call span (a shared no-op when tracing is off)."""

    __slots__ = ("method", "recorder", "rpc_method", "rpc_service", "service", "start",
                 "ok_attempt", "ok_call")

    def __init__(self, recorder: Any, service: str, full_method: str) -> None:
        if not hasattr(recorder, "method"):
            recorder = _NullRecorder()
        self.recorder = recorder
        self.service = service
        self.rpc_service, self.rpc_method = split_full_method(full_method)
        self.method = recorder.method(self.rpc_service, self.rpc_method)
        self.ok_attempt = recorder.attempt_series(1, _SUCCESS)
        self.ok_call = self.method.series("OK", None)
        self.start: Callable[[], Any] = functools.partial(
            start_rpc_call, service, self.rpc_service, self.rpc_method)

    def ok(self, span: Any, seconds: float) -> None:
        """A call ended OK after ``seconds``: its series (``method.call("OK", None, ...)``)
        and its span."""
        self.ok_call.observe(seconds)
        if span is not NOOP_CALL:
            span.end("OK", None)


def code_of(value: Any) -> Any:
    """The status of a finished call or error (``RpcError.code()`` is synchronous for sync
    and aio errors alike; an aio call object's is a coroutine, so it is never asked)."""
    if not isinstance(value, grpc.RpcError):
        return None
    try:
        return value.code()
    except Exception:  # an error object that cannot tell (not expected from grpcio)
        return None
