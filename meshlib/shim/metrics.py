"""The shim's own metric families, next to the library's (which it records through the same
recorders as every meshlib client and server). All start with ``meshlib_shim_`` so that a
comparison with a Python service's exposition can leave them out.

* ``meshlib_shim_refused_requests_total{reason}``: requests answered by the shim itself
  without forwarding: framing and limit rejections (``bad_request``, ``head_too_large``,
  ``body_too_large``, ``head_timeout``, ``http_version``) and destination refusals (the
  ``x-mesh-refused`` kinds: ``ip_literal``, ``not_mesh_service``, ``unknown_service``,
  ``own_port``, ``connect``...);
* ``meshlib_shim_connections{listener}``: open client connections per listener
  (``outbound``, ``inbound``, ``admin``);
* ``meshlib_shim_tunnels``: open upgrade tunnels;
* ``meshlib_shim_app_registered``: 1 while the app is registered in etcd, else 0.
"""

from __future__ import annotations

from typing import Any, Final

from prometheus_client import Counter, Gauge

_REJECT_REASONS: Final = {400: "bad_request", 408: "head_timeout", 413: "body_too_large",
                          431: "head_too_large", 505: "http_version"}


class ShimMetrics:
    """Created once per process (the default registry refuses duplicate families)."""

    _instance: ShimMetrics | None = None

    def __init__(self) -> None:
        self.refused = Counter("meshlib_shim_refused_requests",
                               "Requests the shim answered itself without forwarding them",
                               ["reason"])
        self.connections = Gauge("meshlib_shim_connections",
                                 "Open client connections per shim listener", ["listener"])
        self.tunnels = Gauge("meshlib_shim_tunnels", "Open upgrade (WebSocket) tunnels")
        self.registered = Gauge("meshlib_shim_app_registered",
                                "1 while the app beside the shim is registered in etcd")
        self._refused: dict[str, Any] = {}

    @classmethod
    def get(cls) -> ShimMetrics:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def refuse(self, reason: str) -> None:
        child = self._refused.get(reason)
        if child is None:
            child = self._refused[reason] = self.refused.labels(reason)
        child.inc()

    def rejected(self, status: int) -> None:
        self.refuse(_REJECT_REASONS.get(status, str(status)))
