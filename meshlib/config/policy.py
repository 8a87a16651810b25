"""The policy schema: how callers talk to one destination service.

Operators write policies into etcd as YAML or JSON (``{prefix}/services/{svc}/policy`` for
one service, ``{prefix}/defaults/policy`` for all; see :mod:`meshlib.discovery.keys`). The
effective policy of a service is the default document deep-merged with the service's own
(:func:`merge_policy_dicts`: mappings merge key by key, lists and scalars replace), then
validated once into an immutable :class:`Policy` that the call path reads without locks.

Validation is strict and complete, in the spirit of Envoy's xDS NACK: unknown fields, wrong
types (no ``"3"`` for ``3``, no ``true`` for ``1``), out-of-range values and cross-field
mistakes are all reported together with their exact path; the watcher then keeps the last
good policy in force. Every field has a default, so ``{}`` is a valid policy; the defaults
are those of the systems operators know:

* ``timeout`` 15 s: Envoy's route timeout.
* ``retries``: 3 attempts (Envoy ``num_retries`` ... gRPC A6 caps ``maxAttempts`` at 5),
  Envoy's ``retry_on`` vocabulary, RFC 9110 9.2.2 idempotent methods, backoff base 25 ms
  max 250 ms with full jitter (Envoy, gRPC), budget 20 % + 10/s over 10 s (Finagle,
  Linkerd), hedging off (gRPC A6 hedging policy, max 4 extra).
* ``load_balancer``: power of two choices over least outstanding requests (Envoy, Istio,
  Finagle), peak-EWMA 30 ms / 10 s (Linkerd), ring hash 1024 entries (Envoy).
* ``circuit_breaker`` 5 consecutive failures (Finagle failure accrual), ``outlier_detection``
  5 consecutive 5xx, 10 s interval, 30 s base ejection up to 300 s, 10 % max (Envoy).
* ``concurrency.max_requests`` 1024 (Envoy circuit-breaker thresholds).

``docs/policy.md`` is the operator reference for every field. Decoding documents and
merging the default policy with a service's lives in :mod:`meshlib.config.documents`
(:func:`load_policy_document` and :func:`merge_policy_dicts` are re-exported here).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WrapSerializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from meshlib.config.documents import kind_of, load_policy_document
from meshlib.config.documents import merge_policy_dicts as merge_policy_dicts  # re-export
from meshlib.config.durations import Duration, PositiveDuration, format_duration
from meshlib.config.errors import FieldError, PolicyError, field_errors_from_pydantic

_T = TypeVar("_T")

# --------------------------------------------------------------------------- vocabularies

RetryOn = Literal[
    "connect-failure",
    "reset",
    "refused-stream",
    "5xx",
    "gateway-error",
    "retriable-status-codes",
    "retriable-4xx",
]
GrpcRetryOn = Literal["cancelled", "deadline-exceeded", "internal", "resource-exhausted",
                      "unavailable"]
#: gRPC status code names (lowercase, '-' separated) -> numeric code.
GRPC_STATUS_NAMES: Mapping[str, int] = MappingProxyType({
    "cancelled": 1, "unknown": 2, "invalid-argument": 3, "deadline-exceeded": 4,
    "not-found": 5, "already-exists": 6, "permission-denied": 7, "resource-exhausted": 8,
    "failed-precondition": 9, "aborted": 10, "out-of-range": 11, "unimplemented": 12,
    "internal": 13, "unavailable": 14, "data-loss": 15, "unauthenticated": 16,
})
GrpcStatus = Literal[
    "cancelled", "unknown", "invalid-argument", "deadline-exceeded", "not-found",
    "already-exists", "permission-denied", "resource-exhausted", "failed-precondition",
    "aborted", "out-of-range", "unimplemented", "internal", "unavailable", "data-loss",
    "unauthenticated",
]
#: RFC 9110 9.2.2 idempotent methods: the only ones ``retries.methods`` may list.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_NON_IDEMPOTENT = frozenset({"POST", "PATCH", "CONNECT"})
HttpMethod = Literal["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"]
LbPolicy = Literal["round_robin", "random", "least_request", "peak_ewma", "ring_hash"]

# RFC 9110 5.1 field-name = token; tchar set.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
# Service names are DNS labels (same rule as meshlib.discovery.keys.check_service_name).
_SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SUBSET_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")

# --------------------------------------------------------------------------- helper types


def _list_to_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


class FrozenDict(dict[str, _T]):
    """A read-only dict: as fast to read as a dict, hashable, picklable, deep-copyable.

    Policies are shared by every call and thread; a mutation would be a bug, so it raises.
    """

    __slots__ = ()

    def _readonly(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("policy mappings are read-only")

    __setitem__ = __delitem__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]
    __ior__ = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> Any:
        return (type(self), (dict(self),))

    def __copy__(self) -> FrozenDict[_T]:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict[_T]:
        return self

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


def _freeze_map(v: Mapping[str, _T]) -> Mapping[str, _T]:
    return FrozenDict(v)


def _dump_map(v: Mapping[str, Any], handler: Any) -> Any:
    return handler(dict(v))


def _canon_token(v: Any) -> Any:
    """``"UNAVAILABLE"`` / ``"deadline_exceeded"`` -> ``"unavailable"`` / ``"deadline-exceeded"``."""
    return v.strip().lower().replace("_", "-") if isinstance(v, str) else v


def _lower(v: Any) -> Any:
    return v.strip().lower() if isinstance(v, str) else v


def _method(v: Any) -> Any:
    if not isinstance(v, str):
        return v
    m = v.strip().upper()
    if m in _NON_IDEMPOTENT:
        raise PydanticCustomError(
            "non_idempotent",
            "{reason}",
            {"reason": f"{m} is not idempotent (RFC 9110 9.2.2) and is never retried by "
                       f"method; see retries.allow_post_with_idempotency_key"},
        )
    return m


def _header_name(v: Any) -> Any:
    if not isinstance(v, str):
        return v
    name = v.strip().lower()
    if not _TOKEN.match(name):
        raise PydanticCustomError(
            "header_name", "{reason}",
            {"reason": "not a valid HTTP header name (RFC 9110 token characters)"},
        )
    return name


def _service_name(v: Any) -> Any:
    if isinstance(v, str) and v != "*" and not _SERVICE_NAME.match(v):
        raise PydanticCustomError(
            "service_name", "{reason}",
            {"reason": "must be '*' or a service name (DNS label: a-z, 0-9, '-')"},
        )
    return v


def _subset_name(v: Any) -> Any:
    if isinstance(v, str) and not _SUBSET_NAME.match(v):
        raise PydanticCustomError(
            "subset_name", "{reason}",
            {"reason": "subset names use A-Z a-z 0-9 . _ - (at most 63 characters)"},
        )
    return v


def _unique(v: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(v))


def _cross(errors: list[FieldError]) -> None:
    if errors:
        raise PydanticCustomError("cross_field", "{summary}", {
            "summary": "; ".join(f"{e.field}: {e.reason}" for e in errors),
            "errors": errors,
        })


Tuple = Annotated[tuple[_T, ...], BeforeValidator(_list_to_tuple)]
UniqueTuple = Annotated[tuple[_T, ...], BeforeValidator(_list_to_tuple), AfterValidator(_unique)]
FrozenMap = Annotated[
    Mapping[str, _T], AfterValidator(_freeze_map), WrapSerializer(_dump_map)
]
HeaderName = Annotated[str, BeforeValidator(_header_name)]
SubsetName = Annotated[str, BeforeValidator(_subset_name)]
Percent100 = Annotated[float, Field(ge=0, le=100)]

_EMPTY: Mapping[str, Any] = FrozenDict()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --------------------------------------------------------------------------- retries


class Backoff(_Model):
    """Exponential backoff with full jitter: attempt n waits random(0, min(base*2^(n-1), max))."""

    base: PositiveDuration = 0.025
    max: PositiveDuration = 0.25

    @model_validator(mode="after")
    def _check(self) -> Backoff:
        if self.max < self.base:
            _cross([FieldError("max", _fmt(self.max), f"must be >= base ({_fmt(self.base)})")])
        return self


class RetryBudget(_Model):
    """Finagle/Linkerd retry budget: retries may add ``percent`` % of requests, plus
    ``min_retries_per_second``, counted over ``window``."""

    percent: int = Field(default=20, ge=0, le=1000)
    min_retries_per_second: int = Field(default=10, ge=0, le=1_000_000)
    window: PositiveDuration = 10.0


class Hedging(_Model):
    """Send up to ``max_extra`` extra copies of an idempotent request, ``delay`` apart,
    to other endpoints; the first response wins (gRPC A6 hedging policy)."""

    enabled: bool = False
    delay: Duration = 0.05
    max_extra: int = Field(default=1, ge=1, le=4)


class Retries(_Model):
    attempts: int = Field(default=3, ge=1, le=5)
    per_try_timeout: PositiveDuration | None = None
    retry_on: UniqueTuple[RetryOn] = Field(
        default=("connect-failure", "refused-stream", "reset", "gateway-error")
    )
    retriable_status_codes: UniqueTuple[Annotated[int, Field(ge=100, le=599)]] = ()
    grpc_retry_on: UniqueTuple[Annotated[GrpcRetryOn, BeforeValidator(_canon_token)]] = (
        "unavailable",
    )
    methods: UniqueTuple[Annotated[HttpMethod, BeforeValidator(_method)]] = (
        "GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE",
    )
    allow_post_with_idempotency_key: bool = False
    backoff: Backoff = Backoff()
    budget: RetryBudget = RetryBudget()
    hedging: Hedging = Hedging()

    @model_validator(mode="after")
    def _check(self) -> Retries:
        if "retriable-status-codes" in self.retry_on and not self.retriable_status_codes:
            _cross([FieldError(
                "retriable_status_codes", [],
                "must list at least one status code when retry_on contains "
                "retriable-status-codes",
            )])
        return self


# --------------------------------------------------------------------------- balancing


class HashOn(_Model):
    """What ring_hash hashes: exactly one of a request header or a cookie."""

    header: HeaderName | None = None
    cookie: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> HashOn:
        if (self.header is None) == (self.cookie is None):
            _cross([FieldError(
                "", {"header": self.header, "cookie": self.cookie},
                "give exactly one of header or cookie",
            )])
        return self


class Ewma(_Model):
    """Linkerd peak-EWMA: RTT estimate before any sample, and the decay time constant."""

    default_rtt: PositiveDuration = 0.03
    decay: PositiveDuration = 10.0


class LoadBalancer(_Model):
    policy: LbPolicy = "least_request"
    hash_on: HashOn | None = None
    ring_size: int = Field(default=1024, ge=64, le=65536)
    zone_aware: bool = True
    min_zone_healthy_percent: int = Field(default=50, ge=0, le=100)
    #: least_request with unequal weights: effective weight = weight / (active + 1) ** bias
    #: (Envoy ``active_request_bias``; 0 = plain weighted round robin).
    active_request_bias: float = Field(default=1.0, ge=0, le=10)
    ewma: Ewma = Ewma()

    @model_validator(mode="after")
    def _check(self) -> LoadBalancer:
        if self.policy == "ring_hash" and self.hash_on is None:
            _cross([FieldError("hash_on", None, "required when policy is ring_hash")])
        return self


# --------------------------------------------------------------------------- resilience


class CircuitBreaker(_Model):
    enabled: bool = True
    failure_threshold: int = Field(default=5, ge=1, le=10_000)
    reset_timeout: PositiveDuration = 10.0
    half_open_max_calls: int = Field(default=1, ge=1, le=10_000)


class OutlierDetection(_Model):
    enabled: bool = True
    consecutive_5xx: int = Field(default=5, ge=1, le=10_000)
    consecutive_gateway_failure: int = Field(default=5, ge=1, le=10_000)
    interval: PositiveDuration = 10.0
    base_ejection_time: PositiveDuration = 30.0
    max_ejection_time: PositiveDuration = 300.0
    max_ejection_percent: int = Field(default=10, ge=0, le=100)
    #: Envoy >= 1.31: one endpoint may be ejected even beyond ``max_ejection_percent``.
    always_eject_one_host: bool = False

    @model_validator(mode="after")
    def _check(self) -> OutlierDetection:
        if self.max_ejection_time < self.base_ejection_time:
            _cross([FieldError(
                "max_ejection_time", _fmt(self.max_ejection_time),
                f"must be >= base_ejection_time ({_fmt(self.base_ejection_time)})",
            )])
        return self


class Concurrency(_Model):
    max_requests: int = Field(default=1024, ge=1, le=1_000_000)


# --------------------------------------------------------------------------- routing


class Subset(_Model):
    """Endpoints whose labels include all of ``labels`` (an empty selector matches all)."""

    labels: FrozenMap[str] = _EMPTY


class RouteMatch(_Model):
    """All given conditions must hold: exact header values (names case-insensitive) and a
    path prefix."""

    headers: Annotated[
        Mapping[HeaderName, str], AfterValidator(_freeze_map), WrapSerializer(_dump_map)
    ] = _EMPTY
    path_prefix: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_duplicate_headers(cls, data: Any) -> Any:
        # Names are case-insensitive: "X-Canary" and "x-canary" would silently collapse.
        if isinstance(data, Mapping) and isinstance(data.get("headers"), Mapping):
            seen: set[str] = set()
            errors: list[FieldError] = []
            for name, value in data["headers"].items():
                if isinstance(name, str):
                    low = name.strip().lower()
                    if low in seen:
                        errors.append(FieldError(
                            f"headers.{name}", value,
                            f"header {low!r} is given twice (names are case-insensitive)",
                        ))
                    seen.add(low)
            _cross(errors)
        return data

    @model_validator(mode="after")
    def _check(self) -> RouteMatch:
        if self.path_prefix is not None and not self.path_prefix.startswith("/"):
            _cross([FieldError("path_prefix", self.path_prefix, "must start with '/'")])
        return self


class Split(_Model):
    """A share of traffic sent to a subset (``None``: all endpoints)."""

    subset: SubsetName | None = None
    weight: int = Field(ge=0, le=10_000)


class Route(_Model):
    name: str | None = None
    match: RouteMatch = RouteMatch()
    split: Tuple[Split]

    @model_validator(mode="after")
    def _check(self) -> Route:
        # Checked here, not with Field(min_length=1): pydantic reports a spurious "too short"
        # next to any invalid item of a length-constrained tuple.
        if not self.split:
            _cross([FieldError("split", [], "must have at least 1 item")])
        if sum(s.weight for s in self.split) <= 0:
            _cross([FieldError(
                "split", [s.weight for s in self.split], "weights must add up to more than 0"
            )])
        return self


# --------------------------------------------------------------------------- fault, access, HC


class DelayFault(_Model):
    percent: Percent100 = 0.0
    duration: Duration = 0.0


class AbortFault(_Model):
    percent: Percent100 = 0.0
    http_status: int = Field(default=503, ge=200, le=599)
    grpc_status: Annotated[GrpcStatus, BeforeValidator(_canon_token)] = "unavailable"

    @property
    def grpc_code(self) -> int:
        """Numeric gRPC status code of ``grpc_status``."""
        return GRPC_STATUS_NAMES[self.grpc_status]


class Fault(_Model):
    """Fault injection (Envoy HTTP fault filter): delay and/or abort a share of calls."""

    delay: DelayFault = DelayFault()
    abort: AbortFault = AbortFault()


class Access(_Model):
    """Caller services allowed to call this service; ``"*"`` means any caller."""

    allow: UniqueTuple[Annotated[str, BeforeValidator(_service_name)]] = ("*",)

    def allows(self, caller: str | None) -> bool:
        return "*" in self.allow or (caller is not None and caller in self.allow)


class Mtls(_Model):
    """Mutual TLS mode of this service, as Istio's PeerAuthentication (meshlib.core.mtls):
    callers of the service and the service's own servers both read it."""

    mode: Annotated[Literal["off", "permissive", "strict"], BeforeValidator(_lower)] = "permissive"


class HealthCheck(_Model):
    """Active grpc.health.v1 checks of endpoints."""

    enabled: bool = False
    interval: PositiveDuration = 5.0
    timeout: PositiveDuration = 1.0
    unhealthy_threshold: int = Field(default=2, ge=1, le=1000)


# --------------------------------------------------------------------------- the policy


class Policy(_Model):
    """The validated, immutable policy for calls to one destination service."""

    timeout: PositiveDuration | None = 15.0
    retries: Retries = Retries()
    load_balancer: LoadBalancer = LoadBalancer()
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    outlier_detection: OutlierDetection = OutlierDetection()
    concurrency: Concurrency = Concurrency()
    subsets: Annotated[
        Mapping[SubsetName, Subset], AfterValidator(_freeze_map), WrapSerializer(_dump_map)
    ] = _EMPTY
    routes: Tuple[Route] = ()
    fault: Fault = Fault()
    access: Access = Access()
    mtls: Mtls = Mtls()
    health_check: HealthCheck = HealthCheck()

    @model_validator(mode="after")
    def _check(self) -> Policy:
        errors: list[FieldError] = []
        per_try = self.retries.per_try_timeout
        if per_try is not None and self.timeout is not None and per_try > self.timeout:
            errors.append(FieldError(
                "retries.per_try_timeout", _fmt(per_try),
                f"must be <= timeout ({_fmt(self.timeout)})",
            ))
        for i, route in enumerate(self.routes):
            for j, split in enumerate(route.split):
                if split.subset is not None and split.subset not in self.subsets:
                    known = ", ".join(sorted(self.subsets)) or "none defined"
                    errors.append(FieldError(
                        f"routes[{i}].split[{j}].subset", split.subset,
                        f"no subset named {split.subset!r} in subsets ({known})",
                    ))
        _cross(errors)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible data (durations as strings) that parses back to an equal
        Policy: ``parse_policy_dict(p.to_dict(), key) == p``."""
        return self.model_dump(mode="json")

    def subset_labels(self, name: str) -> Mapping[str, str]:
        """The label selector of subset ``name`` (KeyError if it does not exist)."""
        return self.subsets[name].labels


def _fmt(seconds: float) -> str:
    return format_duration(seconds)


DEFAULT_POLICY = Policy()

# --------------------------------------------------------------------------- parsing


def parse_policy(data: bytes | str, key: str) -> Policy:
    """Parse and validate a YAML or JSON policy document on its own (an empty document is
    the default policy).

    Raises :class:`PolicyError` (naming ``key``) listing every problem found.
    """
    raw = load_policy_document(data, key)
    return parse_policy_dict(raw, key) if raw else DEFAULT_POLICY


def parse_policy_dict(raw: Any, key: str) -> Policy:
    """Validate already-decoded policy data (a mapping) into a :class:`Policy`."""
    if not isinstance(raw, Mapping):
        raise PolicyError(key, [FieldError(
            "", raw, f"top level must be a mapping of policy fields, got {kind_of(raw)}"
        )])
    try:
        return Policy.model_validate(dict(raw))
    except ValidationError as exc:
        raise PolicyError(key, field_errors_from_pydantic(exc, raw, Policy)) from None
