"""Named gRPC upstream listeners: ``--upstream orders=15101``.

grpcio can neither read ``:authority`` on a server (grpc#38906) nor set it per call
(grpc#12400), so a gRPC app cannot name its destination the way an HTTP app sends ``Host``.
As in Consul Connect (``upstreams``: one local port per destination service), the shim opens
one local port per upstream service; a stub pointed at ``127.0.0.1:15101`` reaches ``orders``
through the mesh, whatever services and methods ``orders`` serves.

Each listener is a ``grpc.aio`` server with one generic handler answering every method with a
``stream_stream`` behaviour without serializers (raw bytes; :mod:`meshlib.shim.grpc_forward`
forwards the call) and an :class:`~meshlib.grpc.aio.AioMeshChannel` to the service, created
on the shim's event loop. The 4 MiB default message limit of grpcio is lifted on both legs
(``max_message_bytes``, default unlimited: the app and the upstream keep their own limits,
and the shim holds one message at a time). The channel never goes through ``grpc_proxy`` /
``http_proxy`` from the environment (``grpc.enable_http_proxy`` 0): an app that points
``HTTP_PROXY`` at the shim must not make the shim loop through itself.

Usage: from blocking code (the shim's main thread) :func:`start_upstream` starts a listener
on the shared gRPC loop thread (:mod:`meshlib.shim.grpc_loop`) and returns an
:class:`UpstreamHandle`; on a running loop of one's own::

    up = await start_grpc_upstream(mesh, "orders", 15101)
    ...
    await up.stop(grace=5.0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from meshlib.discovery.keys import check_service_name
from meshlib.shim.grpc_forward import DEFAULT_UNARY_WINDOW, CallForwarder
from meshlib.shim.grpc_loop import GrpcLoop, shared_loop

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

__all__ = ["GrpcUpstream", "UpstreamHandle", "parse_upstream", "start_grpc_upstream",
           "start_upstream"]


def parse_upstream(spec: str, *, where: str = "--upstream") -> tuple[str, int]:
    """``"orders=15101"`` -> ``("orders", 15101)``; a ``ValueError`` naming ``where`` and the
    bad value otherwise."""
    service, sep, port_text = spec.partition("=")
    service = service.strip()
    port_text = port_text.strip()
    if not sep or not service or not port_text:
        raise ValueError(f"{where} {spec!r}: expected SERVICE=PORT, e.g. orders=15101")
    try:
        check_service_name(service)
    except ValueError as exc:
        raise ValueError(f"{where} {spec!r}: bad service name {service!r} ({exc})") from None
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{where} {spec!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{where} {spec!r}: port {port} is outside 0..65535")
    return service, port


class _AnyMethod(grpc.GenericRpcHandler):
    """Every method of every gRPC service: one raw-bytes ``stream_stream`` behaviour."""

    def __init__(self, forwarder: CallForwarder) -> None:
        self._forwarder = forwarder
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            forward = self._forwarder.handle

            async def behaviour(requests: Any, context: Any) -> None:
                await forward(method, requests, context)

            handler = grpc.stream_stream_rpc_method_handler(behaviour)
            if len(self._handlers) < 1024:
                self._handlers[method] = handler
        return handler


class GrpcUpstream:
    """A local port forwarding every gRPC method to mesh service ``service``.

    ``port`` 0 picks a free port (read :attr:`port` after :meth:`start`). ``host`` is the
    bind address (loopback by default: the shim is not an open proxy). ``unary_window``: see
    :mod:`meshlib.shim.grpc_forward` (shape detection). ``channel_options``: extra grpcio
    channel arguments of the upstream leg."""

    def __init__(self, mesh: Mesh, service: str, port: int = 0, *, host: str = "127.0.0.1",
                 max_message_bytes: int | None = None,
                 unary_window: float = DEFAULT_UNARY_WINDOW,
                 channel_options: list[tuple[str, Any]] | None = None) -> None:
        check_service_name(service)
        if max_message_bytes is not None and max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes: must be > 0 (or None: unlimited), "
                             f"got {max_message_bytes!r}")
        self.mesh = mesh
        self.service = service
        self.host = host
        self.requested_port = port
        self.port = port
        self.unary_window = unary_window
        limit = -1 if max_message_bytes is None else max_message_bytes
        self._limits = [("grpc.max_receive_message_length", limit),
                        ("grpc.max_send_message_length", limit)]
        self._channel_options = [*self._limits, ("grpc.enable_http_proxy", 0),
                                 *(channel_options or ())]
        self.channel: Any = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> GrpcUpstream:
        """Bind and serve (on the running loop); raises ``OSError`` naming the port when it
        cannot be bound."""
        if self._server is not None:
            return self
        self.channel = self.mesh.async_grpc_channel(self.service, options=self._channel_options)
        forwarder = CallForwarder(self.channel, unary_window=self.unary_window)
        server = grpc.aio.server(options=[*self._limits, ("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((_AnyMethod(forwarder),))
        address = f"[{self.host}]" if ":" in self.host else self.host
        try:
            self.port = server.add_insecure_port(f"{address}:{self.requested_port}")
        except RuntimeError as exc:
            await self.channel.close()
            self.channel = None
            raise OSError(f"gRPC upstream {self.service}: cannot listen on "
                          f"{self.host}:{self.requested_port} ({exc})") from exc
        await server.start()
        self._server = server
        return self

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let calls in flight finish for ``grace`` seconds, then
        cancel the rest and close the upstream channel."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
        if self.channel is not None:
            channel, self.channel = self.channel, None
            await channel.close()

    def describe(self) -> dict[str, Any]:
        """What ``/config`` shows of this listener."""
        return {"service": self.service, "protocol": "grpc", "address": self.host,
                "port": self.port, "listening": self._server is not None}


async def start_grpc_upstream(mesh: Mesh, service: str, port: int = 0,
                              **options: Any) -> GrpcUpstream:
    """Start a :class:`GrpcUpstream` on the running event loop and return it."""
    return await GrpcUpstream(mesh, service, port, **options).start()


class UpstreamHandle:
    """A :class:`GrpcUpstream` running on the shared gRPC loop, driven from blocking code."""

    def __init__(self, spec: Any, upstream: GrpcUpstream, loop: GrpcLoop) -> None:
        self.spec = spec
        self.upstream = upstream
        self._loop = loop

    @property
    def port(self) -> int:
        return self.upstream.port

    def describe(self) -> dict[str, Any]:
        return self.upstream.describe()

    def stop(self, grace: float) -> None:
        """Stop accepting calls, let calls in flight finish within ``grace`` seconds, then
        cancel them (blocking)."""
        self._loop.run(self.upstream.stop(grace), timeout=grace + 10.0)


def start_upstream(mesh: Mesh, spec: Any, config: Any = None) -> UpstreamHandle:
    """Start the listener of ``spec`` (``service``, ``port``, ``bind``) on the shared gRPC
    loop and return when it listens. ``config.grpc_max_message_bytes`` (if given) is the
    message limit of both legs. ``OSError`` when the port cannot be bound."""
    limit = getattr(config, "grpc_max_message_bytes", None)
    upstream = GrpcUpstream(mesh, spec.service, spec.port,
                            host=getattr(spec, "bind", "127.0.0.1"),
                            max_message_bytes=limit or None)
    loop = shared_loop()
    loop.run(upstream.start(), timeout=30.0)
    return UpstreamHandle(spec, upstream, loop)
