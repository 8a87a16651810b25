"""The sans-I/O watch state machine, driven response by response from tables (no etcd, no
threads: these are etcd's documented answers, built as the protobuf messages etcd sends)."""

from __future__ import annotations

from typing import Any

import pytest
from etcd3.etcdrpc import kv_pb2, rpc_pb2

from meshlib.discovery.watch_state import (
    PROBE_KEY,
    Cancel,
    Create,
    Deliver,
    End,
    Forget,
    Relisted,
    StreamState,
    WatchState,
)


def W(wid: int = 1, prefix: str = "/s/", next_rev: int = 10, **kw: Any) -> WatchState:
    return WatchState(wid=wid, prefix=prefix, key=prefix.encode(), next_rev=next_rev,
                      need_reset=False, **kw)


def resp(watch_id: int = 0, *, rev: int = 0, created: bool = False, canceled: bool = False,
         compact: int = 0, reason: str = "", events: tuple[tuple[str, str, int], ...] = ()
         ) -> rpc_pb2.WatchResponse:
    evs = [
        kv_pb2.Event(
            type=kv_pb2.Event.DELETE if t == "delete" else kv_pb2.Event.PUT,
            kv=kv_pb2.KeyValue(key=k.encode(), value=b"v", mod_revision=r),
        )
        for t, k, r in events
    ]
    return rpc_pb2.WatchResponse(
        header=rpc_pb2.ResponseHeader(revision=rev, member_id=7), watch_id=watch_id,
        created=created, canceled=canceled, compact_revision=compact, cancel_reason=reason,
        events=evs,
    )


def created_stream(*watches: WatchState) -> StreamState:
    """A stream on which ``watches`` were planned, created and answered with ids 0, 1, ..."""
    st = StreamState(gen=1, opened=0.0)
    st.plan(watches)
    for i, w in enumerate(watches):
        st.ready.append(st.todo.popleft())
        assert st.next_create(1.0) == [Create(w)]
        assert st.receive(resp(i, created=True)) == []
    return st


def summary(actions: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for a in actions:
        if isinstance(a, Deliver):
            out.append(("deliver", a.watch.prefix, [(e.type, e.kv.key) for e in a.events],
                        a.revision))
        elif isinstance(a, Create):
            out.append(("create", a.watch.prefix or a.watch.key))
        elif isinstance(a, Cancel):
            out.append(("cancel", a.server_id))
        elif isinstance(a, Forget):
            out.append(("forget", a.watch.prefix))
        elif isinstance(a, Relisted):
            out.append(("relist", a.watch.prefix, a.compact_revision))
        elif isinstance(a, End):
            out.append(("end", a.reason))
    return out


# Each row: responses in, per response the actions out, then the watch's next_rev.
EVENT_TABLE = [
    pytest.param(
        [resp(0, rev=11, events=(("put", "/s/a", 11),))],
        [[("deliver", "/s/", [("put", "/s/a")], 11)]], 12, id="event advances next_rev",
    ),
    pytest.param(
        [resp(0, rev=12, events=(("put", "/s/a", 9), ("put", "/s/b", 12)))],
        [[("deliver", "/s/", [("put", "/s/b")], 12)]], 13,
        id="events below next_rev (a resumed stream) are dropped",
    ),
    pytest.param(
        [resp(0, rev=9, events=(("put", "/s/a", 9),))], [[]], 10,
        id="a batch wholly below next_rev delivers nothing",
    ),
    pytest.param(
        [resp(0, rev=20)], [[]], 21, id="per-watch progress notice advances next_rev",
    ),
    pytest.param(
        [resp(-1, rev=30)], [[]], 10,
        id="stream-wide progress answer is liveness only (etcd#15220)",
    ),
    pytest.param(
        [resp(5, rev=11, events=(("put", "/s/a", 11),))], [[]], 10,
        id="events for an unknown watch id are ignored",
    ),
    pytest.param(
        [resp(0, rev=11, events=(("put", "/s/a", 11),)),
         resp(0, rev=12, events=(("delete", "/s/a", 12),))],
        [[("deliver", "/s/", [("put", "/s/a")], 11)],
         [("deliver", "/s/", [("delete", "/s/a")], 12)]], 13, id="put then delete",
    ),
    pytest.param(
        [resp(0, canceled=True, compact=15)], [[("relist", "/s/", 15)]], 10,
        id="compacted: relist (need_reset), not an end",
    ),
    pytest.param(
        [resp(0, canceled=True, reason="permission denied")], [[("end", "canceled")]], 10,
        id="canceled by etcd without compaction ends the stream",
    ),
]


@pytest.mark.parametrize(("responses", "expected", "next_rev"), EVENT_TABLE)
def test_responses_on_a_created_watch(responses: list[Any], expected: list[Any],
                                      next_rev: int) -> None:
    w = W()
    st = created_stream(w)
    for r, want in zip(responses, expected, strict=True):
        assert summary(st.receive(r)) == want
    assert w.next_rev == next_rev


def test_compaction_marks_the_watch_for_a_reread_and_off_the_stream() -> None:
    w = W()
    st = created_stream(w)
    st.receive(resp(0, canceled=True, compact=15))
    assert w.need_reset and w.stream == 0 and w.server_id is None and not st.by_server_id
    assert st.plan([w]) == [] and list(st.todo) == [w]  # planned again on the same stream


def test_one_create_outstanding_and_created_pairs_with_it() -> None:
    a, b, c = W(1, "/a/"), W(2, "/b/"), W(3, "/c/")
    st = StreamState(gen=1, opened=0.0)
    assert st.plan([a, b, c]) == []
    st.ready.extend(st.todo)
    st.todo.clear()
    assert summary(st.next_create(1.0)) == [("create", "/a/")]
    assert st.next_create(1.1) == []  # a is outstanding: nothing more goes out
    assert st.receive(resp(4, created=True)) == [] and a.server_id == 4
    assert summary(st.next_create(1.2)) == [("create", "/b/")]
    assert st.receive(resp(3, created=True)) == [] and b.server_id == 3  # proxy order: any id
    assert summary(st.next_create(1.3)) == [("create", "/c/")]


CREATE_TABLE = [
    pytest.param(False, resp(0, created=True, canceled=True, reason="no"), [("end", "refused")],
                 id="refused create ends the stream"),
    pytest.param(True, resp(0, created=True, canceled=True), [("forget", "/a/")],
                 id="refused create of a cancelled watch: forget it"),
    pytest.param(True, resp(6, created=True), [("cancel", 6), ("forget", "/a/")],
                 id="cancelled while its create was outstanding: cancel once created"),
    pytest.param(False, resp(9, created=True), [], id="plain created"),
]


@pytest.mark.parametrize(("cancelled", "answer", "expected"), CREATE_TABLE)
def test_answers_to_a_create(cancelled: bool, answer: Any, expected: list[Any]) -> None:
    a = W(1, "/a/")
    st = StreamState(gen=1, opened=0.0)
    st.plan([a])
    st.ready.append(st.todo.popleft())
    st.next_create(1.0)
    a.cancelled = cancelled
    assert summary(st.receive(answer)) == expected
    assert st.pending is None


def test_reused_watch_id_ends_the_stream() -> None:
    a, b = W(1, "/a/"), W(2, "/b/")
    st = created_stream(a)
    st.plan([b])
    st.ready.append(st.todo.popleft())
    st.next_create(2.0)
    assert summary(st.receive(resp(0, created=True))) == [("end", "reused_id")]


def test_plan_cancels_created_watches_and_forgets_others() -> None:
    a, b = W(1, "/a/"), W(2, "/b/")
    st = created_stream(a)
    other = W(3, "/c/", stream=0)
    a.cancelled = other.cancelled = True
    assert summary(st.plan([a, other, b])) == [("cancel", 0), ("forget", "/a/"), ("forget", "/c/")]
    assert list(st.todo) == [b] and b.stream == 1


def test_a_stray_created_with_nothing_outstanding_is_ignored() -> None:
    st = created_stream(W())
    assert st.receive(resp(3, created=True)) == []


def test_probe_is_created_then_cancelled_and_never_delivers() -> None:
    st = StreamState(gen=1, opened=0.0)
    assert st.probe(5.0) is None  # the server has not answered anything yet
    st = created_stream(W())
    assert st.healthy
    probe = st.probe(5.0)
    assert probe is not None and probe.watch.key == PROBE_KEY and probe.watch.probe
    assert st.probe(5.1) is None  # one question at a time
    assert summary(st.receive(resp(8, created=True))) == [("cancel", 8)]
    assert 8 not in st.by_server_id and st.pending is None
    st.progress_ok = True
    assert st.probe(6.0) is None  # etcd answers progress requests: no probes needed


# Liveness: (questions asked at, last message arrival, now) -> owed since
LIVENESS_TABLE = [
    pytest.param([], None, None, id="nothing asked: nothing owed"),
    pytest.param([1.0], None, 1.0, id="asked, never heard"),
    pytest.param([1.0], 0.5, 1.0, id="asked after the last message"),
    pytest.param([1.0], 1.2, None, id="a message after the question answers it"),
    pytest.param([1.0, 2.0], 0.5, 1.0, id="the oldest unanswered question counts"),
    pytest.param([1.0, 2.0], 1.5, 2.0, id="answered, then asked again"),
]


@pytest.mark.parametrize(("asks", "heard", "owed"), LIVENESS_TABLE)
def test_owed_since(asks: list[float], heard: float | None, owed: float | None) -> None:
    st = StreamState(gen=1, opened=0.0)
    for t in asks:
        # a message arriving between questions is seen by the later question
        st.asked(t, heard if heard is not None and heard < t else None)
    assert st.owed_since(heard) == owed


def test_time_the_driver_did_not_run_is_not_counted_as_silence() -> None:
    st = StreamState(gen=1, opened=0.0)
    st.asked(1.0, None)
    st.excuse(0.8)  # the process was starved for 0.8 s after asking
    assert st.owed_since(None) == 1.8
    assert st.owed_since(1.9) is None  # an answer recorded after that still counts
    StreamState(gen=1, opened=0.0).excuse(5.0)  # nothing asked: nothing to excuse
