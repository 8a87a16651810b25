"""Fakes shared by the call-plan table tests: a settable clock and a recording observer."""

from __future__ import annotations

from typing import Any

from meshlib.core.health import EventKind


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


class Recorder:
    """A ``CallObserver`` that keeps what it was told."""

    def __init__(self) -> None:
        self.retries: list[str] = []
        self.stops: list[str] = []
        self.events: list[Any] = []

    def retry(self, reason: str) -> None:
        self.retries.append(reason)

    def stopped(self, reason: str) -> None:
        self.stops.append(reason)

    def health(self, events: Any) -> None:
        self.events.extend(events)

    def kinds(self, key: str | None = None) -> list[EventKind]:
        return [e.kind for e in self.events if key is None or e.key == key]
