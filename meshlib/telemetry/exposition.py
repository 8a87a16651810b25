"""Serve meshlib's metrics in the Prometheus text format.

Thin wrappers over prometheus_client's own exposition (``start_http_server``,
``make_asgi_app``, ``make_wsgi_app``) that differ in two ways: the standalone server binds to
loopback unless told otherwise (a metrics port open on every interface leaks service names
and traffic shape), and with the default registry the meshlib call families are registered
first, so a scrape lists every meshlib family (with no samples yet) before the first call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import REGISTRY, CollectorRegistry

from meshlib.telemetry.metrics import MeshMetrics

__all__ = ["MetricsServer", "metrics_asgi_app", "metrics_wsgi_app", "start_metrics_server"]


def _registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    if registry is None or registry is REGISTRY:
        MeshMetrics.default()
        return REGISTRY
    return registry


@dataclass
class MetricsServer:
    """A running standalone metrics server; ``port`` is the bound port (useful with 0)."""

    server: WSGIServer
    thread: threading.Thread
    addr: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(port: int, addr: str = "127.0.0.1",
                         registry: CollectorRegistry | None = None) -> MetricsServer:
    """Serve ``/metrics`` (any path, in fact) on ``addr:port`` from a daemon thread.

    ``port=0`` picks a free port; ``addr`` defaults to loopback (pass ``"0.0.0.0"`` for a
    scraper on another host); ``registry`` defaults to prometheus_client's process registry,
    with every meshlib family registered first.

    Returns a :class:`MetricsServer`: ``port`` is the bound port (the one chosen when you
    passed 0), ``url`` the scrape URL (``http://127.0.0.1:PORT/metrics``), and ``close()``
    stops the server and releases the port (the thread is a daemon, so a process that never
    calls it still exits).

    >>> srv = start_metrics_server(0)   # doctest: +SKIP
    >>> srv.url                         # doctest: +SKIP
    'http://127.0.0.1:40123/metrics'
    >>> srv.close()                     # doctest: +SKIP
    """
    server, thread = prometheus_client.start_http_server(port, addr=addr,
                                                         registry=_registry(registry))
    return MetricsServer(server, thread, addr, server.server_port)


def metrics_asgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """An ASGI app answering scrapes; mount it at ``/metrics``."""
    return prometheus_client.make_asgi_app(registry=_registry(registry))


def metrics_wsgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """A WSGI app answering scrapes; mount it at ``/metrics``."""
    return prometheus_client.make_wsgi_app(registry=_registry(registry))
