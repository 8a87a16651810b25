"""The etcd client over TLS with client certificates, against a real etcd started with
``--client-cert-auth``: with auth on, etcd takes the user from the certificate's CN."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlib.discovery.etcd_auth import EtcdAuth
from meshlib.discovery.etcd_client import EtcdAuthError, EtcdClient
from meshlib.identity import x509util
from meshlib.testing.binaries import find_etcd_binary
from meshlib.testing.process import free_port, make_temp_dir, reap, remove_temp_dir, spawn


def _cert(ca_key, ca_cert, cn: str, server: bool, d: Path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    key = x509util.generate_key()
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage(
             [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    (d / f"{cn}.crt").write_bytes(x509util.cert_pem(cert))
    (d / f"{cn}.key").write_bytes(x509util.key_pem(key))
    return str(d / f"{cn}.crt"), str(d / f"{cn}.key")


@pytest.fixture
def tls_etcd() -> Iterator[tuple[str, Path]]:
    work = make_temp_dir("meshlib-etcd-tls-")
    ca_key = x509util.generate_key()
    ca_cert = x509util.make_root(ca_key, "etcd.test", lifetime=dt.timedelta(hours=1))
    (work / "ca.crt").write_bytes(x509util.cert_pem(ca_cert))
    server_crt, server_key = _cert(ca_key, ca_cert, "server", True, work)
    for cn in ("root", "orders"):
        _cert(ca_key, ca_cert, cn, False, work)
    port, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{port}"
    proc = spawn([
        find_etcd_binary(), "--name", "tls", "--data-dir", str(work / "data"),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
        "--cert-file", server_crt, "--key-file", server_key,
        "--trusted-ca-file", str(work / "ca.crt"), "--client-cert-auth",
        "--unsafe-no-fsync",
    ], work / "etcd.log")
    try:
        yield url, work
    finally:
        reap(proc, 5)
        remove_temp_dir(work)


def _ctl(url: str, work: Path, user: str, *args: str) -> None:
    subprocess.run(
        [find_etcd_binary("etcdctl"), "--endpoints", url, "--cacert", str(work / "ca.crt"),
         "--cert", str(work / f"{user}.crt"), "--key", str(work / f"{user}.key"), *args],
        check=True, capture_output=True, timeout=30,
    )


def _auth(work: Path, cn: str) -> EtcdAuth:
    return EtcdAuth.from_files(ca_cert=str(work / "ca.crt"), cert=str(work / f"{cn}.crt"),
                               key=str(work / f"{cn}.key"))


def test_client_certificates_and_cn_as_user(tls_etcd: tuple[str, Path]) -> None:
    url, work = tls_etcd
    with EtcdClient(url, timeout=15, auth=_auth(work, "root")) as root:
        assert root.tls
        root.put("/meshlib/v1/ready", b"1")  # waits for etcd to come up (retries UNAVAILABLE)
    _ctl(url, work, "root", "user", "add", "root", "--no-password")
    _ctl(url, work, "root", "user", "grant-role", "root", "root")
    _ctl(url, work, "root", "role", "add", "svc-orders")
    _ctl(url, work, "root", "role", "grant-permission", "svc-orders", "readwrite", "--prefix=true",
         "/meshlib/v1/identity/csr/orders/")
    _ctl(url, work, "root", "user", "add", "orders", "--no-password")
    _ctl(url, work, "root", "user", "grant-role", "orders", "svc-orders")
    _ctl(url, work, "root", "auth", "enable")
    with EtcdClient(url, timeout=5, auth=_auth(work, "orders")) as orders:
        orders.put("/meshlib/v1/identity/csr/orders/r1", b"csr")
        assert orders.get("/meshlib/v1/identity/csr/orders/r1") is not None
        with pytest.raises(EtcdAuthError, match="permission denied"):
            orders.put("/meshlib/v1/identity/csr/payments/r1", b"csr")
    # without a client certificate the TLS handshake is refused: no answer within the budget
    from meshlib.discovery.etcd_client import EtcdUnavailable

    with EtcdClient(url, timeout=2, auth=EtcdAuth.from_files(ca_cert=str(work / "ca.crt"))) as anon:
        with pytest.raises((EtcdUnavailable, EtcdAuthError)):
            anon.get("/meshlib/v1/x")
