"""``AioMeshChannel``: a ``grpc.aio.Channel`` whose calls go through the mesh.

The asyncio twin of :mod:`meshlib.grpc.channel` (same plan, same retry and commit rules;
the drive loops differ only by ``await``). ``OrdersStub(mesh.aio_grpc_channel("orders"))``
returns calls that are awaitable (unary response) or async-iterable with ``read()`` (stream
response), with ``write()`` / ``done_writing()`` for request streams and the async
``grpc.aio.Call`` accessors (``code()``, ``details()``, ``initial_metadata()``,
``trailing_metadata()``), ``cancel()``, ``cancelled()``, ``done()``, ``add_done_callback``.

As in grpc.aio, a call starts when it is created: the first attempt is sent at once (unless
fault injection delays it), and the plan continues (retries) when the call is awaited or read.
A call is meant to be awaited by one task.

Telemetry is recorded as in the sync channel (``meshlib.grpc.attempt``, "Telemetry"): a call
span and one call-duration observation per call (a stream's when grpc.aio reports it done),
a CLIENT span and one attempt observation per attempt as it ends.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc.aio import AioRpcError

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
    result_from_error,
    settle_stream,
    start_call,
)
from meshlib.grpc.base import MeshChannelBase, MultiCallableBase
from meshlib.telemetry.tracing import NOOP_ATTEMPT, NOOP_CALL
from meshlib.telemetry.tracing import state as _tstate

if TYPE_CHECKING:
    pass

_EOF = grpc.aio.EOF
_SUCCESS = Outcome.SUCCESS
_sleep = asyncio.sleep
#: (credentials, wait_for_ready, compression) when the caller set none of them.
_NO_EXTRA: tuple[Any, Any, Any] = (None, None, None)
_UNARY_RESPONSE = frozenset({"unary_unary", "stream_unary"})


class _AioMultiCallable(MultiCallableBase):
    __slots__ = ()

    def __call__(self, request: Any = None, *, timeout: float | None = None,
                 metadata: Any = None, credentials: Any = None,
                 wait_for_ready: bool | None = None, compression: Any = None) -> Any:
        started = perf_counter()
        # tel.start() when tracing may be on; the shared no-op span, without a call, when off
        span = (NOOP_CALL if _tstate.tracer is None and started < _tstate.next_check
                else self._tel.start())
        gen = start_call(self._dest, self._method, metadata, timeout, self._replayable,
                         self._observer)
        cls = _AioUnaryCall if self._kind in _UNARY_RESPONSE else _AioStreamCall
        extra = (_NO_EXTRA if credentials is None and wait_for_ready is None
                 and compression is None else (credentials, wait_for_ready, compression))
        return cls(self, request, base_metadata(metadata, self._extra), gen, extra, span,
                   started)


class UnaryUnary(_AioMultiCallable, grpc.aio.UnaryUnaryMultiCallable):
    __slots__ = ()


class UnaryStream(_AioMultiCallable, grpc.aio.UnaryStreamMultiCallable):
    __slots__ = ()


class StreamUnary(_AioMultiCallable, grpc.aio.StreamUnaryMultiCallable):
    __slots__ = ()


class StreamStream(_AioMultiCallable, grpc.aio.StreamStreamMultiCallable):
    __slots__ = ()


class _AioCallBase:
    """Starting attempts and the accessors common to both call kinds."""

    __slots__ = ("_owner", "_request", "_md", "_gen", "_extra", "_span", "_started", "_aspan",
                 "_deadline", "_n", "_t0", "_call", "_pending", "_done", "_value", "_exc",
                 "_callbacks")

    def __init__(self, owner: _AioMultiCallable, request: Any, md: Any, gen: CallGen,
                 extra: tuple[Any, Any, Any], span: Any, started: float) -> None:
        self._owner = owner
        self._request = request
        self._md = md
        self._gen: CallGen | None = gen
        self._extra = extra
        self._span = span
        self._started = started
        self._aspan: Any = None  # the attempt in flight (its span)
        self._deadline: Any = None  # the call's overall deadline (from the plan)
        self._n = 0
        self._t0 = started
        self._call: Any = None
        self._pending: Sleep | None = None
        self._done = False
        self._value: Any = None
        self._exc: BaseException | None = None
        self._callbacks: list[Any] = []
        try:
            self._next(next(gen))
        except StopIteration as stop:
            self._end(stop.value)

    def _next(self, action: Any) -> None:
        if action.__class__ is Sleep:
            self._pending = action
            return
        ep = action.endpoint
        owner = self._owner
        mc = owner._mcs.get(ep.key) if owner._gen == owner._pool.generation else None
        if mc is None:
            mc = owner._mc(ep)
        n = action.number
        span = self._span
        if span is NOOP_CALL:  # tracing off: no span calls, metadata as it is
            aspan = NOOP_ATTEMPT
            md = (self._md if n == 1 and not _tstate.passthrough
                  else attempt_metadata(self._md, n, aspan))
        else:
            aspan = span.attempt(n, ep.address, ep.port)
            md = attempt_metadata(self._md, n, aspan)
        extra = self._extra
        self._aspan, self._n, self._t0 = aspan, n, perf_counter()
        self._deadline = action.deadline
        if extra is _NO_EXTRA:  # grpc.aio's defaults: fewer keywords to pass
            self._call = mc(self._request, timeout=action.timeout, metadata=md)
        else:
            cred, wfr, comp = extra
            self._call = mc(self._request, timeout=action.timeout, metadata=md,
                            credentials=cred, wait_for_ready=wfr, compression=comp)

    def _end(self, end: CallEnd) -> None:
        self._gen = None
        self._done = True
        if end.result is OK_RESULT:  # _value already holds the response
            self._owner._tel.ok_call.observe(perf_counter() - self._started)
            if self._span is not NOOP_CALL:
                self._span.end("OK", None)
        else:
            exc = end_error(end, self._owner._service, aio=True)
            if exc is None:
                self._value = end.result.value  # type: ignore[union-attr]
            self._exc = exc
            call_ended(self._owner._tel, self._span, self._started, end, exc)
        if self._callbacks:
            self._fire()

    def _end_attempt(self, result: AttemptResult, code: Any = None) -> None:
        aspan, self._aspan = self._aspan, None
        if aspan is not None:
            attempt_ended(self._owner._tel.recorder, aspan, self._n, result,
                          perf_counter() - self._t0, code)

    def _abort(self, exc: BaseException | None) -> None:
        """The call ended without a status from the server: cancelled (``exc`` None) or
        interrupted by ``exc`` (task cancellation, an error of the caller's)."""
        if isinstance(exc, asyncio.CancelledError):
            exc = None
        aspan, self._aspan = self._aspan, None
        tel = self._owner._tel
        if aspan is not None:
            attempt_aborted(tel.recorder, aspan, self._n, perf_counter() - self._t0, exc)
        if exc is None:
            dl = self._deadline
            call_cancelled(tel, self._span, self._started,
                           dl is not None and dl.expired(self._owner._dest.now()))
        else:
            call_ended(tel, self._span, self._started, None, exc)

    def _fire(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)

    async def _ensure_started(self) -> None:
        """Run a pending (fault-injection or backoff) sleep and start the attempt."""
        while self._pending is not None:
            p, self._pending = self._pending, None
            await _sleep(p.seconds)
            gen = self._gen
            if gen is None:
                return
            try:
                self._next(gen.send(None))
            except StopIteration as stop:
                self._end(stop.value)

    def _abandon(self, exc: BaseException | None = None) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.close()
            self._abort(exc)

    # --- grpc.aio.Call / RpcContext -------------------------------------------------------
    def cancelled(self) -> bool:
        return self._call is not None and self._call.cancelled()

    def done(self) -> bool:
        return self._done

    def time_remaining(self) -> float | None:
        return None if self._call is None else self._call.time_remaining()

    def add_done_callback(self, callback: Any) -> None:
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    async def _settle(self) -> Any:
        raise NotImplementedError

    async def initial_metadata(self) -> Any:
        s = await self._settle()
        return s.initial_metadata() if isinstance(s, AioRpcError) else await s.initial_metadata()

    async def trailing_metadata(self) -> Any:
        s = await self._settle()
        return s.trailing_metadata() if isinstance(s, AioRpcError) else await s.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        s = await self._settle()
        return s.code() if isinstance(s, AioRpcError) else await s.code()  # type: ignore[no-any-return]

    async def details(self) -> str:
        s = await self._settle()
        return s.details() if isinstance(s, AioRpcError) else await s.details()  # type: ignore[no-any-return]

    async def debug_error_string(self) -> str:
        s = await self._settle()
        if isinstance(s, AioRpcError):
            return s.debug_error_string()
        return await s.debug_error_string()  # type: ignore[no-any-return]

    async def wait_for_connection(self) -> None:
        await self._ensure_started()
        if self._call is not None:
            await self._call.wait_for_connection()

    # request streams (single attempt: requests are never replayed)
    async def write(self, request: Any) -> None:
        await self._ensure_started()
        if self._exc is not None:
            raise self._exc
        await self._call.write(request)

    async def done_writing(self) -> None:
        await self._ensure_started()
        if self._call is not None and self._exc is None:
            await self._call.done_writing()


class _AioUnaryCall(_AioCallBase):
    """unary-unary / stream-unary: ``await call`` drives the plan to its end."""

    __slots__ = ()

    def __await__(self) -> Any:
        """Drive the plan to its end (a generator, as grpc.aio's own calls: no coroutine
        object per call)."""
        if not self._done:
            gen = self._gen
            assert gen is not None
            try:
                while True:
                    if self._pending is not None:
                        p, self._pending = self._pending, None
                        yield from _sleep(p.seconds).__await__()
                        self._next(gen.send(None))
                        continue
                    try:
                        self._value = yield from self._call.__await__()
                    except AioRpcError as err:
                        result = result_from_error(err)
                        self._end_attempt(result)
                    else:  # _end_attempt(OK_RESULT) inlined: the hot path
                        result = OK_RESULT
                        aspan, self._aspan = self._aspan, None
                        n = self._n
                        tel = self._owner._tel
                        if n == 1:
                            tel.ok_attempt.observe(perf_counter() - self._t0)
                        else:
                            tel.recorder.attempt(n, _SUCCESS, perf_counter() - self._t0)
                        if aspan is not NOOP_ATTEMPT:
                            aspan.end("OK", None)
                    self._next(gen.send(result))
            except StopIteration as stop:
                end = stop.value
                if end.result is OK_RESULT and not self._callbacks:
                    # _end(end) inlined: the hot path (_value holds the response)
                    self._gen = None
                    self._done = True
                    self._owner._tel.ok_call.observe(perf_counter() - self._started)
                    if self._span is not NOOP_CALL:
                        self._span.end("OK", None)
                    return self._value
                self._end(end)
            except BaseException as exc:
                gen.close()  # frees the concurrency slot, the load count and any breaker trial
                self._gen = None
                self._done = True
                self._exc = exc
                self._abort(exc)
                self._fire()
                raise
        if self._exc is not None:
            raise self._exc
        return self._value

    async def _run(self) -> Any:
        return await self

    async def _settle(self) -> Any:
        if not self._done:
            try:
                await self._run()
            except (AioRpcError, asyncio.CancelledError):
                pass
        if isinstance(self._exc, AioRpcError):
            return self._exc
        return self._call

    def cancel(self) -> bool:
        if self._done:
            return False
        call = self._call
        if call is not None and not call.done():
            # the awaiting task sees CancelledError from the attempt and closes the plan
            return bool(call.cancel())
        self._abandon()
        self._done = True
        self._exc = asyncio.CancelledError()
        self._fire()
        return True


class _AioStreamCall(_AioCallBase):
    """unary-stream / stream-stream: ``async for`` / ``read()``; retried until committed."""

    __slots__ = ("_committed", "_buffer")

    def __init__(self, *args: Any) -> None:
        self._committed = False
        self._buffer: list[Any] = []
        super().__init__(*args)
        if not self._owner._replayable and self._call is not None:
            self._commit()

    def _end(self, end: CallEnd) -> None:
        self._committed = True
        super()._end(end)

    def _commit(self) -> None:
        self._committed = True
        self._call.add_done_callback(self._on_done)

    def _on_done(self, call: Any) -> None:
        if self._gen is not None:
            asyncio.get_running_loop().create_task(self._report(call))

    async def _report(self, call: Any) -> None:
        gen, self._gen = self._gen, None
        if gen is None:
            return
        try:
            code = await call.code()
        except BaseException:
            code = grpc.StatusCode.CANCELLED
        settle_stream(self, gen, code, call)
        self._done = True
        self._fire()

    async def _drive(self) -> None:
        while not self._committed:
            await self._ensure_started()
            if self._committed:
                return
            try:
                msg = await self._call.read()
                if msg is not _EOF:
                    self._buffer.append(msg)
            except AioRpcError as err:
                result = result_from_error(err)
                if result.grpc_code is None:  # headers had arrived: committed
                    self._exc = err
                    break
                gen = self._gen
                assert gen is not None
                self._end_attempt(result)
                try:
                    self._next(gen.send(result))
                except StopIteration as stop:
                    self._end(stop.value)
                    return
                continue
            except BaseException as exc:
                self._abandon(exc)
                raise
            break
        self._commit()

    async def read(self) -> Any:
        if not self._committed:
            await self._drive()
        if self._buffer:
            return self._buffer.pop()
        if self._exc is not None:
            raise self._exc
        return await self._call.read()

    def __aiter__(self) -> Any:
        return self._iterate()

    async def _iterate(self) -> Any:
        while True:
            msg = await self.read()
            if msg is _EOF:
                return
            yield msg

    async def _settle(self) -> Any:
        if not self._committed:
            try:
                await self._drive()
            except (AioRpcError, asyncio.CancelledError):
                pass
        if isinstance(self._exc, AioRpcError) and self._call is None:
            return self._exc
        if isinstance(self._exc, AioRpcError) and getattr(self._exc, "reason", None):
            return self._exc  # a mesh failure
        return self._call

    def done(self) -> bool:
        return self._done or (self._call is not None and self._call.done() and self._gen is None)

    def cancel(self) -> bool:
        call = self._call
        if not self._committed:
            self._abandon()
            self._committed = True
            self._done = True
            if call is not None:
                return bool(call.cancel())
            self._exc = asyncio.CancelledError()
            self._fire()
            return True
        return call is not None and bool(call.cancel())


class AioMeshChannel(MeshChannelBase, grpc.aio.Channel):
    """A ``grpc.aio.Channel`` to one mesh service (``mesh.aio_grpc_channel("orders")``).

    Create and use it on one event loop (grpc.aio channels belong to the loop that created
    them). Options as for :class:`meshlib.grpc.channel.MeshChannel`."""

    _AIO = True
    _UNARY_UNARY = UnaryUnary
    _UNARY_STREAM = UnaryStream
    _STREAM_UNARY = StreamUnary
    _STREAM_STREAM = StreamStream

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY when the service has endpoints, else IDLE (per-endpoint channels connect
        on demand)."""
        has = bool(self._dest.plan().snapshot.endpoints)
        return grpc.ChannelConnectivity.READY if has else grpc.ChannelConnectivity.IDLE

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        while self.get_state() == last_observed_state:
            await asyncio.sleep(0.05)

    async def channel_ready(self) -> None:
        await self.wait_for_state_change(grpc.ChannelConnectivity.IDLE)

    async def close(self, grace: float | None = None) -> None:
        self._release_health()
        await self._pool.aclose(grace)

    async def __aenter__(self) -> AioMeshChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AioMeshChannel"]
