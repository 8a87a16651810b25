"""Per-service token buckets for certificate requests (Consul's CA rate-limits CSRs likewise).

Each service has a bucket of ``burst`` tokens refilled at ``per_minute`` tokens a minute; a
request takes one token or is refused. A normal instance asks once per half lifetime, so the
defaults (burst 20, 60 a minute) leave room for a fleet restart while stopping a loop that
asks every millisecond. The clock is injected (monotonic seconds) so tests need no sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self, per_minute: float = 60.0, burst: int = 20, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if per_minute <= 0 or burst < 1:
            raise ValueError(f"rate limit: per_minute must be > 0 and burst >= 1 (got {per_minute}, {burst})")
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # service -> (tokens, at)

    def allow(self, service: str) -> bool:
        now = self._clock()
        tokens, at = self._buckets.get(service, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[service] = (tokens, now)
            return False
        self._buckets[service] = (tokens - 1.0, now)
        return True
