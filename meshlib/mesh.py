"""``Mesh``: the facade of meshlib, one per process.

It owns the etcd connection, the watch thread, the snapshot store and the registrations,
and hands out what the application uses: snapshots, httpx clients and gRPC channels whose
calls read the store without locks. The drivers behind those clients use only the seven
members declared by :class:`meshlib.ports.MeshPort`; ``Mesh`` is the one implementation.

Threads: one watch thread (all watched prefixes multiplexed on one etcd Watch stream) and
one keepalive thread per registration. Sync and asyncio users share them; the async
``async_wait_for`` is woken from the watch thread with ``loop.call_soon_threadsafe``, and
``aclose`` runs the blocking part of ``close`` (lease revocation, joining the watch thread)
in a worker thread so that the event loop keeps running.

Signals: a library does not take over its host's SIGTERM unasked (gRPC, httpx, the
OpenTelemetry SDK and Finagle's clients install no signal handler either; the process's
owner, e.g. TwitterServer, uvicorn or gunicorn, does). ``close()`` runs at interpreter exit
(``atexit``), which covers ``sys.exit``, the end of ``main`` and Ctrl-C; a process killed by
a plain SIGTERM leaves its records until their lease TTL expires. ``Mesh(handle_sigterm=True)``
opts in to a handler that deregisters first and then defers to the previous handler (or
exits with status 143), for programs that own their process and have no handler of their
own: the demo, the sidecar.
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
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

import httpx

from meshlib.config import DEFAULT_POLICY
from meshlib.core.destination import DestinationState
from meshlib.core.endpoints import Endpoint, ServiceSnapshot
from meshlib.core.endpoints import Protocol as EndpointProtocol
from meshlib.discovery.etcd_client import EtcdClient
from meshlib.discovery.keys import DEFAULT_PREFIX, KeyLayout, check_service_name
from meshlib.discovery.mesh_names import ENV_DOMAINS, MeshNames, parse_domains
from meshlib.discovery.registration import Registration
from meshlib.discovery.store import SnapshotStore
from meshlib.discovery.watch import WatchManager
from meshlib.identity.mesh_hook import close_identity, start_identity
from meshlib.identity.source import IdentitySource
from meshlib.ports import CallKind, MeshPort, SnapshotListener
from meshlib.telemetry import metrics

if TYPE_CHECKING:
    import pybreaker

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
    """The process-wide entry point (a facade over discovery, policies, clients, telemetry).

    >>> mesh = Mesh("127.0.0.1:2379", service="gateway")              # doctest: +SKIP
    >>> reg = mesh.register("orders", 8080, labels={"version": "v1"})  # doctest: +SKIP
    >>> mesh.wait_for("orders").endpoints                              # doctest: +SKIP
    >>> with mesh.http_client() as http:                               # doctest: +SKIP
    ...     http.get("http://orders/api/orders/42")

    Sync and async: a method that blocks has an ``async_`` twin for asyncio code
    (``wait_for`` / ``async_wait_for``), and a factory of asyncio objects carries the same
    prefix (``async_http_client`` gives an ``httpx.AsyncClient``, ``async_grpc_channel`` a
    ``grpc.aio``-style channel). The one exception is ``aclose``, the name Python's own
    protocols use (``contextlib.aclosing``, async generators, ``httpx.AsyncClient``).
    ``with Mesh(...)`` and ``async with Mesh(...)`` close the mesh on exit.

    Deprecated names (kept for one release; they warn with ``DeprecationWarning``):
    ``aio_grpc_channel`` (now ``async_grpc_channel``), ``endpoints`` (now ``etcd_endpoints``).

    Attributes:
        etcd_endpoints: the etcd addresses in use (``host:port`` strings).
        layout: the :class:`~meshlib.discovery.keys.KeyLayout` of this mesh's prefix: the
            etcd key of anything (``mesh.layout.policy_key("orders")``); docs/etcd-layout.md.
        client: the :class:`~meshlib.discovery.etcd_client.EtcdClient` the mesh talks to
            etcd with (``get``, ``put``, ``delete``, ``get_prefix``; retried, with
            ``etcd_timeout``), for tools and tests that write policies:
            ``mesh.client.put(mesh.layout.policy_key("orders"), text)``.
        store: the :class:`~meshlib.discovery.store.SnapshotStore` the watch thread publishes
            into. ``store.get(service)`` reads a snapshot without starting a watch (None:
            discovery has not answered for it yet); ``store.services()`` lists the known
            services. Applications read ``snapshot`` and ``add_listener`` instead.
        service: this process's own service name (the caller identity), or None.
        zone: this process's zone, or None.
        breaker_listeners: the pybreaker listeners told of breaker transitions.
    """

    etcd_endpoints: list[str]
    layout: KeyLayout
    client: EtcdClient
    store: SnapshotStore
    service: str | None
    zone: str | None
    breaker_listeners: list[pybreaker.CircuitBreakerListener]

    def __init__(
        self,
        etcd: str | Sequence[str] | None = None,
        *,
        prefix: str | None = None,
        zone: str | None = None,
        service: str | None = None,
        snapshot_path: str | None = None,
        snapshot_interval: float = 1.0,
        etcd_timeout: float = 5.0,
        progress_interval: float = 1.0,
        handle_sigterm: bool = False,
        breaker_listeners: Sequence[pybreaker.CircuitBreakerListener] = (),
        domains: Sequence[str] | str | None = None,
        identity: bool | IdentitySource = False,
        trust_domain: str | None = None,
        identity_timeout: float = 15.0,
    ) -> None:
        """Connect to etcd (lazily: nothing here waits for it) and start the watch thread.

        Args:
            etcd: etcd client endpoints, as ``"host:port"``, a comma-separated string of
                them or a sequence; default ``MESHLIB_ETCD_ENDPOINTS``, else
                ``127.0.0.1:2379``. With several members a dead one is skipped.
            prefix: the key prefix every key lives under (docs/etcd-layout.md); default
                ``MESHLIB_PREFIX``, else ``/meshlib/v1``. Meshes that should see each other
                share it; tests use a fresh one each.
            zone: this process's zone. Instances it registers get it unless ``register`` says
                otherwise, and calls prefer instances of the same zone while enough of them
                are healthy (docs/http.md, "Zones").
            service: this process's own service name. Clients send it as the caller identity
                (``x-mesh-caller``) that destinations' access policies check, and the server
                middleware uses it as its own name; None: anonymous caller.
            snapshot_path: a JSON file the mesh reads at start and rewrites (off the watch
                thread, atomically) after etcd changes a watched service, so that a process
                started while etcd is down can still route (docs/discovery.md); None: no file.
            snapshot_interval: at most one snapshot file write per this many seconds (and a
                last one at close).
            etcd_timeout: seconds one etcd request may take, retries included, before it
                fails (registration, reads and writes through ``client``).
            progress_interval: seconds between the watch stream's liveness questions; one
                unanswered for max(interval, 1 s) means the endpoint hung: the stream moves to
                the next endpoint (docs/discovery.md). Raise it (5-10 s) for thousands of
                clients (docs/scaling.md).
            handle_sigterm: install a SIGTERM handler that closes every live mesh
                (deregistering its instances at once) and then calls the handler that was in
                place before, or exits with status 143 when there was none. Default False: a
                library leaves its host's signals alone; ``close()`` still runs at exit
                (``atexit``), and a host with its own handler calls ``close()`` from it. Set
                it in a program that owns its process and has no handler. Only the main
                thread can install it (elsewhere it is skipped with a warning); a handler the
                host installs later replaces it.
            breaker_listeners: ``pybreaker.CircuitBreakerListener`` objects told of every
                breaker transition of every endpoint this mesh calls (``state_change``);
                ``breakers(service)`` returns the mirrored breakers.
            domains: mesh domains: with ``["mesh"]``, ``http://orders.mesh/`` is the service
                ``orders`` (single labels such as ``http://orders/`` always are); see
                ``meshlib.discovery.mesh_names`` and docs/http.md "Mesh names". Default
                ``MESHLIB_MESH_DOMAINS`` (comma-separated), else the etcd key
                ``{prefix}/defaults/domains`` (watched: an operator sets it once for every
                process), else none. An argument or the variable wins over the key.
            identity: ``True``: get and rotate a certificate for ``service`` from the mesh
                signer (``mesh.identity``, docs/security.md; waits up to ``identity_timeout``
                s for the first one, else raises ``IdentityUnavailable``); or an
                ``IdentitySource`` to use; default False (no identity).
            trust_domain: the SPIFFE trust domain; default ``MESHLIB_TRUST_DOMAIN``, else
                ``meshlib.local``.
        """
        self.etcd_endpoints = resolve_endpoints(etcd)
        self.layout = KeyLayout(prefix or os.environ.get(ENV_PREFIX, DEFAULT_PREFIX))
        self.zone = zone
        self.service = service
        self._names = _initial_names(domains)
        self.client = EtcdClient(self.etcd_endpoints, timeout=etcd_timeout)
        self.store = SnapshotStore(
            self.layout, snapshot_path=snapshot_path, snapshot_interval=snapshot_interval
        )
        self._watcher = WatchManager(
            self.client, progress_interval=progress_interval, on_state=self._on_etcd_state
        )
        metrics.track_staleness(self._watcher)
        self._watched: dict[str, object] = {}
        self._watch_lock = threading.Lock()
        self._registrations: list[Registration] = []
        self._destinations: dict[str, DestinationState] = {}
        self.breaker_listeners = list(breaker_listeners)
        self.store.add_listener(self._on_snapshot)
        self._closed = False
        self._close_lock = threading.RLock()  # re-entrant: SIGTERM may arrive inside close()
        self._close_done = threading.Event()
        self._default_watch = self._watcher.watch_prefix(
            self.layout.default_policy_key, self._on_default_reset, self._on_default_events
        )
        self._domains_watch = None
        if self._names.source == "default":  # neither argument nor variable: the etcd key
            self._domains_watch = self._watcher.watch_prefix(
                self.layout.domains_key, self._on_domains_reset, self._on_domains_events
            )
        _live_meshes.add(self)
        self._owns_identity = identity is True
        self.identity: IdentitySource | None = None
        try:
            self.identity = start_identity(self, identity, trust_domain, identity_timeout)
        except BaseException:
            self.close()
            raise
        if handle_sigterm:
            _install_sigterm_handler()

    # --- deprecated names (one release) --------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        """Deprecated: ``etcd_endpoints`` (these are etcd's addresses, not a service's)."""
        _deprecated("Mesh.endpoints", "Mesh.etcd_endpoints")
        return self.etcd_endpoints

    # --- etcd state ------------------------------------------------------------------------
    def _on_etcd_state(self, connected: bool) -> None:
        metrics.ETCD_CONNECTED.set(1 if connected else 0)

    @property
    def connected(self) -> bool:
        """Whether the watch stream to etcd is up now."""
        return bool(self._watcher.connected)

    @property
    def staleness(self) -> float | None:
        """Seconds since etcd last answered the watch stream (None: never yet)."""
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

    @property
    def names(self) -> MeshNames:
        """Which hosts are mesh services: ``mesh.names.service_of("orders.mesh")`` and the
        current ``mesh.names.domains`` (``domains`` argument; etcd key ``defaults/domains``)."""
        return self._names

    def _on_domains_reset(self, kvs: list[Any], revision: int) -> None:
        match = [kv for kv in kvs if kv.key == self.layout.domains_key]
        self._apply_domains(match[0].value if match else None)

    def _on_domains_events(self, events: list[Any], revision: int) -> None:
        for etype, kv in events:
            if kv.key == self.layout.domains_key:
                self._apply_domains(None if etype == "delete" else kv.value)

    def _apply_domains(self, value: bytes | str | None) -> None:
        """A new value of the domains key (None: deleted). An invalid value is refused with a
        warning naming the key, and the last valid domains stay (like a refused policy)."""
        key = self.layout.domains_key
        if value is None:
            self._names.set((), "default")
            return
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        try:
            domains = parse_domains(text, key)
        except ValueError as exc:
            log.warning("%s; keeping mesh domains %s", exc, list(self._names.domains))
            return
        self._names.set(domains, key)

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

    def breakers(self, service: str) -> dict[str, pybreaker.CircuitBreaker]:
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

    def http_client(self, *, passthrough: bool = True,
                    no_propagate: Sequence[str] | str | None = None,
                    **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` whose transport is the mesh: ``client.get("http://orders/x")``.

        ``kwargs`` go to ``httpx.Client``; the transport settings among them (``verify``,
        ``cert``, ``limits``, ``http1``, ``http2``, ``proxy``) also build the transport of
        calls to hosts outside the mesh (``passthrough``), and ``proxy`` applies to those
        only. ``no_propagate``: host patterns that get no trace context
        (``meshlib.config.propagation``; default ``MESHLIB_NO_PROPAGATE``)."""
        from meshlib.http import MeshTransport

        kwargs.setdefault("trust_env", False)  # a proxy from the environment would bypass us
        options = _passthrough_options(kwargs)
        return httpx.Client(transport=MeshTransport(
            self, passthrough=passthrough, passthrough_options=options,
            no_propagate=no_propagate), **kwargs)

    def async_http_client(self, *, passthrough: bool = True,
                          no_propagate: Sequence[str] | str | None = None,
                          **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` whose transport is the mesh (arguments as for
        ``http_client``)."""
        from meshlib.http import AsyncMeshTransport

        kwargs.setdefault("trust_env", False)
        options = _passthrough_options(kwargs)
        return httpx.AsyncClient(transport=AsyncMeshTransport(
            self, passthrough=passthrough, passthrough_options=options,
            no_propagate=no_propagate), **kwargs)

    def grpc_channel(self, service: str, **options: Any) -> MeshChannel:
        """A ``grpc.Channel`` to ``service`` through the mesh: ``OrdersStub(mesh.grpc_channel("orders"))``.

        ``options``: see :class:`meshlib.grpc.MeshChannel` (``options=[(arg, value)]`` channel
        arguments, ``compression``, ``drain_timeout``, ``health_check``, ``observer``)."""
        from meshlib.grpc import MeshChannel

        return MeshChannel(self, service, **options)

    def async_grpc_channel(self, service: str, **options: Any) -> AioMeshChannel:
        """A ``grpc.aio.Channel`` to ``service`` through the mesh (create it on its event loop):
        ``OrdersStub(mesh.async_grpc_channel("orders"))``; ``options`` as for ``grpc_channel``."""
        from meshlib.grpc import AioMeshChannel

        return AioMeshChannel(self, service, **options)

    def aio_grpc_channel(self, service: str, **options: Any) -> AioMeshChannel:
        """Deprecated: ``async_grpc_channel`` (one ``async_`` prefix for every asyncio variant)."""
        _deprecated("Mesh.aio_grpc_channel", "Mesh.async_grpc_channel")
        return self.async_grpc_channel(service, **options)

    # --- registration ----------------------------------------------------------------------
    def register(
        self,
        service: str,
        port: int,
        *,
        address: str = "127.0.0.1",
        protocol: EndpointProtocol = "http",
        zone: str | None = None,
        labels: dict[str, str] | None = None,
        weight: int = 100,
        metadata: dict[str, Any] | None = None,
        ttl: float = 10.0,
        instance_id: str | None = None,
        wait: bool = True,
        tls: bool = False,
    ) -> Registration:
        """Register an instance of ``service`` at ``address:port`` on an etcd lease of ``ttl``
        seconds, kept alive from a thread and restored after a lease loss; returns the handle
        (a context manager; ``close()`` deregisters, as does closing the mesh).

        ``protocol`` is how callers reach it (``"http"`` or ``"grpc"``); ``zone`` defaults to
        the mesh's; ``labels`` select subsets in policies; ``weight`` (1-10000 in practice)
        scales its share under weighted balancers; ``metadata`` is free-form JSON stored in the
        record; ``instance_id`` defaults to ``address-port-<random>``. With ``wait`` the call
        waits up to twice ``etcd_timeout`` for the record to be written, and logs a warning
        (and keeps trying) when it is not. ``tls``: the instance serves mesh mTLS (its
        record advertises it, docs/mtls.md)."""
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
            protocol=protocol,
            zone=zone if zone is not None else self.zone,
            weight=weight,
            labels=dict(labels or {}),
            metadata=dict(metadata or {}),
            key=key,
            tls=tls,
        )
        reg = Registration(self.client, key, ep, ttl)
        self._registrations.append(reg)
        if wait and not reg.wait_registered(timeout=self.client.timeout * 2):
            log.warning("%s not registered yet (etcd unreachable?); will keep trying", key)
        return reg

    # --- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Deregister every instance (revoke its lease), stop the watch thread and close the
        etcd connection. Idempotent and thread-safe: a second caller waits for the first.
        Blocks (up to a few seconds when etcd is slow or down); from asyncio code use
        ``await mesh.aclose()``. Clients and channels handed out stop seeing updates."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            try:
                for reg in self._registrations:
                    reg.close()
                close_identity(self.identity, self._owns_identity)
                self._watcher.close()
                self.store.close()  # the last snapshot file write, if one is pending
                self.client.close()
            finally:
                _live_meshes.discard(self)
                self._close_done.set()

    async def aclose(self) -> None:
        """``close()`` for asyncio code: the blocking work runs in a worker thread
        (``asyncio.to_thread``), so the event loop keeps serving while leases are revoked.
        Cancelling the caller does not stop the close, which completes in its thread."""
        if self._close_done.is_set():
            return
        await asyncio.shield(asyncio.to_thread(self.close))

    @property
    def closed(self) -> bool:
        """Whether ``close()`` (or ``aclose()``) has started."""
        return self._closed

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (f"<Mesh etcd={','.join(self.etcd_endpoints)} prefix={self.layout.prefix!r} "
                f"service={self.service!r}{state}>")

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Mesh:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


#: ``httpx.Client`` arguments that configure its transport (httpx builds none when a
#: transport is given, so the mesh builds the passthrough transport with them).
_TRANSPORT_OPTIONS = ("verify", "cert", "limits", "http1", "http2", "trust_env")


def _passthrough_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The transport settings among ``httpx.Client`` ``kwargs``. ``proxy`` is taken out of
    ``kwargs``: httpx would mount it for every URL, sending mesh calls past the mesh."""
    options = {k: kwargs[k] for k in _TRANSPORT_OPTIONS if k in kwargs}
    if kwargs.get("proxy") is not None:
        options["proxy"] = kwargs.pop("proxy")
    return options


def _initial_names(domains: Sequence[str] | str | None) -> MeshNames:
    """Mesh domains from the argument, else the environment; else none until the etcd key
    answers (source ``default``)."""
    if domains is not None:
        return MeshNames(parse_domains(domains, "Mesh(domains=...)"), "argument")
    env = os.environ.get(ENV_DOMAINS)
    if env is not None and env.strip():
        return MeshNames(parse_domains(env, ENV_DOMAINS), ENV_DOMAINS)
    return MeshNames()


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in meshlib 0.2; use {new}",
                  DeprecationWarning, stacklevel=3)


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
    """Deregister on SIGTERM (then defer to the previous handler or exit 143). Installed at
    most once per process, and only by ``Mesh(handle_sigterm=True)``."""
    global _sigterm_installed
    if _sigterm_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        log.warning("Mesh(handle_sigterm=True) outside the main thread: no SIGTERM handler "
                    "installed (signal.signal works only there); call close() on shutdown")
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
