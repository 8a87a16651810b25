"""The attempt loop of a hedged call (the call plan's *hedged mode*).

Hedging (Envoy request hedging, gRPC A6 hedging policy, Finagle backup requests)
---------------------------------------------------------------------------------
When ``retries.hedging.enabled``, the call is idempotent with a replayable body, it is not a
gRPC call (``grpc=True`` never hedges: the gRPC drivers see exactly the protocol above) and
the target has at least two endpoints, the plan runs in *hedged mode*. Otherwise hedging
costs one attribute check in the plan per call (and one, ``action.hedge_after``, in the
driver per attempt; plain attempts read it from the class). In hedged mode:

* an :class:`Attempt` carries ``hedge_after`` (seconds, or ``None``): if no outstanding attempt
  has finished that long after the action was yielded, the driver sends :data:`HEDGE`. Every
  action replaces the previous timer;
* the driver sends each attempt's result as :class:`Done` ``(attempt, result)``, so the plan
  finishes load and health for the right endpoint;
* on :data:`HEDGE` the plan answers with another :class:`Attempt` to an endpoint this call has
  not tried (ring-hash: the next one clockwise), if ``RetryPolicy.may_hedge`` allows it
  (``max_extra``, deadline, retry budget) and the breaker admits it, recording
  ``observer.retry("hedge")``; else with :data:`WAIT` (wait for a result, no more timer);
* the first *final* result (success, or not selected by ``retry_on``) wins: the plan returns
  a :class:`CallEnd` whose ``cancelled`` lists the attempts still outstanding. The plan has
  already released their load counts and breaker trial slots (``health.release``: being
  cancelled is no failure); the driver cancels them and closes their connections;
* a retryable failure while another copy is still in flight does not end the call: the next
  hedge is sent at once if one is allowed (gRPC A6 "the next hedged request in line is sent
  immediately"), else the plan yields :data:`WAIT`. Only when nothing is in flight does the
  normal retry decision run (backoff :class:`Sleep`, then a new round whose first attempt may
  hedge again while ``max_extra`` is not used up). Hedges count as attempts (``CallEnd.attempts``,
  ``retries.attempts`` for a later retry) and each one takes a retry-budget token.

The hedged driver loop::

    action = next(gen)                      # first Attempt with hedge_after set
    while True:
        if Sleep:   sleep; action = gen.send(None); continue
        if Attempt: start it (a task / a pool thread); timer = action.hedge_after
        if WAIT:    timer = None
        wait for the first of: an outstanding attempt finishes -> action = gen.send(Done(a, r))
                               the timer expires              -> action = gen.send(HEDGE)
    # StopIteration: cancel end.cancelled, close every response but end.result.value
"""

from __future__ import annotations

from typing import Any

from meshlib.core.actions import (
    HEDGE,
    HEDGE_REASON,
    WAIT,
    Attempt,
    AttemptResult,
    CallObserver,
    Done,
    HedgedAttempt,
    HedgedCallGen,
    HedgedEnd,
    Sleep,
    deadline_end,
    ended,
    unusable_end,
)
from meshlib.core.destination import DestinationState, Plan
from meshlib.core.health import REJECT
from meshlib.core.outcome import Outcome
from meshlib.core.retry import CallState, Fail, Retry
from meshlib.core.steps import choose, report

__all__ = ["run_hedged"]


def run_hedged(
    dest: DestinationState,
    plan: Plan,
    state: CallState,
    candidates_all: tuple[Any, ...],
    hash_key: str | None,
    observer: CallObserver,
    t: float,
) -> HedgedCallGen:
    """The attempt loop of a hedged call (see "Hedging" in the module docstring).

    A *round* is a first attempt plus its hedges; it ends with a final result (the call
    ends), or with every copy failed retryably (the normal retry decision, then the next
    round). ``inflight`` maps each outstanding :class:`Attempt` to its endpoint, load start
    time and breaker admission; whatever is still in it when the generator ends (winner
    found, call failed, generator closed by a cancelled caller) is released without a
    health penalty."""
    now = dest.now
    service = dest.service
    health = dest.health
    stats = dest.stats
    balancer = plan.balancer
    zones = plan.zones
    retry = plan.retry
    max_extra = retry.hedging.max_extra
    delay = retry.hedging.delay_s
    inflight: dict[Attempt, tuple[Any, float, int]] = {}

    def start(ep: Any, admission: int, t: float) -> Attempt:
        state.begin_attempt(ep.key)
        a = HedgedAttempt(ep, retry.attempt_timeout(state, t), state.attempt, state.deadline,
                           delay if state.hedges < max_extra else None)
        inflight[a] = (ep, stats.start(ep), admission)
        return a

    def hedge(t: float) -> Attempt | None:
        """One more copy to an untried endpoint, if allowed now; else None."""
        if state.hedges >= max_extra or state.deadline.expired(t):
            return None
        candidates = zones.select(candidates_all, t)
        ep = balancer.pick(candidates, state.tried, hash_key, t)
        if ep is None and candidates is not candidates_all:
            ep = balancer.pick(candidates_all, state.tried, hash_key, t)
        if ep is None:
            return None  # every usable endpoint is already working on this call
        admission = health.admit(ep, t)
        if admission == REJECT:
            return None
        if not retry.may_hedge(state, t):  # max_extra, deadline, retry budget (takes a token)
            report(dest, observer, health.release(ep, admission, t))
            return None
        observer.retry(HEDGE_REASON)
        return start(ep, admission, t)

    result: AttemptResult | None = None
    try:
        while True:  # one round per iteration
            if state.deadline.expired(t):
                return deadline_end(service, result, state.attempt)
            ep, admission = choose(plan, health, candidates_all, state.tried, hash_key, t)
            if ep is None:
                return unusable_end(service, result, state.attempt, len(candidates_all),
                                    admission)
            msg = yield start(ep, admission, t)
            while True:  # until this round's copies have all answered (or one won)
                if msg is HEDGE:
                    a = hedge(now())
                    msg = yield (WAIT if a is None else a)
                    continue
                if not isinstance(msg, Done):
                    raise TypeError(f"service {service!r}: hedged call plan expected Done or "
                                    f"HEDGE from the driver, got {msg!r}")
                ep, started, admission = inflight.pop(msg.attempt)
                result = msg.result
                t = now()
                outcome = result.outcome
                stats.finish(ep, started, t, outcome is Outcome.SUCCESS)
                events = health.record(ep, outcome, admission, t)
                report(dest, observer, events)
                if outcome is Outcome.SUCCESS or not retry.is_retryable(
                        state, outcome, result.status, result.grpc_code):
                    return HedgedEnd(result, state.attempt, tuple(inflight))
                if inflight:  # another copy may still answer: hedge now (gRPC A6) or wait
                    a = hedge(t)
                    msg = yield (WAIT if a is None else a)
                    continue
                break
            d = retry.decide(state, outcome, result.status, result.retry_after_s, t,
                             grpc_code=result.grpc_code, pushback_s=result.pushback_s)
            if isinstance(d, Fail):
                observer.stopped(d.reason)
                return ended(service, result, state.attempt, state.deadline, t, d.reason)
            if not isinstance(d, Retry):  # FINISH (is_retryable said otherwise just above)
                return ended(service, result, state.attempt, state.deadline, t)
            observer.retry(outcome.value)
            if d.delay_s > 0:
                yield Sleep(d.delay_s, "backoff")
            t = now()
    finally:
        if inflight:  # losers, or everything if the caller went away: no health penalty
            t = now()
            for ep, started, admission in inflight.values():
                stats.finish(ep, started, t, False)
                report(dest, observer, health.release(ep, admission, t))
            inflight.clear()
