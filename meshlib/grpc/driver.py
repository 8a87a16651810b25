"""The one sans-I/O driver of a gRPC call: every call shape, sync and aio, does I/O around it.

A mesh gRPC call is driven by five shells, because grpcio's call shapes differ in who waits
and how: the blocking unary call (``MeshChannel``'s ``__call__`` / ``with_call``), the unary
future (grpcio completion callbacks and a timer), the sync response stream (the caller's
thread until the stream commits, then grpcio's done callback), and the aio unary and stream
calls (``await``). What happens between those waits is the same for all five, and lives here
once, in :class:`CallDriver` (the h11 shape: the driver never blocks, sleeps, awaits or reads
a socket; the shells do, and hand it what they saw):

==========================  ==============================================================
``CallDriver(owner, ...)``  start the call: the plan generator (``start_call``), the call
                            span (the shared no-op while tracing is off), the base metadata
``advance(result)``         send the plan an attempt's result (None: the first action, or
                            after a :class:`~meshlib.core.call.Sleep`); its next action, or
                            its :class:`~meshlib.core.call.CallEnd`
``start_attempt(action)``   an :class:`~meshlib.core.call.Attempt` -> the picked endpoint's
                            own grpcio multicallable and the attempt's metadata (retry
                            count, trace context); opens the attempt span, starts its clock
``ok()`` / ``failed(err)``  the attempt returned a response / raised ``err``: classify
                            (:func:`~meshlib.grpc.attempt.result_from_error`), record the
                            attempt (series and span), then ``advance``
``ended(result, code)``     the same for a result the shell classified itself (streams)
``finish(end)``             record the logical call; the exception the caller gets, or None
``abort(exc)``              the call ended without a status (cancelled: ``exc`` None or
                            ``asyncio.CancelledError``; or interrupted by ``exc``): close the
                            plan (frees the concurrency slot, load count, breaker trial), end
                            the attempt in flight, record the call
``settle_stream(code, c)``  a committed stream finished with ``code``: the plan sees the
                            result (health, load), the call is recorded
==========================  ==============================================================

The plan ends exactly once: :meth:`CallDriver.advance` returns its end (and forgets the
generator), and :meth:`abort` / :meth:`settle_stream` take the generator through
:meth:`_take` (a shell whose ends race across threads overrides it with a locked version).
Every failure inside the driver (the plan raising, the endpoint channel not available) aborts
the call before it propagates, so a shell cannot forget it; a shell wraps its own I/O with
``except BaseException: self.abort(exc); raise`` (a second abort is a no-op).

Cost: the per-call objects of the future, stream and aio shells *are* drivers (subclasses:
no object more per call); the blocking call makes one driver (its former local variables),
or, while tracing is off, runs a first attempt that succeeds without one (shortcut T3 in
``meshlib.grpc.channel``, docs/design.md 9) and hands anything else to an
:class:`AdoptedDriver`.
Every method is a plain function on ``__slots__``; the common case (first attempt OK) runs
``__init__``, ``advance``, ``start_attempt``, ``ok`` (which records the attempt on the
pre-resolved success series itself, then ``advance``) and ``finish`` (``RpcTelemetry.ok``).

Why one hand-written driver and not sync code generated from async code (as the HTTP
drivers are): grpcio's sync and aio APIs differ in shape, not only by ``await`` (a future
with callbacks and a timer, a stream that commits in a callback thread, calls that start when
created), so the shells cannot be generated from one another; what they share is everything
but the waiting, which is this class.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import TYPE_CHECKING, Any

import grpc

from meshlib.core.call import Action, Attempt, AttemptResult, CallEnd, CallGen, FailureKind
from meshlib.core.outcome import Outcome
from meshlib.grpc.attempt import (
    OK_RESULT,
    base_metadata,
    code_of,
    end_error,
    result_from_code,
    result_from_error,
    retry_metadata,
    start_call,
)
from meshlib.telemetry.recorders import error_type_of
from meshlib.telemetry.tracing import NOOP_ATTEMPT, NOOP_CALL
from meshlib.telemetry.tracing import state as _tstate

if TYPE_CHECKING:
    from meshlib.grpc.base import MultiCallableBase

__all__ = ["AdoptedDriver", "CallDriver"]

_SUCCESS = Outcome.SUCCESS
_LOCAL = Outcome.LOCAL
_CANCELLED = grpc.StatusCode.CANCELLED
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
_UNKNOWN = grpc.StatusCode.UNKNOWN
_NO_USABLE_ENDPOINT = frozenset({FailureKind.NO_ENDPOINTS, FailureKind.CIRCUIT_OPEN})


class CallDriver:
    """One logical gRPC call between the shell's waits (see the module docstring)."""

    __slots__ = ("_owner", "_tel", "_gen", "_span", "_started", "_md", "_aspan", "_n", "_t0",
                 "_deadline")

    #: Which error classes a mesh failure raises (``MeshAioRpcError`` when True).
    _AIO = False

    def __init__(self, owner: MultiCallableBase, metadata: Any, timeout: float | None) -> None:
        started = perf_counter()
        self._owner = owner
        self._started = started
        self._gen: CallGen | None = start_call(owner._dest, owner._method, metadata, timeout,
                                               owner._replayable, owner._observer)
        self._tel = tel = owner._tel
        self._span: Any = NOOP_CALL if started < _tstate.off_until else tel.start()
        self._md = base_metadata(metadata, owner._extra)
        self._aspan: Any = None  # the attempt in flight (its span); None between attempts
        self._deadline: Any = None  # the call's overall deadline, from the last attempt
        # _n (attempt number) and _t0 (its start) are set by start_attempt, read after it

    # --- the plan ---------------------------------------------------------------------
    def advance(self, result: AttemptResult | None) -> Action | CallEnd:
        """Send ``result`` to the plan; its next action, or its end."""
        gen = self._gen
        assert gen is not None, "the call's plan has already ended"
        try:
            return gen.send(result)
        except StopIteration as stop:
            self._gen = None
            return stop.value  # type: ignore[no-any-return]
        except BaseException as exc:
            self.abort(exc)
            raise

    def _take(self) -> CallGen | None:
        """Take the plan generator, once (None when it was taken or has ended)."""
        gen = self._gen
        self._gen = None
        return gen

    # --- attempts ---------------------------------------------------------------------
    def start_attempt(self, action: Attempt) -> tuple[Any, Any]:
        """The endpoint's grpcio multicallable and the metadata for attempt ``action``.

        The metadata is the call's own (the same object when nothing is added), plus
        ``grpc-previous-rpc-attempts`` on a retry and the attempt span's trace context when
        there is one to send (tracing on, or pass-through of an inbound context)."""
        ep = action.endpoint
        owner = self._owner
        try:
            mc = owner._mcs.get(ep.key) if owner._gen == owner._pool.generation else None
            if mc is None:
                mc = owner._mc(ep)
        except BaseException as exc:  # e.g. the channel was closed
            self.abort(exc)
            raise
        n = action.number
        span = self._span
        aspan = NOOP_ATTEMPT if span is NOOP_CALL else span.attempt(n, ep.address, ep.port)
        md = self._md
        if n != 1:
            md = retry_metadata(md, n)
        if aspan is not NOOP_ATTEMPT or _tstate.passthrough:  # trace context to send
            out = list(md) if md else []
            aspan.inject(out, False)
            md = out or None
        self._aspan = aspan
        self._n = n
        self._deadline = action.deadline
        self._t0 = perf_counter()
        return mc, md

    def end_attempt(self, result: AttemptResult, code: Any = None) -> None:
        """Record the attempt in flight (if any) as ended with ``result`` (status ``code``
        when the shell knows it): its series and its span."""
        aspan = self._aspan
        if aspan is None:
            return
        self._aspan = None
        seconds = perf_counter() - self._t0
        n = self._n
        tel = self._tel
        tel.recorder.attempt(n, result.outcome, seconds)
        if aspan is not NOOP_ATTEMPT:
            if code is None:
                code = result.grpc_code
                if code is None:
                    code = code_of(result.value)
            aspan.end(code, None)

    def ok(self) -> Action | CallEnd:
        """The attempt in flight returned a response (the shell keeps it): the common case,
        recorded without :meth:`end_attempt`'s general path. A first attempt observes
        ``tel.ok_attempt``, the series ``recorder.attempt(1, SUCCESS)`` observes (a unit test
        holds the two to each other)."""
        aspan = self._aspan
        self._aspan = None
        n = self._n
        seconds = perf_counter() - self._t0
        tel = self._tel
        if n == 1:
            tel.ok_attempt.observe(seconds)
        else:
            tel.recorder.attempt(n, _SUCCESS, seconds)
        if aspan is not NOOP_ATTEMPT:
            aspan.end("OK", None)
        return self.advance(OK_RESULT)

    def failed(self, err: Any) -> Action | CallEnd:
        """The attempt in flight raised ``err`` (a ``grpc.RpcError`` that is a ``grpc.Call``)."""
        result = result_from_error(err)
        self.end_attempt(result)
        return self.advance(result)

    def ended(self, result: AttemptResult, code: Any = None) -> Action | CallEnd:
        """The attempt in flight ended with ``result``, classified by the shell."""
        self.end_attempt(result, code)
        return self.advance(result)

    # --- the call's end ---------------------------------------------------------------
    def finish(self, end: CallEnd) -> BaseException | None:
        """Record the call the plan ended with ``end``; the exception the caller gets, or
        None when the last attempt's response stands (the shell holds it)."""
        tel = self._tel
        seconds = perf_counter() - self._started
        if end.result is OK_RESULT:
            tel.ok(self._span, seconds)
            return None
        exc = end_error(end, self._owner._service, aio=self._AIO)
        if exc is None:
            tel.ok(self._span, seconds)
            return None
        if end.failure is not None:
            if end.failure in _NO_USABLE_ENDPOINT:
                tel.recorder.no_endpoints()
            elif end.failure == FailureKind.CONCURRENCY:
                tel.recorder.concurrency_rejected()
        status = code_of(exc)
        etype = getattr(exc, "reason", None) or None
        tel.method.call(status, etype, seconds)
        self._span.end(status, etype)
        return exc

    def abort(self, exc: BaseException | None) -> bool:
        """The call ended without a status from the server: cancelled by the application
        (``exc`` None or ``asyncio.CancelledError``) or interrupted by ``exc`` (an error of
        the caller's, the channel closed, ``KeyboardInterrupt``). Closes the plan, ends the
        attempt in flight and records the call. False (and nothing done) when the plan had
        already ended.

        A cancellation after the call's deadline passed is the deadline's doing (e.g. an
        inbound middleware cancelling its handler at the same deadline): DEADLINE_EXCEEDED.
        Otherwise CANCELLED, with the exception's class as ``error_type`` when interrupted
        (as in gRFC A66, a call the application cancels is recorded too)."""
        gen = self._take()
        if gen is None:
            return False
        gen.close()  # frees the concurrency slot, the load count and any breaker trial
        if isinstance(exc, asyncio.CancelledError):
            exc = None
        etype = None if exc is None else error_type_of(exc)
        tel = self._tel
        aspan = self._aspan
        if aspan is not None:
            self._aspan = None
            tel.recorder.attempt(self._n, _LOCAL, perf_counter() - self._t0)
            aspan.end(_CANCELLED, etype)
        status = _CANCELLED
        dl = self._deadline
        if exc is None and dl is not None and dl.expired(self._owner._dest.now()):
            status, etype = _DEADLINE, "deadline_exceeded"
        tel.method.call(status, etype, perf_counter() - self._started)
        self._span.end(status, etype)
        return True

    def settle_stream(self, code: Any, call: Any) -> bool:
        """A committed stream finished with status ``code`` (``call``: its grpcio call):
        end its attempt, let the plan record the result (health, load), close the plan and
        record the call. False when the plan had already ended (cancelled)."""
        gen = self._take()
        if gen is None:
            return False
        if code is None:
            code = _UNKNOWN
        result = result_from_code(code, call)
        self.end_attempt(result, code)
        try:
            gen.send(result)
        except StopIteration:
            pass
        finally:
            gen.close()
            seconds = perf_counter() - self._started
            tel = self._tel
            if code is grpc.StatusCode.OK:
                tel.ok(self._span, seconds)
            else:
                tel.method.call(code, None, seconds)
                self._span.end(code, None)
        return True


class AdoptedDriver(CallDriver):
    """The driver of a blocking call begun on the shell's fast path (shortcut T3,
    docs/design.md 9), taking over where the fast path stops.

    ``gen`` is the plan (None when it has ended), ``started`` the call's start, and
    ``attempt`` (begun at ``t0``) the first attempt when it is in flight. The fast path
    runs only while tracing is off and nothing is passed through, so the call span is the
    no-op one. This constructor sets what :meth:`CallDriver.__init__` (and, for an attempt
    in flight, :meth:`CallDriver.start_attempt`) would have set; a unit test compares every
    slot with a driver that ran them."""

    __slots__ = ()

    def __init__(self, owner: MultiCallableBase, metadata: Any, gen: CallGen | None,
                 started: float, attempt: Attempt | None = None, t0: float = 0.0) -> None:
        self._owner = owner
        self._started = started
        self._gen = gen
        self._tel = owner._tel
        self._span = NOOP_CALL
        self._md = base_metadata(metadata, owner._extra)
        self._aspan = None
        self._deadline = None
        if attempt is not None:
            self._aspan = NOOP_ATTEMPT
            self._n = attempt.number
            self._deadline = attempt.deadline
            self._t0 = t0
