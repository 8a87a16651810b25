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
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc.aio import AioRpcError

from meshlib.core.call import CallEnd, CallGen, CallObserver, Sleep
from meshlib.grpc.attempt import (
    CALLER_KEY,
    OK_RESULT,
    base_metadata,
    end_error,
    result_from_code,
    result_from_error,
    retry_metadata,
    start_call,
)
from meshlib.grpc.pool import ChannelPool

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

_EOF = grpc.aio.EOF
_sleep = asyncio.sleep


class _AioMultiCallable:
    __slots__ = ("_ch", "_dest", "_pool", "_kind", "_method", "_ser", "_deser", "_kw",
                 "_mcs", "_gen", "_service", "_observer", "_extra", "_replayable")

    def __init__(self, ch: AioMeshChannel, kind: str, method: str, ser: Any, deser: Any,
                 kwargs: dict[str, Any], replayable: bool) -> None:
        self._ch = ch
        self._dest = ch._dest
        self._pool = ch._pool
        self._kind = kind
        self._method = method if isinstance(method, str) else method.decode()
        self._ser = ser
        self._deser = deser
        self._kw = kwargs
        self._mcs: dict[str, Any] = {}
        self._gen = -1
        self._service = ch.service
        self._observer = ch._observer
        self._extra = ch._extra
        self._replayable = replayable

    def _mc(self, ep: Any) -> Any:
        pool = self._pool
        mcs = self._mcs
        if pool.generation != self._gen:
            mcs = self._mcs = {}
            self._gen = pool.generation
        mc = mcs.get(ep.key)
        if mc is None:
            factory = getattr(pool.channel(ep), self._kind)
            mc = mcs[ep.key] = factory(self._method, request_serializer=self._ser,
                                       response_deserializer=self._deser, **self._kw)
        return mc

    def __call__(self, request: Any = None, *, timeout: float | None = None,
                 metadata: Any = None, credentials: Any = None,
                 wait_for_ready: bool | None = None, compression: Any = None) -> Any:
        gen = start_call(self._dest, self._method, metadata, timeout, self._replayable,
                         self._observer)
        cls = _AioUnaryCall if self._kind in ("unary_unary", "stream_unary") else _AioStreamCall
        return cls(self, request, base_metadata(metadata, self._extra), gen,
                   (credentials, wait_for_ready, compression))


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

    def __init__(self, owner: _AioMultiCallable, request: Any, md: Any, gen: CallGen,
                 extra: tuple[Any, Any, Any]) -> None:
        self._owner = owner
        self._request = request
        self._md = md
        self._gen: CallGen | None = gen
        self._extra = extra
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
        mc = self._owner._mc(action.endpoint)
        n = action.number
        cred, wfr, comp = self._extra
        self._call = mc(self._request, timeout=action.timeout,
                        metadata=self._md if n == 1 else retry_metadata(self._md, n),
                        credentials=cred, wait_for_ready=wfr, compression=comp)

    def _end(self, end: CallEnd) -> None:
        self._gen = None
        self._done = True
        if end.result is not OK_RESULT:  # OK_RESULT: _value already holds the response
            exc = end_error(end, self._owner._service, aio=True)
            if exc is None:
                self._value = end.result.value  # type: ignore[union-attr]
            self._exc = exc
        if self._callbacks:
            self._fire()

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

    def _abandon(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.close()

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

    def __await__(self) -> Any:
        return self._run().__await__()

    async def _run(self) -> Any:
        if not self._done:
            gen = self._gen
            assert gen is not None
            try:
                while True:
                    if self._pending is not None:
                        p, self._pending = self._pending, None
                        await _sleep(p.seconds)
                        self._next(gen.send(None))
                        continue
                    try:
                        self._value = await self._call
                        result = OK_RESULT
                    except AioRpcError as err:
                        result = result_from_error(err)
                    # TELEMETRY(attempt): per-attempt metrics go here.
                    self._next(gen.send(result))
            except StopIteration as stop:
                # TELEMETRY(call): per-call metrics go here.
                self._end(stop.value)
            except BaseException as exc:
                gen.close()  # frees the concurrency slot, the load count and any breaker trial
                self._gen = None
                self._done = True
                self._exc = exc
                self._fire()
                raise
        if self._exc is not None:
            raise self._exc
        return self._value

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
        # TELEMETRY(call): a stream's end (code) is known here.
        try:
            gen.send(result_from_code(code, call))
        except StopIteration:
            pass
        finally:
            gen.close()
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
                try:
                    self._next(gen.send(result))
                except StopIteration as stop:
                    self._end(stop.value)
                    return
                continue
            except BaseException:
                self._abandon()
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


class AioMeshChannel(grpc.aio.Channel):
    """A ``grpc.aio.Channel`` to one mesh service (``mesh.aio_grpc_channel("orders")``).

    Create and use it on one event loop (grpc.aio channels belong to the loop that created
    them). Options as for :class:`meshlib.grpc.channel.MeshChannel`."""

    def __init__(
        self,
        mesh: Mesh,
        service: str,
        *,
        options: Any = None,
        compression: grpc.Compression | None = None,
        observer: CallObserver | None = None,
        drain_timeout: float = 30.0,
        health_check: bool = True,
    ) -> None:
        self.service = service
        self._dest = mesh.destination(service)
        self._pool = ChannelPool(mesh, service, options=options, compression=compression,
                                 aio=True, drain_timeout=drain_timeout)
        self._observer = observer or mesh.call_observer("grpc")
        self._extra: tuple[tuple[str, str], ...] = (
            ((CALLER_KEY, mesh.service),) if mesh.service else ()
        )
        self._health: Any = None
        if health_check:
            from meshlib.grpc.health import HealthMonitor

            self._health = HealthMonitor.for_destination(mesh, self._dest, options=options)

    @property
    def destination(self) -> Any:
        return self._dest

    @property
    def pool(self) -> ChannelPool:
        return self._pool

    def unary_unary(self, method: str, request_serializer: Any = None,
                    response_deserializer: Any = None, **kwargs: Any) -> UnaryUnary:
        return UnaryUnary(self, "unary_unary", method, request_serializer,
                          response_deserializer, kwargs, True)

    def unary_stream(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **kwargs: Any) -> UnaryStream:
        return UnaryStream(self, "unary_stream", method, request_serializer,
                           response_deserializer, kwargs, True)

    def stream_unary(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **kwargs: Any) -> StreamUnary:
        return StreamUnary(self, "stream_unary", method, request_serializer,
                           response_deserializer, kwargs, False)

    def stream_stream(self, method: str, request_serializer: Any = None,
                      response_deserializer: Any = None, **kwargs: Any) -> StreamStream:
        return StreamStream(self, "stream_stream", method, request_serializer,
                            response_deserializer, kwargs, False)

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
        if self._health is not None:
            self._health.release()
            self._health = None
        await self._pool.aclose(grace)

    async def __aenter__(self) -> AioMeshChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AioMeshChannel"]
