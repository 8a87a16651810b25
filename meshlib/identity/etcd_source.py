"""An :class:`~meshlib.identity.source.IdentitySource` whose certificates come from the signer.

Algorithm (Istio's agent does the same with istiod: key and CSR made locally, renewal at half
life with jitter so a fleet does not renew at once; SPIFFE's Workload API streams rotations):

1. Make a fresh ECDSA P-256 key in memory (never written anywhere) and a CSR for
   ``spiffe://<trust-domain>/svc/<service>``; put it at ``{prefix}/identity/csr/<service>/<id>``.
2. Wait for the answer at ``{prefix}/identity/certs/<service>/<id>`` (one watch on the service's
   answers, plus one on the trust bundle, over one etcd watch stream) for ``request_timeout``.
3. An issued chain is checked before use: its key must be ours, its SPIFFE ID ours, and it must
   verify against the published trust bundle (:func:`~meshlib.identity.verify.verify_svid`).
   It becomes current and subscribers are told. The next renewal is due after
   ``remaining * renew_fraction * (1 +- jitter)``, ``remaining`` counted from now to not-after.
4. No answer in time (etcd or the signer down), or a refusal: the current certificate stays in
   use, the request is withdrawn, and it is tried again after ``retry_interval`` (doubling up
   to ``retry_max``, never past a quarter of the time left), so renewal catches up soon after the
   signer returns. Every attempt is counted (``meshlib_identity_renewals_total``).
5. A new trust bundle (a CA rotation) replaces the bundle of the current credentials and is
   passed to subscribers without a new certificate.

``meshlib_identity_cert_expiry_seconds{service}`` reports the time left, computed at scrape time.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Callable

from cryptography import x509

from meshlib.discovery.etcd_client import KV, EtcdClient, EtcdError, Event
from meshlib.discovery.watch import WatchManager
from meshlib.identity import x509util
from meshlib.identity.keys import IdentityKeys, parse_answer
from meshlib.identity.source import Callback, Credentials, IdentityUnavailable, SubscriberList
from meshlib.identity.spiffe import resolve_trust_domain, spiffe_id
from meshlib.identity.verify import SvidRejected, verify_svid
from meshlib.telemetry import metrics

log = logging.getLogger("meshlib.identity")


class EtcdIdentitySource:
    """Keeps a current certificate for ``service``, requested from the signer through etcd.

    >>> source = EtcdIdentitySource(client, "orders")          # doctest: +SKIP
    >>> source.wait_ready(10); source.current().spiffe_id       # doctest: +SKIP
    'spiffe://meshlib.local/svc/orders'
    """

    def __init__(
        self,
        client: EtcdClient,
        service: str,
        *,
        prefix: str | None = None,
        trust_domain: str | None = None,
        watch_manager: WatchManager | None = None,
        request_timeout: float = 10.0,
        renew_fraction: float = 0.5,
        jitter: float = 0.05,
        retry_interval: float = 1.0,
        retry_max: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < renew_fraction < 1:
            raise ValueError(f"renew_fraction must be between 0 and 1, got {renew_fraction!r}")
        self.client = client
        self.service = service
        self.trust_domain = resolve_trust_domain(trust_domain)
        self.spiffe_id = spiffe_id(self.trust_domain, service)
        self.keys = IdentityKeys(prefix) if prefix else IdentityKeys()
        self.request_timeout = request_timeout
        self.renew_fraction = renew_fraction
        self.jitter = jitter
        self.retry_interval = retry_interval
        self.retry_max = retry_max
        self._rng = rng or random.Random()
        self._subscribers = SubscriberList()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._creds: Credentials | None = None
        self._bundle: bytes | None = None
        self._answers: dict[str, bytes] = {}
        self._pending: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self.last_error: str | None = None
        self.renewals = 0
        self._own_watches = watch_manager is None
        self._watches = watch_manager or WatchManager(client, name="meshlib-identity-watch")
        self._bundle_watch = self._watches.watch_prefix(
            self.keys.bundle, self._bundle_reset, self._bundle_events
        )
        self._answer_watch = self._watches.watch_prefix(
            self.keys.certs_prefix(service), self._answers_reset, self._answer_events
        )
        metrics.IDENTITY_CERT_EXPIRY.labels(service).set_function(self._seconds_left)
        self._thread = threading.Thread(target=self._run, name=f"meshlib-identity-{service}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ IdentitySource
    def current(self) -> Credentials:
        creds = self._creds
        if creds is None:
            raise IdentityUnavailable(
                f"no certificate for {self.spiffe_id} yet"
                + (f": {self.last_error}" if self.last_error else " (waiting for the signer)")
            )
        return creds

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        return self._subscribers.add(callback)

    # ------------------------------------------------------------------ extras
    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the first certificate is in hand."""
        return self._ready.wait(timeout)

    def seconds_until_expiry(self) -> float | None:
        creds = self._creds
        return None if creds is None else creds.seconds_until_expiry()

    def renew_now(self) -> None:
        """Ask for a new certificate now (the next renewal is scheduled from its answer)."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(5)
        self._bundle_watch.cancel()
        self._answer_watch.cancel()
        if self._own_watches:
            self._watches.close()

    def _seconds_left(self) -> float:
        left = self.seconds_until_expiry()
        return float("nan") if left is None else left

    # ------------------------------------------------------------------ watches
    def _bundle_reset(self, kvs: list[KV], revision: int) -> None:
        for kv in kvs:
            if kv.key == self.keys.bundle:
                self._set_bundle(kv.value)

    def _bundle_events(self, events: list[Event], revision: int) -> None:
        for ev in events:
            if ev.kv.key == self.keys.bundle and ev.type == "put":
                self._set_bundle(ev.kv.value)

    def _set_bundle(self, pem: bytes) -> None:
        try:
            x509util.load_certs(pem)
        except ValueError as e:
            log.error("trust bundle at %s is not PEM certificates (%s); keeping the previous one",
                      self.keys.bundle, e)
            return
        with self._cond:
            if pem == self._bundle:
                return
            self._bundle = pem
            creds = self._creds
            if creds is not None:
                creds = creds.with_trust_bundle(pem)
                self._creds = creds
            self._cond.notify_all()
        if creds is not None:
            log.info("%s: new trust bundle (%d roots)", self.service, len(x509util.load_certs(pem)))
            self._subscribers.notify(creds)

    def _answers_reset(self, kvs: list[KV], revision: int) -> None:
        self._answer_events([Event("put", kv) for kv in kvs], revision)

    def _answer_events(self, events: list[Event], revision: int) -> None:
        with self._cond:
            for ev in events:
                if ev.type == "put":
                    rid = ev.kv.key.rsplit("/", 1)[-1]
                    if rid == self._pending:
                        self._answers[rid] = ev.kv.value
            self._cond.notify_all()

    # ------------------------------------------------------------------ renewal loop
    def _run(self) -> None:
        delay = self.retry_interval
        while not self._stop.is_set():
            ok = self._request_once()
            if self._stop.is_set():
                return
            creds = self._creds
            if ok and creds is not None:
                delay = self.retry_interval
                left = max(0.0, creds.seconds_until_expiry())
                wait = left * self.renew_fraction * (1 + self._rng.uniform(-self.jitter, self.jitter))
            else:
                wait = delay
                if creds is not None:  # never wait past a quarter of what is left
                    wait = min(wait, max(self.retry_interval, creds.seconds_until_expiry() / 4))
                delay = min(delay * 2, self.retry_max)
            self._wake.wait(wait)
            self._wake.clear()

    def _request_once(self) -> bool:
        key = x509util.generate_key()
        csr = x509util.make_csr(key, self.spiffe_id, self.service)
        rid = uuid.uuid4().hex
        csr_key = self.keys.csr(self.service, rid)
        with self._cond:
            self._pending = rid
            self._answers.clear()
        try:
            self.client.put(csr_key, csr)
        except EtcdError as e:
            return self._failed("unavailable", f"could not write the request {csr_key}: {e}")
        with self._cond:
            self._cond.wait_for(
                lambda: rid in self._answers or self._stop.is_set(), timeout=self.request_timeout
            )
            answer = self._answers.pop(rid, None)
            self._pending = None
            bundle = self._bundle
        if answer is None:
            try:  # withdraw it, so a signer coming back does not sign a key we dropped
                self.client.delete(csr_key)
            except EtcdError:
                pass
            return self._failed(
                "unavailable",
                f"no answer to {csr_key} within {self.request_timeout:g}s (is `meshlib signer` "
                "running and able to reach etcd?)",
            )
        try:
            data = parse_answer(answer)
        except ValueError as e:
            return self._failed("refused", f"unreadable answer at {self.keys.cert(self.service, rid)}: {e}")
        if data["status"] == "refused":
            return self._failed(
                "refused", f"the signer refused {csr_key}: {data.get('reason')} ({data.get('code')})"
            )
        chain = str(data.get("chain", "")).encode()
        if bundle is None:  # the answer can arrive before the bundle watch's first read
            try:
                got = self.client.get(self.keys.bundle)
            except EtcdError:
                got = None
            bundle = got[0] if got else None
            if bundle is not None:
                self._set_bundle(bundle)
        try:
            creds = self._credentials(key, chain, bundle)
        except (ValueError, SvidRejected) as e:
            return self._failed("refused", f"the certificate issued for {csr_key} is unusable: {e}")
        with self._cond:
            self._creds = creds
            self.last_error = None
            self.renewals += 1
        metrics.IDENTITY_RENEWALS.labels(self.service, "issued").inc()
        log.info("%s: new certificate valid until %s", self.spiffe_id, creds.not_after)
        self._ready.set()
        self._subscribers.notify(creds)
        return True

    def _credentials(
        self, key: x509util.PrivateKey, chain: bytes, bundle: bytes | None
    ) -> Credentials:
        if bundle is None:
            raise ValueError(f"no trust bundle at {self.keys.bundle} yet")
        certs = x509util.load_certs(chain)
        leaf: x509.Certificate = certs[0]
        if not x509util.same_public_key(leaf.public_key(), key.public_key()):
            raise ValueError("the certificate is not for the key this process made")
        verify_svid(certs, bundle, expected_spiffe_id=self.spiffe_id)
        return Credentials(
            cert_chain_pem=chain,
            private_key_pem=x509util.key_pem(key),
            trust_bundle_pem=bundle,
            spiffe_id=self.spiffe_id,
            not_after=leaf.not_valid_after_utc,
            not_before=leaf.not_valid_before_utc,
        )

    def _failed(self, result: str, message: str) -> bool:
        self.last_error = message
        metrics.IDENTITY_RENEWALS.labels(self.service, result).inc()
        creds = self._creds
        if creds is not None:
            log.warning("%s: renewal failed, keeping the current certificate (expires in %.0fs): %s",
                        self.spiffe_id, creds.seconds_until_expiry(), message)
        else:
            log.warning("%s: no certificate yet: %s", self.spiffe_id, message)
        return False
