"""The values the call plan and its drivers exchange (see :mod:`meshlib.core.call`).

The plan yields *actions* (:class:`Attempt`, :class:`Sleep`, and in hedged mode
:data:`WAIT`), the driver answers with *results* (:class:`AttemptResult`, or in hedged mode
:class:`Done` and :data:`HEDGE`), and the plan returns a :class:`CallEnd`. They are plain
slotted objects built through their ``__init__`` (no ``object.__new__`` shortcuts: measured,
the saved frame is ~0.1 us of a ~2 us plan and of a ~700 us call, within noise).

Also here: the stable failure kinds (:class:`FailureKind`), the telemetry hook
(:class:`CallObserver`) and the constructors of the plan's own endings (no endpoint, all
blocked, deadline), shared by the plain and the hedged loop.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Final, Protocol

from meshlib.core.deadline import Deadline
from meshlib.core.health import HealthEvent
from meshlib.core.outcome import Outcome


class FailureKind:
    """Why the mesh itself failed a call (stable strings: metric label values, error types)."""

    NO_ENDPOINTS: Final = "no_endpoints"
    CIRCUIT_OPEN: Final = "circuit_open"
    CONCURRENCY: Final = "concurrency_limit"
    DEADLINE: Final = "deadline_exceeded"
    FAULT_ABORT: Final = "fault_abort"


class Attempt:
    """Action: send one attempt to ``endpoint`` within ``timeout`` seconds (None = no limit).

    ``number`` counts from 1; ``deadline`` is the call's overall deadline (for the
    propagated timeout header). ``hedge_after`` (hedged mode only, see
    :mod:`meshlib.core.hedged`): send :data:`HEDGE` if no outstanding attempt finished
    within that many seconds."""

    __slots__ = ("endpoint", "timeout", "number", "deadline")

    #: None outside hedged mode: a class attribute, so plain attempts pay nothing for it.
    hedge_after: float | None = None

    def __init__(self, endpoint: Any, timeout: float | None, number: int, deadline: Deadline):
        self.endpoint = endpoint
        self.timeout = timeout
        self.number = number
        self.deadline = deadline

    def __repr__(self) -> str:
        ep = self.endpoint
        return (f"Attempt(#{self.number} {getattr(ep, 'key', ep)!r}, timeout={self.timeout!r}, "
                f"hedge_after={self.hedge_after!r})")


class HedgedAttempt(Attempt):
    """An :class:`Attempt` of a hedged call: ``hedge_after`` is its own."""

    __slots__ = ("hedge_after",)  # shadows the class attribute Attempt.hedge_after

    def __init__(self, endpoint: Any, timeout: float | None, number: int, deadline: Deadline,
                 hedge_after: float | None):
        super().__init__(endpoint, timeout, number, deadline)
        self.hedge_after = hedge_after


class Signal:
    """A named singleton (:data:`HEDGE`, :data:`WAIT`)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: Sent by a hedged-mode driver when an action's ``hedge_after`` passed without a result.
HEDGE: Final = Signal("HEDGE")
#: Action (hedged mode): start nothing, wait for the next outstanding attempt, no timer.
WAIT: Final = Signal("WAIT")

#: ``CallObserver.retry`` reason of a hedge (``meshlib_client_retries_total{reason="hedge"}``).
HEDGE_REASON: Final = "hedge"


class Sleep:
    """Action: wait ``seconds`` (backoff or injected delay), then send ``None``."""

    __slots__ = ("seconds", "reason")

    def __init__(self, seconds: float, reason: str):
        self.seconds = seconds
        self.reason = reason


class AttemptResult:
    """What the driver saw of one attempt. ``value`` is the driver's payload (a response,
    an exception) handed back in :class:`CallEnd`."""

    __slots__ = ("outcome", "status", "retry_after_s", "pushback_s", "grpc_code", "value")

    def __init__(
        self,
        outcome: Outcome,
        status: int | None = None,
        value: Any = None,
        *,
        retry_after_s: float | None = None,
        pushback_s: float | None = None,
        grpc_code: str | None = None,
    ):
        self.outcome = outcome
        self.status = status
        self.value = value
        self.retry_after_s = retry_after_s
        self.pushback_s = pushback_s
        self.grpc_code = grpc_code


class Done:
    """Message (hedged mode): ``attempt`` (the :class:`Attempt` action) ended with ``result``."""

    __slots__ = ("attempt", "result")

    def __init__(self, attempt: Attempt, result: AttemptResult):
        self.attempt = attempt
        self.result = result


class CallEnd:
    """How the call ended: the last attempt's ``result`` (None if no attempt was made),
    a mesh ``failure`` kind with ``message`` (None when the last result stands), the
    reason a wanted retry was refused (``stopped``), and ``attempts`` made.

    ``cancelled`` (hedged mode): the attempts still outstanding when the winner arrived; the
    driver cancels them. Their load and breaker slots are already released."""

    __slots__ = ("result", "failure", "message", "stopped", "attempts", "status")

    #: Outside hedged mode every end has no cancelled attempts (a class attribute: free).
    cancelled: tuple[Attempt, ...] = ()

    def __init__(
        self,
        result: AttemptResult | None,
        attempts: int,
        failure: str | None = None,
        message: str = "",
        stopped: str | None = None,
        status: int | str | None = None,
    ):
        self.result = result
        self.attempts = attempts
        self.failure = failure
        self.message = message
        self.stopped = stopped
        self.status = status


class HedgedEnd(CallEnd):
    """A :class:`CallEnd` of a hedged call, with its own ``cancelled``."""

    __slots__ = ("cancelled",)  # shadows the class attribute CallEnd.cancelled

    def __init__(self, result: AttemptResult, attempts: int,
                 cancelled: tuple[Attempt, ...]) -> None:
        super().__init__(result, attempts)
        self.cancelled = cancelled


class CallObserver(Protocol):
    """Hooks for telemetry (a structural type: the telemetry recorders implement it)."""

    def retry(self, reason: str) -> None:
        """A retry was decided after an attempt that ended with ``reason`` (outcome name)."""

    def stopped(self, reason: str) -> None:
        """A retry was wanted but refused (``FailReason``)."""

    def health(self, events: tuple[HealthEvent, ...]) -> None:
        """Breaker / outlier state changes."""


class _NullObserver:
    """The observer that records nothing."""

    def retry(self, reason: str) -> None:
        pass

    def stopped(self, reason: str) -> None:
        pass

    def health(self, events: tuple[HealthEvent, ...]) -> None:
        pass


NULL_OBSERVER: Final[CallObserver] = _NullObserver()

Action = Attempt | Sleep
CallGen = Generator[Action, "AttemptResult | None", CallEnd]
#: What a hedged-mode driver really talks to (``run_call`` is typed as the non-hedged
#: :data:`CallGen` so drivers that never hedge, such as gRPC's, keep their types).
HedgedCallGen = Generator["Attempt | Sleep | Signal", "Done | Signal | None", CallEnd]


# --------------------------------------------------------------------------- the plan's endings


def ended(service: str, result: AttemptResult, attempts: int, deadline: Deadline, t: float,
          stopped: str | None = None) -> CallEnd:
    """The end of a call whose last attempt stands. A failed attempt without an HTTP status
    whose retry the deadline refused, or that got no answer at all (no gRPC status either)
    when the overall deadline had passed, ends the call as ``DEADLINE`` (the driver raises
    its deadline error); anything else returns the last result."""
    if result.status is None and result.outcome is not Outcome.SUCCESS and (
            stopped == "deadline_exceeded"
            or (result.grpc_code is None and deadline.expired(t))):
        return deadline_end(service, result, attempts, stopped)
    return CallEnd(result, attempts, None, "", stopped)  # positional: cheaper than keywords


def deadline_end(service: str, result: AttemptResult | None, attempts: int,
                 stopped: str | None = None) -> CallEnd:
    return CallEnd(result, attempts, FailureKind.DEADLINE,
                   f"service {service!r}: deadline exceeded after {attempts} attempt(s)",
                   stopped=stopped)


#: :func:`meshlib.core.steps.choose` found no usable endpoint (every candidate ejected, with
#: an open breaker, or held out by a failed health check). Not an admission value.
BLOCKED: Final = -1


def unusable_end(service: str, result: AttemptResult | None, attempts: int, candidates: int,
                 why: int) -> CallEnd:
    """The end of a call for which no endpoint could be used: ``why`` is :data:`BLOCKED`
    (none usable) or ``REJECT`` (breakers refused every pick)."""
    if why == BLOCKED:
        message = (f"service {service!r}: all {candidates} endpoint(s) are ejected or have an "
                   "open circuit breaker (or fail active health checks)")
    else:
        message = f"service {service!r}: circuit breakers refused every endpoint"
    return CallEnd(result, attempts, FailureKind.CIRCUIT_OPEN, message)
