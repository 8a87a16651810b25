"""Names, units, buckets and label names of every meshlib series and span attribute.

This is the one place where a metric name or a label name is spelled. Drivers never name a
series: they call the recorders in :mod:`meshlib.telemetry.recorders`, which build the
families from the :class:`Family` specs below, so the same outcome gives the same family,
label names and buckets on every path (httpx sync/async, gRPC sync/aio, the shim, the ASGI,
WSGI and gRPC server layers).

Conventions followed (OpenTelemetry semantic conventions, rendered in Prometheus form the
way the OTel Prometheus exporter does it: dots become underscores, the unit is appended as a
suffix, counters get ``_total``):

* HTTP: semantic conventions **v1.27.0** (HTTP is stable since v1.23.0; nothing used here
  changed after it). ``http.client.request.duration`` and ``http.server.request.duration``
  (histograms, seconds, with the advisory buckets in :data:`DURATION_BUCKETS`); attributes
  ``http.request.method`` (methods outside :data:`KNOWN_HTTP_METHODS` become ``_OTHER``),
  ``http.response.status_code``, ``error.type``, ``server.address``, ``http.route``.
* RPC: the RPC conventions are not stable. meshlib follows their revision after v1.37.0
  (release candidate): the metric is ``rpc.client.call.duration`` / ``rpc.server.call.duration``
  in **seconds** (v1.37.0 and earlier had ``rpc.client.duration`` in milliseconds) with the same
  buckets as HTTP, and the status is the *string* name of the gRPC code in
  ``rpc.response.status_code`` (``"OK"``, ``"UNAVAILABLE"``; it replaced the integer
  ``rpc.grpc.status_code``). ``rpc.system``, ``rpc.service`` and ``rpc.method`` stay separate
  attributes as the gRPC page of the conventions lists them, so a dashboard can group by
  service without parsing ``pkg.Service/Method``.

Deliberate deviations, for a mesh:

* ``server.address`` is the destination *mesh service name* (``orders``), never an instance
  address, and ``server.port`` is not a label: a logical service has no single port and the
  instance address would make the series count grow with every pod restart.
* The HTTP and RPC *client* durations measure the logical call as the application saw it
  (every attempt and backoff included). The per-attempt time, which the conventions would put
  in the client histogram, is in the mesh series ``meshlib_client_attempt_duration_seconds``
  with an ``attempt`` label ``"1"``, ``"2"``, ``"3+"`` (bounded; a boolean ``retry`` label would
  hide whether the second or the fifth attempt is slow).
* Every free-form label value (route, RPC method, error type, caller) is capped per recorder
  (:data:`MAX_DISTINCT_VALUES`); past the cap the value is ``_OTHER``, as the conventions
  prescribe for unknown methods. Raw URL paths are never a label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

#: The semantic-conventions version followed for HTTP (stable) and the schema URL of spans.
SEMCONV_VERSION: Final = "1.27.0"
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.27.0"

#: Advisory explicit bucket boundaries of ``http.*.request.duration`` (semconv HTTP metrics);
#: meshlib uses them for every duration histogram so quantiles compare across families.
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)

#: Methods the conventions list as known (RFC 9110 section 9 plus PATCH, RFC 5789). The
#: attribute is case-sensitive: ``get`` is not a known method and becomes ``_OTHER``.
KNOWN_HTTP_METHODS: Final = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)
OTHER: Final = "_OTHER"

#: Cap on distinct values of each free-form label (route, rpc method, error type, caller)
#: in one recorder; further values are recorded as ``_OTHER``.
MAX_DISTINCT_VALUES: Final = 200

# --- label names (OTel attribute names with dots -> underscores) ----------------------------

HTTP_REQUEST_METHOD: Final = "http_request_method"
HTTP_RESPONSE_STATUS_CODE: Final = "http_response_status_code"
HTTP_ROUTE: Final = "http_route"
SERVER_ADDRESS: Final = "server_address"
ERROR_TYPE: Final = "error_type"
RPC_SYSTEM: Final = "rpc_system"
RPC_SERVICE: Final = "rpc_service"
RPC_METHOD: Final = "rpc_method"
RPC_RESPONSE_STATUS_CODE: Final = "rpc_response_status_code"
# mesh labels
CALLER: Final = "meshlib_caller"
ATTEMPT: Final = "attempt"
OUTCOME: Final = "outcome"
REASON: Final = "reason"
STATE: Final = "state"
SERVICE: Final = "service"  # discovery series (destination service name)

#: ``http_route`` on the server when the framework gives no route template.
UNMATCHED_ROUTE: Final = ""
#: ``attempt`` label values: attempt numbers 3 and above share one bucket.
ATTEMPT_LABELS: Final[tuple[str, str, str]] = ("1", "2", "3+")
#: Breaker states (the same strings as meshlib.core.health and pybreaker).
BREAKER_STATES: Final[tuple[str, str, str]] = ("closed", "open", "half-open")

# --- span attribute keys (OTel names, for tracing.py) ---------------------------------------

ATTR_HTTP_REQUEST_METHOD: Final = "http.request.method"
ATTR_HTTP_REQUEST_METHOD_ORIGINAL: Final = "http.request.method_original"
ATTR_HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
ATTR_HTTP_RESEND_COUNT: Final = "http.request.resend_count"
ATTR_HTTP_ROUTE: Final = "http.route"
ATTR_SERVER_ADDRESS: Final = "server.address"
ATTR_SERVER_PORT: Final = "server.port"
ATTR_NETWORK_PEER_ADDRESS: Final = "network.peer.address"
ATTR_NETWORK_PEER_PORT: Final = "network.peer.port"
ATTR_ERROR_TYPE: Final = "error.type"
ATTR_RPC_SYSTEM: Final = "rpc.system"
ATTR_RPC_SERVICE: Final = "rpc.service"
ATTR_RPC_METHOD: Final = "rpc.method"
ATTR_RPC_RESPONSE_STATUS_CODE: Final = "rpc.response.status_code"
ATTR_MESHLIB_ATTEMPT: Final = "meshlib.attempt"
ATTR_MESHLIB_CALLER: Final = "meshlib.caller"


Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family. ``name`` is as given to prometheus_client: counters are exposed
    with a ``_total`` suffix (:attr:`exposed_name`)."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    unit: str = ""

    @property
    def exposed_name(self) -> str:
        return self.name + "_total" if self.kind == "counter" else self.name


def _h(name: str, help: str, labels: tuple[str, ...]) -> Family:  # noqa: A002
    return Family(name, "histogram", help, labels, DURATION_BUCKETS, "seconds")


# --- request / call durations (OTel semconv) ------------------------------------------------

HTTP_CLIENT_DURATION = _h(
    "http_client_request_duration_seconds",
    "Duration of HTTP client requests through the mesh, as the application saw them "
    "(all attempts and backoff included).",
    (HTTP_REQUEST_METHOD, HTTP_RESPONSE_STATUS_CODE, SERVER_ADDRESS, ERROR_TYPE),
)
HTTP_SERVER_DURATION = _h(
    "http_server_request_duration_seconds",
    "Duration of HTTP server requests handled behind the mesh server layer.",
    (HTTP_REQUEST_METHOD, HTTP_RESPONSE_STATUS_CODE, HTTP_ROUTE, ERROR_TYPE, CALLER),
)
RPC_CLIENT_DURATION = _h(
    "rpc_client_call_duration_seconds",
    "Duration of outgoing RPCs through the mesh, as the application saw them "
    "(all attempts and backoff included).",
    (RPC_SYSTEM, RPC_SERVICE, RPC_METHOD, RPC_RESPONSE_STATUS_CODE, SERVER_ADDRESS, ERROR_TYPE),
)
RPC_SERVER_DURATION = _h(
    "rpc_server_call_duration_seconds",
    "Duration of incoming RPCs handled behind the mesh server layer.",
    (RPC_SYSTEM, RPC_SERVICE, RPC_METHOD, RPC_RESPONSE_STATUS_CODE, ERROR_TYPE, CALLER),
)

# --- mesh client series ------------------------------------------------------------------

CLIENT_ATTEMPT_DURATION = _h(
    "meshlib_client_attempt_duration_seconds",
    "Duration of each attempt (one request to one endpoint); attempt is 1, 2 or 3+, outcome "
    "is the meshlib.core.outcome classification.",
    (SERVER_ADDRESS, ATTEMPT, OUTCOME),
)
CLIENT_RETRIES = Family(
    "meshlib_client_retries", "counter",
    "Retries started, by the outcome of the attempt that was retried.",
    (SERVER_ADDRESS, REASON),
)
CLIENT_RETRIES_REFUSED = Family(
    "meshlib_client_retries_refused", "counter",
    "Retryable failures that were not retried, by why (attempts_exhausted, budget_exhausted, "
    "deadline_exceeded, not_idempotent, body_not_replayable, server_pushback).",
    (SERVER_ADDRESS, REASON),
)
CLIENT_BUDGET_EXHAUSTED = Family(
    "meshlib_client_retry_budget_exhausted", "counter",
    "Retries refused because the retry budget of the destination was exhausted.",
    (SERVER_ADDRESS,),
)
CLIENT_BREAKER_ENDPOINTS = Family(
    "meshlib_client_breaker_endpoints", "gauge",
    "Endpoints of the destination whose circuit breaker is in each state.",
    (SERVER_ADDRESS, STATE),
)
CLIENT_BREAKER_TRANSITIONS = Family(
    "meshlib_client_breaker_transitions", "counter",
    "Circuit breaker transitions of the destination's endpoints, by the state entered.",
    (SERVER_ADDRESS, STATE),
)
CLIENT_EJECTIONS = Family(
    "meshlib_client_ejections", "counter",
    "Outlier ejections of the destination's endpoints, by detector (consecutive_5xx, ...).",
    (SERVER_ADDRESS, REASON),
)
CLIENT_EJECTIONS_SKIPPED = Family(
    "meshlib_client_ejections_skipped", "counter",
    "Ejections not enforced because max_ejection_percent was reached.",
    (SERVER_ADDRESS,),
)
CLIENT_EJECTED = Family(
    "meshlib_client_ejected_endpoints", "gauge",
    "Endpoints of the destination currently ejected by outlier detection.",
    (SERVER_ADDRESS,),
)
CLIENT_CONCURRENCY_REJECTED = Family(
    "meshlib_client_concurrency_rejections", "counter",
    "Calls refused locally because a concurrency limit of the destination was reached.",
    (SERVER_ADDRESS,),
)
CLIENT_NO_ENDPOINTS = Family(
    "meshlib_client_no_endpoints", "counter",
    "Calls that failed because the destination had no usable endpoint.",
    (SERVER_ADDRESS,),
)

# --- mesh server series ------------------------------------------------------------------

SERVER_ACCESS_DENIALS = Family(
    "meshlib_server_access_denials", "counter",
    "Requests refused by the server layer's access policy, by calling mesh service.",
    (CALLER,),
)

# --- discovery / control plane (defined in metrics.py at import; specs here) -------------

ETCD_CONNECTED = Family(
    "meshlib_etcd_connected", "gauge",
    "1 while the discovery watch stream to etcd is healthy, else 0.",
)
ETCD_STALENESS = Family(
    "meshlib_etcd_staleness_seconds", "gauge",
    "Seconds since the last message from etcd on the discovery watch stream "
    "(the age of the routing data in force).",
    unit="seconds",
)
ENDPOINTS = Family(
    "meshlib_endpoints", "gauge",
    "Endpoints known for a destination service in the current snapshot.",
    (SERVICE,),
)
POLICY_REVISION = Family(
    "meshlib_policy_revision", "gauge",
    "etcd mod revision of the service policy in force (0 = defaults only).",
    (SERVICE,),
)
POLICY_REJECTIONS = Family(
    "meshlib_policy_rejections", "counter",
    "Policies read from etcd and refused as invalid (the last good policy stayed in force).",
    (SERVICE,),
)
RECORD_REJECTIONS = Family(
    "meshlib_instance_record_rejections", "counter",
    "Instance records read from etcd and skipped as malformed.",
    (SERVICE,),
)
DISCOVERY_UPDATES = Family(
    "meshlib_discovery_updates", "counter",
    "Snapshots swapped in for a destination service (endpoints or policy changed).",
    (SERVICE,),
)

WATCH_OPEN_REASONS: Final = ("start", "ended", "silent", "canceled", "refused", "reused_id", "error")
WATCH_STREAMS_OPENED = Family(
    "meshlib_etcd_watch_streams_opened", "counter",
    "etcd Watch streams opened, by why the previous one ended (start = the first one).",
    ("reason",),
)
WATCH_RELISTS = Family(
    "meshlib_etcd_watch_relists", "counter",
    "Watched prefixes read again whole because etcd had compacted their resume revision.",
)
WATCH_SILENCE = Family(
    "meshlib_etcd_watch_silence_seconds", "gauge",
    "Seconds since the last message (event, progress notice, create answer) on the watch "
    "stream, by the etcd endpoint the stream is on.",
    ("endpoint",), unit="seconds",
)
LEASE_LOSS_REASONS: Final = ("gone", "timeout")
LEASES_LOST = Family(
    "meshlib_etcd_leases_lost", "counter",
    "Registration leases lost: gone = etcd said expired or revoked; timeout = no keepalive "
    "answered within the TTL.",
    ("reason",),
)
LEASE_GRANT_KINDS: Final = ("first", "regrant")
LEASE_GRANTS = Family(
    "meshlib_etcd_lease_grants", "counter",
    "Registration leases granted: first = a new registration, regrant = after a lost lease.",
    ("kind",),
)
SNAPSHOT_WRITE_RESULTS: Final = ("ok", "error")
SNAPSHOT_FILE_WRITES = Family(
    "meshlib_snapshot_file_writes", "counter",
    "Writes of the on-disk snapshot file (Mesh(snapshot_path=...)), by result.",
    ("result",),
)
SNAPSHOT_FILE_WRITE_DURATION = Family(
    "meshlib_snapshot_file_write_duration_seconds", "histogram",
    "Time to write the on-disk snapshot file (serialise, write, fsync, rename).",
    (), DURATION_BUCKETS, "seconds",
)

IDENTITY_CERT_EXPIRY = Family(
    "meshlib_identity_cert_expiry_seconds", "gauge",
    "Seconds until this process's mesh certificate expires (negative once expired).",
    (SERVICE,), None, "seconds",
)
IDENTITY_RENEWALS = Family(
    "meshlib_identity_renewals", "counter",
    "Certificate requests made by this process, by result (issued, refused, unavailable).",
    (SERVICE, "result"),
)
SIGNER_REQUESTS = Family(
    "meshlib_signer_requests", "counter",
    "Certificate requests handled by the active signer, by result (issued or the refusal code).",
    (SERVICE, "result"),
)
SIGNER_ACTIVE = Family(
    "meshlib_signer_active", "gauge",
    "1 while this signer process holds the signer election (is the one signing), else 0.",
)
IDENTITY_FAMILIES: Final[tuple[Family, ...]] = (
    IDENTITY_CERT_EXPIRY, IDENTITY_RENEWALS, SIGNER_REQUESTS, SIGNER_ACTIVE,
)

DISCOVERY_FAMILIES: Final[tuple[Family, ...]] = (
    ETCD_CONNECTED, ETCD_STALENESS, ENDPOINTS, POLICY_REVISION, POLICY_REJECTIONS,
    RECORD_REJECTIONS, DISCOVERY_UPDATES, WATCH_STREAMS_OPENED, WATCH_RELISTS, WATCH_SILENCE,
    LEASES_LOST, LEASE_GRANTS, SNAPSHOT_FILE_WRITES, SNAPSHOT_FILE_WRITE_DURATION,
    *IDENTITY_FAMILIES,
)
CALL_FAMILIES: Final[tuple[Family, ...]] = (
    HTTP_CLIENT_DURATION, HTTP_SERVER_DURATION, RPC_CLIENT_DURATION, RPC_SERVER_DURATION,
    CLIENT_ATTEMPT_DURATION, CLIENT_RETRIES, CLIENT_RETRIES_REFUSED, CLIENT_BUDGET_EXHAUSTED,
    CLIENT_BREAKER_ENDPOINTS, CLIENT_BREAKER_TRANSITIONS, CLIENT_EJECTIONS,
    CLIENT_EJECTIONS_SKIPPED, CLIENT_EJECTED, CLIENT_CONCURRENCY_REJECTED, CLIENT_NO_ENDPOINTS,
    SERVER_ACCESS_DENIALS,
)
#: Every family meshlib exports; docs/metrics.md lists the same, and a test checks it.
ALL_FAMILIES: Final[tuple[Family, ...]] = DISCOVERY_FAMILIES + CALL_FAMILIES


# --- value normalisation ------------------------------------------------------------------

#: str and bytes spellings of the known methods -> label value (httpcore passes bytes).
HTTP_METHOD_LABELS: Final[dict[str | bytes, str]] = {
    **{m: m for m in KNOWN_HTTP_METHODS},
    **{m.encode("ascii"): m for m in KNOWN_HTTP_METHODS},
}

#: int status -> label string for every valid HTTP status (100-599).
STATUS_LABELS: Final[dict[int, str]] = {code: str(code) for code in range(100, 600)}


def http_method_label(method: str | bytes) -> str:
    """``GET`` -> ``GET``; ``b"GET"`` -> ``GET``; ``get``, ``PROPFIND`` -> ``_OTHER``."""
    return HTTP_METHOD_LABELS.get(method, OTHER)


def http_status_label(status: int | None) -> str:
    """``200`` -> ``"200"``; ``None`` (no response) -> ``""``; out of range -> ``_OTHER``."""
    if status is None:
        return ""
    return STATUS_LABELS.get(status, OTHER)


#: gRPC status code number -> canonical name (grpc/doc/statuscodes.md).
GRPC_CODE_NAMES: Final[tuple[str, ...]] = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)


def grpc_status_label(code: object) -> str:
    """A gRPC status as its canonical name: ``"OK"``, ``grpc.StatusCode.UNAVAILABLE`` or ``14``
    -> ``"UNAVAILABLE"``, ``"deadline-exceeded"`` -> ``"DEADLINE_EXCEEDED"``, ``None`` -> ``""``.
    Anything else is ``_OTHER``."""
    if code is None:
        return ""
    if isinstance(code, int) and not isinstance(code, bool):
        return GRPC_CODE_NAMES[code] if 0 <= code < len(GRPC_CODE_NAMES) else OTHER
    name = getattr(code, "name", None)
    if not isinstance(name, str):
        name = str(code)
    name = name.strip().upper().replace("-", "_")
    return name if name in _GRPC_CODE_SET else OTHER


_GRPC_CODE_SET: Final = frozenset(GRPC_CODE_NAMES)


def attempt_label(n: int) -> str:
    """Attempt number (1-based) -> ``"1"``, ``"2"``, ``"3+"``."""
    return ATTEMPT_LABELS[0] if n <= 1 else ATTEMPT_LABELS[1] if n == 2 else ATTEMPT_LABELS[2]

# --- mesh mTLS (meshlib.tls, meshlib.core.mtls) ------------------------------------------
MTLS_REFUSED = Family(
    "meshlib_mtls_refused", "counter",
    "TLS peers refused by mesh mTLS, by side (client: the server we called; server: a caller) "
    "and reason (no_identity, no_certificate, wrong_identity, bad_identity, handshake).",
    ("side", "reason"),
)
MTLS_REFUSED_REASONS: Final = ("no_identity", "no_certificate", "wrong_identity",
                               "bad_identity", "handshake")
