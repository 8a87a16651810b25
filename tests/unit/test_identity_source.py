"""The identity interface and the test CA: real X.509-SVIDs, subscribers told of rotations."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshlib.identity import Credentials, IdentitySource, StaticIdentitySource
from meshlib.identity.testing import TestCA


def test_test_ca_issues_an_x509_svid() -> None:
    ca = TestCA("example.org")
    creds = ca.issue("orders")
    leaf = x509.load_pem_x509_certificates(creds.cert_chain_pem)[0]
    assert creds.spiffe_id == "spiffe://example.org/svc/orders"
    assert creds.service == "orders"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [creds.spiffe_id]
    assert san.get_values_for_type(x509.DNSName) == ["orders"]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert creds.not_after == leaf.not_valid_after_utc
    assert 3500 < creds.seconds_until_expiry() <= 3600


def test_static_source_notifies_subscribers_and_unsubscribes() -> None:
    ca = TestCA()
    source = StaticIdentitySource(ca.issue("orders"))
    assert isinstance(source, IdentitySource)
    seen: list[Credentials] = []
    unsubscribe = source.subscribe(seen.append)
    new = ca.issue("orders")
    source.set(new)
    assert seen == [new] and source.current() is new
    unsubscribe()
    source.set(ca.issue("orders"))
    assert seen == [new]


def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    ca = TestCA()
    source = StaticIdentitySource(ca.issue("a"))
    seen: list[Credentials] = []

    def boom(_: Credentials) -> None:
        raise RuntimeError("boom")

    source.subscribe(boom)
    source.subscribe(seen.append)
    source.set(ca.issue("a"))
    assert len(seen) == 1


def _ctx(creds: Credentials, tmp: Path, server: bool) -> ssl.SSLContext:
    (tmp / "c.pem").write_bytes(creds.cert_chain_pem)
    (tmp / "k.pem").write_bytes(creds.private_key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    ctx.load_verify_locations(cadata=creds.trust_bundle_pem.decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False
    return ctx


def test_test_ca_credentials_complete_a_mutual_tls_handshake(tmp_path: Path) -> None:
    ca = TestCA()
    (tmp_path / "s").mkdir()
    (tmp_path / "c").mkdir()
    sctx = _ctx(ca.issue("orders"), tmp_path / "s", True)
    cctx = _ctx(ca.issue("gateway"), tmp_path / "c", False)
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    peer: dict[str, object] = {}

    def serve() -> None:
        conn, _ = lsock.accept()
        with sctx.wrap_socket(conn, server_side=True) as tls:
            peer.update(tls.getpeercert() or {})
            tls.sendall(b"x")

    t = threading.Thread(target=serve)
    t.start()
    with cctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) as tls:
        server_cert = tls.getpeercert() or {}
        assert tls.recv(1) == b"x"
    t.join(5)
    lsock.close()
    assert ("URI", "spiffe://meshlib.local/svc/orders") in server_cert["subjectAltName"]  # type: ignore[operator]
    assert ("URI", "spiffe://meshlib.local/svc/gateway") in peer["subjectAltName"]  # type: ignore[operator]


def test_expired_credentials_can_be_made_for_tests() -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    ca = TestCA(now=past)
    creds = ca.issue("orders", lifetime=dt.timedelta(minutes=5), now=past)
    assert creds.seconds_until_expiry() < 0
