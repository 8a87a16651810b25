"""Every Prometheus series meshlib exports, defined in one place.

Names, labels and buckets are spelled once, in :mod:`meshlib.telemetry.semconv` (OpenTelemetry
semantic conventions in Prometheus form where a convention exists; mesh-specific series use the
``meshlib_`` namespace); this module turns those specs into prometheus_client families. The
full list, with labels and meaning, is in docs/metrics.md. Series are registered once per
process on prometheus_client's default registry (several ``Mesh`` objects in one process share
them), and labelled children are created when a service is first seen, never per call.

* The discovery / control-plane series are module globals, created at import on the default
  registry (``meshlib.discovery.store`` and ``meshlib.mesh`` use them directly).
* The call series (durations, retries, breakers, ...) live on a :class:`MeshMetrics`: one set
  of families bound to one registry. :meth:`MeshMetrics.default` is the process-wide instance
  on the default registry; tests pass their own ``CollectorRegistry``. Drivers do not touch
  families: they use the recorders of :mod:`meshlib.telemetry.recorders`.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from meshlib.telemetry import semconv
from meshlib.telemetry.fasthist import FastHistogram
from meshlib.telemetry.semconv import Family


def make_family(spec: Family, registry: CollectorRegistry | None = REGISTRY) -> Any:
    """Create the family for ``spec`` on ``registry``: a prometheus_client ``Counter`` or
    ``Gauge``; histograms (all of them per-call durations) are a
    :class:`~meshlib.telemetry.fasthist.FastHistogram`, which exports the same series as
    ``prometheus_client.Histogram`` at a fraction of the cost per observation."""
    labels = list(spec.labels)
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, labels, registry=registry)
    if spec.kind == "histogram":
        return FastHistogram(spec.name, spec.help, labels,
                             spec.buckets or Histogram.DEFAULT_BUCKETS, registry=registry)
    raise ValueError(f"metric family {spec.name!r}: unknown kind {spec.kind!r}")


# --- discovery / control plane -------------------------------------------------------

ETCD_CONNECTED: Gauge = make_family(semconv.ETCD_CONNECTED)
ETCD_STALENESS: Gauge = make_family(semconv.ETCD_STALENESS)
ENDPOINTS: Gauge = make_family(semconv.ENDPOINTS)
POLICY_REVISION: Gauge = make_family(semconv.POLICY_REVISION)
POLICY_REJECTIONS: Counter = make_family(semconv.POLICY_REJECTIONS)
RECORD_REJECTIONS: Counter = make_family(semconv.RECORD_REJECTIONS)
DISCOVERY_UPDATES: Counter = make_family(semconv.DISCOVERY_UPDATES)

WATCH_STREAMS_OPENED: Counter = make_family(semconv.WATCH_STREAMS_OPENED)
WATCH_RELISTS: Counter = make_family(semconv.WATCH_RELISTS)
WATCH_SILENCE: Gauge = make_family(semconv.WATCH_SILENCE)
LEASES_LOST: Counter = make_family(semconv.LEASES_LOST)
LEASE_GRANTS: Counter = make_family(semconv.LEASE_GRANTS)
SNAPSHOT_FILE_WRITES: Counter = make_family(semconv.SNAPSHOT_FILE_WRITES)
SNAPSHOT_FILE_WRITE_DURATION: Any = make_family(semconv.SNAPSHOT_FILE_WRITE_DURATION)
IDENTITY_CERT_EXPIRY: Gauge = make_family(semconv.IDENTITY_CERT_EXPIRY)
IDENTITY_RENEWALS: Counter = make_family(semconv.IDENTITY_RENEWALS)
SIGNER_REQUESTS: Counter = make_family(semconv.SIGNER_REQUESTS)
SIGNER_ACTIVE: Gauge = make_family(semconv.SIGNER_ACTIVE)

# Counters whose label values form a closed set are exported at 0 from the start, so a rate()
# or an alert on them has a series before the first event (Prometheus naming/instrumentation
# practice: "initialise labelled metrics with known label values").
for _reason in semconv.WATCH_OPEN_REASONS:
    WATCH_STREAMS_OPENED.labels(_reason)
for _reason in semconv.LEASE_LOSS_REASONS:
    LEASES_LOST.labels(_reason)
for _kind in semconv.LEASE_GRANT_KINDS:
    LEASE_GRANTS.labels(_kind)
for _result in semconv.SNAPSHOT_WRITE_RESULTS:
    SNAPSHOT_FILE_WRITES.labels(_result)
SNAPSHOT_FILE_WRITE_DURATION.labels()
MTLS_REFUSED: Counter = make_family(semconv.MTLS_REFUSED)
for _side in ("client", "server"):
    for _reason in semconv.MTLS_REFUSED_REASONS:
        MTLS_REFUSED.labels(_side, _reason)

_DISCOVERY_GLOBALS: dict[str, MetricWrapperBase] = {
    semconv.WATCH_STREAMS_OPENED.name: WATCH_STREAMS_OPENED,
    semconv.WATCH_RELISTS.name: WATCH_RELISTS,
    semconv.WATCH_SILENCE.name: WATCH_SILENCE,
    semconv.LEASES_LOST.name: LEASES_LOST,
    semconv.LEASE_GRANTS.name: LEASE_GRANTS,
    semconv.SNAPSHOT_FILE_WRITES.name: SNAPSHOT_FILE_WRITES,
    semconv.SNAPSHOT_FILE_WRITE_DURATION.name: SNAPSHOT_FILE_WRITE_DURATION,
    semconv.ETCD_CONNECTED.name: ETCD_CONNECTED,
    semconv.ETCD_STALENESS.name: ETCD_STALENESS,
    semconv.ENDPOINTS.name: ENDPOINTS,
    semconv.POLICY_REVISION.name: POLICY_REVISION,
    semconv.POLICY_REJECTIONS.name: POLICY_REJECTIONS,
    semconv.RECORD_REJECTIONS.name: RECORD_REJECTIONS,
    semconv.DISCOVERY_UPDATES.name: DISCOVERY_UPDATES,
    semconv.IDENTITY_CERT_EXPIRY.name: IDENTITY_CERT_EXPIRY,
    semconv.IDENTITY_RENEWALS.name: IDENTITY_RENEWALS,
    semconv.SIGNER_REQUESTS.name: SIGNER_REQUESTS,
    semconv.SIGNER_ACTIVE.name: SIGNER_ACTIVE,
    semconv.MTLS_REFUSED.name: MTLS_REFUSED,
}

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


def track_watch_stream(source: object, endpoint: str, previous: str = "") -> None:
    """Export the silence of ``source``'s stream (``last_contact``, monotonic seconds) under
    ``endpoint``, computed at scrape time; drop the series of ``previous`` when it moved."""
    if previous and previous != endpoint:
        untrack_watch_stream(previous)
    ref = weakref.ref(source)

    def age() -> float:
        src = ref()
        last = getattr(src, "last_contact", None) if src is not None else None
        return 0.0 if last is None else time.monotonic() - last

    WATCH_SILENCE.labels(endpoint).set_function(age)


def untrack_watch_stream(endpoint: str) -> None:
    try:
        WATCH_SILENCE.remove(endpoint)
    except KeyError:
        pass


def cached_children(metric: Gauge | Counter) -> Callable[[str], object]:
    """Return ``get(service)`` that creates a labelled child once and caches it."""
    cache: dict[str, object] = {}

    def get(service: str) -> object:
        child = cache.get(service)
        if child is None:
            child = cache[service] = metric.labels(service)
        return child

    return get


# --- call series -------------------------------------------------------------------------


class MeshMetrics:
    """Every meshlib family, bound to one registry.

    ``MeshMetrics()`` / :meth:`default` use the process default registry (the discovery
    series are the module globals above; the call series are registered on first use, once
    per process). ``MeshMetrics(CollectorRegistry())`` builds a private copy of every family,
    for tests and for embedding several isolated meshes in one process.
    """

    _default: MeshMetrics | None = None
    _default_lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry
        if self.registry is REGISTRY and MeshMetrics._default is not None:
            raise ValueError(
                "meshlib call series are already registered on the default registry: "
                "use MeshMetrics.default(), or pass a fresh CollectorRegistry"
            )
        self.families: dict[str, Any] = {}
        for spec in semconv.DISCOVERY_FAMILIES:
            if self.registry is REGISTRY:
                self.families[spec.name] = _DISCOVERY_GLOBALS[spec.name]
            else:
                self.families[spec.name] = make_family(spec, self.registry)
        if self.registry is not REGISTRY:
            self.families[semconv.ETCD_STALENESS.name].set_function(_staleness)
        for spec in semconv.CALL_FAMILIES:
            self.families[spec.name] = make_family(spec, self.registry)
        #: Recorder cache used by meshlib.telemetry.recorders: (kind, key) -> recorder.
        self.recorders: dict[tuple[str, str], Any] = {}
        self.recorders_lock = threading.RLock()

    def family(self, spec: Family) -> Any:
        return self.families[spec.name]

    @classmethod
    def default(cls) -> MeshMetrics:
        """The process-wide instance on prometheus_client's default registry."""
        inst = cls._default
        if inst is None:
            with cls._default_lock:
                inst = cls._default
                if inst is None:
                    inst = cls._default = cls(None)
        return inst
