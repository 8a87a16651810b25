"""The admin port: ``/live``, ``/ready``, ``/metrics``, ``/config``, ``POST /shutdown``.

Served by the same strict front end as the proxy (``frontend.py``), on its own port (loopback
by default), answering small bodies:

* ``GET /live``: 200 while the event loop runs (a liveness probe restarts a wedged shim);
* ``GET /ready``: 200 when etcd is reachable or a snapshot was loaded, and the app is
  registered (when the shim registers one), and the shim is not draining; else 503 with a
  JSON body listing what is missing (``meshlib shim --wait`` and ``meshlib await`` poll it:
  Istio's ``holdApplicationUntilProxyStarts``, linkerd-await);
* ``GET /metrics``: the process's Prometheus registry in the text format (the library's
  families, as every meshlib process exposes them, plus the shim's own);
* ``GET /config``: JSON of the effective configuration, the app's registration, and every
  destination the shim has called with its endpoints, their breaker and ejection state and
  the policy revision in force, plus the gRPC upstream listeners;
* ``POST /shutdown``: 202, then the same drain as SIGTERM (for batch jobs whose sidecar
  would otherwise run forever).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import prometheus_client

from meshlib.shim.request import Request
from meshlib.shim.responder import Responder
from meshlib.telemetry.metrics import MeshMetrics

if TYPE_CHECKING:
    from meshlib.shim.app import Shim


class AdminHandler:
    def __init__(self, shim: Shim) -> None:
        self.shim = shim

    async def handle(self, req: Request, resp: Responder) -> None:
        path = req.target.partition(b"?")[0]
        method = req.method
        if req.body is not None and not req.body.done:
            async for _ in req.body:
                pass
        if path == b"/shutdown":
            if method != "POST":
                await self._json(resp, 405, {"error": "use POST /shutdown"})
                return
            await self._json(resp, 202, {"status": "draining",
                                         "drain_seconds": self.shim.config.drain_seconds})
            self.shim.request_shutdown("POST /shutdown")
            return
        if method not in ("GET", "HEAD"):
            await self._json(resp, 405, {"error": f"{method} not allowed on {path.decode()}"})
            return
        if path == b"/live":
            await self._json(resp, 200, {"live": True})
        elif path == b"/ready":
            missing = self.shim.not_ready()
            await self._json(resp, 503 if missing else 200,
                             {"ready": not missing, "missing": missing})
        elif path == b"/metrics":
            MeshMetrics.default()  # every meshlib family is listed before the first call
            body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
            resp.start(200, [(b"Content-Type", prometheus_client.CONTENT_TYPE_LATEST.encode())],
                       len(body))
            await resp.write(body)
            resp.end()
        elif path == b"/config":
            await self._json(resp, 200, self.shim.describe())
        else:
            await self._json(resp, 404, {"error": "not found", "paths": [
                "/live", "/ready", "/metrics", "/config", "POST /shutdown"]})

    async def _json(self, resp: Responder, status: int, doc: Any) -> None:
        body = json.dumps(doc, indent=1, default=str).encode() + b"\n"
        resp.start(status, [(b"Content-Type", b"application/json")], len(body))
        await resp.write(body)
        resp.end()
