"""ASGI middleware: the inbound half of the mesh for Starlette, FastAPI or any ASGI app.

Per HTTP request (ASGI 3 spec, "HTTP" scope; websocket and lifespan scopes pass through):

1. One pass over ``scope["headers"]`` finds ``x-mesh-caller`` and ``x-mesh-timeout``; the
   caller is the verified mTLS peer when the server provides the ASGI TLS extension
   (``scope["extensions"]["tls"]``: the mesh service of the peer's SPIFFE ID, added under
   uvicorn by :func:`meshlib.server.tls.uvicorn_protocol`, else the ``client_cert_name`` CN),
   else the header unless ``mtls.mode`` is ``strict``: then a request without a verified
   peer gets 403 ``mtls_required`` (:mod:`meshlib.server.common`).
2. A SERVER span is started from the inbound trace context.
3. Access policy: a caller not in ``policy.access.allow`` of this service gets 403 with a
   small JSON body; the application is not called.
4. Deadline: zero left on arrival gives 504 without calling the application; otherwise the
   deadline is put in :data:`meshlib.context.current_deadline` and the application runs under
   ``asyncio.timeout``: when the deadline passes the handler is cancelled (Go's
   ``http.TimeoutHandler``, Envoy's route timeout) and, if no response has started, the client
   gets 504. If the response had started, the connection is left for the server to close.
5. The span is current while the application runs, so spans and outgoing mesh calls made by
   the handler are its children.
6. At the end: ``http.server.request.duration`` with the route *template*. Starlette and
   FastAPI store the matched route in ``scope["route"]`` (its ``path`` is the template,
   ``/orders/{id}``); any app may instead put a template string in ``scope["meshlib.route"]``.
   Without either the route label is empty: raw paths never become labels. Routes inside a
   Starlette ``Mount`` are reported by their path relative to the mount.

Cancellation uses ``asyncio`` (the server must run the app on an asyncio loop: uvicorn,
hypercorn's asyncio worker, granian).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

from meshlib.context import CALLER_HEADER, current_deadline
from meshlib.server.common import (
    EXPIRED_BODY,
    TIMEOUT_HEADER,
    AccessGate,
    common_name,
    denied_body,
    inbound_deadline,
    name_span_route,
    resolve_service,
    unverified_body,
)
from meshlib.telemetry.metrics import MeshMetrics
from meshlib.telemetry.recorders import HttpServerRecorder, error_type_of
from meshlib.telemetry.tracing import start_server_span

if TYPE_CHECKING:
    from meshlib.ports import MeshPort

__all__ = ["MeshASGIMiddleware", "route_of_scope"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]


def route_of_scope(scope: Scope) -> str | None:
    """The matched route template: ``scope["meshlib.route"]`` or ``scope["route"].path``."""
    route = scope.get("meshlib.route")
    if isinstance(route, str):
        return route
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else None


def _tls_peer(scope: Scope) -> str | None:
    ext = scope.get("extensions")
    if not ext:
        return None
    tls = ext.get("tls")
    if not tls:
        return None
    if "meshlib.peer_service" in tls:  # meshlib.server.tls: the SPIFFE ID decides, never a CN
        return tls["meshlib.peer_service"]  # type: ignore[no-any-return]
    return common_name(tls.get("client_cert_name"))


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*_JSON, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class MeshASGIMiddleware:
    """Wrap an ASGI app: ``app = MeshASGIMiddleware(app, mesh, service="orders")``, or
    ``app.add_middleware(MeshASGIMiddleware, mesh=mesh)`` (Starlette/FastAPI).

    ``service`` defaults to ``mesh.service``. ``mesh=None`` keeps metrics, tracing and
    deadlines but enforces no access policy. ``metrics``: a ``MeshMetrics`` (tests pass one
    on a fresh registry; default: the process registry).
    """

    def __init__(self, app: ASGIApp, mesh: MeshPort | None = None, *, service: str | None = None,
                 metrics: MeshMetrics | None = None) -> None:
        self.app = app
        self.service = resolve_service(mesh, service, "MeshASGIMiddleware")
        self.gate = AccessGate(mesh, self.service)
        self.recorder = HttpServerRecorder.get(metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        caller_h = timeout_h = None
        for name, value in scope["headers"]:
            if name == CALLER_HEADER:
                caller_h = value
            elif name == TIMEOUT_HEADER:
                timeout_h = value
        verified = self.gate.identify(caller_h, _tls_peer(scope))
        caller = "" if verified is None else verified
        method = scope["method"]
        span = start_server_span(scope["headers"], method=method, caller=caller)
        rec = self.recorder

        if verified is None:  # strict mTLS and no verified certificate
            try:
                await _respond(send, 403, unverified_body(self.gate.unverified_message()))
            finally:
                rec.request(method, 403, None, None, perf_counter() - start, caller)
                span.end(403)
            return
        if not self.gate.allows(caller):
            rec.access_denied(caller)
            try:
                await _respond(send, 403, denied_body(caller, self.service))
            finally:
                rec.request(method, 403, None, None, perf_counter() - start, caller)
                span.end(403)
            return
        deadline, expired = inbound_deadline(timeout_h)
        if expired:
            try:
                await _respond(send, 504, EXPIRED_BODY)
            finally:
                rec.request(method, 504, None, "timeout", perf_counter() - start, caller)
                span.end(504, "timeout")
            return

        status: int | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: str | None = None
        token = current_deadline.set(deadline) if deadline is not None else None
        span.attach()
        try:
            if deadline is None or deadline.at is None:
                await self.app(scope, receive, send_wrapper)
            else:
                timer = asyncio.timeout(deadline.at - time.monotonic())
                try:
                    async with timer:
                        await self.app(scope, receive, send_wrapper)
                except TimeoutError:
                    if not timer.expired():
                        raise  # the application's own timeout, not the request deadline
                    error = "timeout"
                    if status is None:
                        await _respond(send, 504, EXPIRED_BODY)
                        status = 504
        except BaseException as exc:
            error = error or error_type_of(exc)
            if status is None and isinstance(exc, Exception):
                status = 500  # what the server answers for an exception before the response
            raise
        finally:
            if token is not None:
                current_deadline.reset(token)
            route = route_of_scope(scope)
            if route:
                name_span_route(span, method, route)
            rec.request(method, status, route, error, perf_counter() - start, caller)
            span.end(status, error)
