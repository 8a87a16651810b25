"""httpx transports that route ``http://<service>/...`` through the mesh.

Both transports run the same sans-I/O call plan (``meshlib.core.call.run_call``) and share
every step but the I/O (``meshlib.http.attempt``); the two ``_drive`` loops below are
line-for-line twins (sleep vs ``await asyncio.sleep``, send vs ``await``), and one table of
behaviour tests runs against both.

A host is a mesh service when it is a single DNS label (``orders``; no dots, not
``localhost``, not an IP literal). Other hosts pass through to a plain httpx transport,
or are refused with :class:`NotAMeshServiceError` when ``passthrough=False``.
"""

from __future__ import annotations

import asyncio
import time
from time import perf_counter
from typing import TYPE_CHECKING, Any

import httpx

from meshlib.core.call import CallGen, Sleep, run_call
from meshlib.core.destination import DestinationState
from meshlib.http.attempt import (
    CALLER_HEADER,
    adiscard,
    attempt_headers_and_timeouts,
    discard,
    finish,
    record_attempt,
    replayable,
    request_deadline,
    result_from_error,
    result_from_response,
)
from meshlib.http.connections import AsyncPool, SyncPool
from meshlib.http.errors import NotAMeshServiceError, UnsupportedSchemeError
from meshlib.telemetry.recorders import HttpClientRecorder
from meshlib.telemetry.tracing import start_http_call

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

_NOT_MESH = object()


def _is_mesh_host(host: str) -> bool:
    return bool(host) and "." not in host and ":" not in host and host != "localhost"


class _Route:
    """What a mesh host resolves to: its call state and its telemetry recorder."""

    __slots__ = ("dest", "recorder", "service")

    def __init__(self, dest: DestinationState, recorder: HttpClientRecorder) -> None:
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
    ) -> None:
        self._router = _Router(mesh, passthrough)
        self._pool = SyncPool(max_idle=max_keepalive_per_endpoint)
        self._fallback: httpx.BaseTransport | None = None

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

    def close(self) -> None:
        self._pool.close()
        if self._fallback is not None:
            self._fallback.close()


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

    async def aclose(self) -> None:
        await self._pool.aclose()
        if self._fallback is not None:
            await self._fallback.aclose()
