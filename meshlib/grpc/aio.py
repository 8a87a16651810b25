"""``AioMeshChannel``: a ``grpc.aio.Channel`` whose calls go through the mesh.

The asyncio twin of :mod:`meshlib.grpc.channel`: the same plan, retry and commit rules and
telemetry, because both call :class:`meshlib.grpc.driver.CallDriver` (each call object here
*is* one) and only wait differently (``await``). ``OrdersStub(mesh.async_grpc_channel("orders"))``
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
from typing import Any

import grpc
import grpc.aio
from grpc.aio import AioRpcError

from meshlib.core.call import Attempt, CallEnd, Sleep
from meshlib.grpc.attempt import result_from_error
from meshlib.grpc.base import MeshChannelBase, MultiCallableBase
from meshlib.grpc.driver import CallDriver

_EOF = grpc.aio.EOF
_sleep = asyncio.sleep
#: (credentials, wait_for_ready, compression) when the caller set none of them.
_NO_EXTRA: tuple[Any, Any, Any] = (None, None, None)


class _AioMultiCallable(MultiCallableBase):
    __slots__ = ()
    _CALL: Any  # the call class: _AioUnaryCall or _AioStreamCall

    def __call__(self, request: Any = None, *, timeout: float | None = None,
                 metadata: Any = None, credentials: Any = None,
                 wait_for_ready: bool | None = None, compression: Any = None) -> Any:
        extra = (_NO_EXTRA if credentials is None and wait_for_ready is None
                 and compression is None else (credentials, wait_for_ready, compression))
        return self._CALL(self, request, metadata, timeout, extra)


class _AioCallBase(CallDriver):
    """Starting attempts and the accessors common to both call kinds: the I/O around the
    :class:`CallDriver` it is."""

    __slots__ = ("_request", "_extra", "_call", "_pending", "_done", "_value", "_exc",
                 "_callbacks")

    _AIO = True

    def __init__(self, owner: _AioMultiCallable, request: Any, metadata: Any,
                 timeout: float | None, extra: tuple[Any, Any, Any]) -> None:
        CallDriver.__init__(self, owner, metadata, timeout)
        self._request = request
        self._extra = extra
        self._call: Any = None
        self._pending: Sleep | None = None
        self._done = False
        self._value: Any = None
        self._exc: BaseException | None = None
        self._callbacks: list[Any] | None = None  # made by the first add_done_callback
        self._act(self.advance(None))

    def _act(self, action: Any) -> None:
        """Act on the plan's ``action`` without waiting: note a sleep (run by whoever awaits
        next), start the attempt, or end the call. Any failure aborts the call."""
        cls = action.__class__
        if cls is Sleep:
            self._pending = action
            return
        if cls is not Attempt:
            self._end(action)
            return
        mc, md = self.start_attempt(action)
        extra = self._extra
        try:
            if extra is _NO_EXTRA:  # grpc.aio's defaults: fewer keywords to pass
                self._call = mc(self._request, timeout=action.timeout, metadata=md)
            else:
                cred, wfr, comp = extra
                self._call = mc(self._request, timeout=action.timeout, metadata=md,
                                credentials=cred, wait_for_ready=wfr, compression=comp)
        except BaseException as exc:
            self._fail(exc)
            raise

    def _end(self, end: CallEnd) -> None:
        """The plan ended: record the call; the caller gets ``_value`` or ``_exc``."""
        exc = self.finish(end)
        if exc is not None:
            self._exc = exc
        self._done = True
        if self._callbacks:
            self._fire()

    def _fail(self, exc: BaseException | None) -> None:
        """The call ends without a status (cancelled, or interrupted by ``exc``)."""
        self.abort(exc)
        if not self._done:
            self._done = True
            self._exc = exc if exc is not None else asyncio.CancelledError()
            self._fire()

    def _fire(self) -> None:
        callbacks, self._callbacks = self._callbacks, None
        for cb in callbacks or ():
            cb(self)

    async def _ensure_started(self) -> None:
        """Run a pending (fault-injection or backoff) sleep and start the attempt."""
        while self._pending is not None:
            p, self._pending = self._pending, None
            try:
                await _sleep(p.seconds)
                if self._gen is None:
                    return
                self._act(self.advance(None))
            except BaseException as exc:
                self._fail(exc)
                raise

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
            if self._callbacks is None:
                self._callbacks = []
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
            try:
                while not self._done:
                    p = self._pending
                    if p is not None:
                        self._pending = None
                        yield from _sleep(p.seconds).__await__()
                        if self._gen is None:  # cancelled while sleeping
                            break
                        self._act(self.advance(None))
                        continue
                    try:
                        value = yield from self._call.__await__()
                    except AioRpcError as err:
                        self._act(self.failed(err))
                    else:
                        self._value = value
                        self._act(self.ok())
            except BaseException as exc:
                self._fail(exc)
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
        self._fail(None)
        return True


class _AioStreamCall(_AioCallBase):
    """unary-stream / stream-stream: ``async for`` / ``read()``; retried until committed."""

    __slots__ = ("_committed", "_buffer")

    def __init__(self, owner: _AioMultiCallable, request: Any, metadata: Any,
                 timeout: float | None, extra: tuple[Any, Any, Any]) -> None:
        self._committed = False
        self._buffer: list[Any] = []
        _AioCallBase.__init__(self, owner, request, metadata, timeout, extra)
        if not owner._replayable and self._call is not None:
            self._commit()

    def _end(self, end: CallEnd) -> None:
        self._committed = True
        _AioCallBase._end(self, end)

    def _fail(self, exc: BaseException | None) -> None:
        self._committed = True  # an interrupted stream is over
        _AioCallBase._fail(self, exc)

    def _commit(self) -> None:
        self._committed = True
        self._call.add_done_callback(self._on_done)

    def _on_done(self, call: Any) -> None:
        if self._gen is not None:
            asyncio.get_running_loop().create_task(self._report(call))

    async def _report(self, call: Any) -> None:
        try:
            code = await call.code()
        except BaseException:
            code = grpc.StatusCode.CANCELLED
        if self.settle_stream(code, call):
            self._done = True
            self._fire()

    async def _drive(self) -> None:
        """Until committed: read the first message, retrying uncommitted failures."""
        try:
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
                    self._act(self.ended(result))
                    continue
                break
        except BaseException as exc:
            self._fail(exc)
            raise
        if self._gen is not None:
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
            self._committed = True
            self.abort(None)
            self._done = True
            if call is not None:
                return bool(call.cancel())
            self._exc = asyncio.CancelledError()
            self._fire()
            return True
        return call is not None and bool(call.cancel())


class UnaryUnary(_AioMultiCallable, grpc.aio.UnaryUnaryMultiCallable):
    __slots__ = ()
    _CALL = _AioUnaryCall


class UnaryStream(_AioMultiCallable, grpc.aio.UnaryStreamMultiCallable):
    __slots__ = ()
    _CALL = _AioStreamCall


class StreamUnary(_AioMultiCallable, grpc.aio.StreamUnaryMultiCallable):
    __slots__ = ()
    _CALL = _AioUnaryCall


class StreamStream(_AioMultiCallable, grpc.aio.StreamStreamMultiCallable):
    __slots__ = ()
    _CALL = _AioStreamCall


class AioMeshChannel(MeshChannelBase, grpc.aio.Channel):
    """A ``grpc.aio.Channel`` to one mesh service (``mesh.async_grpc_channel("orders")``).

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
