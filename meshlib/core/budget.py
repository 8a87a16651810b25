"""Retry budget: retries may add at most a fixed share of the request rate (Finagle).

Finagle's ``RetryBudget`` (``com.twitter.finagle.service.RetryBudget``; Linkerd uses the same
defaults: 20 %, 10 retries/s, 10 s) is a token bucket whose deposits expire: every request
deposits, every retry withdraws, and a constant reserve of ``min_retries_per_second * window``
retries lets low-traffic clients retry at all. It stops retry storms (envoy PR #9069 added the
same idea as ``retry_budget``): when a dependency fails, retries stay a bounded fraction of the
load instead of multiplying it by ``attempts``.

Implementation: two rings of time buckets (``buckets`` per ``window``) count deposits and
withdrawals. At time ``t`` a retry is allowed when::

    (withdrawals_live + 1) * 100 <= percent * deposits_live + 100 * min_retries_per_second * window

where ``deposits_live`` counts only the last ``buckets`` buckets (all younger than ``window``)
and ``withdrawals_live`` the last ``buckets + 1`` (all withdrawals younger than ``window``,
plus possibly some older). The conservative asymmetry makes the guarantee exact despite
bucketing: **at the moment of every allowed retry, the retries in the trailing window
(t - window, t] are at most percent/100 * requests in that window + min_retries_per_second *
window.** (No budget can promise the bound for arbitrary windows not ending at a retry:
deposits made just before a window legitimately fund retries inside it.)

Per-request work is one comparison and one ``+=``: ``current`` counts every deposit ever
made, and when the clock passes ``current_end`` the deposits since the last fold
(``current - _folded``) go into the finished bucket. Threads: a deposit takes no lock (a
``+=`` raced by another thread can lose one count, which only makes the budget stricter);
moving to a new bucket (at most once per ``window / buckets``) and every withdrawal take a
lock, so no bucket is folded or zeroed twice and two threads cannot both take the last
retry. So the guarantee above holds under threads too, with requests counted at most
exactly (a deposit counts in the bucket that is current when it lands).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["RetryBudget"]


class RetryBudget:
    """Finagle-style retry budget over a sliding, bucketed window.

    ``deposit()`` once per logical request (not per attempt), ``try_withdraw()`` once per
    retry or hedge; it returns ``False`` when the budget is exhausted.
    """

    __slots__ = (
        "percent", "min_retries_per_second", "window", "_now", "_n", "_inv_width",
        "_reserve", "_dep", "_wd", "_cur", "current", "_folded", "current_end", "_lock",
    )

    def __init__(
        self,
        percent: float,
        min_retries_per_second: float,
        window: float,
        now: Callable[[], float],
        buckets: int = 10,
    ) -> None:
        if window <= 0:
            raise ValueError(f"retry budget window must be > 0 seconds, got {window!r}")
        if percent < 0 or min_retries_per_second < 0:
            raise ValueError(
                f"retry budget percent and min_retries_per_second must be >= 0, got "
                f"{percent!r} and {min_retries_per_second!r}"
            )
        if buckets < 1:
            raise ValueError(f"retry budget buckets must be >= 1, got {buckets!r}")
        self.percent = percent
        self.min_retries_per_second = min_retries_per_second
        self.window = window
        self._now = now
        self._n = buckets + 1  # ring size: one extra slot keeps withdrawals a bucket longer
        self._inv_width = buckets / window
        self._reserve = 100.0 * min_retries_per_second * window
        self._dep = [0] * self._n
        self._wd = [0] * self._n
        self._cur = int(now() * self._inv_width)
        #: every deposit ever counted; those since ``_folded`` are the current bucket's
        self.current = 0
        self._folded = 0
        #: when the current bucket ends
        self.current_end = (self._cur + 1) / self._inv_width
        self._lock = threading.Lock()

    @classmethod
    def from_policy(cls, budget: Any, now: Callable[[], float]) -> RetryBudget:
        """From ``policy.retries.budget`` (``percent``, ``min_retries_per_second``, ``window``)."""
        return cls(budget.percent, budget.min_retries_per_second, budget.window, now)

    def _advance(self, idx: int) -> None:
        with self._lock:
            self._advance_locked(idx)

    def _advance_locked(self, idx: int) -> None:
        cur = self._cur
        if idx <= cur:
            return  # another thread moved to this bucket first
        n = self._n
        total = self.current
        self._dep[cur % n] += total - self._folded  # fold the finished bucket's deposits
        self._folded = total
        steps = idx - cur
        if steps >= n:
            for i in range(n):
                self._dep[i] = 0
                self._wd[i] = 0
        else:
            for b in range(cur + 1, idx + 1):
                self._dep[b % n] = 0
                self._wd[b % n] = 0
        self._cur = idx
        self.current_end = (idx + 1) / self._inv_width

    def _roll(self, now: float | None) -> None:
        t = self._now() if now is None else now
        if t >= self.current_end:
            self._advance(int(t * self._inv_width))

    def deposit(self, now: float | None = None) -> None:
        """Record one request."""
        t = self._now() if now is None else now
        if t >= self.current_end:
            self._advance(int(t * self._inv_width))
        self.current += 1

    def _sums(self) -> tuple[int, int]:
        n = self._n
        cur = self._cur
        oldest = (cur + 1) % n  # the extra slot: withdrawals only
        deposits = sum(self._dep) - self._dep[oldest] + (self.current - self._folded)
        return deposits, sum(self._wd)

    def available(self, now: float | None = None) -> float:
        """Retries the budget would allow right now (fractional)."""
        self._roll(now)
        deposits, withdrawals = self._sums()
        return (self.percent * deposits + self._reserve) / 100.0 - withdrawals

    def try_withdraw(self, now: float | None = None) -> bool:
        """Take one retry from the budget; ``False`` (and nothing taken) when exhausted.
        Under a lock: retries are rare, and the check and the take must be one step."""
        t = self._now() if now is None else now
        with self._lock:
            if t >= self.current_end:
                self._advance_locked(int(t * self._inv_width))
            deposits, withdrawals = self._sums()
            if (withdrawals + 1) * 100.0 <= self.percent * deposits + self._reserve:
                self._wd[self._cur % self._n] += 1
                return True
            return False

    def __repr__(self) -> str:
        return (
            f"RetryBudget(percent={self.percent}, min_retries_per_second="
            f"{self.min_retries_per_second}, window={self.window})"
        )
