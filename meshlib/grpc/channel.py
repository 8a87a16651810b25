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

Each call shape here (blocking, future, stream) only waits: what happens between the waits
(attempt start, classification, telemetry, the plan's next step, the call's end) is
:class:`meshlib.grpc.driver.CallDriver`, shared with the aio channel.

Telemetry mirrors the HTTP transports (``meshlib.grpc.attempt``, "Telemetry"): one call span
and one ``rpc_client_call_duration_seconds`` observation per logical call (for a stream, when
it finishes), one CLIENT span and one attempt observation per attempt as it ends; the
attempt span's context travels in that attempt's metadata (``traceparent``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from meshlib.core.call import Attempt, AttemptResult, Sleep
from meshlib.core.outcome import Outcome
from meshlib.grpc.attempt import OK_RESULT, base_metadata, result_from_error, start_call
from meshlib.grpc.base import MeshChannelBase, MultiCallableBase
from meshlib.grpc.driver import AdoptedDriver, CallDriver
from meshlib.telemetry.tracing import NOOP_CALL
from meshlib.telemetry.tracing import state as _tstate

_sleep = time.sleep
perf_counter = time.perf_counter


# --------------------------------------------------------------------------- unary response


def _drive(drv: CallDriver, action: Any, request: Any, credentials: Any, wait_for_ready: Any,
           compression: Any, with_call: bool, resp: Any = None) -> Any:
    """The blocking call's general loop from ``action`` on: attempts (each sent with the
    endpoint's own multicallable), backoff sleeps, and the end (``drv.finish``)."""
    try:
        while True:
            cls = action.__class__
            if cls is Attempt:
                mc, md = drv.start_attempt(action)
                send = mc.with_call if with_call else mc  # with_call: (response, call)
                try:
                    resp = send(request, action.timeout, md, credentials, wait_for_ready,
                                compression)
                except grpc.RpcError as err:
                    action = drv.failed(err)
                else:
                    action = drv.ok()
            elif cls is Sleep:
                _sleep(action.seconds)
                action = drv.advance(None)
            else:
                break
    except BaseException as exc:
        drv.abort(exc)
        raise
    error = drv.finish(action)
    if error is not None:
        raise error
    return resp


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
        return _UnaryFuture(self, request, metadata, timeout,
                            (credentials, wait_for_ready, compression))

    def _blocking(self, request: Any, timeout: float | None = None, metadata: Any = None,
                  credentials: Any = None, wait_for_ready: bool | None = None,
                  compression: Any = None, with_call: bool = False) -> Any:
        """``__call__`` (``with_call`` False: the response) and ``with_call`` (True: the
        response and the call): the call's I/O around one :class:`CallDriver`.

        Shortcut T3 (docs/design.md 9): while tracing is off and nothing is passed through
        (no span, no trace context to send), the first attempt runs without a driver
        object: the plan, the endpoint's cached multicallable, the attempt, and, when it
        succeeds, what ``CallDriver.ok`` and ``finish`` record for a first attempt that
        succeeded (``RpcTelemetry.ok_attempt``, then ``RpcTelemetry.ok``). Anything else
        (no cached multicallable, the plan ending or sleeping first, an error, an exception)
        is handed to an :class:`AdoptedDriver` at the point reached and continues in
        :func:`_drive`. ``tests/unit/test_grpc_blocking_fast_path.py`` holds it to the
        driver: the same scripted calls through both leave the same metrics, plan state,
        responses and errors."""
        started = perf_counter()
        if started >= _tstate.off_until or _tstate.passthrough:
            drv = CallDriver(self, metadata, timeout)
            return _drive(drv, drv.advance(None), request, credentials, wait_for_ready,
                          compression, with_call)
        gen = start_call(self._dest, self._method, metadata, timeout, self._replayable,
                         self._observer)
        try:
            action = gen.send(None)
        except StopIteration as stop:  # ended before any attempt (no endpoints, a fault)
            return _drive(AdoptedDriver(self, metadata, None, started), stop.value, request,
                          credentials, wait_for_ready, compression, with_call)
        except BaseException as exc:
            AdoptedDriver(self, metadata, gen, started).abort(exc)
            raise
        if action.__class__ is Attempt:
            mc = self._mcs.get(action.endpoint.key) if self._gen == self._pool.generation \
                else None
            if mc is not None:
                md = base_metadata(metadata, self._extra)
                send = mc.with_call if with_call else mc
                t0 = perf_counter()
                try:
                    resp = send(request, action.timeout, md, credentials, wait_for_ready,
                                compression)
                except grpc.RpcError as err:
                    drv = AdoptedDriver(self, metadata, gen, started, action, t0)
                    return _drive(drv, drv.failed(err), request, credentials, wait_for_ready,
                                  compression, with_call)
                except BaseException as exc:
                    AdoptedDriver(self, metadata, gen, started, action, t0).abort(exc)
                    raise
                tel = self._tel
                tel.ok_attempt.observe(perf_counter() - t0)
                try:
                    end = gen.send(OK_RESULT)
                except StopIteration as stop:
                    end = stop.value
                except BaseException as exc:
                    AdoptedDriver(self, metadata, gen, started).abort(exc)
                    raise
                else:  # the plan went on after a success (it does not): the general loop
                    return _drive(AdoptedDriver(self, metadata, gen, started), end, request,
                                  credentials, wait_for_ready, compression, with_call, resp)
                if end.result is OK_RESULT:
                    tel.ok(NOOP_CALL, perf_counter() - started)
                    return resp
                return _drive(AdoptedDriver(self, metadata, None, started), end, request,
                              credentials, wait_for_ready, compression, with_call, resp)
        return _drive(AdoptedDriver(self, metadata, gen, started), action, request,
                      credentials, wait_for_ready, compression, with_call)

    __call__ = _blocking


class UnaryUnary(_UnaryResponse, grpc.UnaryUnaryMultiCallable):
    __slots__ = ()


class StreamUnary(_UnaryResponse, grpc.StreamUnaryMultiCallable):
    __slots__ = ()


_RUNNING, _FINISHED, _CANCELLED = 0, 1, 2


class _UnaryFuture(CallDriver, grpc.Future, grpc.Call):  # type: ignore[misc]
    """``multicallable.future()``: the driver stepped by grpcio completion callbacks.

    ``_lock`` (reentrant: grpcio may run a done callback inline) serialises every use of the
    driver; it is never held while waiting for I/O."""

    def __init__(self, owner: _UnaryResponse, request: Any, metadata: Any,
                 timeout: float | None, extra: tuple[Any, Any, Any]) -> None:
        CallDriver.__init__(self, owner, metadata, timeout)
        self._request = request
        self._extra = extra
        self._lock = threading.RLock()
        self._cond = threading.Condition(threading.Lock())
        self._state = _RUNNING
        self._attempt: Any = None
        self._timer: threading.Timer | None = None
        self._value: Any = None
        self._exc: BaseException | None = None
        self._callbacks: list[Any] = []
        self._step(None)

    # --- driving ----------------------------------------------------------------------
    def _step(self, result: AttemptResult | None, value: Any = None, fut: Any = None) -> None:
        """Send the plan ``result`` of attempt ``fut`` (None: start, or after a backoff) and
        start what it asks next. ``value``: the response of an attempt that succeeded."""
        with self._lock:
            if self._state != _RUNNING or fut is not self._attempt:
                return
            try:
                if result is None:
                    action = self.advance(None)
                elif result is OK_RESULT:
                    self._value = value
                    action = self.ok()
                else:
                    action = self.ended(result)
                cls = action.__class__
                if cls is Sleep:
                    self._timer = threading.Timer(action.seconds, self._step,  # type: ignore[union-attr]
                                                  (None, None, self._attempt))
                    self._timer.daemon = True
                    self._timer.start()
                    return
                if cls is not Attempt:
                    self._complete(self.finish(action))  # type: ignore[arg-type]
                    return
                mc, md = self.start_attempt(action)  # type: ignore[arg-type]
                cred, wfr, comp = self._extra
                fut = mc.future(self._request, action.timeout, md, cred, wfr, comp)  # type: ignore[union-attr]
                self._attempt = fut
            except BaseException as exc:
                self.abort(exc)
                self._complete(exc)
                return
        fut.add_done_callback(self._on_attempt)

    def _on_attempt(self, fut: Any) -> None:
        if self._state != _RUNNING or fut is not self._attempt:
            return
        value = None
        try:
            value = fut.result()
            result = OK_RESULT
        except grpc.RpcError as err:
            result = result_from_error(err)
        except grpc.FutureCancelledError:
            result = AttemptResult(Outcome.LOCAL, 499, None)
        self._step(result, value, fut)

    def _complete(self, exc: BaseException | None) -> None:
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
            self.abort(None)
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
        return _StreamCall(self, request, metadata, timeout,
                           (credentials, wait_for_ready, compression))


class UnaryStream(_StreamResponse, grpc.UnaryStreamMultiCallable):
    __slots__ = ()


class StreamStream(_StreamResponse, grpc.StreamStreamMultiCallable):
    __slots__ = ()


class _StreamCall(CallDriver, grpc.Call, grpc.Future, Iterator[Any]):  # type: ignore[misc]
    """A response stream: an iterator, a ``grpc.Call`` and a ``grpc.Future`` like grpcio's.

    Before it commits, the caller's thread drives the plan (read the first message; on an
    uncommitted retryable error, retry). From the commit on, the plan is finished by the
    committed attempt's done callback, exactly once (``_take`` under ``_lock``: the callback
    thread and a caller's ``cancel()`` may race)."""

    def __init__(self, owner: _StreamResponse, request: Any, metadata: Any,
                 timeout: float | None, extra: tuple[Any, Any, Any]) -> None:
        CallDriver.__init__(self, owner, metadata, timeout)
        self._request = request
        self._extra = extra
        self._call: Any = None
        self._committed = False
        self._buffer: list[Any] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        try:
            self._run(self.advance(None))
        except BaseException as exc:
            self.abort(exc)
            raise
        if not owner._replayable and self._call is not None:
            self._commit()  # a request stream is never replayed: one attempt

    def _take(self) -> Any:
        with self._lock:
            return CallDriver._take(self)

    def _run(self, action: Any) -> None:
        """Act on the plan's ``action``: sleep, start the attempt, or end the call."""
        while action.__class__ is Sleep:
            _sleep(action.seconds)
            action = self.advance(None)
        if action.__class__ is not Attempt:
            self._committed = True
            self._error = self.finish(action)
            return
        mc, md = self.start_attempt(action)
        cred, wfr, comp = self._extra
        self._call = mc(self._request, action.timeout, md, cred, wfr, comp)

    def _commit(self) -> None:
        self._committed = True
        self._call.add_done_callback(self._on_done)

    def _on_done(self, call: Any) -> None:
        try:
            code = call.code()
        except Exception:  # pragma: no cover - defensive: grpcio always has a code when done
            code = None
        self.settle_stream(code, call)

    def _drive(self) -> None:
        """Until committed: read the first message, retrying uncommitted failures."""
        try:
            while not self._committed:
                try:
                    self._buffer.append(next(self._call))
                except StopIteration:
                    pass
                except grpc.RpcError as err:
                    result = result_from_error(err)
                    if result.grpc_code is None:  # headers had arrived: committed
                        break
                    self._run(self.ended(result))
                    continue
                break
        except BaseException as exc:  # interrupted (e.g. KeyboardInterrupt while waiting)
            self.abort(exc)
            raise
        if self._error is None:
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
            cancelled = call.cancel()
            self._committed = True
            self.abort(None)
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
