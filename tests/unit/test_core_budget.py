"""RetryBudget (Finagle): bound property with a fake clock, reserve, expiry."""

from __future__ import annotations

import random
from bisect import bisect_right
from types import SimpleNamespace

import pytest

from meshlib.core.budget import RetryBudget


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _count(times: list[float], lo: float, hi: float) -> int:
    """Events in (lo, hi]."""
    return bisect_right(times, hi) - bisect_right(times, lo)


@pytest.mark.parametrize(
    ("percent", "min_rps", "window", "seed", "retry_pressure"),
    [
        (20, 10, 10.0, 1, 0.9),
        (20, 0, 10.0, 2, 1.0),
        (5, 1, 2.0, 3, 0.5),
        (100, 0, 1.0, 4, 1.0),
        (0, 3, 5.0, 5, 1.0),
    ],
)
def test_budget_bound_holds_in_every_trailing_window(percent, min_rps, window, seed,
                                                       retry_pressure):
    """At every allowed retry t: retries in (t-W, t] <= percent/100 * requests in
    (t-W, t] + min_rps * W. Bursty traffic with gaps exercises bucket expiry."""
    rng = random.Random(seed)
    clock = Clock()
    budget = RetryBudget(percent, min_rps, window, clock)
    requests: list[float] = []
    retries: list[float] = []
    for _ in range(20000):
        # mostly small steps, sometimes a gap of up to 1.5 windows
        clock.t += rng.expovariate(200.0) if rng.random() < 0.995 else rng.uniform(0, 1.5 * window)
        if rng.random() < 0.3:
            budget.deposit()
            requests.append(clock.t)
        if rng.random() < retry_pressure and budget.try_withdraw():
            retries.append(clock.t)
            in_window = _count(retries, clock.t - window, clock.t)
            reqs = _count(requests, clock.t - window, clock.t)
            assert in_window <= percent / 100 * reqs + min_rps * window + 1e-9
    assert retries, "the budget must allow some retries"


def test_budget_is_used_up_to_the_bound_not_just_below():
    clock = Clock()
    budget = RetryBudget(20, 0, 10.0, clock)
    for _ in range(100):
        budget.deposit()
    allowed = sum(budget.try_withdraw() for _ in range(50))
    assert allowed == 20
    assert budget.available() == pytest.approx(0.0)


def test_reserve_allows_min_retries_without_traffic():
    clock = Clock()
    budget = RetryBudget(20, 10, 10.0, clock)
    allowed = sum(budget.try_withdraw() for _ in range(500))
    assert allowed == 100  # 10/s * 10 s


def test_zero_budget_never_retries():
    clock = Clock()
    budget = RetryBudget(0, 0, 10.0, clock)
    for _ in range(1000):
        budget.deposit()
    assert not budget.try_withdraw()


def test_deposits_and_withdrawals_expire_after_the_window():
    clock = Clock()
    budget = RetryBudget(50, 0, 10.0, clock)
    for _ in range(10):
        budget.deposit()
    assert sum(budget.try_withdraw() for _ in range(10)) == 5
    clock.t += 10.0  # the deposits are now a full window old
    assert not budget.try_withdraw()
    for _ in range(4):
        budget.deposit()
    clock.t += 1.0  # old withdrawals expired too: only the 4 new deposits count
    assert sum(budget.try_withdraw() for _ in range(10)) == 2


def test_from_policy_and_validation():
    clock = Clock()
    b = RetryBudget.from_policy(SimpleNamespace(percent=20, min_retries_per_second=10,
                                                window=10.0), clock)
    assert (b.percent, b.min_retries_per_second, b.window) == (20, 10, 10.0)
    with pytest.raises(ValueError, match="window"):
        RetryBudget(20, 10, 0, clock)
    with pytest.raises(ValueError, match="percent"):
        RetryBudget(-1, 10, 1, clock)



# --------------------------------------------------------------------------- threads


def _hammer(budget, clock_box, threads: int, per_thread: int, advance_every: int) -> None:
    """``threads`` threads deposit ``per_thread`` times each and move the clock forward one
    bucket every ``advance_every`` deposits, so bucket changes race with each other and with
    deposits. A tiny switch interval makes the races happen."""
    import sys
    import threading

    start = threading.Barrier(threads)

    def work(i: int) -> None:
        start.wait()
        for j in range(per_thread):
            if j % advance_every == 0:
                clock_box[0] += 1.0
            budget.deposit()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        sys.setswitchinterval(old)


def test_deposits_racing_bucket_changes_are_never_counted_twice():
    """Two threads folding one bucket used to count its deposits twice (and zero a bucket
    another thread had just filled): the budget then allowed more retries than its bound."""
    from meshlib.core.budget import RetryBudget

    for _ in range(10):
        clock_box = [0.0]
        # window 10000 s in 10000 buckets, each thread moves the clock one bucket every 4
        # deposits (2000 bucket changes) and no deposit expires: all are live at the end
        budget = RetryBudget(20, 0, 10000.0, lambda box=clock_box: box[0], buckets=10000)
        threads, per_thread = 4, 2000
        _hammer(budget, clock_box, threads, per_thread, advance_every=4)
        deposits, withdrawals = budget._sums()
        made = threads * per_thread
        assert deposits <= made, (deposits, made)  # never more than were made
        assert deposits >= made * 0.95  # a lost ``+=`` race costs a count, rarely
        assert withdrawals == 0


def test_concurrent_withdrawals_never_exceed_the_budget():
    import threading

    from meshlib.core.budget import RetryBudget

    clock_box = [100.0]
    budget = RetryBudget(0, 5, 2.0, lambda: clock_box[0])  # reserve: 5/s * 2 s = 10 retries
    taken: list[bool] = []
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(50):
            taken.append(budget.try_withdraw())

    ts = [threading.Thread(target=work) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert taken.count(True) == 10
