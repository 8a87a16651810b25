"""``Mesh``: one per process. Owns the etcd connection, the watch thread, the snapshot
store and the registrations; hands out snapshots (and, in later layers, HTTP clients and
gRPC channels) that read the store without locks.

Threads: one watch thread (all watched prefixes multiplexed on one etcd Watch stream) and
one keepalive thread per registration. Sync and asyncio users share them; the async
``async_wait_for`` is woken from the watch thread with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

import httpx

from meshlib.config import DEFAULT_POLICY
from meshlib.core.destination import DestinationState
from meshlib.core.endpoints import Endpoint, ServiceSnapshot
from meshlib.discovery.etcd_client import EtcdClient
from meshlib.discovery.keys import DEFAULT_PREFIX, KeyLayout, check_service_name
from meshlib.discovery.registration import Registration
from meshlib.discovery.store import SnapshotStore
from meshlib.discovery.watch import WatchManager
from meshlib.ports import CallKind, MeshPort, SnapshotListener
from meshlib.telemetry import metrics

if TYPE_CHECKING:
    from meshlib.grpc import AioMeshChannel, MeshChannel
    from meshlib.telemetry.recorders import HttpClientRecorder, RpcClientRecorder

log = logging.getLogger("meshlib")

ENV_ENDPOINTS = "MESHLIB_ETCD_ENDPOINTS"
ENV_PREFIX = "MESHLIB_PREFIX"
DEFAULT_ENDPOINTS = "127.0.0.1:2379"


class MeshTimeout(TimeoutError):
    """``wait_for`` did not see the requested endpoints in time."""


def resolve_endpoints(etcd: str | Sequence[str] | None) -> list[str]:
    """Endpoints from the argument, else ``MESHLIB_ETCD_ENDPOINTS``, else 127.0.0.1:2379."""
    if etcd is None:
        etcd = os.environ.get(ENV_ENDPOINTS, DEFAULT_ENDPOINTS)
    items = etcd.split(",") if isinstance(etcd, str) else list(etcd)
    out = [e.strip() for e in items if e and e.strip()]
    if not out:
        raise ValueError("no etcd endpoints given")
    return out


class Mesh:
    """The process-wide entry point.

    >>> mesh = Mesh("127.0.0.1:2379")                          # doctest: +SKIP
    >>> reg = mesh.register("orders", 8080, labels={"version": "v1"})  # doctest: +SKIP
    >>> mesh.wait_for("orders").endpoints                       # doctest: +SKIP
    """

    def __init__(
        self,
        etcd: str | Sequence[str] | None = None,
        *,
        prefix: str | None = None,
        zone: str | None = None,
        service: str | None = None,
        snapshot_path: str | None = None,
        etcd_timeout: float = 5.0,
        progress_interval: float = 1.0,
        handle_sigterm: bool = True,
        breaker_listeners: Sequence[Any] = (),
    ) -> None:
        self.endpoints = resolve_endpoints(etcd)
        self.layout = KeyLayout(prefix or os.environ.get(ENV_PREFIX, DEFAULT_PREFIX))
        self.zone = zone
        self.service = service  # this process's own service name (caller identity)
        self.client = EtcdClient(self.endpoints, timeout=etcd_timeout)
        self.store = SnapshotStore(self.layout, snapshot_path=snapshot_path)
        self._watcher = WatchManager(
            self.client, progress_interval=progress_interval, on_state=self._on_etcd_state
        )
        metrics.track_staleness(self._watcher)
        self._watched: dict[str, Any] = {}
        self._watch_lock = threading.Lock()
        self._registrations: list[Registration] = []
        self._destinations: dict[str, DestinationState] = {}
        self.breaker_listeners = list(breaker_listeners)
        self.store.add_listener(self._on_snapshot)
        self._closed = False
        self._default_watch = self._watcher.watch_prefix(
            self.layout.default_policy_key, self._on_default_reset, self._on_default_events
        )
        _live_meshes.add(self)
        if handle_sigterm:
            _install_sigterm_handler()

    # --- etcd state ------------------------------------------------------------------------
    def _on_etcd_state(self, connected: bool) -> None:
        metrics.ETCD_CONNECTED.set(1 if connected else 0)

    @property
    def connected(self) -> bool:
        return bool(self._watcher.connected)

    @property
    def staleness(self) -> float | None:
        last = self._watcher.last_contact
        return None if last is None else time.monotonic() - last

    def _on_default_reset(self, kvs: list[Any], revision: int) -> None:
        match = [kv for kv in kvs if kv.key == self.layout.default_policy_key]
        if match:
            self.store.reset_default_policy(match[0].value, match[0].mod_revision)
        else:
            self.store.reset_default_policy(None, revision)

    def _on_default_events(self, events: list[Any], revision: int) -> None:
        for etype, kv in events:
            if kv.key != self.layout.default_policy_key:
                continue
            if etype == "delete":
                self.store.reset_default_policy(None, revision)
            else:
                self.store.reset_default_policy(kv.value, kv.mod_revision)

    # --- discovery ---------------------------------------------------------------------------
    def watch(self, service: str) -> None:
        """Start watching ``service`` (idempotent). Done implicitly by ``snapshot``/``wait_for``."""
        if service in self._watched:
            return
        check_service_name(service)
        with self._watch_lock:
            if service in self._watched or self._closed:
                return
            self.store.ensure_service(service)
            self._watched[service] = self._watcher.watch_prefix(
                self.layout.service_prefix(service),
                functools.partial(self.store.reset_service, service),
                functools.partial(self.store.apply_events, service),
            )

    def snapshot(self, service: str) -> ServiceSnapshot:
        """The current snapshot of ``service`` (empty until etcd has answered). Lock-free."""
        snap = self.store.get(service)
        if snap is not None and service in self._watched:
            return snap
        self.watch(service)
        return self.store.get(service) or ServiceSnapshot(service, policy=DEFAULT_POLICY)

    def add_listener(self, listener: SnapshotListener) -> Callable[[], None]:
        """Call ``listener(service, snapshot)`` from the watch thread on every swap."""
        return self.store.add_listener(listener)

    def wait_for(
        self, service: str, min_endpoints: int = 1, timeout: float | None = 10.0
    ) -> ServiceSnapshot:
        """Block until ``service`` has at least ``min_endpoints`` endpoints."""
        self.watch(service)

        def ready() -> bool:
            snap = self.store.get(service)
            return snap is not None and len(snap.endpoints) >= min_endpoints

        if not self.store.wait(ready, timeout):
            have = len(self.snapshot(service).endpoints)
            raise MeshTimeout(
                f"service {service!r}: {have} endpoint(s) after {timeout}s, wanted {min_endpoints}"
            )
        return self.snapshot(service)

    async def async_wait_for(
        self, service: str, min_endpoints: int = 1, timeout: float | None = 10.0
    ) -> ServiceSnapshot:
        """``wait_for`` for asyncio code: does not block the event loop."""
        self.watch(service)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> bool:
            snap = self.store.get(service)
            return snap is not None and len(snap.endpoints) >= min_endpoints

        def resolve() -> None:
            if not fut.done():
                fut.set_result(None)

        def wake(_s: str, _snap: ServiceSnapshot) -> None:
            if _s == service and ready():
                loop.call_soon_threadsafe(resolve)

        remove = self.store.add_listener(wake)
        try:
            if not ready():
                try:
                    await asyncio.wait_for(fut, timeout)
                except TimeoutError:
                    have = len(self.snapshot(service).endpoints)
                    raise MeshTimeout(
                        f"service {service!r}: {have} endpoint(s) after {timeout}s, "
                        f"wanted {min_endpoints}"
                    ) from None
        finally:
            remove()
        return self.snapshot(service)

    # --- calls ---------------------------------------------------------------------------------
    def destination(self, service: str) -> DestinationState:
        """Per-destination call state shared by every client of this mesh (HTTP, gRPC)."""
        dest = self._destinations.get(service)
        if dest is None:
            check_service_name(service)
            self.watch(service)
            with self._watch_lock:
                dest = self._destinations.get(service)
                if dest is None:
                    dest = DestinationState(
                        service, functools.partial(self.snapshot, service),
                        lookup=self.store.lookup, zone=self.zone,
                    )
                    dest.breaker_listeners = self.breaker_listeners
                    dest.observer = self.call_observer("http", service)  # policy changes
                    dest.discovery = self._watcher  # "etcd unreachable since" in errors
                    self._sync_endpoint_gauges(service, self.snapshot(service))
                    self._destinations[service] = dest
        return dest

    def _sync_endpoint_gauges(self, service: str, snap: ServiceSnapshot) -> None:
        """Keep the per-state endpoint gauges of a called destination in step with its
        endpoints (watch thread; not on the call path)."""
        from meshlib.telemetry.recorders import HttpClientRecorder

        HttpClientRecorder.for_service(service).sync_endpoints(e.key for e in snap.endpoints)

    def _on_snapshot(self, service: str, snap: ServiceSnapshot) -> None:
        if service in self._destinations:
            self._sync_endpoint_gauges(service, snap)

    def breakers(self, service: str) -> dict[str, Any]:
        """``pybreaker.CircuitBreaker`` mirrors of the endpoints of ``service`` whose breaker
        changed state so far, by endpoint key (only with ``Mesh(breaker_listeners=[...])``)."""
        return dict(self.destination(service).breakers)

    @overload
    def call_observer(self, kind: Literal["http"], service: str) -> HttpClientRecorder: ...
    @overload
    def call_observer(self, kind: Literal["grpc"], service: str) -> RpcClientRecorder: ...
    def call_observer(
        self, kind: CallKind, service: str
    ) -> HttpClientRecorder | RpcClientRecorder:
        """The telemetry recorder of calls of ``kind`` ("http" or "grpc") to ``service``
        (process-wide, one per kind and service); it is also the call plan's observer
        (:class:`meshlib.core.call.CallObserver`: retries, refusals, breaker and ejection
        events)."""
        from meshlib.telemetry.recorders import HttpClientRecorder, RpcClientRecorder

        if kind == "grpc":
            return RpcClientRecorder.for_service(service)
        if kind == "http":
            return HttpClientRecorder.for_service(service)
        raise ValueError(f"call_observer kind must be 'http' or 'grpc', not {kind!r}")

    def http_client(self, *, passthrough: bool = True, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` whose transport is the mesh: ``client.get("http://orders/x")``."""
        from meshlib.http import MeshTransport

        kwargs.setdefault("trust_env", False)  # a proxy from the environment would bypass us
        return httpx.Client(transport=MeshTransport(self, passthrough=passthrough), **kwargs)

    def async_http_client(self, *, passthrough: bool = True, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` whose transport is the mesh."""
        from meshlib.http import AsyncMeshTransport

        kwargs.setdefault("trust_env", False)
        return httpx.AsyncClient(
            transport=AsyncMeshTransport(self, passthrough=passthrough), **kwargs
        )

    def grpc_channel(self, service: str, **options: Any) -> MeshChannel:
        """A ``grpc.Channel`` to ``service`` through the mesh: ``OrdersStub(mesh.grpc_channel("orders"))``.

        ``options``: see :class:`meshlib.grpc.MeshChannel` (``options=[(arg, value)]`` channel
        arguments, ``compression``, ``drain_timeout``, ``health_check``, ``observer``)."""
        from meshlib.grpc import MeshChannel

        return MeshChannel(self, service, **options)

    def aio_grpc_channel(self, service: str, **options: Any) -> AioMeshChannel:
        """A ``grpc.aio.Channel`` to ``service`` through the mesh (create it on its event loop)."""
        from meshlib.grpc import AioMeshChannel

        return AioMeshChannel(self, service, **options)

    # --- registration ----------------------------------------------------------------------
    def register(
        self,
        service: str,
        port: int,
        *,
        address: str = "127.0.0.1",
        protocol: str = "http",
        zone: str | None = None,
        labels: dict[str, str] | None = None,
        weight: int = 100,
        metadata: dict[str, Any] | None = None,
        ttl: float = 10.0,
        instance_id: str | None = None,
        wait: bool = True,
    ) -> Registration:
        """Register an instance of ``service``; returns a handle (context manager)."""
        check_service_name(service)
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', not {protocol!r}")
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"port out of range: {port!r}")
        iid = instance_id or f"{address}-{port}-{uuid.uuid4().hex[:8]}".replace(":", "_")
        key = self.layout.instance_key(service, iid)
        ep = Endpoint(
            service=service,
            instance_id=iid,
            address=address,
            port=int(port),
            protocol=protocol,  # type: ignore[arg-type]
            zone=zone if zone is not None else self.zone,
            weight=weight,
            labels=dict(labels or {}),
            metadata=dict(metadata or {}),
            key=key,
        )
        reg = Registration(self.client, key, ep, ttl)
        self._registrations.append(reg)
        if wait and not reg.wait_registered(timeout=self.client.timeout * 2):
            log.warning("%s not registered yet (etcd unreachable?); will keep trying", key)
        return reg

    # --- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for reg in self._registrations:
            reg.close()
        self._watcher.close()
        self.client.close()
        _live_meshes.discard(self)

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _port(mesh: Mesh) -> MeshPort:
    """Never called: mypy checks here that ``Mesh`` satisfies the drivers' port."""
    return mesh


_live_meshes: weakref.WeakSet[Mesh] = weakref.WeakSet()


def _close_all() -> None:
    for mesh in list(_live_meshes):
        try:
            mesh.close()
        except Exception:
            log.exception("closing mesh at exit failed")


atexit.register(_close_all)
_sigterm_installed = False


def _install_sigterm_handler() -> None:
    """Deregister on SIGTERM (then defer to the previous handler or exit 143)."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        _close_all()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    _sigterm_installed = True
