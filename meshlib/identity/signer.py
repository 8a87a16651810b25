"""The signer: turns certificate requests in etcd into X.509-SVIDs, one active at a time.

Algorithm:

* **Election.** Every signer process holds a lease (:class:`~meshlib.discovery.lease.LeaseKeeper`,
  TTL ``lease_ttl``) and tries to create ``{prefix}/identity/signer/leader`` on it with a
  create-if-absent transaction. The one that succeeds is active; the others watch the key and try
  again when it is deleted (its holder closed, or its lease expired when it died or lost etcd for
  a TTL). This is etcd's documented election recipe (``concurrency.Election``) reduced to one
  key. A signer that loses its lease stops signing at once (``meshlib_signer_active`` 0).
  Two signers may overlap only for the moment between a lease expiring and the old holder
  noticing; signing the same request twice is harmless (both answers are valid certificates).
* **Bundle.** The active signer writes its CA directory's ``bundle.pem`` to
  ``{prefix}/identity/bundle`` (only when it differs), so a CA rotation is: add the new root to
  the bundle, wait for every service to pick it up, then switch the signer to the new CA.
* **Requests.** One watch on ``{prefix}/identity/csr/`` (initial list, then events). Each put is
  checked (:func:`~meshlib.identity.csr_check.check_csr`: parse, signature, key, SANs, identity
  against the service in the key; then the per-service :class:`~.ratelimit.RateLimiter`), and the
  answer is written to ``{prefix}/identity/certs/{service}/{id}`` on an answer lease of
  ``answer_ttl`` seconds (answers clean themselves up); then the request is deleted. Refusals
  are answers too, with a ``code`` and a ``reason``, counted in ``meshlib_signer_requests_total``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import socket
import threading
import time
from collections import OrderedDict

from meshlib.discovery.etcd_client import KV, EtcdClient, EtcdError, Event
from meshlib.discovery.keys import is_service_name
from meshlib.discovery.lease import LeaseKeeper
from meshlib.discovery.watch import WatchHandle, WatchManager
from meshlib.identity.authority import Authority
from meshlib.identity.csr_check import CsrRefused, check_csr
from meshlib.identity.keys import IdentityKeys, issued_answer, refused_answer
from meshlib.identity.ratelimit import RateLimiter
from meshlib.identity.x509util import load_certs
from meshlib.telemetry import metrics

log = logging.getLogger("meshlib.identity.signer")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
DEFAULT_LIFETIME = dt.timedelta(hours=24)


class Signer:
    """One signer process (start several for availability; one signs at a time).

    >>> signer = Signer(client, Authority.load("ca/", "meshlib.local"))   # doctest: +SKIP
    >>> signer.wait_active(10); signer.close()                          # doctest: +SKIP
    """

    def __init__(
        self,
        client: EtcdClient,
        authority: Authority,
        *,
        prefix: str | None = None,
        lifetime: dt.timedelta = DEFAULT_LIFETIME,
        limiter: RateLimiter | None = None,
        lease_ttl: int = 5,
        answer_ttl: int = 600,
        name: str | None = None,
    ) -> None:
        self.client = client
        self.authority = authority
        self.keys = IdentityKeys(prefix) if prefix else IdentityKeys()
        self.lifetime = lifetime
        self.limiter = limiter or RateLimiter()
        self.answer_ttl = int(answer_ttl)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._lock = threading.RLock()
        self._active = threading.Event()
        self._lease: int | None = None
        self._answer_lease: tuple[int, float] | None = None
        self._closed = False
        # (key, mod_revision) of answered requests: the backlog read and the watch can both
        # deliver the same put when a signer becomes active; each is answered once.
        self._done: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._active_gauge = metrics.SIGNER_ACTIVE
        self._active_gauge.set(0)
        self._watches = WatchManager(client, name="meshlib-signer-watch")
        self._leader_watch: WatchHandle = self._watches.watch_prefix(
            self.keys.leader, self._leader_reset, self._leader_events
        )
        self._keeper = LeaseKeeper(
            client, lease_ttl, on_granted=self._granted, on_lost=self._lost, name="meshlib-signer-lease"
        )
        self._csr_watch: WatchHandle = self._watches.watch_prefix(
            self.keys.csr_root, self._csr_reset, self._csr_events
        )

    # ------------------------------------------------------------------ public
    @property
    def active(self) -> bool:
        return self._active.is_set()

    def wait_active(self, timeout: float | None = None) -> bool:
        return self._active.wait(timeout)

    def close(self) -> None:
        """Stop signing and give up the election (the lease is revoked: a standby takes over)."""
        with self._lock:
            self._closed = True
            self._set_active(False)
        self._csr_watch.cancel()
        self._leader_watch.cancel()
        self._watches.close()
        self._keeper.revoke()
        self._keeper.close()

    def __enter__(self) -> Signer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ election
    def _set_active(self, value: bool) -> None:
        if value:
            self._active.set()
        else:
            self._active.clear()
        self._active_gauge.set(1 if value else 0)

    def _granted(self, lease_id: int) -> None:
        with self._lock:
            self._lease = lease_id
        self._campaign()

    def _lost(self, lease_id: int) -> None:
        with self._lock:
            if self._lease == lease_id:
                self._lease = None
            if self._active.is_set():
                log.warning("signer %s lost its lease %x: no longer the active signer", self.name, lease_id)
            self._set_active(False)

    def _campaign(self) -> None:
        with self._lock:
            lease = self._lease
            if self._closed or lease is None or self._active.is_set():
                return
            try:
                won = self.client.put_if_absent(self.keys.leader, self.name, lease)
            except EtcdError as e:
                log.warning("signer %s: election attempt failed: %s", self.name, e)
                return
            if not won:
                return
            log.info("signer %s is now the active signer", self.name)
            self._set_active(True)
        self._publish_bundle()
        self._process_backlog()

    def _leader_reset(self, kvs: list[KV], revision: int) -> None:
        if not any(kv.key == self.keys.leader for kv in kvs):
            self._campaign()

    def _leader_events(self, events: list[Event], revision: int) -> None:
        for ev in events:
            if ev.kv.key != self.keys.leader:
                continue
            if ev.type == "delete":
                with self._lock:
                    self._set_active(False)
                self._campaign()
            elif ev.kv.value.decode(errors="replace") != self.name and self._active.is_set():
                with self._lock:
                    self._set_active(False)

    def _publish_bundle(self) -> None:
        try:
            current = self.client.get(self.keys.bundle)
            if current is None or current[0] != self.authority.bundle_pem:
                self.client.put(self.keys.bundle, self.authority.bundle_pem)
                log.info("signer %s published the trust bundle (%d roots)", self.name,
                         len(load_certs(self.authority.bundle_pem)))
        except EtcdError as e:
            log.warning("signer %s: could not publish the trust bundle: %s", self.name, e)

    # ------------------------------------------------------------------ requests
    def _process_backlog(self) -> None:
        try:
            kvs, _ = self.client.get_prefix(self.keys.csr_root)
        except EtcdError as e:
            log.warning("signer %s: could not list pending requests: %s", self.name, e)
            return
        for kv in kvs:
            self._handle(kv)

    def _csr_reset(self, kvs: list[KV], revision: int) -> None:
        for kv in kvs:
            self._handle(kv)

    def _csr_events(self, events: list[Event], revision: int) -> None:
        for ev in events:
            if ev.type == "put":
                self._handle(ev.kv)

    def _handle(self, kv: KV) -> None:
        """Answer one request. The lock only guards the bookkeeping (active, dedup, rate
        limiter); checking, signing and the etcd writes run outside it."""
        parsed = self.keys.parse_csr_key(kv.key)
        if parsed is not None and not (is_service_name(parsed[0]) and _REQUEST_ID.match(parsed[1])):
            parsed = None
        with self._lock:
            if not self._active.is_set() or self._closed:
                return
            done_key = (kv.key, kv.mod_revision)
            if done_key in self._done:
                return
            self._done[done_key] = None  # claimed: the other delivery of this put skips it
            if len(self._done) > 10_000:
                self._done.popitem(last=False)
            allowed = parsed is not None and self.limiter.allow(parsed[0])
        if parsed is None:
            log.warning(
                "signer: ignoring %r: not a request key (expected %s<service>/<request-id>)",
                kv.key, self.keys.csr_root,
            )
            metrics.SIGNER_REQUESTS.labels("", "malformed").inc()
            with contextlib.suppress(EtcdError):
                self.client.delete(kv.key)
            return
        service, request_id = parsed
        try:
            csr = check_csr(kv.value, service=service, trust_domain=self.authority.trust_domain)
            if not allowed:
                raise CsrRefused(
                    "rate_limited",
                    f"service {service!r} exceeded the signer's rate limit "
                    f"({self.limiter.rate * 60:g} requests a minute, burst {self.limiter.burst:g})",
                )
            chain = self.authority.issue(csr, service, self.lifetime)
            not_after = load_certs(chain)[0].not_valid_after_utc
            answer = issued_answer(chain, not_after.isoformat())
            result = "issued"
            log.info("signer: issued %s for %s until %s", request_id, service, not_after)
        except CsrRefused as e:
            answer = refused_answer(e.code, e.reason)
            result = e.code
            log.warning("signer: refused request %s: %s (%s)", kv.key, e.reason, e.code)
        try:
            self.client.put(self.keys.cert(service, request_id), answer, self._answer_lease_id())
            self.client.delete(kv.key)
        except EtcdError as e:
            log.warning("signer: could not answer %s: %s (it stays pending)", kv.key, e)
            with self._lock:  # a later delivery (backlog read, relist) may try again
                self._done.pop(done_key, None)
            return
        metrics.SIGNER_REQUESTS.labels(service, result).inc()

    def _answer_lease_id(self) -> int:
        """A lease shared by the answers of one minute, so answers expire after ``answer_ttl``."""
        now = time.monotonic()
        if self._answer_lease is None or now - self._answer_lease[1] > 60:
            lease_id, _ = self.client.lease_grant(self.answer_ttl)
            self._answer_lease = (lease_id, now)
        return self._answer_lease[0]
