"""The shim process: start-up order, readiness, and the drain on SIGTERM.

Start (each step stops the shim with an error naming the flag when it fails):

1. ``Mesh`` (etcd client, watch thread; ``--snapshot`` loads what a previous run knew, so a
   shim restarted while etcd is down routes at once);
2. gRPC upstream listeners (``--upstream``, ``meshlib.shim.grpc_proxy``);
3. the outbound HTTP port, the optional inbound port, the admin port;
4. the app's registration loop (``registrar.py``): registered once its health check passes.

``/ready`` turns 200 when etcd answered (or a snapshot was loaded) and the app is registered.

Shutdown (SIGTERM, SIGINT or ``POST /shutdown``), in the order that loses no request:

1. ``/ready`` answers 503 and the app is deregistered (lease revoked: the record disappears
   and callers' watches drop the instance within milliseconds);
2. for ``drain_seconds`` every listener keeps serving in-flight *and new* requests (callers
   that have not seen the deregistration yet, the app's own outgoing calls), answering with
   ``Connection: close`` so clients reconnect elsewhere; idle keep-alive connections are
   closed at once;
3. gRPC upstream listeners stop (1 s grace), the listeners close, the mesh closes; exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from meshlib.shim.admin import AdminHandler
from meshlib.shim.config import ConfigError, ShimConfig
from meshlib.shim.frontend import FrontServer, Limits
from meshlib.shim.outbound import OutboundProxy
from meshlib.shim.process import tune_gc
from meshlib.shim.registrar import AppRegistrar
from meshlib.shim.upstream import UpstreamPool

log = logging.getLogger("meshlib.shim")


class Shim:
    """One shim process (``Shim(config).run()`` blocks until it has drained)."""

    def __init__(self, config: ShimConfig) -> None:
        self.config = config
        self.mesh: Any = None
        self.outbound: FrontServer | None = None
        self.inbound: FrontServer | None = None
        self.admin: FrontServer | None = None
        self.proxy: OutboundProxy | None = None
        self.pool: UpstreamPool | None = None
        self.registrar: AppRegistrar | None = None
        self.upstreams: list[Any] = []
        self.server_tls: Any = None  # meshlib.tls.ServerTLS of the inbound port (mTLS)
        self.draining = False
        self.started_at = time.time()
        self._stop: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------- running
    def run(self) -> int:
        """Run on uvloop until drained; returns the exit status."""
        import uvloop

        return uvloop.run(self.main())

    async def main(self) -> int:
        await self.start()
        assert self._stop is not None
        await self._stop.wait()
        await self.drain()
        return 0

    async def start(self) -> None:
        cfg = self.config
        loop = self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        _configure_tracing(cfg.tracing)
        from meshlib.mesh import Mesh

        self.mesh = await asyncio.to_thread(
            Mesh, cfg.etcd, prefix=cfg.prefix, zone=cfg.zone, service=cfg.service,
            snapshot_path=cfg.snapshot, handle_sigterm=False,
            identity=cfg.identity == "on", trust_domain=cfg.trust_domain)
        if cfg.upstreams:
            from meshlib.shim import grpc_proxy  # type: ignore[attr-defined]

            for spec in cfg.upstreams:
                try:
                    handle = await asyncio.to_thread(grpc_proxy.start_upstream, self.mesh,
                                                     spec, cfg)
                except OSError as exc:
                    raise ConfigError(f"--upstream {spec.service}={spec.port}: cannot listen "
                                      f"on {spec.bind}:{spec.port}: {exc.strerror or exc}"
                                      ) from None
                self.upstreams.append(handle)
        self.pool = UpstreamPool(max_idle=cfg.max_idle_per_endpoint,
                                 idle_timeout=cfg.upstream_idle_timeout,
                                 connect_timeout=cfg.upstream_connect_timeout)
        limits = Limits(cfg.max_head_bytes, cfg.max_header_fields, cfg.max_body_bytes,
                        cfg.head_timeout, cfg.client_idle_timeout)
        self.proxy = OutboundProxy(self.mesh, cfg, self.pool)
        self.outbound = FrontServer(self.proxy.handle, limits, loop)
        await _listen(self.outbound, cfg.bind, cfg.port, "--port")
        if cfg.inbound_port:
            from meshlib.shim.inbound import InboundProxy

            inbound = InboundProxy(self.mesh, cfg, self.pool)
            if cfg.inbound_tls():
                from meshlib.tls import ServerTLS

                self.server_tls = ServerTLS(self.mesh.identity)
            self.inbound = FrontServer(inbound.handle, limits, loop, name="inbound",
                                       tls=self.server_tls)
            await _listen(self.inbound, cfg.bind, cfg.inbound_port, "--inbound-port")
        self.admin = FrontServer(AdminHandler(self).handle, Limits(head_timeout=5.0), loop,
                                 name="admin")
        await _listen(self.admin, cfg.bind, cfg.admin_port, "--admin-port")
        if cfg.registers():
            self.registrar = AppRegistrar(self.mesh, cfg)
            self.registrar.start()
        if cfg.bind not in ("127.0.0.1", "::1", "localhost"):
            log.warning("--bind %s: the shim's ports are reachable from the network, not only "
                        "by the app beside it", cfg.bind)
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_shutdown, sig.name)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests)
                pass
        log.info("meshlib shim: outbound %s:%d, admin %s:%d%s", cfg.bind, cfg.port, cfg.bind,
                 cfg.admin_port,
                 f", inbound {cfg.bind}:{cfg.inbound_port}" if cfg.inbound_port else "")
        tune_gc()

    def request_shutdown(self, why: str = "") -> None:
        """Start the drain (safe from signal handlers on the loop); asked again while
        draining (a second Ctrl-C), end the drain period at once."""
        if self._stop is not None and self._stop.is_set():
            if self._hurry is not None and not self._hurry.is_set():
                log.info("shim: %s again: ending the drain now", why)
                self._hurry.set()
            return
        if self._stop is not None:
            log.info("shim: shutting down (%s): deregistering, draining %.1fs", why,
                     self.config.drain_seconds)
            self.draining = True
            self._stop.set()

    async def drain(self) -> None:
        self.draining = True
        if self.registrar is not None:
            await self.registrar.stop()
        for srv in (self.outbound, self.inbound):
            if srv is not None:
                srv.start_drain()
        assert self._hurry is not None
        try:
            await asyncio.wait_for(self._hurry.wait(), self.config.drain_seconds)
        except TimeoutError:
            pass
        for handle in self.upstreams:
            try:
                await asyncio.to_thread(handle.stop, 1.0)
            except Exception:
                log.exception("stopping gRPC upstream listener failed")
        for srv in (self.outbound, self.inbound, self.admin):
            if srv is not None:
                await srv.close()
        if self.pool is not None:
            self.pool.close()
        if self.proxy is not None:
            self.proxy.close()
        if self.server_tls is not None:
            self.server_tls.close()
        if self.mesh is not None:
            await asyncio.to_thread(self.mesh.close)

    # ---------------------------------------------------------------- admin views
    def not_ready(self) -> list[str]:
        """What keeps the shim from being ready (empty: ready)."""
        missing = []
        if self.draining:
            missing.append("draining")
        mesh = self.mesh
        if mesh is None:
            missing.append("starting")
            return missing
        if not mesh.connected and not mesh.store.services():
            missing.append("etcd not reachable and no snapshot loaded")
        identity = getattr(mesh, "identity", None)
        if identity is not None:  # cryptography (~12 MB RSS) is imported only when used
            from meshlib.identity.readiness import identity_problems

            missing.extend(identity_problems(identity))
        reg = self.registrar
        if reg is not None and not reg.registered:
            missing.append(f"app {self.config.service!r} not registered (last health check: "
                           f"{'none yet' if reg.last_ok is None else reg.last_ok})")
        return missing

    def describe(self) -> dict[str, Any]:
        from meshlib.core.health import CLOSED

        mesh = self.mesh
        dests: dict[str, Any] = {}
        if self.proxy is not None and mesh is not None:
            for name, route in list(self.proxy.routes.items()):
                snap = mesh.snapshot(name)
                slots = route.dest.health.slots
                now = route.dest.now()
                eps = []
                for ep in snap.endpoints:
                    slot = slots.get(ep.key)
                    eps.append({
                        "instance": ep.instance_id, "address": ep.address, "port": ep.port,
                        "zone": ep.zone, "labels": dict(ep.labels), "weight": ep.weight,
                        "breaker": slot.state if slot is not None else CLOSED,
                        "ejected": bool(slot is not None and slot.ejected_until > now),
                    })
                dests[name] = {"endpoints": eps, "policy_revision": snap.policy_revision,
                               "revision": snap.revision, "from_snapshot_file": snap.from_cache}
        return {
            "config": self.config.public(),
            "etcd_connected": bool(mesh is not None and mesh.connected),
            "draining": self.draining,
            "app": self.registrar.describe() if self.registrar is not None else None,
            "destinations": dests,
            "upstreams": [h.describe() for h in self.upstreams],
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }


async def _listen(server: FrontServer, host: str, port: int, flag: str) -> None:
    try:
        await server.listen(host, port)
    except OSError as exc:
        raise ConfigError(f"{flag} {port}: cannot listen on {host}:{port}: "
                          f"{exc.strerror or exc}") from None


def _configure_tracing(mode: str) -> None:
    from meshlib.telemetry import tracing

    if mode == "passthrough":
        # nothing to do: the app's traceparent/tracestate/baggage are forwarded as received
        # (the shim copies end-to-end fields), with no per-request propagation work
        return
    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        raise ConfigError("--tracing on: needs the opentelemetry-sdk package "
                          "(pip install opentelemetry-sdk)") from None
    provider = TracerProvider()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    except ImportError:
        log.warning("--tracing on: opentelemetry-exporter-otlp is not installed; spans are "
                    "made and propagated but not exported")
    tracing.configure(tracer_provider=provider, propagate_without_sdk=True)
