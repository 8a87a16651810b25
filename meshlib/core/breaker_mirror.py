"""A ``pybreaker.CircuitBreaker`` that mirrors one endpoint's breaker in a ``HealthRegistry``.

The project uses pybreaker for its breaker vocabulary, listeners and storage interface, but
the state machine and admission are :class:`meshlib.core.health.HealthRegistry`'s (monotonic,
non-blocking, bounded half-open; see docs/core.md "How pybreaker is used"). The mirror's
storage reads the endpoint's :class:`~meshlib.core.health.HealthSlot`, so reading its
``state`` after our state changed takes pybreaker's "changed elsewhere" path (meant for shared
Redis storage) and notifies every listener with ``state_change(cb, old, new)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from meshlib.core.health import CLOSED, HealthRegistry, HealthSlot

__all__ = ["pybreaker_mirror", "sync_mirror"]

_storage_cls: Any = None


def _storage_class() -> Any:
    """A ``pybreaker.CircuitBreakerStorage`` whose state is a :class:`HealthSlot`'s.

    Defined lazily so that importing :mod:`meshlib.core.health` does not import pybreaker.
    """
    global _storage_cls
    if _storage_cls is not None:
        return _storage_cls
    import pybreaker

    class SlotStorage(pybreaker.CircuitBreakerStorage):  # type: ignore[misc]
        """Read-only view of a slot: our state machine is the source of truth, so
        pybreaker's writes (counter resets on transitions) are ignored."""

        def __init__(self, slot: HealthSlot, registry: HealthRegistry,
                     wall_now: Callable[[], datetime]) -> None:
            super().__init__(slot.key)
            self._slot = slot
            self._registry = registry
            self._wall_now = wall_now

        @property
        def state(self) -> str:
            return self._slot.state

        @state.setter
        def state(self, state: str) -> None:
            pass

        def increment_counter(self) -> None:
            pass

        def reset_counter(self) -> None:
            pass

        def increment_success_counter(self) -> None:
            pass

        def reset_success_counter(self) -> None:
            pass

        @property
        def counter(self) -> int:
            return self._slot.failures

        @property
        def success_counter(self) -> int:
            return 0

        @property
        def opened_at(self) -> datetime | None:
            s = self._slot
            if s.state is CLOSED:
                return None
            ago = self._registry._now() - s.opened_at
            return self._wall_now() - timedelta(seconds=ago)

        @opened_at.setter
        def opened_at(self, value: datetime) -> None:
            pass

    _storage_cls = SlotStorage
    return SlotStorage


def pybreaker_mirror(
    registry: HealthRegistry,
    key: str,
    *,
    listeners: Iterable[Any] = (),
    name: str | None = None,
    wall_now: Callable[[], datetime] | None = None,
) -> Any:
    """A ``pybreaker.CircuitBreaker`` that mirrors the breaker of endpoint ``key``.

    Its storage reads the slot, so ``current_state`` and ``fail_counter`` are ours. Reading
    its ``state`` property after our state changed makes pybreaker notice the change (its
    "changed elsewhere" path, meant for shared Redis storage) and call every listener's
    ``state_change``. Drivers call :func:`sync_mirror` after :meth:`HealthRegistry.admit` /
    :meth:`HealthRegistry.record` returned a breaker transition. Never use its ``call()`` or
    ``calling()`` for admission: that is what :meth:`HealthRegistry.admit` is for.
    """
    import pybreaker

    slot = registry.slot(key)
    storage = _storage_class()(slot, registry, wall_now or (lambda: datetime.now(UTC)))
    return pybreaker.CircuitBreaker(
        fail_max=max(1, registry.failure_threshold),
        reset_timeout=registry.reset_timeout,
        listeners=list(listeners),
        state_storage=storage,
        name=name or key,
    )


def sync_mirror(breaker: Any) -> str:
    """Let a :func:`pybreaker_mirror` breaker notice our state; returns the state name."""
    return str(breaker.state.name)

