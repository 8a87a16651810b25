"""The httpx transport that routes ``http://<service>/...`` through the mesh.

It runs the sans-I/O call plan (``meshlib.core.call.run_call``): the plan decides (pick an
endpoint, sleep, retry, give up), this driver does the I/O and reports each attempt's result
back (``meshlib.http.attempt`` turns responses and errors into results, and the call's end
into the response to return or the error to raise). Requests to hosts that are not mesh
services go to a plain httpx transport built with the client's own transport settings
(``verify``, ``cert``, ``limits``, ``http2``, ``proxy``: ``passthrough_options``), measured,
traced and without mesh fields (``meshlib.http.outbound``).

Hedged calls (``retries.hedging``, see ``meshlib.core.call``) leave the plain loop at their
first attempt (one attribute check: ``action.hedge_after``) for :meth:`_hedged`, which keeps
several attempts in flight through the backend's hedges (``meshlib.http.backends``: tasks on
the event loop, or a small thread pool in the sync driver, created on the first hedged call)
and waits for the first to finish or for the hedge timer. The losers are cancelled (their
connections are closed) and a loser's response that arrived anyway is closed unread. Every
attempt is recorded; abandoned ones with outcome ``local`` and span ``error.type``
``cancelled``.
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING, Any, cast

import httpx

from meshlib.config.propagation import PropagationPolicy
from meshlib.core.call import (
    HEDGE,
    WAIT,
    Attempt,
    AttemptResult,
    Done,
    HedgedCallGen,
    Sleep,
)
from meshlib.http.attempt import (
    attempt_headers_and_timeouts,
    finish,
    record_attempt,
    record_cancelled,
    result_from_error,
    result_from_response,
)
from meshlib.http.backends.aio import AsyncHedges, discard, sleep
from meshlib.http.mtls import client_tls_of, tls_target
from meshlib.http.outbound import Outbound
from meshlib.http.router import Route, Router
from meshlib.telemetry.tracing import start_http_call

from .pool import AsyncPool

if TYPE_CHECKING:
    from meshlib.ports import MeshPort


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=AsyncMeshTransport(mesh))``: calls to mesh services.

    ``mesh``: a :class:`meshlib.Mesh`, or anything with the members the drivers use
    (:class:`meshlib.ports.MeshPort`).

    ``max_keepalive_per_endpoint``: idle connections kept per endpoint. ``hedge_threads``:
    threads for the attempts of hedged calls in the sync transport (the async one runs them
    as tasks). ``identity``: an IdentitySource for mesh mTLS (default ``mesh.identity``);
    whether an attempt uses it is the destination's ``mtls.mode`` (``meshlib.http.mtls``).

    ``passthrough_options``: keyword arguments of ``httpx.AsyncHTTPTransport`` for calls to
    hosts outside the mesh (``mesh.async_http_client(verify=..., cert=..., proxy=...)``
    passes the client's own); given ones are applied at once, so a bad certificate path
    fails here. ``no_propagate``: host patterns that get no trace context
    (:mod:`meshlib.config.propagation`; None: ``MESHLIB_NO_PROPAGATE``)."""

    def __init__(
        self,
        mesh: MeshPort,
        *,
        passthrough: bool = True,
        max_keepalive_per_endpoint: int = 64,
        hedge_threads: int = 64,
        passthrough_options: dict[str, Any] | None = None,
        no_propagate: Any = None,
        identity: Any = None,
    ) -> None:
        self._router = Router(mesh, passthrough)
        self._tls = client_tls_of(mesh, identity)
        self._pool = AsyncPool(max_idle=max_keepalive_per_endpoint)
        self._fallback_options = dict(passthrough_options or {})
        self._fallback: httpx.AsyncBaseTransport | None = None
        if self._fallback_options.keys() - {"trust_env"}:  # else built at the first use
            self._fallback = httpx.AsyncHTTPTransport(**self._fallback_options)
        self._outbound = Outbound(PropagationPolicy.parse(no_propagate))
        self._hedges = AsyncHedges(hedge_threads)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        route = self._router.route(request)
        if route is None:
            return await self._pass(request)
        started = perf_counter()
        span = start_http_call(route.service, request.method)
        gen = self._router.start(route, request)
        extra = self._router.extra_headers
        now = route.dest.now
        pending: Any = None
        try:
            action = next(gen)
            while True:
                if isinstance(action, Sleep):
                    await sleep(action.seconds)
                    action = gen.send(None)
                    continue
                if action.hedge_after is not None:  # hedged mode (meshlib.core.call)
                    return await self._hedged(
                        request, route, cast(HedgedCallGen, gen), action, span, started)
                if pending is not None:
                    await discard(pending)
                    pending = None
                ep = action.endpoint
                headers, timeouts = attempt_headers_and_timeouts(request, action, extra, now())
                aspan = span.attempt(action.number, ep.address, ep.port)
                aspan.inject(headers, True)
                t0 = perf_counter()
                try:
                    response = await self._pool.request(
                        ep.address, ep.port, request.method, request.url.raw_path,
                        headers, request.stream, timeouts,
                        tls=tls_target(self._tls, route, ep),
                    )
                    result = result_from_response(response)
                    pending = response
                except httpx.TransportError as exc:
                    result = result_from_error(exc)
                record_attempt(route.recorder, aspan, action.number, result, perf_counter() - t0)
                action = gen.send(result)
        except StopIteration as stop:
            return finish(request, route, stop.value, span, started)
        except BaseException:
            gen.close()  # frees the concurrency slot, the load count and any breaker trial
            if pending is not None:
                await pending.aclose()
            raise

    async def _pass(self, request: httpx.Request) -> httpx.Response:
        """A call to a host outside the mesh (``meshlib.http.outbound``)."""
        fallback = self._fallback
        if fallback is None:
            fallback = self._fallback = httpx.AsyncHTTPTransport()
        state = self._outbound.start(request)
        try:
            response = await fallback.handle_async_request(request)
        except BaseException as exc:
            self._outbound.end(state, request, None, exc)
            raise
        self._outbound.end(state, request, response, None)
        return response

    async def _hedged(
        self, request: httpx.Request, route: Route, gen: HedgedCallGen, action: Any, span: Any,
        started: float,
    ) -> httpx.Response:
        """Drive a hedged call: attempts run on the backend's hedges; this one waits and
        decides."""
        hedges = self._hedges
        extra = self._router.extra_headers
        now = route.dest.now
        recorder = route.recorder
        running: dict[Attempt, _Run] = {}
        delivered: list[Any] = []  # values handed to the plan: closed unless returned
        try:
            while True:
                if isinstance(action, Sleep):
                    await sleep(action.seconds)
                    action = gen.send(None)
                    continue
                timer = None
                if action is not WAIT:
                    ep = action.endpoint
                    headers, timeouts = attempt_headers_and_timeouts(request, action, extra,
                                                                     now())
                    aspan = span.attempt(action.number, ep.address, ep.port)
                    aspan.inject(headers, True)
                    handle = hedges.start(timed_attempt, self._pool, ep.address, ep.port,
                                          request.method, request.url.raw_path, headers,
                                          request.stream, timeouts,
                                          (self._tls, route, ep))
                    running[action] = _Run(handle, aspan, perf_counter())
                    if action.hedge_after is not None:
                        timer = perf_counter() + action.hedge_after
                if not running:
                    raise RuntimeError(f"service {route.service!r}: hedged call plan waits "
                                       f"with no attempt in flight ({action!r})")
                timeout = None if timer is None else max(0.0, timer - perf_counter())
                first = await hedges.wait_first([r.handle for r in running.values()], timeout)
                if first is None:
                    action = gen.send(HEDGE)
                    continue
                att = next(a for a, r in running.items() if r.handle is first)
                run = running.pop(att)
                result, seconds = first.result()
                record_attempt(recorder, run.span, att.number, result, seconds)
                delivered.append(result.value)
                action = gen.send(Done(att, result))
        except StopIteration as stop:
            end = stop.value
            _abandon(hedges, recorder, running)
            keep = end.result.value if end.result is not None else None
            for value in delivered:
                if value is not keep:
                    await discard(value)
            return finish(request, route, end, span, started)
        except BaseException:
            gen.close()  # frees the concurrency slot, the load counts and breaker trials
            _abandon(hedges, recorder, running)
            for value in delivered:
                hedges.drop(value)
            raise

    async def aclose(self) -> None:
        if self._tls is not None:
            self._tls.close()
        await self._pool.aclose()
        self._hedges.close()
        if self._fallback is not None:
            await self._fallback.aclose()


class _Run:
    """A hedged attempt in flight: the backend's handle, its span, when it started."""

    __slots__ = ("handle", "span", "t0")

    def __init__(self, handle: Any, span: Any, t0: float) -> None:
        self.handle = handle
        self.span = span
        self.t0 = t0


async def timed_attempt(
    pool: AsyncPool, host: str, port: int, method: str, target: bytes,
    headers: list[tuple[bytes, bytes]], stream: Any, timeouts: dict[str, float | None] | None,
    tls_of: tuple[Any, Route, Any], on_connection: Any = None,
) -> tuple[AttemptResult, float]:
    """One hedged attempt: (result, seconds). ``tls_of``: ``(client TLS, route, endpoint)``
    for :func:`meshlib.http.mtls.tls_target`."""
    t0 = perf_counter()
    try:
        response = await pool.request(
            host, port, method, target, headers, stream, timeouts, on_connection,
            tls_target(*tls_of))
        result = result_from_response(response)
    except httpx.TransportError as exc:
        result = result_from_error(exc)
    return result, perf_counter() - t0


def _abandon(hedges: AsyncHedges, recorder: Any, running: dict[Attempt, _Run]) -> None:
    """Cancel the attempts still running (hedged losers) and record them as cancelled."""
    for att, run in running.items():
        hedges.cancel(run.handle)
        record_cancelled(recorder, run.span, att.number, perf_counter() - run.t0)
    running.clear()

