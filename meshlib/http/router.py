"""Which requests go through the mesh, and how a call starts (shared by both transports).

A host is a mesh service when it is a single DNS label (``orders``; no dots, not
``localhost``, not an IP literal). Other hosts pass through to a plain httpx transport, or are
refused with :class:`NotAMeshServiceError` when ``passthrough=False``. A mesh service must be
addressed with ``http://`` (:class:`UnsupportedSchemeError` otherwise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import httpx

from meshlib.core.call import CallGen, run_call
from meshlib.core.destination import DestinationState
from meshlib.discovery.keys import is_service_name
from meshlib.http.attempt import CALLER_HEADER, replayable, request_deadline
from meshlib.http.errors import NotAMeshServiceError, UnsupportedSchemeError

if TYPE_CHECKING:
    from meshlib.ports import MeshPort

_NOT_MESH = object()


def is_mesh_host(host: str) -> bool:
    """A single DNS label that is a valid service name (see ``keys.check_service_name``)."""
    return host != "localhost" and is_service_name(host)


class Route:
    """What a mesh host resolves to: its call state and its telemetry recorder."""

    __slots__ = ("dest", "recorder", "service")

    def __init__(self, dest: DestinationState, recorder: Any) -> None:
        self.dest = dest
        self.recorder = recorder
        self.service = dest.service


class Router:
    """Host -> :class:`Route` (cached per host: one dict lookup per call)."""

    def __init__(self, mesh: MeshPort, passthrough: bool) -> None:
        self.mesh = mesh
        self.passthrough = passthrough
        self._by_host: dict[bytes, Any] = {}
        caller = mesh.service
        self.extra_headers: list[tuple[bytes, bytes]] = (
            [(CALLER_HEADER, caller.encode())] if caller else []
        )

    def route(self, request: httpx.Request) -> Route | None:
        """The request's mesh route, or None to pass it through to plain httpx."""
        raw = request.url.raw_host
        dest = self._by_host.get(raw)
        if dest is None:
            host = raw.decode("ascii", "replace").lower()
            if is_mesh_host(host):
                dest = Route(self.mesh.destination(host), self.mesh.call_observer("http", host))
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
        return cast(Route, dest)

    def start(self, route: Route, request: httpx.Request) -> CallGen:
        """The call plan of ``request`` (``meshlib.core.call.run_call``)."""
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
