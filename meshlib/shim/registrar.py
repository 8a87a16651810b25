"""Registering the app the shim runs beside, gated by a health check.

The app is registered (``Mesh.register``: a record on a lease, kept alive, restored after a
lease loss) only while its health check passes, so the app may start before or after the
shim and callers never see an instance that cannot answer (Consul's agent checks, Kubernetes
readiness). The state machine, checked every ``health_interval``:

* unregistered -> registered after ``health_passes`` consecutive passed checks;
* registered -> unregistered (lease revoked: the record disappears at once, callers stop
  routing within one watch event) after ``health_failures`` consecutive failed checks.

Checks (each bounded by ``health_timeout``):

* ``http``: ``GET health_path`` with ``Host: <service>`` and ``Connection: close``; a
  2xx or 3xx status passes (Kubernetes' httpGet probe rule);
* ``tcp``: a TCP connect passes;
* ``grpc``: ``grpc.health.v1.Health/Check`` (service ``""``) answering SERVING; the
  messages are those of ``meshlib.grpc.health`` (no grpcio-health-checking dependency);
* ``none``: the app is registered at once and never checked.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from meshlib.shim.metrics import ShimMetrics

if TYPE_CHECKING:
    from meshlib.discovery.registration import Registration
    from meshlib.mesh import Mesh
    from meshlib.shim.config import ShimConfig

log = logging.getLogger("meshlib.shim")


async def check_http(host: str, port: int, path: str, service: str, timeout: float) -> bool:
    from meshlib.http.wire import parse_head, take_head

    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: meshlib-shim-health\r\n"
                         b"Connection: close\r\n\r\n" % (path.encode(), service.encode()))
            buf = bytearray()
            while True:
                head = take_head(buf, False)
                if head is not None:
                    status = parse_head(head)[0]
                    return 200 <= status < 400
                data = await reader.read(4096)
                if not data:
                    return False
                buf += data
    except (OSError, TimeoutError, ValueError, Exception):
        return False
    finally:
        if writer is not None:
            writer.close()


async def check_tcp(host: str, port: int, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            _r, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def _check_grpc_blocking(host: str, port: int, timeout: float) -> bool:
    import grpc

    from meshlib.grpc.health import CHECK_METHOD, decode_response, encode_request

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as ch:
        call = ch.unary_unary(CHECK_METHOD)
        try:
            reply = call(encode_request(""), timeout=timeout, wait_for_ready=False)
        except grpc.RpcError:
            return False
        return decode_response(reply) == 1


async def check_grpc(host: str, port: int, timeout: float) -> bool:
    try:
        return await asyncio.to_thread(_check_grpc_blocking, host, port, timeout)
    except Exception:
        return False


class AppRegistrar:
    """Runs the health check loop and keeps the registration in step with it."""

    def __init__(self, mesh: Mesh, config: ShimConfig) -> None:
        self.mesh = mesh
        self.config = config
        self.kind = config.health_kind()
        self.registration: Registration | None = None
        self.passes = 0
        self.failures = 0
        self.last_ok: bool | None = None
        self.checks = 0
        self.stopped = False
        self._task: asyncio.Task[None] | None = None

    @property
    def registered(self) -> bool:
        reg = self.registration
        return reg is not None and reg.registered

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "service": cfg.service, "address": cfg.app_address, "port": cfg.app_port,
            "registered_port": cfg.inbound_port or cfg.app_port,
            "protocol": cfg.protocol, "health": self.kind, "last_check_ok": self.last_ok,
            "checks": self.checks, "registered": self.registered,
            "key": self.registration.key if self.registration is not None else None,
        }

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def check(self) -> bool:
        cfg = self.config
        host, port = cfg.app_address, cfg.app_port
        assert port is not None
        if self.kind == "http":
            return await check_http(host, port, cfg.health_path, cfg.service or "",
                                    cfg.health_timeout)
        if self.kind == "tcp":
            return await check_tcp(host, port, cfg.health_timeout)
        if self.kind == "grpc":
            return await check_grpc(host, port, cfg.health_timeout)
        return True

    async def _run(self) -> None:
        cfg = self.config
        while not self.stopped:
            ok = await self.check()
            self.checks += 1
            if ok != self.last_ok:
                log.info("health check of %s:%s (%s): %s", cfg.app_address, cfg.app_port,
                         self.kind, "pass" if ok else "fail")
            self.last_ok = ok
            if ok:
                self.passes += 1
                self.failures = 0
                if self.registration is None and self.passes >= cfg.health_passes \
                        and not self.stopped:
                    await self._register()
            else:
                self.failures += 1
                self.passes = 0
                if self.registration is not None and self.failures >= cfg.health_failures:
                    log.warning("deregistering %s: %d failed health checks", cfg.service,
                                self.failures)
                    await self.deregister()
            if self.kind == "none":
                return
            await asyncio.sleep(cfg.health_interval)

    async def _register(self) -> None:
        cfg = self.config
        assert cfg.service and cfg.app_port
        # with an inbound port, callers come through it (server metrics, access policy)
        port = cfg.inbound_port or cfg.app_port
        self.registration = await asyncio.to_thread(
            self.mesh.register, cfg.service, port, address=cfg.app_address,
            protocol=cfg.protocol, zone=cfg.zone, labels=dict(cfg.labels), ttl=cfg.ttl,
            instance_id=cfg.instance_id, wait=False, tls=cfg.inbound_tls())
        ShimMetrics.get().registered.set(1)

    async def deregister(self) -> None:
        reg, self.registration = self.registration, None
        if reg is not None:
            ShimMetrics.get().registered.set(0)
            await asyncio.to_thread(reg.close)

    async def stop(self) -> None:
        """Stop checking and deregister (the first step of a drain)."""
        self.stopped = True
        if self._task is not None:
            self._task.cancel()
        await self.deregister()
