"""Which requests go through the mesh, and how a call starts (shared by both transports).

A host is a mesh service when the mesh's naming rule says so
(:func:`meshlib.discovery.mesh_names.mesh_service`: a single DNS label such as ``orders``,
or ``orders.<domain>`` for a configured mesh domain; the shim calls the same rule). The
decision is cached per raw host and the cache is dropped when the mesh's domains change
(``MeshNames.generation``). A port in a mesh URL is ignored (the instance's registered port
is used) and ``Host`` is sent as the URL wrote it. Other hosts pass through
(``meshlib.http.outbound``), or are refused with :class:`NotAMeshServiceError` when
``passthrough=False``. A mesh service must be addressed with ``http://``
(:class:`UnsupportedSchemeError` otherwise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import httpx

from meshlib.core.call import CallGen, run_call
from meshlib.core.destination import DestinationState
from meshlib.discovery.mesh_names import mesh_service
from meshlib.http.attempt import CALLER_HEADER, replayable, request_deadline
from meshlib.http.errors import NotAMeshServiceError, UnsupportedSchemeError

if TYPE_CHECKING:
    from meshlib.ports import MeshPort

_NOT_MESH = object()


def is_mesh_host(host: str, domains: tuple[str, ...] = ()) -> bool:
    """Whether ``host`` names a mesh service under ``domains`` (:func:`mesh_service`)."""
    return mesh_service(host, domains) is not None


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
        self._names = mesh.names
        self._generation = self._names.generation
        caller = mesh.service
        self.extra_headers: list[tuple[bytes, bytes]] = (
            [(CALLER_HEADER, caller.encode())] if caller else []
        )

    def route(self, request: httpx.Request) -> Route | None:
        """The request's mesh route, or None to pass it through to plain httpx."""
        raw = request.url.raw_host
        if self._names.generation != self._generation:  # the mesh domains changed
            self._by_host = {}
            self._generation = self._names.generation
        dest = self._by_host.get(raw)
        if dest is None:
            service = self._names.service_of(raw.decode("ascii", "replace"))
            if service is not None:
                dest = Route(self.mesh.destination(service),
                             self.mesh.call_observer("http", service))
            else:
                dest = _NOT_MESH
            self._by_host[raw] = dest
        if dest is _NOT_MESH:
            if not self.passthrough:
                domains = ", ".join(self._names.domains) or "none configured"
                raise NotAMeshServiceError(
                    f"host {request.url.host!r} is not a mesh service (use a service name "
                    "such as http://orders/... or orders.<mesh domain>; mesh domains: "
                    f"{domains}, see docs/http.md 'Mesh names')",
                    service=request.url.host, request=request,
                )
            return None
        if request.url.raw_scheme != b"http":
            # the mesh, not the URL, decides TLS (mtls.mode): an https:// URL would promise
            # encryption that the policy may not give
            service = cast(Route, dest).service
            raise UnsupportedSchemeError(
                f"{request.url.scheme}://{request.url.host}/: mesh service "
                f"{service!r} is reached over plain HTTP in the URL (use "
                f"http://{request.url.host}/...; whether the connection uses mesh mTLS is "
                "the policy's mtls.mode, docs/mtls.md)",
                service=service, request=request,
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
