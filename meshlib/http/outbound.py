"""Calls to hosts outside the mesh (passthrough): measured, traced, and stripped of mesh
fields, as a sidecar's passthrough cluster or OpenTelemetry's httpx instrumentation do.

Every such call gets

* one CLIENT span (``tracing.start_outbound_span``: ``server.address`` = host,
  ``server.port``);
* the caller's trace context (``traceparent``, ``tracestate``, ``baggage``) unless the host
  matches a ``no_propagate`` pattern (:mod:`meshlib.config.propagation`; then trace fields
  the application set are removed too);
* the same ``http.client.request.duration`` series as mesh calls, with ``server.address`` =
  the host. Cardinality is bounded process-wide: the first :data:`MAX_OUTBOUND_HOSTS`
  distinct hosts get their own value, later ones are counted under ``_OTHER`` (the
  semantic conventions' overflow value), so a crawler or per-tenant host names cannot grow
  the series without end;
* no ``x-mesh-*`` field (caller identity, deadline: mesh-only; any the application copied
  from an inbound request is removed).

The per-host decisions (label, propagation) are cached per transport, so a call costs a
dict lookup plus the span and the histogram observation.
"""

from __future__ import annotations

import threading
from time import perf_counter
from typing import Any, Final

import httpx

from meshlib.config.propagation import PropagationPolicy
from meshlib.telemetry import semconv as sc
from meshlib.telemetry import tracing
from meshlib.telemetry.recorders import HttpClientRecorder, error_type_of

__all__ = ["MAX_OUTBOUND_HOSTS", "Outbound", "outbound_label"]

#: Distinct non-mesh hosts with their own ``server.address`` value (process-wide).
MAX_OUTBOUND_HOSTS: Final = 100
_CACHE_LIMIT: Final = 4096  # per-transport host cache entries before it is cleared

_labels: dict[str, str] = {}
_labels_lock = threading.Lock()


def outbound_label(host: str) -> str:
    """The ``server.address`` value of ``host``: itself while fewer than
    :data:`MAX_OUTBOUND_HOSTS` hosts were seen in this process, else ``_OTHER``."""
    label = _labels.get(host)
    if label is not None:
        return label
    with _labels_lock:
        if host in _labels or len(_labels) < MAX_OUTBOUND_HOSTS:
            return _labels.setdefault(host, host)
    return sc.OTHER


class _Host:
    """What is decided once per host: its name, recorder and whether context goes to it."""

    __slots__ = ("name", "propagate", "recorder")

    def __init__(self, name: str, recorder: HttpClientRecorder, propagate: bool) -> None:
        self.name = name
        self.recorder = recorder
        self.propagate = propagate


class Outbound:
    """Per transport: ``start(request)`` before the passthrough call, ``end(...)`` after."""

    def __init__(self, policy: PropagationPolicy) -> None:
        self.policy = policy
        self._hosts: dict[bytes, _Host] = {}

    def _host(self, raw: bytes) -> _Host:
        host = self._hosts.get(raw)
        if host is None:
            name = raw.decode("ascii", "replace").lower()
            host = _Host(name, HttpClientRecorder.for_service(outbound_label(name)),
                         self.policy.allows(name))
            if len(self._hosts) >= _CACHE_LIMIT:
                self._hosts = {}
            self._hosts[raw] = host
        return host

    def start(self, request: httpx.Request) -> tuple[_Host, Any, float]:
        """Open the span and rewrite ``request``'s headers (trace context in or out, no
        ``x-mesh-*``); returns what :meth:`end` needs."""
        url = request.url
        host = self._host(url.raw_host)
        span = tracing.start_outbound_span(host.name, url.port, request.method)
        raw = request.headers.raw
        headers = [h for h in raw if not h[0].lower().startswith(b"x-mesh-")]
        changed = len(headers) != len(raw)
        if host.propagate:
            if span is not tracing.NOOP_ATTEMPT or tracing.state.passthrough:
                span.inject(headers, True)
                changed = True
        else:
            before = len(headers)
            tracing.remove_fields(headers, tracing.TRACE_FIELDS)
            changed = changed or len(headers) != before
        if changed:
            request.headers = httpx.Headers(headers)
        return host, span, perf_counter()

    @staticmethod
    def end(state: tuple[_Host, Any, float], request: httpx.Request,
            response: httpx.Response | None, exc: BaseException | None) -> None:
        """Record the call: its response status, or the error that ended it."""
        host, span, t0 = state
        seconds = perf_counter() - t0
        if response is not None:
            status = response.status_code
            host.recorder.request(request.method, status, None, seconds)
            span.end(status, None)
        else:
            etype = error_type_of(exc) if exc is not None else "_OTHER"
            host.recorder.request(request.method, None, etype, seconds)
            span.end(None, etype)
