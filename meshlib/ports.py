"""The port between the drivers and the process's mesh: what a driver needs of ``Mesh``.

Drivers (the httpx transports, the gRPC channels and their channel pool and health monitor,
the server middleware and interceptors, the shim) use seven members of
:class:`meshlib.mesh.Mesh` and nothing else. :class:`MeshPort` declares them, so that

* the drivers are typed against this structural type rather than against the whole facade
  (arrows run from drivers to core; ``Mesh`` satisfies the port without naming it), and
* a transport can be built on anything with these members: a test double over a fixed
  :class:`~meshlib.core.endpoints.ServiceSnapshot`, or a future shim that owns its own
  discovery, without etcd.

This is the "ports and adapters" shape (Cockburn, *Hexagonal Architecture*, 2005): the side
that uses the interface owns it, the facade (``meshlib.mesh``) implements it. It lives beside
``meshlib.core``, not in it, because ``call_observer`` hands out the telemetry recorders the
drivers write to, and ``core`` imports nothing outside itself. ``Mesh`` is checked against it by mypy
(``meshlib.mesh._port``) and by ``tests/unit/test_ports.py``.

Which driver uses what (keep this list true when a driver starts using another member):

=====================  ===========================================================
member                 used by
=====================  ===========================================================
``service``            caller identity header (HTTP, gRPC); server's own name
``destination(s)``     HTTP transports, gRPC channels: the per-destination call state
``call_observer(k,s)`` HTTP transports, gRPC channels: telemetry recorder and plan observer
``add_listener(f)``    gRPC channel pool and active health monitor: endpoint-set changes
``watch(s)``           server middleware: start the watch of its own service early
``snapshot(s)``        server middleware: the access policy of its own service
``names``              HTTP transports, shim: which hosts are mesh services (domains)
=====================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, Protocol, overload, runtime_checkable

if TYPE_CHECKING:
    from meshlib.core.destination import DestinationState
    from meshlib.core.endpoints import ServiceSnapshot
    from meshlib.discovery.mesh_names import MeshNames
    from meshlib.telemetry.recorders import HttpClientRecorder, RpcClientRecorder

__all__ = ["CallKind", "MeshPort", "SnapshotListener"]

#: Which driver family a call observer records for (selects the metric names).
CallKind = Literal["http", "grpc"]

#: ``listener(service, snapshot)``, called from the watch thread on every snapshot swap.
SnapshotListener = Callable[[str, "ServiceSnapshot"], None]


@runtime_checkable
class MeshPort(Protocol):
    """What the drivers need of the process's mesh (implemented by :class:`meshlib.Mesh`).

    ``isinstance(obj, MeshPort)`` checks only that the members exist (``runtime_checkable``);
    mypy checks their signatures.
    """

    @property
    def service(self) -> str | None:
        """This process's own service name (the caller identity), or None when unknown."""
        ...

    @property
    def names(self) -> MeshNames:
        """The mesh's naming rule and current mesh domains (``names.service_of(host)``)."""
        ...

    def destination(self, service: str) -> DestinationState:
        """The call state of ``service`` shared by every driver of this mesh (one per name:
        balancer load, breakers, retry budget, current plan). Starts watching ``service``."""
        ...

    @overload
    def call_observer(self, kind: Literal["http"], service: str) -> HttpClientRecorder: ...
    @overload
    def call_observer(self, kind: Literal["grpc"], service: str) -> RpcClientRecorder: ...
    def call_observer(
        self, kind: CallKind, service: str
    ) -> HttpClientRecorder | RpcClientRecorder:
        """The telemetry recorder for calls of ``kind`` to ``service`` (attempt and request
        series); it is also the call plan's observer (``meshlib.core.call.CallObserver``:
        retries, refusals, breaker and ejection events)."""
        ...

    def add_listener(self, listener: SnapshotListener) -> Callable[[], None]:
        """Call ``listener(service, snapshot)`` on every snapshot swap; returns the remover."""
        ...

    def watch(self, service: str) -> None:
        """Start watching ``service`` (idempotent; returns at once)."""
        ...

    def snapshot(self, service: str) -> ServiceSnapshot:
        """The current snapshot of ``service`` (lock-free; empty until discovery answers)."""
        ...
