"""``MeshChannel``: a ``grpc.Channel`` whose calls go through the mesh (sync grpcio API).

``OrdersStub(mesh.grpc_channel("orders"))`` works like any stub. The channel hands out thin
multicallables; each call runs the shared sans-I/O plan (``meshlib.core.call.run_call`` with
``grpc=True``: fault injection, concurrency limit, routes and subsets on metadata, zone
filter, balancer, breakers and outlier ejection, gRPC A6 retries with budget and pushback)
and sends each attempt with the picked endpoint's own grpcio multicallable, cached per
(endpoint, method). No interceptor is stacked (``grpc.intercept_channel`` alone costs ~4 %
of a local unary call, field notes).

Call shapes (gRPC A6 "When Retries are Valid"):

* unary-unary: blocking ``__call__`` / ``with_call`` drive the plan in the caller's thread;
  ``future`` drives it from grpcio's completion callbacks (backoff on a timer), so it never
  blocks. Retried when the status is in ``grpc_retry_on`` and no response headers came.
* unary-stream: the stream is retried until it commits, i.e. until the first response
  message (or non-empty initial metadata) reaches the caller; afterwards errors surface
  to the caller during iteration, as in grpcio.
* stream-unary and stream-stream: a request iterator is consumed once and never replayed,
  so they get one attempt (balanced, guarded, limited and accounted like any other).

Streams report their end to the plan from grpcio's done callback, so a stream abandoned by
its caller still frees its concurrency slot and load count when grpcio ends it.

Telemetry mirrors the HTTP transports (``meshlib.grpc.attempt``, "Telemetry"): one call span
and one ``rpc_client_call_duration_seconds`` observation per logical call (for a stream, when
it finishes), one CLIENT span and one attempt observation per attempt as it ends; the
attempt span's context travels in that attempt's metadata (``traceparent``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from time import perf_counter
from typing import Any

import grpc

from meshlib.core.call import AttemptResult, CallEnd, CallGen, Sleep
from meshlib.core.outcome import Outcome
from meshlib.grpc.attempt import (
    OK_RESULT,
    attempt_aborted,
    attempt_ended,
    attempt_metadata,
    base_metadata,
    call_cancelled,
    call_ended,
    end_error,
    ok_result,
    result_from_error,
    settle_stream,
    start_call,
)
from meshlib.grpc.base import MeshChannelBase, MultiCallableBase
from meshlib.telemetry.tracing import NOOP_ATTEMPT, NOOP_CALL
from meshlib.telemetry.tracing import state as _tstate

_sleep = time.sleep
_SUCCESS = Outcome.SUCCESS


# --------------------------------------------------------------------------- unary response


class _UnaryResponse(MultiCallableBase):
    """unary-unary and stream-unary (the latter with ``replayable=False``)."""

    def with_call(self, request: Any, timeout: float | None = None, metadata: Any = None,
                  credentials: Any = None, wait_for_ready: bool | None = None,
                  compression: Any = None) -> tuple[Any, grpc.Call]:
        return self._blocking(request, timeout, metadata, credentials,  # type: ignore[no-any-return]
                              wait_for_ready, compression, True)

    def future(self, request: Any, timeout: float | None = None, metadata: Any = None,
               credentials: Any = None, wait_for_ready: bool | None = None,
               compression: Any = None) -> _UnaryFuture:
        started = perf_counter()
        span = self._tel.start()
        gen = self._start(metadata, timeout)
        return _UnaryFuture(self, request, base_metadata(metadata, self._extra), gen,
                            (credentials, wait_for_ready, compression), span, started)

    def _blocking(self, request: Any, timeout: float | None = None, metadata: Any = None,
                  credentials: Any = None, wait_for_ready: bool | None = None,
                  compression: Any = None, with_call: bool = False) -> Any:
        """``__call__`` (``with_call`` False: the response) and ``with_call`` (True: the
        response and the call); one frame for the common blocking call."""
        started = perf_counter()
        tel = self._tel
        # tel.start() when tracing may be on; the shared no-op span, without a call, when off
        span = (NOOP_CALL if _tstate.tracer is None and started < _tstate.next_check
                else tel.start())
        recorder = tel.recorder
        gen = start_call(self._dest, self._method, metadata, timeout, self._replayable,
                         self._observer)
        md = base_metadata(metadata, self._extra)
        resp = None
        action: Any
        aspan: Any = None
        t0 = started
        n = 0
        try:
            action = next(gen)
            while True:
                if action.__class__ is Sleep:
                    _sleep(action.seconds)
                    action = gen.send(None)
                    continue
                ep = action.endpoint
                mc = self._mcs.get(ep.key) if self._gen == self._pool.generation else None
                if mc is None:
                    mc = self._mc(ep)
                n = action.number
                if span is NOOP_CALL:  # tracing off: no span calls, metadata as it is
                    aspan = NOOP_ATTEMPT
                    amd = (md if n == 1 and not _tstate.passthrough
                           else attempt_metadata(md, n, aspan))
                else:
                    aspan = span.attempt(n, ep.address, ep.port)
                    amd = attempt_metadata(md, n, aspan)
                t0 = perf_counter()
                try:
                    if with_call:
                        resp = mc.with_call(request, action.timeout, amd,
                                            credentials, wait_for_ready, compression)
                    else:
                        resp = mc(request, action.timeout, amd,
                                  credentials, wait_for_ready, compression)
                except grpc.RpcError as err:
                    result = result_from_error(err)
                    attempt_ended(recorder, aspan, n, result, perf_counter() - t0)
                else:  # attempt_ended(..., OK_RESULT, ...) inlined: the hot path
                    result = OK_RESULT
                    if n == 1:
                        tel.ok_attempt.observe(perf_counter() - t0)
                    else:
                        recorder.attempt(n, _SUCCESS, perf_counter() - t0)
                    if aspan is not NOOP_ATTEMPT:
                        aspan.end("OK", None)
                aspan = None
                action = gen.send(result)
        except StopIteration as stop:
            end: CallEnd = stop.value
        except BaseException as exc:
            gen.close()  # frees the concurrency slot, the load count and any breaker trial
            if aspan is not None:
                attempt_aborted(recorder, aspan, n, perf_counter() - t0, exc)
            call_ended(tel, span, started, None, exc)
            raise
        if end.result is OK_RESULT:
            tel.ok_call.observe(perf_counter() - started)  # call_ended(..., None)
            if span is not NOOP_CALL:
                span.end("OK", None)
            return resp
        error = end_error(end, self._service, aio=False)
        call_ended(tel, span, started, end, error)
        if error is not None:
            raise error
        return end.result.value  # type: ignore[union-attr]

    __call__ = _blocking


class UnaryUnary(_UnaryResponse, grpc.UnaryUnaryMultiCallable):
    __slots__ = ()


class StreamUnary(_UnaryResponse, grpc.StreamUnaryMultiCallable):
    __slots__ = ()


_RUNNING, _FINISHED, _CANCELLED = 0, 1, 2


class _UnaryFuture(grpc.Future, grpc.Call):  # type: ignore[misc]
    """``multicallable.future()``: the plan driven by grpcio completion callbacks.

    ``_lock`` (reentrant: grpcio may run a done callback inline) serialises every use of the
    plan generator; it is never held while waiting for I/O."""

    def __init__(self, owner: _UnaryResponse, request: Any, md: Any, gen: CallGen,
                 extra: tuple[Any, Any, Any], span: Any, started: float) -> None:
        self._owner = owner
        self._request = request
        self._md = md
        self._gen = gen
        self._extra = extra
        self._span = span
        self._started = started
        self._aspan: Any = None  # the attempt in flight (its span), guarded by _lock
        self._n = 0
        self._t0 = started
        self._lock = threading.RLock()
        self._cond = threading.Condition(threading.Lock())
        self._state = _RUNNING
        self._attempt: Any = None
        self._timer: threading.Timer | None = None
        self._value: Any = None
        self._exc: BaseException | None = None
        self._callbacks: list[Any] = []
        self._step(None, True)

    # --- driving ----------------------------------------------------------------------
    def _step(self, result: AttemptResult | None, first: bool = False) -> None:
        with self._lock:
            if self._state != _RUNNING:
                return
            gen = self._gen
            try:
                action = next(gen) if first else gen.send(result)
                if action.__class__ is Sleep:
                    self._timer = threading.Timer(action.seconds, self._step, (None,))
                    self._timer.daemon = True
                    self._timer.start()
                    return
                ep = action.endpoint  # type: ignore[union-attr]
                mc = self._owner._mc(ep)
                n = action.number  # type: ignore[union-attr]
                aspan = self._span.attempt(n, ep.address, ep.port)
                md = attempt_metadata(self._md, n, aspan)
                cred, wfr, comp = self._extra
                self._aspan, self._n, self._t0 = aspan, n, perf_counter()
                fut = mc.future(self._request, action.timeout, md, cred, wfr, comp)  # type: ignore[union-attr]
                self._attempt = fut
            except StopIteration as stop:
                self._finish(stop.value, None)
                return
            except BaseException as exc:
                gen.close()
                self._end_attempt(None, exc)
                self._finish(None, exc)
                return
        fut.add_done_callback(self._on_attempt)

    def _end_attempt(self, result: AttemptResult | None, exc: BaseException | None) -> None:
        """Record the attempt in flight (if any) as ended with ``result`` (None: aborted)."""
        aspan, self._aspan = self._aspan, None
        if aspan is None:
            return
        rec = self._owner._tel.recorder  # type: ignore[union-attr]
        if result is None:
            attempt_aborted(rec, aspan, self._n, perf_counter() - self._t0, exc)
        else:
            attempt_ended(rec, aspan, self._n, result, perf_counter() - self._t0)

    def _on_attempt(self, fut: Any) -> None:
        if self._state != _RUNNING or fut is not self._attempt:
            return
        try:
            result = ok_result(fut.result())
        except grpc.RpcError as err:
            result = result_from_error(err)
        except grpc.FutureCancelledError:
            result = AttemptResult(Outcome.LOCAL, 499, None)
        with self._lock:
            if self._state != _RUNNING or fut is not self._attempt:
                return
            self._end_attempt(result, None)
        self._step(result)

    def _finish(self, end: CallEnd | None, exc: BaseException | None) -> None:
        if end is not None:
            exc = end_error(end, self._owner._service, aio=False)
            if exc is None:
                self._value = end.result.value  # type: ignore[union-attr]
        call_ended(self._owner._tel, self._span, self._started, end, exc)  # type: ignore[union-attr]
        self._exc = exc
        with self._cond:
            self._state = _FINISHED
            self._cond.notify_all()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)

    # --- grpc.Future ------------------------------------------------------------------
    def cancel(self) -> bool:
        with self._lock:
            if self._state != _RUNNING:
                return False
            with self._cond:
                self._state = _CANCELLED
                self._cond.notify_all()
                callbacks, self._callbacks = self._callbacks, []
            if self._timer is not None:
                self._timer.cancel()
            if self._attempt is not None:
                self._attempt.cancel()
            self._gen.close()
            self._end_attempt(None, None)
            call_cancelled(self._owner._tel, self._span, self._started)  # type: ignore[union-attr]
        for cb in callbacks:
            cb(self)
        return True

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def running(self) -> bool:
        return self._state == _RUNNING

    def done(self) -> bool:
        return self._state != _RUNNING

    def _wait(self, timeout: float | None) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._state != _RUNNING, timeout):
                raise grpc.FutureTimeoutError()
        if self._state == _CANCELLED:
            raise grpc.FutureCancelledError()

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._exc is not None:
            raise self._exc
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._exc

    def traceback(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        return None if self._exc is None else self._exc.__traceback__

    def add_done_callback(self, fn: Any) -> None:
        with self._cond:
            if self._state == _RUNNING:
                self._callbacks.append(fn)
                return
        fn(self)

    # --- grpc.Call (of the final attempt; waits for the call to end) --------------------
    def _final(self) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._state != _RUNNING)
        if self._state == _CANCELLED:
            return None
        if self._exc is not None and hasattr(self._exc, "code"):
            return self._exc
        return self._attempt

    def initial_metadata(self) -> Any:
        f = self._final()
        return None if f is None else f.initial_metadata()

    def trailing_metadata(self) -> Any:
        f = self._final()
        return None if f is None else f.trailing_metadata()

    def code(self) -> grpc.StatusCode:
        f = self._final()
        return grpc.StatusCode.CANCELLED if f is None else f.code()

    def details(self) -> str:
        f = self._final()
        return "Locally cancelled by application!" if f is None else f.details()

    def is_active(self) -> bool:
        return self._state == _RUNNING

    def time_remaining(self) -> float | None:
        a = self._attempt
        return None if a is None else a.time_remaining()

    def add_callback(self, callback: Any) -> bool:
        with self._cond:
            if self._state == _RUNNING:
                self._callbacks.append(lambda _f: callback())
                return True
        return False


# --------------------------------------------------------------------------- stream response


class _StreamResponse(MultiCallableBase):
    """unary-stream and stream-stream (the latter with ``replayable=False``)."""

    def __call__(self, request: Any, timeout: float | None = None, metadata: Any = None,
                 credentials: Any = None, wait_for_ready: bool | None = None,
                 compression: Any = None) -> _StreamCall:
        started = perf_counter()
        span = self._tel.start()
        gen = self._start(metadata, timeout)
        return _StreamCall(self, request, base_metadata(metadata, self._extra), gen,
                           (credentials, wait_for_ready, compression), span, started)


class UnaryStream(_StreamResponse, grpc.UnaryStreamMultiCallable):
    __slots__ = ()


class StreamStream(_StreamResponse, grpc.StreamStreamMultiCallable):
    __slots__ = ()


class _StreamCall(grpc.Call, grpc.Future, Iterator[Any]):  # type: ignore[misc]
    """A response stream: an iterator, a ``grpc.Call`` and a ``grpc.Future`` like grpcio's.

    Before it commits, the caller's thread drives the plan (read the first message; on an
    uncommitted retryable error, retry). From the commit on, the plan is finished by the
    committed attempt's done callback, exactly once."""

    def __init__(self, owner: _StreamResponse, request: Any, md: Any, gen: CallGen,
                 extra: tuple[Any, Any, Any], span: Any, started: float) -> None:
        self._owner = owner
        self._request = request
        self._md = md
        self._gen: CallGen | None = gen
        self._extra = extra
        self._call: Any = None
        self._committed = False
        self._buffer: list[Any] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._span = span
        self._started = started
        self._aspan: Any = None  # the attempt in flight (its span)
        self._n = 0
        self._t0 = started
        try:
            self._advance(next(gen))
        except StopIteration as stop:
            self._end(stop.value)
        except BaseException as exc:
            gen.close()
            self._abort(exc)
            raise
        if not owner._replayable and self._call is not None:
            self._commit()  # a request stream is never replayed: one attempt

    def _advance(self, action: Any) -> None:
        while action.__class__ is Sleep:
            _sleep(action.seconds)
            action = self._gen.send(None)  # type: ignore[union-attr]
        ep = action.endpoint
        mc = self._owner._mc(ep)
        n = action.number
        aspan = self._span.attempt(n, ep.address, ep.port)
        md = attempt_metadata(self._md, n, aspan)
        cred, wfr, comp = self._extra
        self._aspan, self._n, self._t0 = aspan, n, perf_counter()
        self._call = mc(self._request, action.timeout, md, cred, wfr, comp)

    def _end(self, end: CallEnd) -> None:
        self._gen = None
        self._committed = True
        self._error = end_error(end, self._owner._service, aio=False)
        call_ended(self._owner._tel, self._span, self._started, end, self._error)

    def _end_attempt(self, result: AttemptResult, code: Any = None) -> None:
        aspan, self._aspan = self._aspan, None
        if aspan is not None:
            attempt_ended(self._owner._tel.recorder, aspan, self._n, result,
                          perf_counter() - self._t0, code)

    def _abort(self, exc: BaseException | None) -> None:
        """The call ended without a status from the server: cancelled (``exc`` None) or
        interrupted by ``exc``."""
        aspan, self._aspan = self._aspan, None
        tel = self._owner._tel
        if aspan is not None:
            attempt_aborted(tel.recorder, aspan, self._n, perf_counter() - self._t0, exc)
        if exc is None:
            call_cancelled(tel, self._span, self._started)
        else:
            call_ended(tel, self._span, self._started, None, exc)

    def _commit(self) -> None:
        self._committed = True
        self._call.add_done_callback(self._on_done)

    def _on_done(self, call: Any) -> None:
        with self._lock:
            gen, self._gen = self._gen, None
        if gen is None:
            return
        try:
            code = call.code()
        except Exception:  # pragma: no cover - defensive: grpcio always has a code when done
            code = None
        settle_stream(self, gen, code, call)

    def _drive(self) -> None:
        """Until committed: read the first message, retrying uncommitted failures."""
        while not self._committed:
            call = self._call
            try:
                self._buffer.append(next(call))
            except StopIteration:
                pass
            except grpc.RpcError as err:
                result = result_from_error(err)
                if result.grpc_code is None:  # headers had arrived: committed
                    break
                gen = self._gen
                assert gen is not None
                self._end_attempt(result)
                try:
                    self._advance(gen.send(result))
                except StopIteration as stop:
                    self._end(stop.value)
                    return
                except BaseException as exc:
                    gen.close()
                    self._abort(exc)
                    raise
                continue
            break
        self._commit()

    # --- iterator -----------------------------------------------------------------------
    def __iter__(self) -> _StreamCall:
        return self

    def __next__(self) -> Any:
        if not self._committed:
            self._drive()
        if self._error is not None:
            raise self._error
        if self._buffer:
            return self._buffer.pop()
        return next(self._call)

    next = __next__

    # --- grpc.Call --------------------------------------------------------------------
    def _settled(self) -> Any:
        if not self._committed:
            self._drive()
        return self._error if self._error is not None else self._call

    def initial_metadata(self) -> Any:
        return self._settled().initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._settled().trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._settled().code()  # type: ignore[no-any-return]

    def details(self) -> str:
        return self._settled().details()  # type: ignore[no-any-return]

    def debug_error_string(self) -> str:
        s = self._settled()
        return s.debug_error_string() if hasattr(s, "debug_error_string") else ""

    def is_active(self) -> bool:
        return self._error is None and self._call is not None and self._call.is_active()

    def time_remaining(self) -> float | None:
        return None if self._call is None else self._call.time_remaining()

    def cancel(self) -> bool:
        call = self._call
        if self._error is not None or call is None:
            return False
        if not self._committed:
            with self._lock:
                gen, self._gen = self._gen, None
            cancelled = call.cancel()
            self._committed = True
            if gen is not None:
                gen.close()
                self._abort(None)
            return bool(cancelled)
        return bool(call.cancel())

    def add_callback(self, callback: Any) -> bool:
        return self._call is not None and bool(self._call.add_callback(callback))

    # --- grpc.Future ------------------------------------------------------------------
    def cancelled(self) -> bool:
        return self._call is not None and self._error is None and self._call.cancelled()

    def running(self) -> bool:
        return self.is_active()

    def done(self) -> bool:
        return self._error is not None or (self._call is not None and self._call.done())

    def result(self, timeout: float | None = None) -> Any:
        s: Any = self._settled()
        err = self._error
        if err is not None and s is err:
            raise err
        return s.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        s = self._settled()
        return s if s is self._error else s.exception(timeout)  # type: ignore[no-any-return]

    def traceback(self, timeout: float | None = None) -> Any:
        s: Any = self._settled()
        err = self._error
        return err.__traceback__ if err is not None and s is err else s.traceback(timeout)

    def add_done_callback(self, fn: Any) -> None:
        if self._error is not None:
            fn(self)
        else:
            self._call.add_done_callback(lambda _c: fn(self))


# --------------------------------------------------------------------------- the channel


class MeshChannel(MeshChannelBase, grpc.Channel):
    """A ``grpc.Channel`` to one mesh service (``mesh.grpc_channel("orders")``).

    ``options`` are grpcio channel arguments for every per-endpoint channel (grpcio retries
    are always disabled); ``drain_timeout`` is how long a departed endpoint's channel stays
    open for calls in flight; ``health_check`` enables ``grpc.health.v1`` checks when the
    service's policy has ``health_check.enabled``."""

    _UNARY_UNARY = UnaryUnary
    _UNARY_STREAM = UnaryStream
    _STREAM_UNARY = StreamUnary
    _STREAM_STREAM = StreamStream

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        """Connectivity of a mesh channel is per endpoint; subscribing is accepted and ignored
        (use ``mesh.add_listener`` for endpoint changes)."""

    def unsubscribe(self, callback: Any) -> None:
        """See :meth:`subscribe`."""

    def close(self) -> None:
        self._release_health()
        self._pool.close()

    def __enter__(self) -> MeshChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
