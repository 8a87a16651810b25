"""Active health checking with the gRPC health protocol (``grpc.health.v1.Health/Check``).

When a service's policy has ``health_check.enabled``, one background thread per destination
(shared by all of a mesh's channels to it) checks every endpoint each ``interval`` with a
``timeout``; after ``unhealthy_threshold`` consecutive failed checks the endpoint is skipped by
the balancer until a check passes again (gRPC A17 client-side health checking; Envoy active
health checking's ``unhealthy_threshold``). A check passes when the server answers SERVING,
or UNIMPLEMENTED (no health service: gRPC A17 treats it as healthy rather than failing every
endpoint of a server that never offered the protocol).

Verdicts go through the core's one public entry for outside health checks:
``HealthRegistry.mark_unhealthy(key, until)`` holds an unhealthy endpoint out of traffic at
least one interval ahead (renewed by every failed round), ``mark_healthy(key)`` lifts the hold
when a check passes; breaker and ejection transitions keep the hold in force
(``meshlib.core.health``).

grpcio-health-checking is not a dependency, so the two messages are encoded by hand (the
protobuf wire format, ``grpc/health/v1/health.proto``): ``HealthCheckRequest{string service
= 1}`` and ``HealthCheckResponse{ServingStatus status = 1}`` with SERVING = 1.
:func:`add_health_servicer` registers a minimal server side the same way (tests, examples).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from meshlib.core.destination import DestinationState
from meshlib.grpc.pool import channel_options

if TYPE_CHECKING:
    from meshlib.ports import MeshPort

log = logging.getLogger("meshlib.grpc.health")

CHECK_METHOD = "/grpc.health.v1.Health/Check"
SERVICE_NAME = "grpc.health.v1.Health"
UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN = 0, 1, 2, 3


# --------------------------------------------------------------------------- wire format


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def encode_request(service: str = "") -> bytes:
    raw = service.encode()
    return b"\x0a" + _varint(len(raw)) + raw if raw else b""


def decode_request(buf: bytes) -> str:
    return _string_field(buf)


def encode_response(status: int) -> bytes:
    return b"\x08" + _varint(status) if status else b""


def decode_response(buf: bytes) -> int:
    """The ``status`` field of a ``HealthCheckResponse`` (unknown fields skipped)."""
    i = 0
    status = UNKNOWN
    while i < len(buf):
        tag, i = _read_varint(buf, i)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
            if field == 1:
                status = value
        elif wire == 2:
            n, i = _read_varint(buf, i)
            i += n
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"HealthCheckResponse: unsupported wire type {wire}")
    return status


def _string_field(buf: bytes) -> str:
    i = 0
    while i < len(buf):
        tag, i = _read_varint(buf, i)
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            n, i = _read_varint(buf, i)
            if field == 1:
                return buf[i:i + n].decode()
            i += n
        elif wire == 0:
            _, i = _read_varint(buf, i)
        else:
            i += 8 if wire == 1 else 4
    return ""


def _identity(b: bytes) -> bytes:
    return b


def add_health_servicer(server: Any, status: Callable[[str], int]) -> None:
    """Serve ``grpc.health.v1.Health/Check`` on a grpcio (sync) server; ``status(service)``
    returns SERVING / NOT_SERVING / SERVICE_UNKNOWN."""

    def check(request: bytes, context: Any) -> bytes:
        return encode_response(status(decode_request(request)))

    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Check": grpc.unary_unary_rpc_method_handler(
            check, request_deserializer=_identity, response_serializer=_identity),
    })
    server.add_generic_rpc_handlers((handler,))


# --------------------------------------------------------------------------- the monitor


class HealthMonitor:
    """Checks one destination's endpoints while its policy enables it (a daemon thread)."""

    _registry: dict[int, HealthMonitor] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def for_destination(cls, mesh: MeshPort, dest: DestinationState,
                        options: Any = None) -> HealthMonitor:
        """The shared monitor of ``dest`` (reference counted; call :meth:`release`)."""
        with cls._registry_lock:
            mon = cls._registry.get(id(dest))
            if mon is None:
                mon = cls._registry[id(dest)] = cls(mesh, dest, options)
            mon._refs += 1
        return mon

    def __init__(self, mesh: MeshPort, dest: DestinationState, options: Any = None) -> None:
        self._dest = dest
        self._options = channel_options(options)
        self._refs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._channels: dict[str, tuple[str, Any]] = {}
        self.failures: dict[str, int] = {}
        self.unhealthy: set[str] = set()
        self.rounds = 0
        self._remove = mesh.add_listener(self._on_snapshot)
        self._maybe_start()

    def _config(self) -> Any:
        return self._dest.plan().policy.health_check

    def _on_snapshot(self, service: str, _snap: Any) -> None:
        if service == self._dest.service:
            self._maybe_start()

    def _maybe_start(self) -> None:
        if self._thread is not None or self._stop.is_set():
            return
        try:
            enabled = bool(self._config().enabled)
        except Exception:  # no policy yet
            return
        if enabled:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name=f"meshlib-health-{self._dest.service}",
                        daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            cfg = self._config()
            if cfg.enabled:
                try:
                    self.check_once(float(cfg.timeout), int(cfg.unhealthy_threshold),
                                    float(cfg.interval))
                except Exception:
                    log.exception("service %r: health check round failed", self._dest.service)
            else:
                self._clear()
            self._stop.wait(float(cfg.interval))

    def check_once(self, timeout: float, threshold: int, interval: float) -> None:
        """One round: check every current endpoint concurrently and apply the results."""
        dest = self._dest
        plan = dest.plan()
        eps = plan.snapshot.endpoints
        alive = {e.key for e in eps}
        for key in [k for k in self._channels if k not in alive]:
            self._channels.pop(key)[1].close()
            self.failures.pop(key, None)
            self.unhealthy.discard(key)
        pending = []
        for ep in eps:
            entry = self._channels.get(ep.key)
            if entry is None or entry[0] != ep.authority:
                if entry is not None:
                    entry[1].close()
                ch = grpc.insecure_channel(ep.authority, options=self._options)
                entry = self._channels[ep.key] = (ep.authority, ch)
            mc = entry[1].unary_unary(CHECK_METHOD, request_serializer=_identity,
                                      response_deserializer=_identity)
            pending.append((ep, mc.future(encode_request(""), timeout=timeout)))
        until = time.monotonic() + timeout + 1.0
        for ep, fut in pending:
            ok = self._passed(fut, max(0.0, until - time.monotonic()))
            self._apply(ep.key, ok, threshold, interval + timeout)
        self.rounds += 1

    @staticmethod
    def _passed(fut: Any, wait: float) -> bool:
        try:
            return decode_response(fut.result(timeout=wait)) == SERVING
        except grpc.RpcError as err:
            return bool(err.code() == grpc.StatusCode.UNIMPLEMENTED)
        except Exception:
            return False

    def _apply(self, key: str, ok: bool, threshold: int, hold: float) -> None:
        health = self._dest.health
        if ok:
            self.failures[key] = 0
            if key in self.unhealthy:
                self.unhealthy.discard(key)
                health.mark_healthy(key)
                log.info("service %r: endpoint %s passes health checks again",
                         self._dest.service, key)
            return
        n = self.failures[key] = self.failures.get(key, 0) + 1
        if n < threshold:
            return
        if health.get(key) is None:
            return
        health.mark_unhealthy(key, self._dest.now() + hold)
        if key not in self.unhealthy:
            self.unhealthy.add(key)
            log.warning("service %r: endpoint %s failed %d health check(s); skipping it",
                        self._dest.service, key, n)

    def _clear(self) -> None:
        for key in list(self.unhealthy):
            self._apply(key, True, 1, 0.0)

    def release(self) -> None:
        with self._registry_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            self._registry.pop(id(self._dest), None)
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._remove()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        for _, ch in self._channels.values():
            ch.close()
        self._channels.clear()
