"""EtcdClient against a real etcd: KV, paged prefix reads, leases, errors and failover."""

from __future__ import annotations

import time

import pytest

from meshlib.discovery.etcd_client import (
    EtcdClient,
    EtcdCompacted,
    EtcdUnavailable,
    LeaseNotFound,
    grpc_target,
    parse_endpoints,
    prefix_range_end,
)
from meshlib.testing.etcd import free_port


def test_prefix_range_end_follows_the_etcd_rule() -> None:
    assert prefix_range_end(b"/a/") == b"/a0"
    assert prefix_range_end(b"ab\xff") == b"ac"
    assert prefix_range_end(b"\xff\xff") == b"\0"
    assert prefix_range_end(b"") == b"\0"


def test_endpoints_parse_into_one_round_robin_target() -> None:
    hosts = parse_endpoints("http://127.0.0.1:2379, 127.0.0.1:22379")
    assert hosts == [("127.0.0.1", 2379), ("127.0.0.1", 22379)]
    assert grpc_target(hosts) == "ipv4:127.0.0.1:2379,127.0.0.1:22379"
    assert grpc_target(parse_endpoints(["[::1]:2379"])) == "ipv6:[::1]:2379"
    assert grpc_target(parse_endpoints(["etcd.example:2379"])) == "dns:///etcd.example:2379"
    with pytest.raises(ValueError, match="port 'x'"):
        parse_endpoints("127.0.0.1:x")
    with pytest.raises(ValueError, match="empty"):
        parse_endpoints("")


def test_kv_round_trip(etcd) -> None:
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        assert c.get("/k") is None
        r1 = c.put("/k", b"v1")
        assert c.get("/k") == (b"v1", r1)
        r2 = c.put("/k", "v2")
        assert r2 > r1 and c.get("/k") == (b"v2", r2)
        assert c.put_if_absent("/k", b"other") is False
        assert c.put_if_absent("/new", b"n") is True
        assert c.delete("/k") == 1
        assert c.delete("/k") == 0
        assert c.get("/k") is None
        c.put("/d/1", b"1")
        c.put("/d/2", b"2")
        c.put("/e", b"outside")
        assert c.delete_prefix("/d/") == 2
        assert c.get("/e") == (b"outside", c.get("/e")[1])
        st = c.status()
        assert st["version"].startswith("3.") and st["member_id"] != 0 and st["leader"] != 0


def test_get_prefix_pages_read_one_revision(etcd) -> None:
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        for i in range(23):
            c.put(f"/p/{i:03d}", f"v{i}")
        c.put("/q", b"not in prefix")
        expected = [f"/p/{i:03d}" for i in range(23)]

        # Write between the pages: the later pages must still be read at the first revision.
        real_range = c.kv.Range
        calls = []

        def racing_range(req, **kw):
            resp = real_range(req, **kw)
            calls.append(req.revision)
            if len(calls) == 1:
                c.put("/p/000a", b"inserted after page 1")
                c.put("/p/022", b"changed after page 1")
                c.delete("/p/015")
            return resp

        c.kv.Range = racing_range  # type: ignore[method-assign]
        kvs, rev = c.get_prefix("/p/", page_size=5)
        c.kv.Range = real_range  # type: ignore[method-assign]

        assert len(calls) == 5  # 23 keys in pages of 5
        assert calls[0] == 0 and all(r == rev for r in calls[1:])
        assert [kv.key for kv in kvs] == expected
        assert kvs[-1].value == b"v22"
        assert all(kv.mod_revision <= rev for kv in kvs)

        kvs2, rev2 = c.get_prefix("/p/", keys_only=True, page_size=4)
        assert rev2 > rev
        keys2 = [kv.key for kv in kvs2]
        assert "/p/000a" in keys2 and "/p/015" not in keys2 and len(keys2) == 23
        assert all(kv.value == b"" for kv in kvs2)


def test_reading_a_compacted_revision_raises_compacted(etcd) -> None:
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        first = c.put("/c", b"1")
        c.put("/c", b"2")
        c.compact(c.put("/c", b"3"))
        c.compact(first)  # compacting to an older revision again is not an error
        from etcd3.etcdrpc import rpc_pb2

        with pytest.raises(EtcdCompacted, match="compacted"):
            c._call(
                "get", "'/c'",
                lambda t: c.kv.Range(rpc_pb2.RangeRequest(key=b"/c", revision=first), timeout=t),
            )


def test_unavailable_etcd_raises_within_timeout_naming_endpoints() -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with EtcdClient(dead, timeout=1.0) as c:
        t0 = time.monotonic()
        with pytest.raises(EtcdUnavailable) as info:
            c.get("/x")
        elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert dead[0] in msg and dead[1] in msg and "UNAVAILABLE" in msg and "'/x'" in msg
    assert 0.9 <= elapsed < 3.0


def test_lease_grant_keepalive_ttl_and_revoke(etcd) -> None:
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        lid, ttl = c.lease_grant(5)
        assert lid > 0 and ttl == 5
        c.put("/leased", b"x", lease=lid)
        assert c.lease_keepalive_once(lid) == 5
        info = c.lease_time_to_live(lid, keys=True)
        assert info.granted_ttl == 5 and 0 < info.ttl <= 5 and info.keys == ("/leased",)
        kvs, _ = c.get_prefix("/leased")
        assert kvs[0].lease == lid
        c.lease_revoke(lid)
        assert c.get("/leased") is None
        with pytest.raises(LeaseNotFound):
            c.lease_keepalive_once(lid)
        with pytest.raises(LeaseNotFound):
            c.lease_time_to_live(lid)
        with pytest.raises(LeaseNotFound):
            c.lease_revoke(lid)


def test_calls_fail_over_when_the_leader_is_killed(etcd_cluster) -> None:
    with EtcdClient(etcd_cluster.endpoints, timeout=5) as c:
        c.put("/f", b"before")
        etcd_cluster.kill(etcd_cluster.leader_index())
        # Every call, whichever member round robin picks, succeeds within its timeout.
        for i in range(10):
            c.put(f"/f/{i}", b"after")
        assert c.get("/f") == (b"before", c.get("/f")[1])
        kvs, _ = c.get_prefix("/f/")
        assert len(kvs) == 10


def test_requests_pass_a_sigstopped_member_within_one_attempt_deadline(etcd_cluster) -> None:
    """Issue 10.2: a SIGSTOPped member keeps its TCP connection, so round robin still sends it
    requests; each such attempt ends at its deadline (max(1 s, timeout / 2)) and the retry goes
    to the next member. No read takes longer than one attempt deadline plus a retry."""
    import os
    import signal

    timeout = 2.0
    with EtcdClient(etcd_cluster.endpoints, timeout=timeout) as c:
        c.put("/hang/a", b"1")
        for _ in range(6):  # every subchannel READY before the stop
            assert c.get("/hang/a") is not None
        victim = etcd_cluster.members[etcd_cluster.leader_index() - 1]  # a follower
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            took = []
            for _ in range(6):
                t0 = time.monotonic()
                got = c.get("/hang/a", timeout=timeout)
                took.append(time.monotonic() - t0)
                assert got is not None and got[0] == b"1"
        finally:
            os.kill(victim.pid, signal.SIGCONT)
    attempt = max(1.0, timeout / 2)
    assert max(took) < attempt + 0.5, took
    assert any(t >= attempt * 0.9 for t in took), took  # round robin did meet the stopped one
