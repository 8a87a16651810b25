"""Endpoints and the immutable per-service snapshot the call path reads.

A :class:`ServiceSnapshot` is built by the discovery layer from etcd records and is
replaced whole (never mutated) when anything about the service changes, the way
Envoy swaps a cluster's host set and tower's discovery yields ``Change`` values.
Readers take a reference once per call and never lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

Protocol = Literal["http", "grpc"]

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One live instance of a service, as registered in etcd.

    ``key`` is the etcd key of the record (unique per instance) and serves as the
    endpoint's identity across snapshots, so per-endpoint state (breakers, load,
    latency) survives a snapshot swap.
    """

    service: str
    instance_id: str
    address: str
    port: int
    protocol: Protocol = "http"
    zone: str | None = None
    weight: int = 100
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    metadata: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    key: str = ""
    tls: bool = False  # accepts mesh mTLS (record field "tls", meshlib.core.mtls)

    def __hash__(self) -> int:
        return hash(self.key) if self.key else hash((self.address, self.port))

    @property
    def authority(self) -> str:
        """``host:port`` (IPv6 literals bracketed)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def to_record(self) -> dict[str, Any]:
        """The JSON record stored in etcd for this endpoint (see docs/etcd-layout.md)."""
        rec: dict[str, Any] = {
            "address": self.address,
            "port": self.port,
            "protocol": self.protocol,
            "weight": self.weight,
            "labels": dict(self.labels),
            "metadata": dict(self.metadata),
        }
        if self.zone is not None:
            rec["zone"] = self.zone
        if self.tls:
            rec["tls"] = True
        return rec


def endpoint_key(ep: Endpoint) -> str:
    """The identity used for per-endpoint state: ``Endpoint.key`` (the etcd key), or a
    stand-in built from service, instance id and address when it is empty."""
    return ep.key or f"{ep.service}/{ep.instance_id}@{ep.address}:{ep.port}"


@dataclass(frozen=True, slots=True)
class ServiceSnapshot:
    """Everything the call path needs to know about one destination service.

    ``endpoints`` is sorted by key so that two snapshots with the same members compare
    equal and balancers that index by position are stable. ``policy`` is the effective
    (default merged with service-specific) validated policy object. ``revision`` is the
    etcd revision the snapshot reflects (0 when it came from the on-disk cache or nothing
    is known yet). ``policy_revision`` is the mod revision of the policy key in force.
    """

    service: str
    endpoints: tuple[Endpoint, ...] = ()
    policy: Any = None
    revision: int = 0
    policy_revision: int = 0
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.endpoints)
