"""WatchManager against real etcd: reset + ordered events, resume after kills, restarts,
compaction and a silent (SIGSTOPped) member, and a clean shutdown."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from meshlib.discovery.etcd_client import KV, EtcdClient, Event
from meshlib.discovery.watch import WatchManager


class Recorder:
    """Applies on_reset / on_events to a dict, the way a discovery cache would."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.state: dict[str, bytes] = {}
        self.resets: list[tuple[dict[str, bytes], int]] = []
        self.events: list[Event] = []
        self.revision = 0

    def on_reset(self, kvs: list[KV], rev: int) -> None:
        with self.cond:
            self.state = {kv.key: kv.value for kv in kvs}
            self.resets.append((dict(self.state), rev))
            self.revision = rev
            self.cond.notify_all()

    def on_events(self, events: list[Event], rev: int) -> None:
        with self.cond:
            assert rev > self.revision, f"revision went back: {rev} after {self.revision}"
            for ev in events:
                if ev.type == "put":
                    self.state[ev.kv.key] = ev.kv.value
                else:
                    self.state.pop(ev.kv.key, None)
            self.events.extend(events)
            self.revision = rev
            self.cond.notify_all()

    def wait(self, pred: Callable[[Recorder], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: pred(self), timeout)

    def put_keys(self, prefix: str) -> list[str]:
        with self.cond:
            return [e.kv.key for e in self.events if e.type == "put" and e.kv.key.startswith(prefix)]


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_reset_then_events_in_order(etcd) -> None:
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        c.put("/svc/a", b"1")
        c.put("/svc/b", b"2")
        c.put("/other", b"x")
        states: list[bool] = []
        rec = Recorder()
        with WatchManager(c, progress_interval=0.5, on_state=states.append) as wm:
            wm.watch_prefix("/svc/", rec.on_reset, rec.on_events)
            assert rec.wait(lambda r: len(r.resets) == 1, 5)
            assert rec.resets[0][0] == {"/svc/a": b"1", "/svc/b": b"2"}
            assert rec.resets[0][1] == c.status()["revision"]
            revs = [c.put(f"/svc/n{i}", str(i)) for i in range(20)]
            revs.append(c.put("/other", b"y"))  # outside the prefix: never delivered
            c.delete("/svc/a")
            assert rec.wait(lambda r: "/svc/a" not in r.state and len(r.events) == 21, 5)
            assert [e.kv.key for e in rec.events[:20]] == [f"/svc/n{i}" for i in range(20)]
            assert [e.kv.mod_revision for e in rec.events[:20]] == revs[:20]
            assert rec.events[-1].type == "delete" and rec.events[-1].kv.key == "/svc/a"
            assert rec.state == {"/svc/b": b"2", **{f"/svc/n{i}": str(i).encode() for i in range(20)}}
            assert wm.connected and states == [True]
            assert len(rec.resets) == 1
        assert states == [True, False]


def test_many_watches_share_one_stream_and_cancel_stops_one(etcd) -> None:
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        recs = {p: Recorder() for p in ("/a/", "/b/", "/c/")}
        with WatchManager(c, progress_interval=0.5) as wm:
            handles = {p: wm.watch_prefix(p, r.on_reset, r.on_events) for p, r in recs.items()}
            assert all(r.wait(lambda x: len(x.resets) == 1, 5) for r in recs.values())
            handles["/b/"].cancel()
            for p in recs:  # /a/k, /b/k, then /c/k: the sentinel
                c.put(p + "k", p)
            assert recs["/a/"].wait(lambda r: "/a/k" in r.state, 5)
            # One stream delivers its watches' events in revision order: once /c/k (written
            # after /b/k) has arrived, an event for /b/k would have arrived before it.
            assert recs["/c/"].wait(lambda r: "/c/k" in r.state, 5)
            assert recs["/b/"].events == [] and not handles["/b/"].active
            assert wm.streams_opened == 1
            assert handles["/a/"].revision == c.get("/a/k")[1]


def test_callback_errors_are_logged_and_do_not_stop_the_watch(etcd, caplog) -> None:
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        rec = Recorder()
        calls = []

        def flaky(events: list[Event], rev: int) -> None:
            calls.append(rev)
            if len(calls) == 1:
                raise RuntimeError("boom in callback")
            rec.on_events(events, rev)

        with WatchManager(c, progress_interval=0.5) as wm:
            wm.watch_prefix("/x/", rec.on_reset, flaky)
            assert rec.wait(lambda r: len(r.resets) == 1, 5)
            c.put("/x/1", b"1")
            assert _wait(lambda: len(calls) == 1, 5)
            c.put("/x/2", b"2")
            assert rec.wait(lambda r: "/x/2" in r.state, 5)
            assert wm.connected
        assert any("boom in callback" in (r.exc_text or "") for r in caplog.records)


def test_resume_after_sigkill_of_the_member_serving_the_stream(etcd_cluster) -> None:
    cluster = etcd_cluster
    member_ids = [m.status().header.member_id for m in cluster.members]
    with EtcdClient(cluster.endpoints, timeout=5) as c:
        rec = Recorder()
        with WatchManager(c, progress_interval=0.5) as wm:
            wm.watch_prefix("/seq/", rec.on_reset, rec.on_events)
            assert rec.wait(lambda r: len(r.resets) == 1, 5)
            for i in range(10):
                c.put(f"/seq/{i:03d}", str(i))
            assert rec.wait(lambda r: len(r.events) == 10, 5)
            victim = member_ids.index(wm.stream_member_id)

            # Writes keep flowing while the member the stream is on dies.
            writer_done = threading.Event()
            written: list[int] = []

            def writer() -> None:
                for i in range(10, 30):
                    written.append(c.put(f"/seq/{i:03d}", str(i)))
                    time.sleep(0.01)
                writer_done.set()

            t = threading.Thread(target=writer)
            t.start()
            cluster.kill(victim)
            t.join(30)
            assert writer_done.is_set()
            c.put("/seq/999", b"after the kill")
            # Current again within 3 s of the put that followed the kill.
            assert rec.wait(lambda r: "/seq/999" in r.state, 3.0), rec.put_keys("/seq/")
            # A put whose connection broke after etcd applied it is retried and so may appear
            # twice in etcd's history (two revisions); each revision is delivered exactly once.
            keys = list(dict.fromkeys(rec.put_keys("/seq/")))
            assert keys == [f"/seq/{i:03d}" for i in range(30)] + ["/seq/999"]
            revs = [e.kv.mod_revision for e in rec.events]
            assert revs == sorted(set(revs))  # in order, no duplicate
            assert set(written) <= set(revs)  # nothing lost
            history, _ = c.get_prefix("/seq/")
            assert {kv.key: kv.mod_revision for kv in history} == {
                e.kv.key: e.kv.mod_revision for e in rec.events
            }
            assert wm.stream_member_id != member_ids[victim]
            assert wm.streams_opened >= 2 and wm.connected
            assert len(rec.resets) == 1  # resumed from the last revision, no re-read needed


def test_resume_after_full_restart_of_a_single_etcd(etcd) -> None:
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        rec = Recorder()
        states: list[bool] = []
        with WatchManager(c, progress_interval=0.5, on_state=states.append) as wm:
            wm.watch_prefix("/r/", rec.on_reset, rec.on_events)
            assert rec.wait(lambda r: len(r.resets) == 1, 5)
            for i in range(5):
                c.put(f"/r/{i}", str(i))
            assert rec.wait(lambda r: len(r.events) == 5, 5)
            etcd.kill()
            assert _wait(lambda: not wm.connected, 5)
            etcd.restart()
            for i in range(5, 10):
                c.put(f"/r/{i}", str(i))
            assert rec.wait(lambda r: len(r.events) == 10, 5)
            assert rec.put_keys("/r/") == [f"/r/{i}" for i in range(10)]
            assert len(rec.resets) == 1 and wm.connected
            assert states[:3] == [True, False, True]


def test_etcd_down_at_start_then_callbacks_once_it_is_up(etcd) -> None:
    with EtcdClient(etcd.endpoints, timeout=3) as c:
        c.put("/late/a", b"1")
        etcd.kill()
        rec = Recorder()
        with WatchManager(c, progress_interval=0.5) as wm:
            wm.watch_prefix("/late/", rec.on_reset, rec.on_events)
            # A second stream is opened only after the first one failed: the manager has
            # tried the dead etcd, so the absence of a reset below is not just "too early".
            assert _wait(lambda: wm.streams_opened >= 2, 10)
            assert rec.resets == [] and not wm.connected and wm.last_contact is None
            etcd.restart()
            assert rec.wait(lambda r: len(r.resets) == 1, 5)
            assert rec.state == {"/late/a": b"1"}
            c.put("/late/b", b"2")
            assert rec.wait(lambda r: "/late/b" in r.state, 5)


def test_compaction_while_disconnected_resets_with_current_content(etcd_cluster) -> None:
    cluster = etcd_cluster
    # The watcher talks to member 0 only; the writer to members 1 and 2.
    with EtcdClient(cluster.endpoints[0], timeout=3) as wc, EtcdClient(
        cluster.endpoints[1:], timeout=5
    ) as c:
        for k in ("a", "b", "c"):
            c.put(f"/cmp/{k}", k)
        rec = Recorder()
        with WatchManager(wc, progress_interval=0.5) as wm:
            wm.watch_prefix("/cmp/", rec.on_reset, rec.on_events)
            assert rec.wait(lambda r: len(r.resets) == 1, 5)
            assert set(rec.state) == {"/cmp/a", "/cmp/b", "/cmp/c"}
            cluster.kill(0)
            assert _wait(lambda: not wm.connected, 5)
            c.put("/cmp/a", b"a2")
            c.delete("/cmp/b")
            c.put("/cmp/d", b"d")
            c.delete("/cmp/c")
            c.compact(c.put("/unrelated", b"x"), physical=True)
            cluster.restart(0)
            assert rec.wait(lambda r: len(r.resets) == 2, 10)
            truth, rev = c.get_prefix("/cmp/")
            assert rec.resets[1][0] == {kv.key: kv.value for kv in truth}
            assert rec.state == {"/cmp/a": b"a2", "/cmp/d": b"d"}  # deletes: keys missing
            assert rec.resets[1][1] >= rev
            c.put("/cmp/e", b"e")
            assert rec.wait(lambda r: "/cmp/e" in r.state, 5)


def test_silent_member_is_detected_and_the_stream_moves(etcd_cluster) -> None:
    cluster = etcd_cluster
    member_ids = [m.status().header.member_id for m in cluster.members]
    with EtcdClient(cluster.endpoints, timeout=5) as c:
        rec = Recorder()
        with WatchManager(c, progress_interval=0.5) as wm:
            wm.watch_prefix("/s/", rec.on_reset, rec.on_events)
            assert rec.wait(lambda r: len(r.resets) == 1, 5)
            # Progress answers keep last_contact fresh on an idle stream: it advances
            # again and again although nothing is written.
            for _ in range(3):
                before = wm.last_contact
                assert before is not None
                assert _wait(lambda b=before: (wm.last_contact or 0.0) > b, 3)
            victim = member_ids.index(wm.stream_member_id)
            pid = cluster.members[victim].pid
            assert pid is not None
            others = [e for i, e in enumerate(cluster.endpoints) if i != victim]
            opened = wm.streams_opened
            os.kill(pid, signal.SIGSTOP)
            try:
                with EtcdClient(others, timeout=10) as w:
                    w.put("/s/while-stopped", b"1")
                assert rec.wait(lambda r: "/s/while-stopped" in r.state, 15)
                assert wm.streams_opened > opened
                assert wm.stream_member_id != member_ids[victim]
            finally:
                os.kill(pid, signal.SIGCONT)


def test_close_stops_every_thread(etcd) -> None:
    before = set(threading.enumerate())
    c = EtcdClient(etcd.endpoints, timeout=3)
    rec = Recorder()
    wm = WatchManager(c, progress_interval=0.2)
    wm.watch_prefix("/t/", rec.on_reset, rec.on_events)
    assert rec.wait(lambda r: len(r.resets) == 1, 5)
    etcd.kill()  # also while reconnecting
    assert _wait(lambda: not wm.connected, 5)
    t0 = time.monotonic()
    wm.close()
    assert time.monotonic() - t0 < 2.5
    c.close()
    assert _wait(lambda: set(threading.enumerate()) <= before, 3), [
        t.name for t in set(threading.enumerate()) - before
    ]
    with pytest.raises(RuntimeError, match="closed"):
        wm.watch_prefix("/t/", rec.on_reset, rec.on_events)


def test_watch_through_grpc_proxy_that_ignores_progress_requests(etcd) -> None:
    from meshlib.testing.etcd import EtcdGrpcProxy

    with EtcdGrpcProxy(etcd) as proxy, EtcdClient(proxy.endpoints, timeout=3) as c:
        c.put("/px/a", b"1")
        rec = Recorder()
        with WatchManager(c, progress_interval=0.3) as wm:
            wm.watch_prefix("/px/", rec.on_reset, rec.on_events)
            assert rec.wait(lambda r: len(r.resets) == 1, 5)
            assert rec.state == {"/px/a": b"1"}
            time.sleep(1.5)  # 5 intervals without progress answers: not mistaken for silence
            c.put("/px/b", b"2")
            assert rec.wait(lambda r: "/px/b" in r.state, 5)
            assert wm.streams_opened == 1 and wm.connected


SENTINEL = "zz-sentinel"


class PrefixLog:
    """Per-watch record of what it was given, to check nothing is lost or misrouted.

    A watch is done when its sentinel key (``prefix + SENTINEL``, written after everything
    else under the prefix) has arrived: events of one watch arrive in revision order, so
    anything else it would receive has arrived by then."""

    def __init__(self, prefix: str, done: threading.Event, pending: set[str], lock: threading.Lock):
        self.prefix = prefix
        self.reset: dict[str, bytes] | None = None
        self.keys: list[str] = []
        self._done, self._pending, self._lock = done, pending, lock

    def on_reset(self, kvs: list[KV], rev: int) -> None:
        self.reset = {kv.key: kv.value for kv in kvs}

    def on_events(self, events: list[Event], rev: int) -> None:
        with self._lock:
            self.keys.extend(e.kv.key for e in events)
            if any(e.kv.key == self.prefix + SENTINEL for e in events):
                self._pending.discard(self.prefix)
            if not self._pending:
                self._done.set()


def _put_all(c: EtcdClient, items: list[tuple[str, bytes]]) -> None:
    from etcd3.etcdrpc import rpc_pb2

    for i in range(0, len(items), 100):  # Txns of 100 puts (etcd's --max-txn-ops is 128)
        ops = [
            rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k.encode(), value=v))
            for k, v in items[i:i + 100]
        ]
        c.kv.Txn(rpc_pb2.TxnRequest(success=ops), timeout=10)


def test_hundreds_of_watches_through_grpc_proxy_each_get_their_own_events(etcd) -> None:
    """etcd's grpc-proxy answers 'created' out of request order: a watch that joins a server
    watcher the proxy already has is answered at once, a new one once etcd has answered. Every
    watch must still receive exactly the events under its own prefix (none lost, none
    misrouted). A first manager watches every other prefix so the second one's creates
    alternate between both kinds."""
    from meshlib.testing.etcd import EtcdGrpcProxy

    n = 400
    prefixes = [f"/many/svc-{i:04d}/" for i in range(n)]
    with EtcdGrpcProxy(etcd) as proxy, EtcdClient(proxy.endpoints, timeout=5) as c:
        _put_all(c, [(p + "seed", p.encode()) for p in prefixes])
        lock = threading.Lock()
        done = threading.Event()
        pending: set[str] = set(prefixes)
        with WatchManager(c, progress_interval=0.5) as first, WatchManager(
            c, progress_interval=0.5
        ) as second:
            early = {p: PrefixLog(p, threading.Event(), set(), lock) for p in prefixes[1::2]}
            for p, log_ in early.items():
                first.watch_prefix(p, log_.on_reset, log_.on_events)
            # The proxy now holds one server watcher per odd prefix.
            assert _wait(lambda: all(h.reset is not None for h in early.values()), 15)
            logs = {p: PrefixLog(p, done, pending, lock) for p in prefixes}
            for p, log_ in logs.items():  # created quickly: one loop, no waiting
                second.watch_prefix(p, log_.on_reset, log_.on_events)
            assert _wait(lambda: all(h.reset is not None for h in logs.values()), 15)
            for p, log_ in logs.items():
                assert log_.reset == {p + "seed": p.encode()}, (p, log_.reset)
            _put_all(c, [(p + "update", b"u") for p in prefixes])
            _put_all(c, [(p + SENTINEL, b"s") for p in prefixes])
            assert done.wait(10), sorted(pending)[:10]
            expected = ["update", SENTINEL]
            assert _wait(lambda: all(h.keys[-1:] == [p + SENTINEL] for p, h in early.items()), 10)
            with lock:
                lost = sorted(p for p in prefixes if p + "update" not in logs[p].keys)
                wrong = {p: h.keys for p, h in logs.items() if h.keys != [p + k for k in expected]}
                wrong_early = {p: h.keys for p, h in early.items()
                               if h.keys != [p + k for k in expected]}
            assert not lost, f"{len(lost)} of {n} watches lost their update: {lost[:10]}"
            assert not wrong, f"{len(wrong)} watches got other events: {dict(list(wrong.items())[:5])}"
            assert not wrong_early, dict(list(wrong_early.items())[:5])
            assert first.streams_opened == 1 and second.streams_opened == 1


def _etcd_watchers(etcd) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"{etcd.client_url}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("etcd_debugging_mvcc_watcher_total "):
            return float(line.split()[1])
    raise AssertionError(f"etcd_debugging_mvcc_watcher_total missing from {etcd.client_url}/metrics")


def test_watches_cancelled_before_their_create_is_answered_get_nothing(etcd) -> None:
    """Creates go out one at a time; a watch cancelled while still queued is never created and
    one cancelled while its create is outstanding is cancelled at etcd once it is created."""
    n = 120
    prefixes = [f"/cq/{i:03d}/" for i in range(n)]
    with EtcdClient(etcd.endpoints, timeout=5) as c:
        base = _etcd_watchers(etcd)
        lock = threading.Lock()
        done = threading.Event()
        keep = set(prefixes[::3])
        pending = set(keep)
        logs = {p: PrefixLog(p, done, pending, lock) for p in prefixes}
        with WatchManager(c, progress_interval=0.5) as wm:
            handles = [wm.watch_prefix(p, h.on_reset, h.on_events) for p, h in logs.items()]
            for h in handles:
                if h.prefix not in keep:
                    h.cancel()
            assert _wait(lambda: all(logs[p].reset is not None for p in keep), 10)
            _put_all(c, [(p + "k", b"v") for p in prefixes])
            # The sentinels come last: one stream delivers its watches' events in revision
            # order, so once every kept watch has its sentinel, any event for a cancelled
            # watch (all at earlier revisions) would have arrived.
            _put_all(c, [(p + SENTINEL, b"s") for p in keep])
            assert done.wait(10), sorted(pending)[:10]
            with lock:
                assert all(logs[p].keys == [p + "k", p + SENTINEL] for p in keep)
                assert all(logs[p].keys == [] for p in prefixes if p not in keep)
            assert all(h.active == (h.prefix in keep) for h in handles)
            assert _wait(lambda: _etcd_watchers(etcd) - base == len(keep), 5), (
                _etcd_watchers(etcd) - base, len(keep))
            assert wm.streams_opened == 1 and wm.connected


def test_unreachable_etcd_is_reported_with_endpoints_time_and_errors(caplog) -> None:
    """Issue 9: with no endpoint answering, the warning names every endpoint, since when (wall
    clock) and each endpoint's last error, instead of 'cannot open a stream ... for 0s'."""
    import logging

    from meshlib.testing.etcd import free_port

    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]  # nothing listens there
    caplog.set_level(logging.WARNING, logger="meshlib.discovery")
    with EtcdClient(dead, timeout=1) as c:
        rec = Recorder()
        t0 = time.time()
        with WatchManager(c, progress_interval=0.5) as wm:
            wm.watch_prefix("/gone/", rec.on_reset, rec.on_events)
            assert _wait(lambda: wm.streams_opened >= 3, 10)  # both endpoints were tried
            assert wm.down_since is not None and t0 - 1 <= wm.down_since <= time.time()
            assert not wm.connected and rec.resets == []
    msgs = [r.getMessage() for r in caplog.records if "no etcd endpoint has answered" in
            r.getMessage()]
    assert msgs, [r.getMessage() for r in caplog.records]
    first = msgs[0]
    assert time.strftime("%H:%M", time.localtime(wm.down_since)) in first
    assert all(ep in first for ep in dead), first
    assert "UNAVAILABLE" in first and "for 0s" not in first
