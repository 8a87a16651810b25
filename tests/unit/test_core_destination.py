"""The destination's concurrency slots (Envoy max_requests), changed live."""

from __future__ import annotations

import threading

from meshlib.core.destination import DestinationState
from meshlib.core.endpoints import ServiceSnapshot


def _dest() -> DestinationState:
    return DestinationState("svc", lambda: ServiceSnapshot("svc"))


def test_slots_are_taken_and_given_back():
    d = _dest()
    d.set_limit(2)
    assert d.acquire() and d.acquire()
    assert not d.acquire()  # full
    assert d.inflight == 2
    d.release()
    assert d.inflight == 1 and d.acquire()


def test_lowering_the_limit_below_what_is_in_use_is_paid_back_by_releases():
    d = _dest()
    d.set_limit(4)
    for _ in range(3):
        assert d.acquire()
    d.set_limit(1)  # 3 in use, 1 allowed: no new call until two have ended
    assert d.inflight == 3 and not d.acquire()
    d.release()
    assert not d.acquire()  # 2 in use, limit 1
    d.release()
    assert not d.acquire()  # 1 in use, limit 1
    d.release()
    assert d.inflight == 0 and d.acquire() and not d.acquire()


def test_raising_the_limit_first_cancels_debt():
    d = _dest()
    d.set_limit(3)
    for _ in range(3):
        d.acquire()
    d.set_limit(1)  # debt 2
    d.set_limit(4)  # pays the debt, then one more free slot
    assert d.inflight == 3 and d.acquire() and not d.acquire()


def test_no_slot_is_lost_or_made_under_threads():
    d = _dest()
    d.set_limit(8)
    taken = []

    def worker() -> None:
        for _ in range(20_000):
            if d.acquire():
                taken.append(1)
                d.release()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert d.inflight == 0
    assert sum(1 for _ in range(9) if d.acquire()) == 8
