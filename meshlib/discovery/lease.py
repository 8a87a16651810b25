"""Keep one etcd lease alive, and replace it when it is lost.

Algorithm (etcd "Lease API" docs; the renewal period follows etcd's own ``clientv3`` keepalive,
which refreshes every TTL/3):

1. Grant a lease of ``ttl`` seconds and call ``on_granted(lease_id)``; the caller attaches its keys
   (registration records) to that lease there. If ``on_granted`` raises, the lease is revoked and
   the grant is retried after a backoff, so keys are never left half-written on a kept lease.
2. Every granted TTL / 3, send one keepalive on the client's one long-lived ``LeaseKeepAlive``
   stream (:mod:`meshlib.discovery.keepalive`) and wait up to TTL / 3 + 1 s for its answer (the
   time ``etcd grpc-proxy`` may take). As in ``clientv3``, an answer means etcd keeps the lease for
   TTL from the moment it arrives. An unanswered keepalive marks the stream silent; the next one
   goes on a new stream on the next endpoint.
3. The lease is *lost* when etcd answers that it is gone (TTL 0: expired, revoked, or etcd
   restarted without its data) or when no keepalive has succeeded for longer than the TTL (a long
   partition or an etcd outage: etcd has surely expired it). Then ``on_lost(old_id)`` is called
   and step 1 runs again as soon as etcd answers (backoff 100 ms doubling to 1 s), so the
   caller's records come back after an etcd restart or a partition. Failed keepalives inside the
   TTL are retried quickly (the same backoff), never waiting a whole period.

Callbacks run on the keeper's thread; their exceptions are logged, never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from meshlib.telemetry import metrics

from .etcd_client import EtcdClient, EtcdError, LeaseNotFound

__all__ = ["LeaseKeeper"]

log = logging.getLogger("meshlib.discovery")

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 1.0


class LeaseKeeper:
    """Background thread that holds one lease of ``ttl`` seconds and re-grants it when lost.

    >>> keeper = LeaseKeeper(client, 10, on_granted=lambda lid: client.put(key, rec, lease=lid))
    ... # doctest: +SKIP
    >>> keeper.wait_alive(5); keeper.lease_id            # doctest: +SKIP
    True
    >>> keeper.revoke()                                    # doctest: +SKIP
    """

    def __init__(
        self,
        client: EtcdClient,
        ttl: int,
        *,
        on_lost: Callable[[int], None] | None = None,
        on_granted: Callable[[int], None] | None = None,
        name: str = "meshlib-etcd-lease",
    ) -> None:
        if int(ttl) < 1:
            raise ValueError(f"lease ttl must be >= 1 second, got {ttl!r}")
        self._client = client
        self.ttl = int(ttl)
        self._on_lost = on_lost
        self._on_granted = on_granted
        self._lease_id: int | None = None
        self._granted_ttl = self.ttl
        self._alive = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.grants = 0  # how many leases were granted and handed to on_granted
        self.losses = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    @property
    def lease_id(self) -> int | None:
        """The current lease id, None while none is held."""
        return self._lease_id

    @property
    def alive(self) -> bool:
        """True while a lease is held, ``on_granted`` succeeded and keepalives are within TTL."""
        return self._alive.is_set()

    def wait_alive(self, timeout: float | None = None) -> bool:
        return self._alive.wait(timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Stop keeping the lease alive (it expires after its TTL). Does not revoke."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("etcd lease keeper thread did not stop within %.1fs", timeout)

    def revoke(self, timeout: float = 1.0) -> None:
        """Stop the keeper and revoke the lease, deleting its keys now.

        Raises :class:`EtcdError` when etcd could not be reached within ``timeout`` (the lease
        then expires by itself after its TTL). Revoking an already lost lease is not an error.
        """
        self.close()
        with self._lock:
            lid, self._lease_id = self._lease_id, None
            self._alive.clear()
        if lid is None:
            return
        with contextlib.suppress(LeaseNotFound):
            self._client.lease_revoke(lid, timeout=timeout)

    def __enter__(self) -> LeaseKeeper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        lid = f"{self._lease_id:x}" if self._lease_id is not None else None
        return f"LeaseKeeper(ttl={self.ttl}, lease={lid}, alive={self.alive})"

    # ------------------------------------------------------------------ internals
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._loop()
            except Exception:  # the thread must not die: log and start over
                log.exception("etcd lease keeper failed unexpectedly; restarting its loop")
                self._stop.wait(_BACKOFF_MAX)

    def _loop(self) -> None:
        backoff = _BACKOFF_MIN
        last_ok = 0.0
        next_at = 0.0
        failing_since: float | None = None
        while not self._stop.is_set():
            lid = self._lease_id
            if lid is None:
                if self._grant():
                    last_ok = time.monotonic()
                    next_at = last_ok + self._granted_ttl / 3
                    backoff = _BACKOFF_MIN
                    failing_since = None
                else:
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            period = self._granted_ttl / 3
            sent = time.monotonic()
            try:
                self._client.lease_keepalive_once(lid, timeout=self._answer_timeout(sent, last_ok))
            except LeaseNotFound:
                self._lost(
                    lid, "etcd reports it gone (expired, revoked or etcd lost its data)", "gone"
                )
                continue
            except EtcdError as e:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("etcd lease %x: keepalive failed (%s); retrying", lid, e)
                if now - last_ok > self._granted_ttl:
                    self._lost(
                        lid, f"no keepalive answered for {now - last_ok:.1f}s > TTL", "timeout"
                    )
                    continue
                next_at = now + backoff
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            if failing_since is not None:
                log.info(
                    "etcd lease %x: keepalive works again after %.1fs",
                    lid, time.monotonic() - failing_since,
                )
            failing_since = None
            backoff = _BACKOFF_MIN
            # As clientv3's lessor: the lease lives TTL from when its answer arrived (behind
            # grpc-proxy the answer reflects the proxy's own, later refresh of the lease).
            last_ok = time.monotonic()
            next_at = sent + period

    def _answer_timeout(self, now: float, last_ok: float) -> float:
        """How long to wait for the answer to one keepalive before calling the stream silent.

        Direct to etcd the answer comes at once. ``etcd grpc-proxy`` answers a keepalive only
        when its own ``clientv3`` lessor next refreshes the lease (every TTL/3, checked every
        0.5 s), so an answer may take up to TTL/3 + 0.5 s: wait TTL/3 + 1 s, but never past the
        point where the lease must be counted lost (TTL after the last success).
        """
        ttl = self._granted_ttl
        return max(0.5, min(ttl / 3 + 1.0, last_ok + ttl - now))

    def _grant(self) -> bool:
        try:
            lid, granted = self._client.lease_grant(
                self.ttl, timeout=min(self._client.timeout, 2.0)
            )
        except EtcdError as e:
            log.debug("etcd lease grant (ttl %d) failed: %s", self.ttl, e)
            return False
        if self._stop.is_set():
            self._revoke_quietly(lid)
            return False
        with self._lock:
            self._lease_id = lid
            self._granted_ttl = max(1, granted or self.ttl)
        if self._on_granted is not None:
            try:
                self._on_granted(lid)
            except Exception:
                log.exception("etcd lease %x: on_granted callback failed; revoking and retrying", lid)
                with self._lock:
                    self._lease_id = None
                self._revoke_quietly(lid)
                return False
        metrics.LEASE_GRANTS.labels("regrant" if self.losses else "first").inc()
        self.grants += 1
        self._alive.set()
        log.info("etcd lease %x granted (ttl %ds)", lid, self._granted_ttl)
        return True

    def _lost(self, lid: int, why: str, reason: str) -> None:
        log.warning("etcd lease %x lost: %s; granting a new one", lid, why)
        with self._lock:
            if self._lease_id == lid:
                self._lease_id = None
            self._alive.clear()
        self.losses += 1
        metrics.LEASES_LOST.labels(reason).inc()
        if self._on_lost is not None:
            try:
                self._on_lost(lid)
            except Exception:
                log.exception("etcd lease %x: on_lost callback failed", lid)

    def _revoke_quietly(self, lid: int) -> None:
        try:
            self._client.lease_revoke(lid, timeout=1.0)
        except EtcdError as e:
            log.debug("etcd lease %x: best-effort revoke failed: %s", lid, e)
