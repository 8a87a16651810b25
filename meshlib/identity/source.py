"""The one interface between identity issuance and the data plane.

A :class:`Credentials` value is everything a TLS endpoint needs, swapped whole on rotation:
the certificate chain (leaf first), the private key, the trust bundle (one or more root CA
certificates: several during a CA rotation) and the SPIFFE ID the leaf carries.

An :class:`IdentitySource` hands out the current value (``current()``) and calls subscribers with
each new value (``subscribe(callback)``), in the spirit of Envoy's SDS and the SPIFFE Workload
API's X509-SVID stream: the consumer never polls and never reads files.

Implementations: :class:`StaticIdentitySource` (fixed credentials, settable in tests) and
:class:`meshlib.identity.etcd_source.EtcdIdentitySource` (key made locally, certificate requested
from the signer through etcd, renewed at about half its lifetime).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

Callback = Callable[["Credentials"], None]
log = logging.getLogger("meshlib.identity")


@dataclass(frozen=True)
class Credentials:
    """One X.509-SVID with its key and the trust bundle to verify peers against.

    ``cert_chain_pem``: the leaf certificate first, then any intermediates (PEM, bytes).
    ``private_key_pem``: the leaf's private key, PKCS#8 PEM, unencrypted (bytes; in memory only).
    ``trust_bundle_pem``: the root certificates peers' chains must lead to (PEM, one or more).
    ``spiffe_id``: the leaf's URI SAN, e.g. ``spiffe://meshlib.local/svc/orders``.
    ``not_after``: when the leaf expires (timezone-aware UTC).
    ``not_before``: when the leaf became valid (timezone-aware UTC).
    """

    cert_chain_pem: bytes
    private_key_pem: bytes
    trust_bundle_pem: bytes
    spiffe_id: str
    not_after: datetime
    not_before: datetime

    @property
    def service(self) -> str:
        """The service name: the last path segment of ``spiffe://<td>/svc/<service>``."""
        return self.spiffe_id.rsplit("/", 1)[-1]

    def seconds_until_expiry(self, now: datetime | None = None) -> float:
        """Seconds until ``not_after`` (negative once expired)."""
        return (self.not_after - (now or datetime.now(UTC))).total_seconds()

    def with_trust_bundle(self, trust_bundle_pem: bytes) -> Credentials:
        """The same leaf with another trust bundle (a CA rotation changes only the bundle)."""
        return replace(self, trust_bundle_pem=trust_bundle_pem)


@runtime_checkable
class IdentitySource(Protocol):
    """Where a TLS endpoint gets its credentials and hears of rotations."""

    def current(self) -> Credentials:
        """The credentials to use for the next handshake (raises ``IdentityUnavailable`` if
        none was ever obtained)."""
        ...

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback(credentials)`` after every rotation (new leaf or new trust bundle).

        Callbacks run on the source's thread and must not block; a callback that raises is
        logged and does not stop the others. Returns a function that unsubscribes.
        """
        ...


class IdentityUnavailable(RuntimeError):
    """No certificate has been obtained yet (the signer never answered, or was refused)."""


class SubscriberList:
    """The subscriber bookkeeping every source shares: add, remove, notify outside the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callback] = []

    def add(self, callback: Callback) -> Callable[[], None]:
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def notify(self, credentials: Credentials) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(credentials)
            except Exception:  # a faulty subscriber must not stop rotation for the others
                log.exception(
                    "identity subscriber %r failed on rotation", callback
                )


class StaticIdentitySource:
    """Fixed credentials, replaceable with :meth:`set` (tests, or certificates from files)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._subscribers = SubscriberList()

    def current(self) -> Credentials:
        return self._credentials

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        return self._subscribers.add(callback)

    def set(self, credentials: Credentials) -> None:
        """Replace the credentials and notify subscribers (a rotation)."""
        self._credentials = credentials
        self._subscribers.notify(credentials)
