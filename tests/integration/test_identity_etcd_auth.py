"""etcd authentication in meshlib's etcd client, and who may ask for which identity.

A real etcd with auth on (users, roles with prefix permissions, ``auth enable``), set up with
the exact etcdctl commands docs/security.md gives.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlib.discovery.etcd_auth import EtcdAuth
from meshlib.discovery.etcd_client import EtcdAuthError, EtcdClient
from meshlib.identity import x509util
from meshlib.identity.authority import Authority
from meshlib.identity.etcd_source import EtcdIdentitySource
from meshlib.identity.keys import IdentityKeys, parse_answer
from meshlib.identity.signer import Signer
from meshlib.identity.testing import TestCA
from meshlib.testing.server import EtcdServer

TD = "meshlib.local"
PREFIX = "/meshlib/v1"
ROOT = "root:rootpw"


def setup_auth(etcd: EtcdServer, services: list[str]) -> None:
    """The commands of docs/security.md "etcd authentication", for a signer and services."""
    ctl = etcd.etcdctl
    ctl("user", "add", "root", "--new-user-password=rootpw")
    ctl("user", "grant-role", "root", "root")
    ctl("role", "add", "meshlib-signer")
    ctl("role", "grant-permission", "meshlib-signer", "readwrite", "--prefix=true", f"{PREFIX}/identity/")
    ctl("user", "add", "meshlib-signer", "--new-user-password=signerpw")
    ctl("user", "grant-role", "meshlib-signer", "meshlib-signer")
    for svc in services:
        role = f"svc-{svc}"
        ctl("role", "add", role)
        ctl("role", "grant-permission", role, "readwrite", "--prefix=true", f"{PREFIX}/services/{svc}/")
        ctl("role", "grant-permission", role, "readwrite", "--prefix=true", f"{PREFIX}/identity/csr/{svc}/")
        ctl("role", "grant-permission", role, "read", "--prefix=true", f"{PREFIX}/identity/certs/{svc}/")
        ctl("role", "grant-permission", role, "read", "--prefix=true", f"{PREFIX}/identity/bundle")
        ctl("user", "add", svc, f"--new-user-password={svc}pw")
        ctl("user", "grant-role", svc, role)
    ctl("auth", "enable")


def client(etcd: EtcdServer, user: str | None, **kw: object) -> EtcdClient:
    auth = EtcdAuth(user=user, password=f"{user}pw") if user else EtcdAuth()
    return EtcdClient(etcd.endpoint, timeout=3, auth=auth, **kw)  # type: ignore[arg-type]


@pytest.fixture
def etcd_auth() -> Iterator[EtcdServer]:
    server = EtcdServer(extra_args=["--auth-token-ttl", "1"]).start()
    try:
        setup_auth(server, ["orders", "payments"])
        yield server
    finally:
        server.stop()


def test_without_credentials_etcd_refuses_with_a_clear_error(etcd_auth: EtcdServer) -> None:
    with client(etcd_auth, None) as c, pytest.raises(EtcdAuthError) as e:
        c.get(f"{PREFIX}/identity/bundle")
    assert "MESHLIB_ETCD_USER" in str(e.value)
    with pytest.raises(EtcdAuthError) as e2:
        EtcdClient(etcd_auth.endpoint, timeout=3,
                   auth=EtcdAuth(user="orders", password="wrong")).get("/x")
    assert "authenticate as 'orders'" in str(e2.value)


def test_only_service_x_user_can_write_x_requests(etcd_auth: EtcdServer) -> None:
    keys = IdentityKeys(PREFIX)
    with client(etcd_auth, "orders") as orders:
        csr = x509util.make_csr(x509util.generate_key(), f"spiffe://{TD}/svc/orders", "orders")
        orders.put(keys.csr("orders", "r1"), csr)
        # orders asking for payments' identity, written where payments' requests go
        steal = x509util.make_csr(x509util.generate_key(), f"spiffe://{TD}/svc/payments", "payments")
        with pytest.raises(EtcdAuthError) as e:
            orders.put(keys.csr("payments", "r2"), steal)
        assert "permission denied" in str(e.value)
        with pytest.raises(EtcdAuthError):
            orders.put(keys.bundle, b"forged roots")
        with pytest.raises(EtcdAuthError):
            orders.get(keys.cert("payments", "r2"))


def test_token_refreshed_after_expiry_and_after_an_auth_change(etcd_auth: EtcdServer) -> None:
    with client(etcd_auth, "orders") as c:
        key = f"{PREFIX}/services/orders/x"
        c.put(key, b"1")
        assert c._token_auth is not None and c._token_auth.authentications == 1
        # Setting the user's password (to the same value) makes etcd drop its tokens
        etcd_auth.etcdctl("--user", ROOT, "user", "passwd", "orders", "--interactive=false",
                          input="orderspw\n")
        c.put(key, b"2")
        assert c._token_auth.authentications == 2
        # A simple token expires after --auth-token-ttl (1 s here) without use: the behaviour
        # under test is time itself, so this waits past the TTL.
        time.sleep(2.5)
        assert c.get(key) == (b"2", pytest.approx(0, abs=10**9))
        assert c._token_auth.authentications == 3


def test_signer_and_sources_with_auth(etcd_auth: EtcdServer, tmp_path: Path) -> None:
    keys = IdentityKeys(PREFIX)
    authority = Authority.load(TestCA(TD).write_dir(tmp_path / "ca"), TD)
    signer_client = EtcdClient(etcd_auth.endpoint, timeout=3,
                               auth=EtcdAuth(user="meshlib-signer", password="signerpw"))
    signer = Signer(signer_client, authority, prefix=PREFIX, lifetime=dt.timedelta(minutes=5))
    orders_client = client(etcd_auth, "orders")
    payments_client = client(etcd_auth, "payments")
    source = EtcdIdentitySource(orders_client, "orders", prefix=PREFIX, trust_domain=TD)
    try:
        assert signer.wait_active(10)
        assert source.wait_ready(15), source.last_error
        assert source.current().spiffe_id == f"spiffe://{TD}/svc/orders"
        # payments' user writes, under its own prefix, a request for orders' identity: etcd lets
        # it write there, the signer refuses it with the reason
        steal = x509util.make_csr(x509util.generate_key(), f"spiffe://{TD}/svc/orders", "payments")
        payments_client.put(keys.csr("payments", "steal"), steal)
        deadline = time.monotonic() + 10
        while (got := payments_client.get(keys.cert("payments", "steal"))) is None:
            assert time.monotonic() < deadline, "no answer from the signer"
            time.sleep(0.02)
        answer = parse_answer(got[0])
        assert answer["status"] == "refused" and answer["code"] == "identity"
        assert "'payments'" in answer["reason"]
    finally:
        source.close()
        signer.close()
        for c in (signer_client, orders_client, payments_client):
            c.close()


def test_watch_keeps_working_after_etcd_drops_the_token(etcd_auth: EtcdServer) -> None:
    """etcd refuses watch creates on a stream whose token it dropped; the watch manager reopens
    the stream with a fresh token (the new watch's first read re-authenticates; a stream opened
    with a token older than stream_refresh_after also gets a fresh one) and the watch delivers.
    Writes go through etcdctl, so no write of this client renews the token."""
    import threading

    from meshlib.discovery.watch import WatchManager

    auth = EtcdAuth(user="orders", password="orderspw", stream_refresh_after=0.5)
    with EtcdClient(etcd_auth.endpoint, timeout=3, auth=auth) as c:
        wm = WatchManager(c)
        try:
            first = threading.Event()
            wm.watch_prefix(f"{PREFIX}/identity/csr/orders/", lambda kvs, r: first.set(),
                            lambda evs, r: None)
            assert first.wait(10)
            assert c._token_auth is not None and c._token_auth.authentications == 1
            etcd_auth.etcdctl("--user", ROOT, "user", "passwd", "orders", "--interactive=false",
                              input="orderspw\n")
            got = threading.Event()
            wm.watch_prefix(f"{PREFIX}/services/orders/", lambda kvs, r: None,
                            lambda evs, r: got.set())
            deadline = time.monotonic() + 15
            while not got.is_set():
                assert time.monotonic() < deadline, "watch never delivered after the token change"
                etcd_auth.etcdctl("--user", ROOT, "put", f"{PREFIX}/services/orders/x", "1")
                got.wait(0.3)
            assert c._token_auth.authentications >= 2
            assert wm.streams_opened >= 2  # the refused create reopened the stream
        finally:
            wm.close()
