"""WSGI middleware: the inbound half of the mesh for Flask, Django or any WSGI app (PEP 3333).

Per request, the same decisions as the ASGI middleware (:mod:`meshlib.server.common`):
caller identity (``SSL_CLIENT_S_DN_CN`` / ``SSL_CLIENT_S_DN`` as Apache mod_ssl exports the
mTLS peer, else ``HTTP_X_MESH_CALLER``), access policy (403 + JSON, application not called),
deadline (``HTTP_X_MESH_TIMEOUT``: zero left gives 504 without calling the application;
otherwise :data:`meshlib.context.current_deadline` is set while the application runs, so its
outgoing mesh calls inherit the budget), a SERVER span current while the application runs.

**No cancellation**: a WSGI request runs in a server thread and Python cannot interrupt a
thread, so a handler that overruns its deadline runs to completion; the middleware only
refuses already expired requests and propagates the deadline to outgoing calls (which then
fail fast with a deadline error instead of waiting).

The request ends when the server calls the response iterable's ``close()`` (PEP 3333), so
the recorded duration includes sending the body. The route template comes from Flask/Werkzeug
(``environ["werkzeug.request"].url_rule.rule``, e.g. ``/orders/<int:id>``, read when the
application calls ``start_response``: Flask drops the request object from the environ as its
request context ends), or from
``environ["meshlib.route"]`` set by the application; otherwise the route label is empty:
raw paths never become labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

from meshlib.context import current_deadline
from meshlib.server.common import (
    EXPIRED_BODY,
    AccessGate,
    common_name,
    denied_body,
    detach_span,
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

__all__ = ["MeshWSGIMiddleware", "route_of_environ"]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_REASONS = {403: "403 Forbidden", 504: "504 Gateway Timeout"}


def route_of_environ(environ: dict[str, Any]) -> str | None:
    """``environ["meshlib.route"]``, else Werkzeug's matched ``url_rule.rule`` (Flask)."""
    route = environ.get("meshlib.route")
    if isinstance(route, str):
        return route
    request = environ.get("werkzeug.request")
    rule = getattr(getattr(request, "url_rule", None), "rule", None)
    return rule if isinstance(rule, str) else None


def _status_code(status: str) -> int | None:
    try:
        return int(status[:3])
    except ValueError:
        return None


class _Body:
    """The application's response iterable; records the request on ``close()``."""

    __slots__ = ("_done", "_inner", "_iter", "_finish")

    def __init__(self, inner: Iterable[bytes], finish: Callable[[str | None], None]) -> None:
        self._inner = inner
        self._iter: Iterator[bytes] | None = None
        self._finish = finish
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        self._iter = iter(self._inner)
        return self

    def __next__(self) -> bytes:
        assert self._iter is not None
        try:
            return next(self._iter)
        except StopIteration:
            raise
        except Exception as exc:
            self._end(error_type_of(exc))
            raise

    def _end(self, error: str | None) -> None:
        if not self._done:
            self._done = True
            self._finish(error)

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            self._end(None)


class MeshWSGIMiddleware:
    """Wrap a WSGI app: ``app.wsgi_app = MeshWSGIMiddleware(app.wsgi_app, mesh)`` (Flask) or
    ``application = MeshWSGIMiddleware(get_wsgi_application(), mesh, service="orders")``.

    ``service`` defaults to ``mesh.service``; ``mesh=None`` enforces no access policy.
    """

    def __init__(self, app: WSGIApp, mesh: MeshPort | None = None, *, service: str | None = None,
                 metrics: MeshMetrics | None = None) -> None:
        self.app = app
        self.service = resolve_service(mesh, service, "MeshWSGIMiddleware")
        self.gate = AccessGate(mesh, self.service)
        self.recorder = HttpServerRecorder.get(metrics)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start = perf_counter()
        tls = environ.get("SSL_CLIENT_S_DN_CN") or common_name(environ.get("SSL_CLIENT_S_DN"))
        verified = self.gate.identify(environ.get("HTTP_X_MESH_CALLER"), tls)
        caller = "" if verified is None else verified
        method = environ.get("REQUEST_METHOD", "")
        span = start_server_span(environ, method=method, caller=caller)
        rec = self.recorder

        if verified is None:  # strict mTLS and no verified certificate
            rec.request(method, 403, None, None, perf_counter() - start, caller)
            span.end(403)
            return self._refuse(start_response, 403,
                                unverified_body(self.gate.unverified_message()))
        if not self.gate.allows(caller):
            rec.access_denied(caller)
            body = denied_body(caller, self.service)
            rec.request(method, 403, None, None, perf_counter() - start, caller)
            span.end(403)
            return self._refuse(start_response, 403, body)
        deadline, expired = inbound_deadline(environ.get("HTTP_X_MESH_TIMEOUT"))
        if expired:
            rec.request(method, 504, None, "timeout", perf_counter() - start, caller)
            span.end(504, "timeout")
            return self._refuse(start_response, 504, EXPIRED_BODY)

        status: list[int | None] = [None]
        route_seen: list[str | None] = [None]

        def start_wrapper(status_line: str, headers: list[tuple[str, str]],
                          exc_info: Any = None) -> Any:
            status[0] = _status_code(status_line)
            # Flask clears environ["werkzeug.request"] when its request context pops, right
            # after start_response: read the matched rule now.
            route_seen[0] = route_of_environ(environ)
            if exc_info is not None:
                return start_response(status_line, headers, exc_info)
            return start_response(status_line, headers)

        def finish(error: str | None) -> None:
            route = route_seen[0] or route_of_environ(environ)
            if route:
                name_span_route(span, method, route)
            rec.request(method, status[0], route, error, perf_counter() - start, caller)
            span.end(status[0], error)

        token = current_deadline.set(deadline) if deadline is not None else None
        span.attach()
        try:
            result = self.app(environ, start_wrapper)
        except Exception as exc:
            detach_span(span)
            if status[0] is None:
                status[0] = 500
            finish(error_type_of(exc))
            raise
        finally:
            if token is not None:
                current_deadline.reset(token)
        detach_span(span)
        return _Body(result, finish)

    @staticmethod
    def _refuse(start_response: StartResponse, status: int, body: bytes) -> list[bytes]:
        start_response(_REASONS[status], [("Content-Type", "application/json"),
                                          ("Content-Length", str(len(body)))])
        return [body]
