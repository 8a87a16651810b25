"""The API every driver records through: one recorder per destination (client) or per process
(server), with one method per thing that happened.

Why recorders and not families: the same outcome must give the same family, label names and
label values on every path (httpx sync/async, gRPC sync/aio, the shim, ASGI/WSGI/gRPC server
layers), and recording must be cheap (the whole mesh overhead budget is ~30 us per call;
prometheus_client's ``labels(...).observe()`` costs ~4.6 us, a cached prometheus_client
child's ``observe()`` ~0.9 us warm and several us cold, a cached
:class:`~meshlib.telemetry.fasthist.FastHistogram` child's ~0.13 us warm, an append folded into the counts at scrape time). So:

* A recorder is created once per destination service (``HttpClientRecorder.for_service``) and
  cached on its :class:`~meshlib.telemetry.metrics.MeshMetrics`; production uses the process
  default registry, tests pass ``metrics=MeshMetrics(CollectorRegistry())``.
* Each labelled family has a small dict cache keyed by the *raw* values the driver passes
  (``(b"GET", 200, "")``). After warm-up a call is one tuple, one ``dict.get`` and one
  ``observe``/``inc``; label normalisation (method -> ``_OTHER``, status -> string,
  ``error_type`` derived from an error status, caps on free-form values) runs only on a miss.
  The hot methods read the cache dict inline (no extra call), and :meth:`ClientRecorder.attempt`
  looks enum outcomes up by identity, because ``Enum.__hash__`` is Python code (~0.1 us).
* Cardinality is bounded twice: free-form label values (route, RPC method, error type, caller)
  are capped per recorder (``semconv.MAX_DISTINCT_VALUES``, then ``_OTHER``), and a cache stops
  growing at ``_MAX_CACHE`` keys (further misses take the slow path, still correct).

``error_type`` follows the semantic conventions: empty when the call succeeded; else the
caller's low-cardinality identifier (``timeout``, an exception class from
:func:`error_type_of`); when the driver passes none and the status is an error (HTTP client
>= 400, HTTP server >= 500, any non-OK gRPC code on the client, the server-error codes on the
server), the status itself.

Breaker and ejection gauges count *endpoints per state* of a destination, never an endpoint
address as a label (instance addresses churn with every restart: unbounded series). Feed
:meth:`ClientRecorder.health_event` the :class:`meshlib.core.health.HealthEvent` values the
health registry returns, and :meth:`ClientRecorder.forget_endpoint` the keys it prunes.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Hashable
from typing import Any, Final

from meshlib.telemetry import semconv as sc
from meshlib.telemetry.metrics import MeshMetrics

__all__ = [
    "ClientRecorder",
    "HttpClientRecorder",
    "HttpServerRecorder",
    "RpcClientRecorder",
    "RpcMethodRecorder",
    "RpcServerRecorder",
    "error_type_of",
    "split_full_method",
]

_MAX_CACHE: Final = 2048
#: gRPC codes that count as errors on the server side (semconv gRPC page).
_GRPC_SERVER_ERRORS: Final = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)

_error_type_cache: dict[type, str] = {}


def error_type_of(exc: BaseException) -> str:
    """``error.type`` for an exception: its fully qualified class name (``httpx.ConnectError``,
    ``TimeoutError`` for builtins), cached per class."""
    cls = type(exc)
    name = _error_type_cache.get(cls)
    if name is None:
        mod = cls.__module__
        name = cls.__qualname__ if mod == "builtins" else f"{mod}.{cls.__qualname__}"
        _error_type_cache[cls] = name
    return name


def split_full_method(full_method: str) -> tuple[str, str]:
    """``"/pkg.Service/Method"`` (gRPC's ``handler_call_details.method``) ->
    ``("pkg.Service", "Method")``; anything else -> ``("_OTHER", "_OTHER")``."""
    parts = full_method.split("/")
    if len(parts) == 3 and not parts[0] and parts[1] and parts[2]:
        return parts[1], parts[2]
    return sc.OTHER, sc.OTHER


def _label(value: object) -> str:
    """An enum (``Outcome.TIMEOUT``) or a plain value as a label string."""
    v = getattr(value, "value", value)
    return v if isinstance(v, str) else str(v)


class _Bounded:
    """At most ``cap`` distinct values pass; the rest become ``_OTHER``."""

    __slots__ = ("cap", "lock", "seen")

    def __init__(self, cap: int = sc.MAX_DISTINCT_VALUES) -> None:
        self.seen: set[str] = set()
        self.cap = cap
        self.lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if not value or value in self.seen:
            return value
        with self.lock:
            if len(self.seen) >= self.cap:
                return sc.OTHER
            self.seen.add(value)
            return value


class _Cache:
    """Raw key -> labelled child; ``miss(key)`` returns the label values for a new key."""

    __slots__ = ("children", "family", "miss")

    def __init__(self, family: Any, miss: Callable[[Any], tuple[str, ...]]) -> None:
        self.family = family
        self.miss = miss
        self.children: dict[Hashable, Any] = {}

    def get(self, key: Hashable) -> Any:
        child = self.children.get(key)
        if child is None:
            child = self.family.labels(*self.miss(key))
            if len(self.children) < _MAX_CACHE:
                self.children[key] = child
        return child


def _cached(metrics: MeshMetrics | None, kind: str, key: str, make: Callable[[MeshMetrics], Any]) -> Any:
    m = metrics if metrics is not None else MeshMetrics.default()
    rec = m.recorders.get((kind, key))
    if rec is None:
        with m.recorders_lock:
            rec = m.recorders.get((kind, key))
            if rec is None:
                rec = m.recorders[(kind, key)] = make(m)
    return rec


# --------------------------------------------------------------------------- clients


class _ClientShared:
    """Mesh-series state of one destination, shared by its HTTP and RPC recorders."""

    def __init__(self, m: MeshMetrics, service: str) -> None:
        svc = service
        self.service = service
        self.attempts = _Cache(
            m.family(sc.CLIENT_ATTEMPT_DURATION),
            lambda k: (svc, sc.attempt_label(k[0]), _label(k[1])),
        )
        self.retries = _Cache(m.family(sc.CLIENT_RETRIES), lambda k: (svc, _label(k)))
        self.refused = _Cache(m.family(sc.CLIENT_RETRIES_REFUSED), lambda k: (svc, _label(k)))
        self.ejections = _Cache(m.family(sc.CLIENT_EJECTIONS), lambda k: (svc, _label(k)))
        self.budget = m.family(sc.CLIENT_BUDGET_EXHAUSTED).labels(svc)
        self.skipped = m.family(sc.CLIENT_EJECTIONS_SKIPPED).labels(svc)
        self.ejected_gauge = m.family(sc.CLIENT_EJECTED).labels(svc)
        self.concurrency = m.family(sc.CLIENT_CONCURRENCY_REJECTED).labels(svc)
        self.no_endpoints = m.family(sc.CLIENT_NO_ENDPOINTS).labels(svc)
        self.breaker_gauges = {
            s: m.family(sc.CLIENT_BREAKER_ENDPOINTS).labels(svc, s) for s in sc.BREAKER_STATES
        }
        self.breaker_transitions = {
            s: m.family(sc.CLIENT_BREAKER_TRANSITIONS).labels(svc, s) for s in sc.BREAKER_STATES
        }
        #: (id(outcome), attempt 1/2/3) -> child, for enum outcomes only (see attempt()).
        self.attempt_ids: dict[tuple[int, int], Any] = {}
        self.lock = threading.Lock()
        self.breaker_state: dict[str, str] = {}
        self.ejected: set[str] = set()


class ClientRecorder:
    """Mesh series of one destination service (attempts, retries, breakers, ejections).

    :class:`HttpClientRecorder` and :class:`RpcClientRecorder` add the call duration; both
    share this state for the same service, so gauges stay consistent across protocols.
    """

    def __init__(self, shared: _ClientShared) -> None:
        self.service = shared.service
        self._shared = shared
        self._attempts = shared.attempts
        self._attempt_ids = shared.attempt_ids
        self._retries = shared.retries
        self._refused = shared.refused
        self._budget = shared.budget

    # -- per attempt / per retry ----------------------------------------------------------

    def attempt(self, attempt: int, outcome: object, seconds: float) -> None:
        """One attempt (1-based number) to one endpoint ended with ``outcome``
        (a :class:`meshlib.core.outcome.Outcome` or its string value)."""
        n = attempt if attempt < 3 else 3
        # Enum members hash through Python-level Enum.__hash__ (~0.1 us); they are
        # singletons that live as long as their class, so they are looked up by identity.
        child = self._attempt_ids.get((id(outcome), n))
        if child is None:
            child = self._attempts.get((n, outcome))
            if isinstance(outcome, enum.Enum) and len(self._attempt_ids) < _MAX_CACHE:
                self._attempt_ids[(id(outcome), n)] = child
        child.observe(seconds)

    def attempt_series(self, attempt: int, outcome: object) -> Any:
        """The histogram child :meth:`attempt` observes for (``attempt``, ``outcome``): a
        driver resolves its common case (first attempt, success) once and observes it
        directly."""
        return self._attempts.get((attempt if attempt < 3 else 3, outcome))

    def retry(self, reason: object) -> None:
        """A retry (or hedge) is starting because the previous attempt ended with ``reason``
        (an ``Outcome`` or a short string such as ``"hedge"``)."""
        self._retries.get(reason).inc()

    def retry_refused(self, reason: str) -> None:
        """A retryable failure was not retried (``meshlib.core.retry.FailReason`` value);
        ``budget_exhausted`` also counts in ``meshlib_client_retry_budget_exhausted_total``."""
        self._refused.get(reason).inc()
        if reason == "budget_exhausted":
            self._budget.inc()

    def budget_exhausted(self) -> None:
        """Shorthand for ``retry_refused("budget_exhausted")``."""
        self.retry_refused("budget_exhausted")

    def no_endpoints(self) -> None:
        """A call failed because the destination had no usable endpoint."""
        self._shared.no_endpoints.inc()

    def concurrency_rejected(self) -> None:
        """A call was refused locally by a concurrency limit of the destination."""
        self._shared.concurrency.inc()

    # -- endpoint health (rare: under a lock) ---------------------------------------------

    def breaker_transition(self, endpoint_key: str, state: str) -> None:
        """The breaker of ``endpoint_key`` entered ``state`` (closed / open / half-open)."""
        sh = self._shared
        if state not in sh.breaker_gauges:
            raise ValueError(
                f"breaker state {state!r} for endpoint {endpoint_key!r} of {sh.service!r}: "
                f"expected one of {sc.BREAKER_STATES}"
            )
        with sh.lock:
            prev = sh.breaker_state.get(endpoint_key)
            if prev == state:
                return
            if prev is not None:
                sh.breaker_gauges[prev].dec()
            sh.breaker_state[endpoint_key] = state
            sh.breaker_gauges[state].inc()
        sh.breaker_transitions[state].inc()

    def ejected(self, endpoint_key: str, reason: str) -> None:
        """Outlier detection ejected ``endpoint_key`` (``reason``: ``consecutive_5xx`` ...)."""
        sh = self._shared
        sh.ejections.get(reason).inc()
        with sh.lock:
            if endpoint_key not in sh.ejected:
                sh.ejected.add(endpoint_key)
                sh.ejected_gauge.inc()

    def unejected(self, endpoint_key: str) -> None:
        """``endpoint_key`` is back in the load-balancing set."""
        sh = self._shared
        with sh.lock:
            if endpoint_key in sh.ejected:
                sh.ejected.discard(endpoint_key)
                sh.ejected_gauge.dec()

    def ejection_skipped(self) -> None:
        """An ejection was not enforced (max_ejection_percent reached)."""
        self._shared.skipped.inc()

    def forget_endpoint(self, endpoint_key: str) -> None:
        """The endpoint left discovery: drop it from the breaker and ejection gauges."""
        sh = self._shared
        with sh.lock:
            prev = sh.breaker_state.pop(endpoint_key, None)
            if prev is not None:
                sh.breaker_gauges[prev].dec()
            if endpoint_key in sh.ejected:
                sh.ejected.discard(endpoint_key)
                sh.ejected_gauge.dec()

    def sync_endpoints(self, keys: Any) -> None:
        """The destination's endpoints are now ``keys``: new ones count as ``closed`` in the
        breaker gauge, departed ones are forgotten (called on every snapshot swap)."""
        sh = self._shared
        keep = set(keys)
        with sh.lock:
            gone = [k for k in sh.breaker_state if k not in keep]
            new = [k for k in keep if k not in sh.breaker_state]
            for k in new:
                sh.breaker_state[k] = "closed"
                sh.breaker_gauges["closed"].inc()
        for k in gone:
            self.forget_endpoint(k)

    def health_event(self, event: Any) -> None:
        """Record a :class:`meshlib.core.health.HealthEvent` (kind, key, reason)."""
        kind = _label(event.kind)
        if kind == "breaker_opened":
            self.breaker_transition(event.key, "open")
        elif kind == "breaker_half_open":
            self.breaker_transition(event.key, "half-open")
        elif kind == "breaker_closed":
            self.breaker_transition(event.key, "closed")
        elif kind == "ejected":
            self.ejected(event.key, event.reason or "unknown")
        elif kind == "unejected":
            self.unejected(event.key)
        elif kind == "ejection_skipped":
            self.ejection_skipped()

    # -- meshlib.core.call.CallObserver protocol: a recorder can be passed as the observer --

    def stopped(self, reason: str) -> None:
        """``CallObserver.stopped``: same as :meth:`retry_refused`."""
        self.retry_refused(reason)

    def health(self, events: Any) -> None:
        """``CallObserver.health``: record each of a tuple of ``HealthEvent``."""
        for ev in events:
            self.health_event(ev)


def _shared_for(m: MeshMetrics, service: str) -> _ClientShared:
    return _cached(m, "client", service, lambda mm: _ClientShared(mm, service))  # type: ignore[no-any-return]


class HttpClientRecorder(ClientRecorder):
    """Records HTTP calls to one destination service.

    >>> rec = HttpClientRecorder.for_service("orders")          # once, at client creation
    >>> rec.request(b"GET", 200, "", 0.012)                     # per logical request
    """

    def __init__(self, metrics: MeshMetrics, service: str) -> None:
        super().__init__(_shared_for(metrics, service))
        errors = _Bounded()

        def miss(k: tuple[Any, Any, Any]) -> tuple[str, ...]:
            method, status, error = k
            status_label = sc.http_status_label(status)
            err = errors(error or "")
            if not err and status is not None and (not isinstance(status, int) or status >= 400):
                err = status_label
            return (sc.http_method_label(method), status_label, service, err)

        self._requests = _Cache(metrics.family(sc.HTTP_CLIENT_DURATION), miss)
        self._request_children = self._requests.children

    @classmethod
    def for_service(cls, service: str, metrics: MeshMetrics | None = None) -> HttpClientRecorder:
        """The recorder of ``service`` (created once per metrics object and cached)."""
        return _cached(metrics, "http_client", service, lambda m: cls(m, service))  # type: ignore[no-any-return]

    def request(self, method: str | bytes, status_code: int | None, error_type: str | None,
                seconds: float) -> None:
        """A logical request ended (after all attempts). ``status_code`` is None when no
        response arrived; ``error_type`` is ``""``/None on success."""
        key = (method, status_code, error_type)
        child = self._request_children.get(key)
        if child is None:
            child = self._requests.get(key)
        child.observe(seconds)


class RpcMethodRecorder:
    """Records calls of one RPC method (cache it per multicallable / per handler)."""

    __slots__ = ("_cache", "_children")

    def __init__(self, cache: _Cache) -> None:
        self._cache = cache
        self._children = cache.children

    def series(self, status: object, error_type: str | None) -> Any:
        """The histogram child :meth:`call` observes for (``status``, ``error_type``)."""
        return self._cache.get((status, error_type))

    def call(self, status: object, error_type: str | None, seconds: float) -> None:
        """One call ended with ``status`` (``"OK"``, ``grpc.StatusCode.X``, an int, or None
        when no status was received)."""
        key = (status, error_type)
        child = self._children.get(key)
        if child is None:
            child = self._cache.get(key)
        child.observe(seconds)


class RpcClientRecorder(ClientRecorder):
    """Records RPCs to one destination service.

    >>> rec = RpcClientRecorder.for_service("orders")
    >>> m = rec.method("shop.Orders", "Get")                    # once per multicallable
    >>> m.call("OK", "", 0.004)                                 # per call
    """

    def __init__(self, metrics: MeshMetrics, service: str, system: str = "grpc") -> None:
        super().__init__(_shared_for(metrics, service))
        self._family = metrics.family(sc.RPC_CLIENT_DURATION)
        self._system = system
        self._methods: dict[tuple[str, str], RpcMethodRecorder] = {}
        self._names = _Bounded()
        self._errors = _Bounded()
        self._lock = threading.Lock()

    @classmethod
    def for_service(cls, service: str, metrics: MeshMetrics | None = None,
                    system: str = "grpc") -> RpcClientRecorder:
        return _cached(  # type: ignore[no-any-return]
            metrics, f"rpc_client:{system}", service, lambda m: cls(m, service, system)
        )

    def method(self, rpc_service: str, rpc_method: str) -> RpcMethodRecorder:
        """The recorder of one method (cached)."""
        key = (rpc_service, rpc_method)
        rec = self._methods.get(key)
        if rec is not None:
            return rec
        svc_label, method_label = self._names(rpc_service), self._names(rpc_method)
        system, server, errors = self._system, self.service, self._errors

        def miss(k: tuple[Any, Any]) -> tuple[str, ...]:
            code = sc.grpc_status_label(k[0])
            err = errors(k[1] or "")
            if not err and code and code != "OK":
                err = code
            return (system, svc_label, method_label, code, server, err)

        rec = RpcMethodRecorder(_Cache(self._family, miss))
        with self._lock:
            if len(self._methods) < _MAX_CACHE:
                rec = self._methods.setdefault(key, rec)
        return rec

    def call(self, rpc_service: str, rpc_method: str, status: object, error_type: str | None,
             seconds: float) -> None:
        """One call ended (convenience: ``method(...).call(...)``)."""
        self.method(rpc_service, rpc_method).call(status, error_type, seconds)


# --------------------------------------------------------------------------- servers


class _ServerBase:
    def __init__(self, metrics: MeshMetrics) -> None:
        self._callers = _Bounded()
        self._errors = _Bounded()
        self._denials = _Cache(
            metrics.family(sc.SERVER_ACCESS_DENIALS), lambda k: (self._callers(k or ""),)
        )

    def access_denied(self, caller: str) -> None:
        """The access policy refused a request from mesh service ``caller``."""
        self._denials.get(caller).inc()


class HttpServerRecorder(_ServerBase):
    """Records requests handled by the ASGI / WSGI server layer (one per process).

    ``route`` is the framework's route template (``/orders/{id}``), or None when the
    framework gives none: raw paths are never a label.
    """

    def __init__(self, metrics: MeshMetrics) -> None:
        super().__init__(metrics)
        routes, errors, callers = _Bounded(), self._errors, self._callers

        def miss(k: tuple[Any, Any, Any, Any, Any]) -> tuple[str, ...]:
            method, status, route, error, caller = k
            status_label = sc.http_status_label(status)
            err = errors(error or "")
            if not err and status is not None and (not isinstance(status, int) or status >= 500):
                err = status_label
            return (sc.http_method_label(method), status_label,
                    routes(route or sc.UNMATCHED_ROUTE), err, callers(caller or ""))

        self._requests = _Cache(metrics.family(sc.HTTP_SERVER_DURATION), miss)
        self._request_children = self._requests.children

    @classmethod
    def get(cls, metrics: MeshMetrics | None = None) -> HttpServerRecorder:
        return _cached(metrics, "http_server", "", cls)  # type: ignore[no-any-return]

    def request(self, method: str | bytes, status_code: int | None, route: str | None,
                error_type: str | None, seconds: float, caller: str = "") -> None:
        key = (method, status_code, route, error_type, caller)
        child = self._request_children.get(key)
        if child is None:
            child = self._requests.get(key)
        child.observe(seconds)


class RpcServerRecorder(_ServerBase):
    """Records calls handled by the gRPC server interceptors (one per process and system).

    Pass ``rpc_service``/``rpc_method`` as ``_OTHER`` for a method the server does not
    implement (semconv: unknown methods must not become label values).
    """

    def __init__(self, metrics: MeshMetrics, system: str = "grpc") -> None:
        super().__init__(metrics)
        names, errors, callers = _Bounded(), self._errors, self._callers

        def miss(k: tuple[Any, Any, Any, Any, Any]) -> tuple[str, ...]:
            svc, meth, status, error, caller = k
            code = sc.grpc_status_label(status)
            err = errors(error or "")
            if not err and code in _GRPC_SERVER_ERRORS:
                err = code
            return (system, names(svc), names(meth), code, err, callers(caller or ""))

        self._calls = _Cache(metrics.family(sc.RPC_SERVER_DURATION), miss)
        self._call_children = self._calls.children

    @classmethod
    def get(cls, metrics: MeshMetrics | None = None, system: str = "grpc") -> RpcServerRecorder:
        return _cached(metrics, "rpc_server", system, lambda m: cls(m, system))  # type: ignore[no-any-return]

    def call(self, rpc_service: str, rpc_method: str, status: object, error_type: str | None,
             seconds: float, caller: str = "") -> None:
        key = (rpc_service, rpc_method, status, error_type, caller)
        child = self._call_children.get(key)
        if child is None:
            child = self._calls.get(key)
        child.observe(seconds)
