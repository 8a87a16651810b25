"""The optional inbound port: the library's server middleware in front of an app in any
language.

Callers reach the app through ``--inbound-port`` (registered in etcd instead of the app's own
port), and every request passes through ``meshlib.server.asgi.MeshASGIMiddleware``, the very
middleware Python services use: caller identity (``x-mesh-caller``), the access policy of
``--service`` from etcd (403 with the JSON body of ``meshlib.server.common.denied_body``), the
inbound deadline (``x-mesh-timeout``: 504 on arrival when none is left, the forward cancelled
with 504 when it runs out), the SERVER span from the caller's trace context, and
``http.server.request.duration`` with the same labels. Nothing of that is restated here: this
module only adapts the shim's front end to ASGI (``scope``, ``receive``, ``send``) and forwards
the request to the app over the shim's upstream connections.

The forwarded request carries the remaining deadline in ``x-mesh-timeout`` and the server
span's trace context (``--tracing on``; passed through unchanged otherwise), so the app's own
outgoing calls through the shim continue the trace and the budget.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, MutableMapping
from typing import TYPE_CHECKING, Any, Final

from meshlib.context import current_deadline
from meshlib.core.deadline import HTTP_TIMEOUT_HEADER, encode_timeout
from meshlib.server.asgi import MeshASGIMiddleware
from meshlib.shim.request import Request
from meshlib.shim.responder import Responder
from meshlib.shim.safety import strip_hop_by_hop
from meshlib.shim.upstream import UpstreamPool
from meshlib.telemetry.tracing import inject_headers

if TYPE_CHECKING:
    from meshlib.mesh import Mesh
    from meshlib.shim.config import ShimConfig

_TIMEOUT: Final = HTTP_TIMEOUT_HEADER.encode()
_DROP: Final = frozenset({b"content-length", _TIMEOUT})
_CALLER: Final = b"x-mesh-caller"
_XFCC: Final = b"x-forwarded-client-cert"
#: with mesh mTLS the caller fields are the shim's to set (Envoy's
#: ``forward_client_cert_details: SANITIZE_SET``): what the network sent is dropped
_DROP_TLS: Final = _DROP | {_CALLER, _XFCC}
Message = MutableMapping[str, Any]


class InboundProxy:
    """The handler of the inbound port (``FrontServer(handler=inbound.handle)``)."""

    def __init__(self, mesh: Mesh, config: ShimConfig, pool: UpstreamPool) -> None:
        assert config.service and config.app_port  # config._validate checks it
        self.pool = pool
        self.address = config.app_address
        self.port = config.app_port
        self.timeout = config.upstream_connect_timeout
        self.drop = _DROP_TLS if config.inbound_tls() else _DROP
        self.app = MeshASGIMiddleware(self._forward, mesh, service=config.service)

    async def handle(self, req: Request, resp: Responder) -> None:
        path, _, query = req.target.partition(b"?")
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": req.version,
            "method": req.method, "scheme": "http", "path": path.decode("latin-1"),
            "raw_path": path, "query_string": query, "root_path": "",
            "headers": [(n.lower(), v) for n, v in req.headers],
            "shim.request": req,
        }
        if resp.conn.peer_tls is not None:  # a mesh mTLS connection: the verified peer
            scope["extensions"] = {"tls": resp.conn.peer_tls}
        body = req.body
        parts = aiter(body) if body is not None and not body.consumed else None

        async def receive() -> Message:
            if parts is None:
                return {"type": "http.request", "body": b"", "more_body": False}
            try:
                chunk = await anext(parts)
            except StopAsyncIteration:
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                length = None
                headers = []
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-length":
                        length = int(value)
                    else:
                        headers.append((name, value))
                resp.start(int(message["status"]), headers, length, hold=False)
            elif message["type"] == "http.response.body":
                await resp.write(message.get("body", b""))
                if not message.get("more_body"):
                    resp.end()

        await self.app(scope, receive, send)

    async def _forward(self, scope: Any, receive: Any, send: Any) -> None:
        """The ASGI app under the middleware: forward to the app, stream the answer back."""
        req: Request = scope["shim.request"]
        headers = strip_hop_by_hop(req.headers, drop=self.drop)
        if self.drop is _DROP_TLS:
            _caller_fields(scope, req.headers, headers)
        deadline = current_deadline.get()
        if deadline is not None:
            remaining = deadline.remaining(time.monotonic())
            if remaining is not None:
                headers.append((_TIMEOUT, encode_timeout(max(remaining, 0.0)).encode()))
        inject_headers(headers, binary=True)  # the SERVER span (or the caller's context)
        body: bytes | AsyncIterator[bytes]
        if req.body is None or req.body.consumed:
            body = b""
            if req.content_length is not None:
                headers.append((b"Content-Length", b"0"))
        else:
            body = _receive_body(receive)
            if req.content_length is not None:
                headers.append((b"Content-Length", b"%d" % req.content_length))
            else:
                headers.append((b"Transfer-Encoding", b"chunked"))
        up = await self.pool.request(self.address, self.port, req.method, req.target, headers,
                                     body, None)
        try:
            reader = up.reader
            if reader.mode == "none":  # HEAD keeps the length a GET would have had
                out = strip_hop_by_hop(up.headers)
            else:
                out = strip_hop_by_hop(up.headers, drop=frozenset({b"content-length"}))
                if reader.mode == "length":
                    out.append((b"content-length", b"%d" % reader.remaining))
            await send({"type": "http.response.start", "status": up.status, "headers": out})
            async for chunk in up.body():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except BaseException:
            up.conn.abort()
            raise
        up.release()


def _caller_fields(scope: Any, received: list[tuple[bytes, bytes]],
                   headers: list[tuple[bytes, bytes]]) -> None:
    """With mesh mTLS on the inbound port, tell the app who called: ``x-mesh-caller`` is the
    verified peer's service, and ``x-forwarded-client-cert: URI=<SPIFFE ID>`` (the field
    Envoy and Istio give apps) carries its identity. Without a verified peer (clear text or
    no certificate, only reaching here outside ``strict``) the caller's own claim is passed
    on as before, and no ``x-forwarded-client-cert`` is sent."""
    ext = scope.get("extensions")
    tls = ext.get("tls") if ext else None
    service = tls.get("meshlib.peer_service") if tls else None
    if service and tls:
        headers.append((_CALLER, service.encode()))
        headers.append((_XFCC, b"URI=" + str(tls["meshlib.peer_spiffe_id"]).encode()))
        return
    for name, value in received:
        if name.lower() == _CALLER:
            headers.append((_CALLER, value))
            return


async def _receive_body(receive: Any) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body"):
            return
