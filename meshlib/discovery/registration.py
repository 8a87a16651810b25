"""Registering an instance: a record on a lease, kept alive, restored after a lease loss.

The record lives at ``{prefix}/services/{service}/instances/{instance_id}`` attached to a
lease (default TTL 10 s). ``LeaseKeeper`` refreshes the lease every TTL/3; if etcd reports
the lease gone (restart with lost data, partition longer than the TTL, operator revoke),
a new lease is granted as soon as etcd answers and the record is written again. Closing
the handle revokes the lease, which deletes the record at once, so callers stop routing to
the instance before it goes away (instead of after the TTL).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING

from meshlib.core.endpoints import Endpoint
from meshlib.discovery.lease import LeaseKeeper

if TYPE_CHECKING:
    from meshlib.discovery.etcd_client import EtcdClient

log = logging.getLogger("meshlib.discovery")


class Registration:
    """A live registration. Use as a context manager or call :meth:`close`."""

    def __init__(self, client: EtcdClient, key: str, endpoint: Endpoint, ttl: float) -> None:
        self.client = client
        self.key = key
        self.endpoint = endpoint
        self.ttl = ttl
        self._value = json.dumps(endpoint.to_record(), sort_keys=True).encode()
        self._closed = threading.Event()
        self._registered = threading.Event()
        self._lock = threading.Lock()
        self.registrations = 0  # how many times the record was (re)written
        self._keeper = LeaseKeeper(
            client, int(max(1, round(ttl))), on_granted=self._on_granted, on_lost=self._on_lost
        )

    def _on_granted(self, lease_id: int) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self.client.put(self.key, self._value, lease=lease_id)
            self.registrations += 1
            self._registered.set()
        log.info("registered %s (lease %x)", self.key, lease_id)

    def _on_lost(self, lease_id: int) -> None:
        self._registered.clear()
        log.warning("lease %x of %s lost; registering again when etcd answers", lease_id, self.key)

    @property
    def registered(self) -> bool:
        return self._registered.is_set() and not self._closed.is_set()

    def wait_registered(self, timeout: float | None = None) -> bool:
        return self._registered.wait(timeout)

    def close(self) -> None:
        """Deregister: revoke the lease (deleting the record) and stop the keepalive thread."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
        try:
            self._keeper.revoke()
        except Exception as exc:  # best effort: the lease expires by itself after the TTL
            log.warning("could not revoke lease of %s: %s", self.key, exc)
            try:
                self.client.delete(self.key)
            except Exception:
                pass
        self._keeper.close()

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registration({self.key!r}, registered={self.registered})"
