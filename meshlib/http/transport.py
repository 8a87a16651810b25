"""httpx transports that route ``http://<service>/...`` through the mesh.

Both transports run the same sans-I/O call plan (``meshlib.core.call.run_call``) and share
every step but the I/O (``meshlib.http.attempt``); the two ``_drive`` loops below are
line-for-line twins (sleep vs ``await asyncio.sleep``, send vs ``await``), and one table of
behaviour tests runs against both.

Hedged calls (``retries.hedging``, see ``meshlib.core.call``) leave the plain loop at their
first attempt (one attribute check: ``action.hedge_after``) for ``_hedged`` drivers that keep
several attempts in flight: asyncio tasks in the async transport; in the sync transport a
small thread pool, created on the first hedged call and used only by hedged calls (the
calling thread waits for the first attempt to finish or the hedge timer to expire). The
losers are cancelled: a task is cancelled (its connection is closed by the pool), a pool
thread has its socket shut down (``shutdown(SHUT_RDWR)`` wakes the blocked ``recv``) and the
connection closed; a loser's response that arrived anyway is closed unread. Every attempt is
recorded; abandoned ones with outcome ``local`` and span ``error.type`` ``cancelled``.

A host is a mesh service when it is a single DNS label (``orders``; no dots, not
``localhost``, not an IP literal). Other hosts pass through to a plain httpx transport,
or are refused with :class:`NotAMeshServiceError` when ``passthrough=False``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
import time
from time import perf_counter
from typing import TYPE_CHECKING, Any, cast

import httpx

from meshlib.core.call import (
    HEDGE,
    WAIT,
    Attempt,
    AttemptResult,
    CallGen,
    Done,
    HedgedCallGen,
    Sleep,
    run_call,
)
from meshlib.core.destination import DestinationState
from meshlib.discovery.keys import is_service_name
from meshlib.http.attempt import (
    CALLER_HEADER,
    adiscard,
    attempt_headers_and_timeouts,
    close_unread,
    discard,
    finish,
    record_attempt,
    record_cancelled,
    replayable,
    request_deadline,
    result_from_error,
    result_from_response,
)
from meshlib.http.connections import AsyncPool, SyncPool, _SyncConn
from meshlib.http.errors import NotAMeshServiceError, UnsupportedSchemeError
from meshlib.telemetry.tracing import start_http_call

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

_NOT_MESH = object()


def _is_mesh_host(host: str) -> bool:
    """A single DNS label that is a valid service name (see ``keys.check_service_name``)."""
    return host != "localhost" and is_service_name(host)


class _Route:
    """What a mesh host resolves to: its call state and its telemetry recorder."""

    __slots__ = ("dest", "recorder", "service")

    def __init__(self, dest: DestinationState, recorder: Any) -> None:
        self.dest = dest
        self.recorder = recorder
        self.service = dest.service


class _Router:
    """Host -> _Route (cached per host: one dict lookup per call)."""

    def __init__(self, mesh: Mesh, passthrough: bool) -> None:
        self.mesh = mesh
        self.passthrough = passthrough
        self._by_host: dict[bytes, Any] = {}
        caller = mesh.service
        self.extra_headers: list[tuple[bytes, bytes]] = (
            [(CALLER_HEADER, caller.encode())] if caller else []
        )

    def route(self, request: httpx.Request) -> _Route | None:
        raw = request.url.raw_host
        dest = self._by_host.get(raw)
        if dest is None:
            host = raw.decode("ascii", "replace").lower()
            if _is_mesh_host(host):
                dest = _Route(self.mesh.destination(host), self.mesh.call_observer("http", host))
            else:
                dest = _NOT_MESH
            self._by_host[raw] = dest
        if dest is _NOT_MESH:
            if not self.passthrough:
                raise NotAMeshServiceError(
                    f"host {request.url.host!r} is not a mesh service (use a single-label "
                    "service name such as http://orders/...)",
                    service=request.url.host, request=request,
                )
            return None
        if request.url.raw_scheme != b"http":
            # mesh endpoints are reached over plain HTTP/1.1: never send an https:// request
            # in clear text while the caller believes it is encrypted
            raise UnsupportedSchemeError(
                f"{request.url.scheme}://{request.url.host}/: mesh service "
                f"{request.url.host!r} is reached over plain HTTP only (use "
                f"http://{request.url.host}/...; TLS to mesh endpoints is not supported)",
                service=request.url.host, request=request,
            )
        return dest  # type: ignore[return-value]

    def start(self, route: _Route, request: httpx.Request) -> CallGen:
        dest = route.dest
        plan = dest.plan()
        headers = request.headers
        return run_call(
            dest,
            plan,
            method=request.method,
            path=request.url.path if plan.has_header_routes else "/",
            header=headers.get,
            has_idempotency_key=lambda: "idempotency-key" in headers,
            replayable=replayable(request),
            deadline=request_deadline(request, dest.now()),
            observer=route.recorder,
        )


class MeshTransport(httpx.BaseTransport):
    """Sync transport: ``httpx.Client(transport=MeshTransport(mesh))``.

    Connections: per-endpoint stacks of HTTP/1.1 connections (``connections.py``)."""

    def __init__(
        self,
        mesh: Mesh,
        *,
        passthrough: bool = True,
        max_keepalive_per_endpoint: int = 64,
        hedge_threads: int = 64,
    ) -> None:
        self._router = _Router(mesh, passthrough)
        self._pool = SyncPool(max_idle=max_keepalive_per_endpoint)
        self._fallback: httpx.BaseTransport | None = None
        self._hedge_threads = hedge_threads
        self._hedge_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._hedge_lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        route = self._router.route(request)
        if route is None:
            if self._fallback is None:
                self._fallback = httpx.HTTPTransport()
            return self._fallback.handle_request(request)
        started = perf_counter()
        span = start_http_call(route.service, request.method)
        gen = self._router.start(route, request)
        extra = self._router.extra_headers
        now = route.dest.now
        pending: Any = None
        try:
            action = next(gen)
            while True:
                if isinstance(action, Sleep):
                    time.sleep(action.seconds)
                    action = gen.send(None)
                    continue
                if action.hedge_after is not None:  # hedged mode (meshlib.core.call)
                    return self._hedged(request, route, cast(HedgedCallGen, gen), action, span,
                                        started)
                if pending is not None:
                    discard(pending)
                    pending = None
                ep = action.endpoint
                headers, timeouts = attempt_headers_and_timeouts(request, action, extra, now())
                aspan = span.attempt(action.number, ep.address, ep.port)
                aspan.inject(headers, True)
                t0 = perf_counter()
                try:
                    response = self._pool.request(
                        ep.address, ep.port, request.method, request.url.raw_path,
                        headers, request.stream, timeouts,
                    )
                    result = result_from_response(response)
                    pending = response
                except httpx.TransportError as exc:
                    result = result_from_error(exc)
                record_attempt(route.recorder, aspan, action.number, result, perf_counter() - t0)
                action = gen.send(result)
        except StopIteration as stop:
            return finish(request, route, stop.value, span, started)
        except BaseException:
            gen.close()  # frees the concurrency slot, the load count and any breaker trial
            if pending is not None:
                pending.close()
            raise

    # ------------------------------------------------------------------ hedged calls

    def _hedge_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        ex = self._hedge_pool
        if ex is None:
            with self._hedge_lock:
                ex = self._hedge_pool
                if ex is None:
                    ex = self._hedge_pool = concurrent.futures.ThreadPoolExecutor(
                        self._hedge_threads, thread_name_prefix="meshlib-hedge")
        return ex

    def _hedged(self, request: httpx.Request, route: _Route, gen: HedgedCallGen,
                action: Any, span: Any, started: float) -> httpx.Response:
        """Drive a hedged call: attempts on the hedge pool, this thread waits and decides."""
        executor = self._hedge_executor()
        extra = self._router.extra_headers
        now = route.dest.now
        recorder = route.recorder
        running: dict[Attempt, _SyncRun] = {}
        delivered: list[Any] = []  # values handed to the plan: closed unless returned
        try:
            while True:
                if isinstance(action, Sleep):
                    time.sleep(action.seconds)
                    action = gen.send(None)
                    continue
                timer = None
                if action is not WAIT:
                    running[action] = self._start(executor, request, action, span, extra, now())
                    if action.hedge_after is not None:
                        timer = perf_counter() + action.hedge_after
                if not running:
                    raise RuntimeError(f"service {route.service!r}: hedged call plan waits "
                                       f"with no attempt in flight ({action!r})")
                futures = [run.future for run in running.values()]
                timeout = None if timer is None else max(0.0, timer - perf_counter())
                done, _ = concurrent.futures.wait(futures, timeout,
                                                  concurrent.futures.FIRST_COMPLETED)
                if not done:
                    action = gen.send(HEDGE)
                    continue
                att = next(a for a, run in running.items() if run.future in done)
                run = running.pop(att)
                result, seconds = run.future.result()
                record_attempt(recorder, run.span, att.number, result, seconds)
                delivered.append(result.value)
                action = gen.send(Done(att, result))
        except StopIteration as stop:
            end = stop.value
            _abandon_sync(recorder, running)
            keep = end.result.value if end.result is not None else None
            for value in delivered:
                if value is not keep:
                    discard(value)
            return finish(request, route, end, span, started)
        except BaseException:
            gen.close()  # frees the concurrency slot, the load counts and breaker trials
            _abandon_sync(recorder, running)
            for value in delivered:
                close_unread(value)
            raise

    def _start(self, executor: concurrent.futures.ThreadPoolExecutor, request: httpx.Request,
               action: Attempt, span: Any, extra: list[tuple[bytes, bytes]],
               now: float) -> _SyncRun:
        ep = action.endpoint
        headers, timeouts = attempt_headers_and_timeouts(request, action, extra, now)
        aspan = span.attempt(action.number, ep.address, ep.port)
        aspan.inject(headers, True)
        box = _Cancel()
        future = executor.submit(_attempt_in_thread, self._pool, box, ep.address, ep.port,
                                 request.method, request.url.raw_path, headers, request.stream,
                                 timeouts)
        return _SyncRun(future, box, aspan, perf_counter())

    def close(self) -> None:
        self._pool.close()
        if self._fallback is not None:
            self._fallback.close()
        if self._hedge_pool is not None:
            self._hedge_pool.shutdown(wait=False, cancel_futures=True)


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """Async transport: ``httpx.AsyncClient(transport=AsyncMeshTransport(mesh))``.

    Connections: per-endpoint stacks of HTTP/1.1 connections (``connections.py``)."""

    def __init__(
        self,
        mesh: Mesh,
        *,
        passthrough: bool = True,
        max_keepalive_per_endpoint: int = 64,
    ) -> None:
        self._router = _Router(mesh, passthrough)
        self._pool = AsyncPool(max_idle=max_keepalive_per_endpoint)
        self._fallback: httpx.AsyncBaseTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        route = self._router.route(request)
        if route is None:
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport()
            return await self._fallback.handle_async_request(request)
        started = perf_counter()
        span = start_http_call(route.service, request.method)
        gen = self._router.start(route, request)
        extra = self._router.extra_headers
        now = route.dest.now
        pending: Any = None
        try:
            action = next(gen)
            while True:
                if isinstance(action, Sleep):
                    await asyncio.sleep(action.seconds)
                    action = gen.send(None)
                    continue
                if action.hedge_after is not None:  # hedged mode (meshlib.core.call)
                    return await self._hedged(request, route, cast(HedgedCallGen, gen), action,
                                              span, started)
                if pending is not None:
                    await adiscard(pending)
                    pending = None
                ep = action.endpoint
                headers, timeouts = attempt_headers_and_timeouts(request, action, extra, now())
                aspan = span.attempt(action.number, ep.address, ep.port)
                aspan.inject(headers, True)
                t0 = perf_counter()
                try:
                    response = await self._pool.request(
                        ep.address, ep.port, request.method, request.url.raw_path,
                        headers, request.stream, timeouts,
                    )
                    result = result_from_response(response)
                    pending = response
                except httpx.TransportError as exc:
                    result = result_from_error(exc)
                record_attempt(route.recorder, aspan, action.number, result, perf_counter() - t0)
                action = gen.send(result)
        except StopIteration as stop:
            return finish(request, route, stop.value, span, started)
        except BaseException:
            gen.close()  # frees the concurrency slot, the load count and any breaker trial
            if pending is not None:
                await pending.aclose()
            raise

    async def _hedged(self, request: httpx.Request, route: _Route, gen: HedgedCallGen,
                      action: Any, span: Any, started: float) -> httpx.Response:
        """Drive a hedged call: one task per attempt, this task waits and decides."""
        loop = asyncio.get_running_loop()
        extra = self._router.extra_headers
        now = route.dest.now
        recorder = route.recorder
        running: dict[Attempt, tuple[asyncio.Task[Any], Any, float]] = {}
        delivered: list[Any] = []  # values handed to the plan: closed unless returned
        try:
            while True:
                if isinstance(action, Sleep):
                    await asyncio.sleep(action.seconds)
                    action = gen.send(None)
                    continue
                timer = None
                if action is not WAIT:
                    ep = action.endpoint
                    headers, timeouts = attempt_headers_and_timeouts(request, action, extra,
                                                                     now())
                    aspan = span.attempt(action.number, ep.address, ep.port)
                    aspan.inject(headers, True)
                    task = loop.create_task(_attempt_task(
                        self._pool, ep.address, ep.port, request.method, request.url.raw_path,
                        headers, request.stream, timeouts))
                    running[action] = (task, aspan, perf_counter())
                    if action.hedge_after is not None:
                        timer = perf_counter() + action.hedge_after
                if not running:
                    raise RuntimeError(f"service {route.service!r}: hedged call plan waits "
                                       f"with no attempt in flight ({action!r})")
                timeout = None if timer is None else max(0.0, timer - perf_counter())
                done, _ = await asyncio.wait([r[0] for r in running.values()], timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    action = gen.send(HEDGE)
                    continue
                att = next(a for a, r in running.items() if r[0] in done)
                task, aspan, _t0 = running.pop(att)
                result, seconds = task.result()
                record_attempt(recorder, aspan, att.number, result, seconds)
                delivered.append(result.value)
                action = gen.send(Done(att, result))
        except StopIteration as stop:
            end = stop.value
            _abandon_async(recorder, running)
            keep = end.result.value if end.result is not None else None
            for value in delivered:
                if value is not keep:
                    await adiscard(value)
            return finish(request, route, end, span, started)
        except BaseException:
            gen.close()  # frees the concurrency slot, the load counts and breaker trials
            _abandon_async(recorder, running)
            for value in delivered:
                if isinstance(value, httpx.Response):
                    _close_later(value)
            raise

    async def aclose(self) -> None:
        await self._pool.aclose()
        if self._fallback is not None:
            await self._fallback.aclose()


# --------------------------------------------------------------------------- hedging helpers


class _Cancel:
    """Cancellation of one sync attempt running on a hedge pool thread.

    The worker publishes its connection in ``conn`` and then checks ``cancelled``; the
    canceller sets ``cancelled`` and then shuts down ``conn``'s socket if it sees one. With
    both sides writing before reading, one of them always sees the other."""

    __slots__ = ("conn", "cancelled")

    def __init__(self) -> None:
        self.conn: _SyncConn | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked in the worker


class _SyncRun:
    __slots__ = ("future", "box", "span", "t0")

    def __init__(self, future: concurrent.futures.Future[Any], box: _Cancel, span: Any,
                 t0: float) -> None:
        self.future = future
        self.box = box
        self.span = span
        self.t0 = t0


def _attempt_in_thread(pool: SyncPool, box: _Cancel, host: str, port: int, method: str,
                       target: bytes, headers: list[tuple[bytes, bytes]], stream: Any,
                       timeouts: dict[str, float | None] | None) -> tuple[AttemptResult, float]:
    """One hedged attempt on a pool thread: (result, seconds)."""
    t0 = perf_counter()
    try:
        result = result_from_response(
            _tracked_request(pool, box, host, port, method, target, headers, stream, timeouts))
    except httpx.TransportError as exc:
        result = result_from_error(exc)
    return result, perf_counter() - t0


def _tracked_request(pool: SyncPool, box: _Cancel, host: str, port: int, method: str,
                     target: bytes, headers: list[tuple[bytes, bytes]], stream: Any,
                     timeouts: dict[str, float | None] | None) -> httpx.Response:
    """``SyncPool.request`` that publishes its connection in ``box`` so that another thread
    can cancel the exchange (hedged calls only)."""

    def publish(conn: Any) -> None:
        box.conn = conn
        if box.cancelled:
            raise httpx.ReadError(f"attempt to {host}:{port} cancelled: another hedged "
                                  "attempt answered first")

    return pool.request(host, port, method, target, headers, stream, timeouts, publish)


def _abandon_sync(recorder: Any, running: dict[Attempt, _SyncRun]) -> None:
    """Cancel the attempts still running (hedged losers): close their connections."""
    for att, run in running.items():
        if not run.future.cancel():  # already running: shut its socket down
            run.box.cancel()
            run.future.add_done_callback(_close_sync_result)
        record_cancelled(recorder, run.span, att.number, perf_counter() - run.t0)
    running.clear()


def _close_sync_result(future: concurrent.futures.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is None:
        close_unread(future.result()[0].value)


async def _attempt_task(pool: AsyncPool, host: str, port: int, method: str, target: bytes,
                        headers: list[tuple[bytes, bytes]], stream: Any,
                        timeouts: dict[str, float | None] | None) -> tuple[AttemptResult, float]:
    """One hedged attempt as a task: (result, seconds). Cancelling the task closes the
    connection (``AsyncPool.request`` closes it on any exception)."""
    t0 = perf_counter()
    try:
        result = result_from_response(
            await pool.request(host, port, method, target, headers, stream, timeouts))
    except httpx.TransportError as exc:
        result = result_from_error(exc)
    return result, perf_counter() - t0


_closing: set[asyncio.Task[Any]] = set()  # strong references to background closes


def _close_later(response: httpx.Response) -> None:
    task = asyncio.get_running_loop().create_task(response.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _abandon_async(recorder: Any, running: dict[Attempt, tuple[asyncio.Task[Any], Any, float]],
                   ) -> None:
    """Cancel the tasks still running (hedged losers); a response that arrived anyway is
    closed unread."""
    for att, (task, aspan, t0) in running.items():
        task.cancel()
        task.add_done_callback(_close_async_result)
        record_cancelled(recorder, aspan, att.number, perf_counter() - t0)
    running.clear()


def _close_async_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is None:
        value = task.result()[0].value
        if isinstance(value, httpx.Response):
            _close_later(value)
