"""Every Prometheus series meshlib exports, defined in one place.

Names follow the OpenTelemetry semantic conventions in Prometheus form where a
convention exists; mesh-specific series use the ``meshlib_`` namespace. The full list,
with labels and meaning, is in docs/metrics.md. Series are registered once per process
on prometheus_client's default registry (several ``Mesh`` objects in one process share
them), and labelled children are created when a service is first seen, never per call.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

from prometheus_client import Counter, Gauge

# --- discovery / control plane -------------------------------------------------------

ETCD_CONNECTED = Gauge(
    "meshlib_etcd_connected",
    "1 while the discovery watch stream to etcd is healthy, else 0.",
)
ETCD_STALENESS = Gauge(
    "meshlib_etcd_staleness_seconds",
    "Seconds since the last message from etcd on the discovery watch stream "
    "(the age of the routing data in force).",
)
ENDPOINTS = Gauge(
    "meshlib_endpoints",
    "Endpoints known for a destination service in the current snapshot.",
    ["service"],
)
POLICY_REVISION = Gauge(
    "meshlib_policy_revision",
    "etcd mod revision of the service policy in force (0 = defaults only).",
    ["service"],
)
POLICY_REJECTIONS = Counter(
    "meshlib_policy_rejections",
    "Policies read from etcd and refused as invalid (the last good policy stayed in force).",
    ["service"],
)
RECORD_REJECTIONS = Counter(
    "meshlib_instance_record_rejections",
    "Instance records read from etcd and skipped as malformed.",
    ["service"],
)
DISCOVERY_UPDATES = Counter(
    "meshlib_discovery_updates",
    "Snapshots swapped in for a destination service (endpoints or policy changed).",
    ["service"],
)

# Staleness is computed at scrape time from the live discovery loops of this process.
_staleness_sources: weakref.WeakSet[object] = weakref.WeakSet()


def track_staleness(source: object) -> None:
    """Register an object with a ``last_contact`` (monotonic seconds, or None) attribute."""
    _staleness_sources.add(source)


def _staleness() -> float:
    now = time.monotonic()
    ages = []
    for src in list(_staleness_sources):
        last = getattr(src, "last_contact", None)
        if last is not None:
            ages.append(now - last)
    return max(ages) if ages else 0.0


ETCD_STALENESS.set_function(_staleness)


def cached_children(metric: Gauge | Counter) -> Callable[[str], object]:
    """Return ``get(service)`` that creates a labelled child once and caches it."""
    cache: dict[str, object] = {}

    def get(service: str) -> object:
        child = cache.get(service)
        if child is None:
            child = cache[service] = metric.labels(service)
        return child

    return get
