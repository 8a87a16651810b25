"""Shortcut T3 (docs/design.md 9): the blocking unary call's fast path, held to the driver.

``_UnaryResponse._blocking`` runs a first attempt without a :class:`CallDriver` while
tracing is off and nothing is passed through, and hands anything else to an
:class:`AdoptedDriver` where it stopped. Here the same random scripts of attempt outcomes
(response, UNAVAILABLE before headers, an error after headers, a non-retryable status, an
interrupt, an endpoint callable not cached yet, ``with_call``, caller deadlines and
metadata) run through the fast path and through the general driver loop (forced by
pass-through mode, which with no inbound context sends nothing more), on two identical
destinations. Both sides must give the same responses and errors, send the same attempts
(endpoint, timeout, metadata), and leave the same counts in every metric series and the
same health, load, budget and concurrency state after every call.

Pure logic: the endpoint callables are stand-ins (what grpcio raises is a ``grpc.RpcError``
that is a ``grpc.Call``); the real shells against real servers are in the integration tests.
"""

from __future__ import annotations

import math
import random
from typing import Any

import grpc
import pytest
from test_core_call_differential import state_of
from test_grpc_driver import Harness

from meshlib.grpc.channel import UnaryUnary
from meshlib.grpc.driver import AdoptedDriver, CallDriver
from meshlib.telemetry.tracing import state as tracing_state

POLICIES = [
    {"retries": {"attempts": 3, "backoff": {"base": "1ms", "max": "1ms"}},
     "outlier_detection": {"enabled": False}},
    {"retries": {"attempts": 2, "backoff": {"base": "1ms", "max": "1ms"}},
     "circuit_breaker": {"enabled": True, "failure_threshold": 2, "reset_timeout": "50ms"},
     "outlier_detection": {"enabled": True, "consecutive_5xx": 2, "interval": "10ms",
                           "base_ejection_time": "30ms", "max_ejection_percent": 50}},
]

OUTCOMES = ("ok", "ok", "ok", "unavailable", "committed", "not_found", "interrupt")


class RpcFailure(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What grpcio raises: an error that is also the finished call."""

    def __init__(self, code: grpc.StatusCode, headers: bool) -> None:
        self._code = code
        self._headers = headers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"scripted {self._code.name}"

    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("server", "x"),) if self._headers else ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


class Interrupt(Exception):
    """An exception of the caller's raised during the attempt (not a gRPC status)."""


class Endpoint:
    """A stand-in endpoint multicallable: records what it is sent, answers by script."""

    def __init__(self, side: Side, name: str) -> None:
        self.side = side
        self.name = name

    def __call__(self, request: Any, timeout: Any, md: Any, *_rest: Any) -> Any:
        return self.side.answer(self.name, request, timeout, md)

    def with_call(self, request: Any, timeout: Any, md: Any, *_rest: Any) -> Any:
        return self.side.answer(self.name, request, timeout, md), "call"


class Side:
    """One destination and one multicallable stand-in; a script of outcomes per call."""

    def __init__(self, policy: dict[str, Any]) -> None:
        self.h = Harness(endpoints=2, policy=policy)
        self.owner = self.h.owner
        self.owner._mc = self._mc  # the shell's miss path: makes and caches the callable
        self.script: list[str] = []
        self.sent: list[tuple[Any, ...]] = []

    def _mc(self, ep: Any) -> Endpoint:
        mc = self.owner._mcs[ep.key] = Endpoint(self, ep.instance_id)
        return mc

    def answer(self, name: str, request: Any, timeout: Any, md: Any) -> Any:
        self.sent.append((name, timeout, tuple(md) if md else None))
        self.h.clock.advance(0.004)
        outcome = self.script.pop(0) if self.script else "ok"
        if outcome == "ok":
            return f"response to {request} from {name}"
        if outcome == "unavailable":
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, headers=False)
        if outcome == "committed":
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, headers=True)
        if outcome == "not_found":
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, headers=False)
        raise Interrupt("interrupted by the caller")

    def call(self, request: str, timeout: float | None, md: Any, with_call: bool) -> Any:
        try:
            return ("value", UnaryUnary._blocking(self.owner, request, timeout, md,  # type: ignore[arg-type]
                                                  None, None, None, with_call))
        except grpc.RpcError as err:
            return ("rpc error", type(err).__name__, err.code(), err.details())
        except Interrupt as exc:
            return ("raised", type(exc).__name__, str(exc))

    def counts(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every counter and histogram count series (durations differ, counts must not)."""
        out = {}
        for metric in self.h.reg.collect():
            for s in metric.samples:
                if s.name.endswith(("_count", "_total")):
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


@pytest.fixture
def tracing_off() -> Any:
    saved = (tracing_state.off_until, tracing_state.passthrough)
    tracing_state.off_until = math.inf  # tracing known to be off: the fast path may run
    yield tracing_state
    tracing_state.off_until, tracing_state.passthrough = saved


@pytest.mark.parametrize("policy_index", range(len(POLICIES)))
@pytest.mark.parametrize("seed", range(6))
def test_fast_path_leaves_what_the_driver_leaves(policy_index: int, seed: int,
                                                 tracing_off: Any) -> None:
    rng = random.Random(seed)
    fast, general = Side(POLICIES[policy_index]), Side(POLICIES[policy_index])
    for i in range(40):
        script = [rng.choice(OUTCOMES) for _ in range(4)]
        timeout = rng.choice((None, None, 1.0, 0.006))
        md = rng.choice((None, (("tenant", "acme"),)))
        with_call = rng.random() < 0.3
        forget = rng.random() < 0.15  # the endpoint callables are not cached (pool change)
        gap = rng.choice((0.0, 0.002, 0.02))  # time after the call, the same on both sides
        results = []
        for side, passthrough in ((fast, False), (general, True)):
            tracing_off.passthrough = passthrough  # True: the general loop, nothing injected
            side.script = list(script)
            if forget:
                side.owner._mcs.clear()
            results.append(side.call(f"req{i}", timeout, md, with_call))
            side.h.clock.advance(gap)
        where = f"call {i}: script={script} timeout={timeout} md={md} with_call={with_call}"
        assert results[0] == results[1], where
        assert fast.sent == general.sent, where
        assert fast.counts() == general.counts(), where
        assert state_of(fast.h.dest) == state_of(general.h.dest), where
    assert fast.counts(), "nothing was recorded"


def _slots(drv: CallDriver) -> dict[str, Any]:
    return {name: getattr(drv, name, "<unset>") for name in CallDriver.__slots__}


def test_adopted_driver_sets_every_slot_the_driver_sets() -> None:
    """AdoptedDriver's constructor leaves what CallDriver.__init__ (and start_attempt, for
    an attempt in flight) leave, but for the plan and the clock readings it is given."""
    h = Harness()
    md = (("tenant", "acme"),)
    drv = CallDriver(h.owner, md, None)  # type: ignore[arg-type]
    adopted = AdoptedDriver(h.owner, md, drv._gen, drv._started)  # type: ignore[arg-type]
    assert _slots(adopted) == _slots(drv)
    action = drv.advance(None)
    drv.start_attempt(action)  # type: ignore[arg-type]
    adopted = AdoptedDriver(h.owner, md, drv._gen, drv._started, action,  # type: ignore[arg-type]
                            drv._t0)
    assert _slots(adopted) == _slots(drv)
    assert drv.abort(None) is True
