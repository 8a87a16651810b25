"""LeaseKeeper against real etcd: keepalive past the TTL, re-grant after loss, revoke, threads."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable

from meshlib.discovery.etcd_client import EtcdClient
from meshlib.discovery.lease import LeaseKeeper
from meshlib.testing.etcd import EtcdServer


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


class Registrar:
    """on_granted/on_lost callbacks that keep one key on the current lease."""

    def __init__(self, client: EtcdClient, key: str) -> None:
        self.client = client
        self.key = key
        self.granted: list[int] = []
        self.lost: list[int] = []

    def on_granted(self, lease_id: int) -> None:
        self.client.put(self.key, b"up", lease=lease_id, timeout=2)
        self.granted.append(lease_id)

    def on_lost(self, lease_id: int) -> None:
        self.lost.append(lease_id)


def test_keepalive_keeps_the_key_past_its_ttl(etcd) -> None:
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        reg = Registrar(c, "/lease/a")
        keeper = LeaseKeeper(c, 2, on_granted=reg.on_granted, on_lost=reg.on_lost)
        try:
            assert keeper.wait_alive(5)
            lid = keeper.lease_id
            assert lid == reg.granted[0] and c.get_prefix("/lease/a")[0][0].lease == lid
            time.sleep(5)  # 2.5 x TTL
            assert c.get("/lease/a") is not None
            assert keeper.alive and keeper.lease_id == lid and reg.lost == []
            assert c.lease_time_to_live(lid).ttl > 0
        finally:
            keeper.revoke()
        assert c.get("/lease/a") is None  # revoke deletes the key at once
        assert keeper.lease_id is None and not keeper.alive


def test_revoked_lease_is_replaced_and_the_key_comes_back(etcd) -> None:
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        reg = Registrar(c, "/lease/b")
        with LeaseKeeper(c, 3, on_granted=reg.on_granted, on_lost=reg.on_lost) as keeper:
            assert keeper.wait_alive(5)
            old = keeper.lease_id
            assert old is not None
            c.lease_revoke(old)  # an operator revokes it: the key goes with it
            assert c.get("/lease/b") is None
            assert _wait(lambda: len(reg.granted) == 2, 5)
            assert reg.lost == [old] and reg.granted[1] != old
            assert keeper.lease_id == reg.granted[1] and keeper.alive
            assert c.get_prefix("/lease/b")[0][0].lease == reg.granted[1]


def test_lease_lost_after_etcd_restart_with_wiped_data(tmp_path) -> None:
    server = EtcdServer(data_dir=tmp_path / "data").start()
    try:
        with EtcdClient(server.endpoints, timeout=3) as c:
            reg = Registrar(c, "/lease/c")
            with LeaseKeeper(c, 3, on_granted=reg.on_granted, on_lost=reg.on_lost) as keeper:
                assert keeper.wait_alive(5)
                old = keeper.lease_id
                server.kill()
                shutil.rmtree(tmp_path / "data")
                server.start()  # same ports, empty store: the lease and the key are gone
                assert _wait(lambda: len(reg.granted) == 2, 10)
                assert reg.lost == [old] and reg.granted[1] != old
                value = c.get("/lease/c")
                assert value is not None and value[0] == b"up"
                assert c.lease_time_to_live(reg.granted[1]).ttl > 0
    finally:
        server.stop()


def test_outage_longer_than_ttl_reports_lost_then_registers_again(etcd) -> None:
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        reg = Registrar(c, "/lease/d")
        with LeaseKeeper(c, 2, on_granted=reg.on_granted, on_lost=reg.on_lost) as keeper:
            assert keeper.wait_alive(5)
            old = keeper.lease_id
            etcd.kill()
            # No keepalive can succeed: after the TTL the lease is surely expired.
            assert _wait(lambda: reg.lost == [old], 6)
            assert not keeper.alive and keeper.lease_id is None
            etcd.restart()
            assert _wait(lambda: len(reg.granted) == 2, 10)
            assert keeper.alive and keeper.lease_id == reg.granted[1] != old
            got = c.get_prefix("/lease/d")[0]
            assert got[0].lease == reg.granted[1]


def test_failing_on_granted_revokes_and_retries(etcd) -> None:
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        seen: list[int] = []

        def on_granted(lease_id: int) -> None:
            seen.append(lease_id)
            if len(seen) == 1:
                raise RuntimeError("could not register")
            c.put("/lease/e", b"up", lease=lease_id)

        with LeaseKeeper(c, 3, on_granted=on_granted) as keeper:
            assert keeper.wait_alive(5)
            assert len(seen) == 2 and keeper.lease_id == seen[1] and keeper.grants == 1
            assert _wait(lambda: _lease_gone(c, seen[0]), 3)  # the failed one was revoked


def _lease_gone(c: EtcdClient, lease_id: int) -> bool:
    try:
        c.lease_time_to_live(lease_id)
    except Exception:
        return True
    return False


def test_close_stops_the_thread(etcd) -> None:
    before = set(threading.enumerate())
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        keeper = LeaseKeeper(c, 2)
        assert keeper.wait_alive(5)
        etcd.kill()  # close also while keepalives are failing
        time.sleep(0.5)
        t0 = time.monotonic()
        keeper.close()
        assert time.monotonic() - t0 < 2.5
    assert _wait(lambda: set(threading.enumerate()) <= before, 3), [
        t.name for t in set(threading.enumerate()) - before
    ]


class DirectWatch:
    """Every event under ``prefix`` as a watch opened directly on the cluster's members sees
    it (not through the proxies under test): what callers would see of a registration."""

    def __init__(self, cluster, prefix: str) -> None:
        from meshlib.discovery.watch import WatchManager

        self.events: list[tuple[str, str]] = []
        self._synced = threading.Event()
        self._client = EtcdClient(cluster.endpoints, timeout=3)
        self._watcher = WatchManager(self._client, progress_interval=0.5)
        self._watcher.watch_prefix(
            prefix,
            lambda kvs, rev: self._synced.set(),
            lambda evs, rev: self.events.extend((e.type, e.kv.key) for e in evs),
        )
        assert self._synced.wait(5)

    def deletes(self) -> list[tuple[str, str]]:
        return [e for e in self.events if e[0] == "delete"]

    def settled_deletes(self, sentinel_key: str) -> list[tuple[str, str]]:
        """The deletes seen once a sentinel written now has arrived: one watch delivers in
        revision order, so every delete etcd made before it has arrived too."""
        self._client.put(sentinel_key, b"s")
        assert _wait(lambda: ("put", sentinel_key) in self.events, 5), self.events
        return self.deletes()

    def close(self) -> None:
        self._watcher.close()
        self._client.close()

    def __enter__(self) -> DirectWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_registrations_through_grpc_proxies_hold_for_3_ttls(etcd_cluster) -> None:
    """Issue 10: through two ``etcd grpc-proxy`` processes in front of a 3-member cluster, two
    registrations with a 3 s TTL hold for 3.5 x TTL: a watch opened directly on the cluster sees
    not one delete of their keys, the leases are never lost or re-granted, and each client keeps
    ONE keepalive stream (etcd's clients do the same; a stream per keepalive failed behind the
    proxy with ``context canceled`` and lost the lease every ~11 s)."""
    from meshlib import Mesh
    from meshlib.testing import EtcdGrpcProxy

    prefix = "/lease-proxy/v1"
    with (
        EtcdGrpcProxy(etcd_cluster) as p1,
        EtcdGrpcProxy(etcd_cluster) as p2,
        DirectWatch(etcd_cluster, f"{prefix}/services/") as seen,
    ):
        proxies = [p1.endpoint, p2.endpoint]
        with Mesh(proxies, prefix=prefix, handle_sigterm=False) as a, \
                Mesh(list(reversed(proxies)), prefix=prefix, handle_sigterm=False) as b:
            regs = [a.register("held", 9201, ttl=3), b.register("held", 9202, ttl=3)]
            assert all(r.wait_registered(5) for r in regs)
            keepers = [r._keeper for r in regs]
            leases = [k.lease_id for k in keepers]
            assert _wait(lambda: len(seen.events) == 2, 5), seen.events
            deadline = time.monotonic() + 10.5  # 3.5 x TTL
            while time.monotonic() < deadline:
                assert not seen.deletes(), seen.events
                time.sleep(0.1)
            assert seen.settled_deletes(f"{prefix}/services/sentinel/x") == []
            assert [k.lease_id for k in keepers] == leases
            assert [(k.grants, k.losses) for k in keepers] == [(1, 0), (1, 0)]
            assert [r.registrations for r in regs] == [1, 1]
            for m in (a, b):
                ka = m.client._keepalive
                assert ka is not None and ka.streams_opened == 1
                assert m.client.stream_endpoint in proxies
        # closing revokes through the proxies: now both keys are deleted
        assert _wait(lambda: len(seen.deletes()) == 2, 5), seen.events


def test_registration_holds_while_the_proxy_carrying_its_keepalives_hangs(etcd_cluster) -> None:
    """Issue 10.2 for leases: two grpc-proxies; the one carrying the keepalive stream is
    SIGSTOPped (TCP stays up) for 1.5 x TTL. The keepalive stream leaves it (when the watch
    stream finds it hung, or after an unanswered keepalive, TTL/3 + 1 s) for the other proxy, and
    the record is never deleted: a watch opened directly on the cluster sees no delete."""
    import os
    import signal

    from meshlib import Mesh
    from meshlib.testing import EtcdGrpcProxy

    prefix = "/lease-hang/v1"
    with (
        EtcdGrpcProxy(etcd_cluster) as p1,
        EtcdGrpcProxy(etcd_cluster) as p2,
        DirectWatch(etcd_cluster, f"{prefix}/services/") as seen,
    ):
        proxies = {p1.endpoint: p1, p2.endpoint: p2}
        with Mesh(list(proxies), prefix=prefix, handle_sigterm=False) as mesh:
            reg = mesh.register("hung", 9301, ttl=6)
            assert reg.wait_registered(5)
            keeper = reg._keeper
            lease = keeper.lease_id
            assert _wait(lambda: mesh.client._keepalive is not None, 5)
            ka = mesh.client._keepalive
            assert _wait(lambda: ka._stream is not None, 5)
            hung = proxies[ka._stream.endpoint]
            assert hung.pid is not None
            os.kill(hung.pid, signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 9.0  # 1.5 x TTL
                while time.monotonic() < deadline:
                    assert not seen.deletes(), seen.events
                    time.sleep(0.1)
                assert ka.streams_opened >= 2
                assert ka._stream is None or ka._stream.endpoint != hung.endpoint
            finally:
                os.kill(hung.pid, signal.SIGCONT)
            assert seen.settled_deletes(f"{prefix}/services/sentinel/x") == []
            assert keeper.lease_id == lease and keeper.losses == 0 and reg.registrations == 1
