"""The signer and EtcdIdentitySource against a real etcd: issue, refuse with reasons, elect,
keep the current certificate while the signer is down and catch up when it returns."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client import REGISTRY

from meshlib.discovery.etcd_client import EtcdClient
from meshlib.identity import x509util
from meshlib.identity.authority import Authority
from meshlib.identity.etcd_source import EtcdIdentitySource
from meshlib.identity.keys import IdentityKeys, parse_answer
from meshlib.identity.signer import Signer
from meshlib.identity.source import Credentials
from meshlib.identity.testing import TestCA
from meshlib.identity.verify import SvidRejected, verify_svid
from meshlib.telemetry import metrics

TD = "meshlib.local"


@pytest.fixture
def client(etcd_server, etcd_prefix) -> Iterator[EtcdClient]:  # type: ignore[no-untyped-def]
    with EtcdClient(etcd_server.endpoint, timeout=3) as c:
        yield c


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority.load(TestCA(TD).write_dir(tmp_path / "ca"), TD)


def _wait(pred, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"condition not reached within {timeout}s")
        time.sleep(0.02)


def _answer(client: EtcdClient, keys: IdentityKeys, service: str, rid: str) -> dict:  # type: ignore[type-arg]
    """Wait for the signer's answer to request ``rid`` (polls etcd until it is there)."""
    key = keys.cert(service, rid)
    _wait(lambda: client.get(key) is not None)
    got = client.get(key)
    assert got is not None
    return parse_answer(got[0])


def _counter(service: str, result: str) -> float:
    return metrics.SIGNER_REQUESTS.labels(service, result)._value.get()  # type: ignore[no-any-return]


def test_source_gets_a_certificate_and_renews_at_half_life(client, authority, etcd_prefix) -> None:  # type: ignore[no-untyped-def]
    with Signer(client, authority, prefix=etcd_prefix, lifetime=dt.timedelta(seconds=4)) as signer:
        assert signer.wait_active(10)
        source = EtcdIdentitySource(client, "orders", prefix=etcd_prefix, trust_domain=TD)
        rotations: list[Credentials] = []
        got_two = threading.Event()

        def on_rotation(c: Credentials) -> None:
            rotations.append(c)
            if len(rotations) >= 2:
                got_two.set()

        source.subscribe(on_rotation)
        try:
            assert source.wait_ready(10)
            first = source.current()
            assert first.spiffe_id == f"spiffe://{TD}/svc/orders"
            assert verify_svid(first.cert_chain_pem, first.trust_bundle_pem) == first.spiffe_id
            assert b"PRIVATE KEY" not in b"".join(kv.value for kv in client.get_prefix(etcd_prefix)[0])
            # lifetime 4 s (+60 s backdating of not_before): renewal after ~2 s, a new leaf
            assert got_two.wait(10)
            assert rotations[-1].cert_chain_pem != first.cert_chain_pem
            assert rotations[-1].private_key_pem != first.private_key_pem
            gauge = REGISTRY.get_sample_value(
                "meshlib_identity_cert_expiry_seconds", {"service": "orders"})
            assert gauge is not None and 0 < gauge <= 4
        finally:
            source.close()


def test_malformed_and_foreign_requests_are_refused_with_reasons(client, authority, etcd_prefix) -> None:  # type: ignore[no-untyped-def]
    keys = IdentityKeys(etcd_prefix)
    with Signer(client, authority, prefix=etcd_prefix) as signer:
        assert signer.wait_active(10)
        before = _counter("orders", "malformed"), _counter("orders", "identity")
        client.put(keys.csr("orders", "bad1"), b"not a csr")
        a = _answer(client, keys, "orders", "bad1")
        assert a["status"] == "refused" and a["code"] == "malformed"
        assert "CERTIFICATE REQUEST" in a["reason"]
        # a CSR for payments written under orders
        csr = x509util.make_csr(x509util.generate_key(), f"spiffe://{TD}/svc/payments", "orders")
        client.put(keys.csr("orders", "steal"), csr)
        a = _answer(client, keys, "orders", "steal")
        assert a["status"] == "refused" and a["code"] == "identity"
        assert "payments" in a["reason"] and "orders" in a["reason"]
        # the signer counts a request once its answer is written: wait for the count
        _wait(lambda: (_counter("orders", "malformed"), _counter("orders", "identity")) == (
            before[0] + 1, before[1] + 1))
        # a key outside the layout (service not a DNS label) cannot be answered: removed, counted
        bad_key = keys.csr_root + "Not_A_Service/r1"
        before_bad = _counter("", "malformed")
        client.put(bad_key, csr)
        _wait(lambda: client.get(bad_key) is None)
        assert _counter("", "malformed") == before_bad + 1
        # requests are removed once answered
        assert client.get_prefix(keys.csr_root)[0] == []


def test_one_active_signer_and_failover(client, authority, etcd_prefix) -> None:  # type: ignore[no-untyped-def]
    keys = IdentityKeys(etcd_prefix)
    a = Signer(client, authority, prefix=etcd_prefix, name="a", lease_ttl=2)
    assert a.wait_active(10)
    b = Signer(client, authority, prefix=etcd_prefix, name="b", lease_ttl=2)
    try:
        assert not b.wait_active(1.0)
        assert client.get(keys.leader)[0] == b"a"  # type: ignore[index]
        a.close()
        assert b.wait_active(10)
        csr = x509util.make_csr(x509util.generate_key(), f"spiffe://{TD}/svc/orders", "orders")
        client.put(keys.csr("orders", "r1"), csr)
        assert _answer(client, keys, "orders", "r1")["status"] == "issued"
    finally:
        a.close() if a.active else None
        b.close()


def test_signer_down_longer_than_a_renewal_keeps_the_certificate_then_catches_up(  # type: ignore[no-untyped-def]
    client, authority, etcd_prefix
) -> None:
    signer = Signer(client, authority, prefix=etcd_prefix, lifetime=dt.timedelta(seconds=6))
    assert signer.wait_active(10)
    source = EtcdIdentitySource(
        client, "orders", prefix=etcd_prefix, trust_domain=TD, request_timeout=1.0, retry_interval=0.3
    )
    try:
        assert source.wait_ready(10)
        first = source.current()
        signer.close()  # renewal is due after ~3 s; the signer stays away for longer
        failed = metrics.IDENTITY_RENEWALS.labels("orders", "unavailable")._value.get()
        _wait(lambda: metrics.IDENTITY_RENEWALS.labels("orders", "unavailable")._value.get() >= failed + 2)
        assert source.current() is first  # kept while the signer is unreachable
        assert "no answer" in (source.last_error or "")
        renewed = threading.Event()
        source.subscribe(lambda c: renewed.set())
        signer = Signer(client, authority, prefix=etcd_prefix, lifetime=dt.timedelta(seconds=6))
        assert renewed.wait(10)  # catches up once the signer is back
        assert source.current().not_after > first.not_after
        assert source.last_error is None
    finally:
        source.close()
        signer.close()


def test_expired_certificate_is_refused_with_a_clear_reason() -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    ca = TestCA(TD, now=past)
    creds = ca.issue("orders", lifetime=dt.timedelta(minutes=10), now=past)
    with pytest.raises(SvidRejected) as e:
        verify_svid(creds.cert_chain_pem, creds.trust_bundle_pem)
    assert e.value.code == "expired" and "expired at" in str(e.value)
    leaf = x509.load_pem_x509_certificates(creds.cert_chain_pem)[0]
    assert leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ") in str(e.value)


def test_rate_limit_per_service_is_a_refusal_with_a_reason(client, authority, etcd_prefix) -> None:  # type: ignore[no-untyped-def]
    from meshlib.identity.ratelimit import RateLimiter

    keys = IdentityKeys(etcd_prefix)
    limiter = RateLimiter(per_minute=1, burst=1)
    with Signer(client, authority, prefix=etcd_prefix, limiter=limiter) as signer:
        assert signer.wait_active(10)
        for rid in ("a", "b"):
            csr = x509util.make_csr(x509util.generate_key(), f"spiffe://{TD}/svc/orders", "orders")
            client.put(keys.csr("orders", rid), csr)
        assert _answer(client, keys, "orders", "a")["status"] == "issued"
        b = _answer(client, keys, "orders", "b")
        assert b["status"] == "refused" and b["code"] == "rate_limited"
        assert "1 requests a minute" in b["reason"]
        csr = x509util.make_csr(x509util.generate_key(), f"spiffe://{TD}/svc/payments", "payments")
        client.put(keys.csr("payments", "c"), csr)  # another service is not limited by orders
        assert _answer(client, keys, "payments", "c")["status"] == "issued"


def test_ca_rotation_bundle_reaches_sources_then_new_leaves(client, etcd_prefix, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """docs/security.md "Rotating the CA": a two-root bundle first, then leaves of the new root."""
    from meshlib.identity.authority import init_ca_dir

    old = init_ca_dir(tmp_path / "ca1", TD)
    new = init_ca_dir(tmp_path / "ca2", TD, also_trust=(old / "bundle.pem").read_bytes())
    signer = Signer(client, Authority.load(old), prefix=etcd_prefix)
    assert signer.wait_active(10)
    source = EtcdIdentitySource(client, "orders", prefix=etcd_prefix, trust_domain=TD)
    try:
        assert source.wait_ready(10)
        first = source.current()
        bundles: list[bytes] = []
        two_roots = threading.Event()

        def on_rotation(c: Credentials) -> None:
            bundles.append(c.trust_bundle_pem)
            if len(x509util.load_certs(c.trust_bundle_pem)) == 2:
                two_roots.set()

        source.subscribe(on_rotation)
        signer.close()
        signer = Signer(client, Authority.load(new), prefix=etcd_prefix)
        assert two_roots.wait(10)  # the bundle alone changed: same leaf, both roots
        assert source.current().cert_chain_pem == first.cert_chain_pem
        assert verify_svid(first.cert_chain_pem, source.current().trust_bundle_pem)
        renewed = threading.Event()
        source.subscribe(lambda c: renewed.set() if c.cert_chain_pem != first.cert_chain_pem else None)
        source.renew_now()
        assert renewed.wait(10)
        leaf = source.current()
        assert verify_svid(leaf.cert_chain_pem, (new / "ca.crt").read_bytes()) == leaf.spiffe_id
        with pytest.raises(SvidRejected):  # not from the old root
            verify_svid(leaf.cert_chain_pem, (old / "ca.crt").read_bytes())
    finally:
        source.close()
        signer.close()
