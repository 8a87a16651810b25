"""The outbound HTTP proxy: one more driver of the mesh's call plan.

For each request the app sends to the shim's port (``Host: orders`` or an absolute-form
target ``http://orders/...``), this module does only I/O around ``meshlib.core.call.run_call``,
exactly as ``meshlib.http.AsyncMeshTransport`` does for Python callers:

1. destination: ``safety.check_destination`` (refusals), then the service's
   ``DestinationState`` and telemetry recorder from the ``Mesh`` (the same objects a library
   client of that service uses); the first request for a name waits for etcd's first listing
   of it (bounded), and a name with neither instances nor a policy in etcd is refused 404;
2. body: a body of at most ``retry_body_bytes`` (64 KiB by default, Linkerd's rule) is read
   first and kept, so the plan may retry or hedge it (``replayable=True``); a larger or
   unknown-length body streams to the first attempt and is never sent twice
   (``replayable=False``: the plan refuses retries with ``body_not_replayable``);
3. deadline: ``x-mesh-timeout`` from the app (``meshlib.server.common.inbound_deadline``,
   the parser the inbound middleware uses); each attempt sends the remaining time in
   ``x-mesh-timeout``, as library clients do (``core.deadline``);
4. trace: the app's ``traceparent``/``tracestate`` become the parent of the shim's call span
   (``--tracing on``) and each attempt injects its own context, so the upstream sees the same
   trace id, a new parent id and the tracestate carried over; with ``passthrough`` the
   fields are forwarded unchanged;
5. the plan's actions: ``Sleep`` -> ``asyncio.sleep``; ``Attempt`` -> one exchange on
   ``upstream.UpstreamPool`` with the per-try timeout; hedged calls run one task per
   attempt like the async transport. Each attempt and the call are recorded with
   ``meshlib.http.attempt.record_attempt`` and ``finish`` (the library's functions), so
   families, labels and buckets are the library's;
6. the answer: the upstream response streams back (hop-by-hop fields stripped, framing
   chosen by ``frontend.Responder``); a mesh failure becomes a status with a one-line body
   and ``x-mesh-error`` naming the reason: 503 no endpoints / circuit open / concurrency
   limit / connect failure, 504 deadline or timeout, 502 reset or malformed response.

A request that failed only because a reused idle connection was closed under it
(``upstream.StaleConnectionError``) is sent again once on a new connection, within the same
attempt, when it is idempotent (``core.retry.is_idempotent`` with the destination's policy)
and its body was kept: the request never reached the application.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final, cast

import httpx
from opentelemetry import context as otel_context

from meshlib.context import CALLER_HEADER
from meshlib.core.call import (
    HEDGE,
    WAIT,
    Attempt,
    AttemptResult,
    Done,
    HedgedCallGen,
    Sleep,
    run_call,
)
from meshlib.core.deadline import HTTP_TIMEOUT_HEADER, Deadline, encode_timeout
from meshlib.core.mtls import STRICT
from meshlib.core.outcome import Outcome, classify_http
from meshlib.core.retry import is_idempotent, parse_retry_after
from meshlib.http.attempt import finish, record_attempt, record_cancelled, result_from_error
from meshlib.http.errors import (
    ConcurrencyLimitError,
    DeadlineExceededError,
    MeshHTTPError,
    RetryBudgetExhaustedError,
)
from meshlib.http.mtls import client_tls_of, tls_target
from meshlib.server.common import inbound_deadline
from meshlib.shim.metrics import ShimMetrics
from meshlib.shim.request import BodyError, Request
from meshlib.shim.responder import Responder
from meshlib.shim.safety import Refusal, check_destination, split_authority, strip_hop_by_hop
from meshlib.shim.tunnel import Tunnel
from meshlib.shim.upstream import StaleConnectionError, UpstreamPool, UpstreamResponse
from meshlib.telemetry import tracing

if TYPE_CHECKING:
    from meshlib.core.destination import DestinationState
    from meshlib.mesh import Mesh
    from meshlib.shim.config import ShimConfig

log = logging.getLogger("meshlib.shim")

_TIMEOUT_HEADER: Final = HTTP_TIMEOUT_HEADER.encode()
_DROP_REQUEST: Final = frozenset({b"host", b"content-length", b"expect", _TIMEOUT_HEADER})
_DROP_RESPONSE: Final = frozenset({b"content-length"})
_RETRY_AFTER_STATUSES: Final = frozenset({429, 503})
#: Distinct destination names one shim will resolve (each one is an etcd watch).
MAX_DESTINATIONS: Final = 4096


class _Route:
    __slots__ = ("dest", "recorder", "service", "known")

    def __init__(self, dest: DestinationState, recorder: Any) -> None:
        self.dest = dest
        self.recorder = recorder
        self.service = dest.service
        self.known = False


class _MethodOnly:
    """What ``meshlib.http.attempt.finish`` reads of a request (its method)."""

    __slots__ = ("method",)

    def __init__(self, method: str) -> None:
        self.method = method


class LoopError(httpx.ConnectError):
    """The picked endpoint is this shim's own listener: nothing is sent (a connect failure
    for the plan, which tries another endpoint)."""


class ClientBodyError(httpx.TransportError):
    """The app's request body failed while it was being forwarded (stalled, over the limit,
    bad chunked framing, connection closed): the app gets ``status``; never the endpoint's
    fault (outcome ``local``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _OnceBody:
    """A streamed request body: kept parts first, then the rest; may be sent only once."""

    __slots__ = ("head", "rest", "started", "source")

    def __init__(self, head: list[bytes], rest: AsyncIterator[bytes] | None,
                 source: Any = None) -> None:
        self.head = head
        self.rest = rest
        self.started = False
        self.source = source  # the frontend Body (for the status of its error)

    @property
    def error_status(self) -> int:
        return getattr(self.source, "error_status", 400)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        for part in self.head:
            yield part
        if self.rest is not None:
            async for part in self.rest:
                yield part


class OutboundProxy:
    """The handler of the outbound port (``frontend.FrontServer(handler=proxy.handle)``)."""

    def __init__(self, mesh: Mesh, config: ShimConfig, pool: UpstreamPool,
                 own_ports: frozenset[int] | None = None, resolve_timeout: float = 2.0) -> None:
        self.mesh = mesh
        self.config = config
        self.pool = pool
        self.own_ports = config.own_ports() if own_ports is None else own_ports
        # an endpoint on one of these is this shim itself (the inbound port is not: it
        # forwards to the app, so calling one's own service through it is no loop)
        self.loop_ports = self.own_ports - {config.inbound_port}
        self.own_addresses = frozenset({config.bind, "127.0.0.1", "::1", "localhost"}
                                       if config.bind not in ("0.0.0.0", "::") else
                                       {"127.0.0.1", "::1", "localhost", config.app_address})
        self.resolve_timeout = resolve_timeout
        self.routes: dict[str, _Route] = {}
        #: Host field value -> service name or the Refusal it gets (checks are pure)
        self._by_host: dict[bytes, str | tuple[int, str, str]] = {}
        self._by_authority: dict[bytes, str | tuple[int, str, str]] = {}
        self._names_generation = mesh.names.generation
        self.caller = config.service.encode() if config.service else None
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._remove_listener = mesh.add_listener(self._on_snapshot)
        #: mesh mTLS for upstream connections (``--identity on``): the library's rotating
        #: client context; the decision per attempt is ``meshlib.http.mtls.tls_target``
        self.tls = client_tls_of(mesh)

    def close(self) -> None:
        self._remove_listener()
        if self.tls is not None:
            self.tls.close()

    # ---------------------------------------------------------------- destination
    def destination(self, req: Request) -> tuple[str, bytes]:
        """(service, origin-form target) of a request, or raise :class:`Refusal`."""
        if req.method == "CONNECT":
            raise Refusal(405, "CONNECT is not supported: the shim forwards plain HTTP to "
                          "mesh services only", "connect")
        target = req.target
        if target.startswith(b"/"):
            raw = req.host
            if raw is None:
                raise Refusal(400, "missing Host header field", "no_host")
            return self._resolve(raw, self._by_host, False), target
        elif target == b"*":
            raise Refusal(400, "asterisk-form target is not forwarded", "bad_target")
        else:
            scheme, sep, rest = target.partition(b"://")
            if not sep:
                raise Refusal(400, f"bad request target {target[:100]!r}", "bad_target")
            if scheme.lower() != b"http":
                raise Refusal(400, f"scheme {scheme.decode('latin-1')!r} is not forwarded: mesh "
                              "services are reached over plain http://", "bad_scheme")
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0),
                      default=len(rest))
            authority, path = rest[:cut], rest[cut:]
            if not path.startswith(b"/"):
                path = b"/" + path
            if b"@" in authority:
                raise Refusal(400, "userinfo in the request target is not forwarded",
                              "bad_target")
            return self._resolve(authority, self._by_authority, True), path

    def _resolve(self, authority: bytes, cache: dict[bytes, str | tuple[int, str, str]],
                 check_port: bool) -> str:
        """The service an authority names, or raise :class:`Refusal`; the verdicts are pure
        functions of the bytes, so they are cached (the common case: one dict lookup).
        The port of a ``Host`` field is not checked (``check_port`` False): it is the port
        the app connected to, often the shim's own, and routing is by name."""
        names = self.mesh.names
        if names.generation != self._names_generation:  # mesh domains changed
            self._by_host.clear()
            self._by_authority.clear()
            self._names_generation = names.generation
        known = cache.get(authority)
        if known is None:
            try:
                host, port = split_authority(authority)
                known = check_destination(host, port if check_port else None, self.own_ports,
                                          names.domains)
            except Refusal as refusal:
                known = (refusal.status, refusal.reason, refusal.code)
            if len(cache) < MAX_DESTINATIONS:
                cache[authority] = known
        if isinstance(known, tuple):
            raise Refusal(*known)  # a new exception each time (no growing traceback)
        return known

    def _on_snapshot(self, service: str, _snap: Any) -> None:
        """Watch thread: wake requests waiting for a service's first listing."""
        if service in self._waiters and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake, service)

    def _wake(self, service: str) -> None:
        for fut in self._waiters.pop(service, ()):
            if not fut.done():
                fut.set_result(None)

    async def route(self, service: str) -> _Route:
        r = self.routes.get(service)
        if r is None:
            if len(self.routes) >= MAX_DESTINATIONS:
                raise Refusal(403, f"this shim already resolves {MAX_DESTINATIONS} distinct "
                              "services", "too_many_destinations")
            r = _Route(self.mesh.destination(service), self.mesh.call_observer("http", service))
            self.routes[service] = r
        if r.known:
            return r
        store = self.mesh.store
        snap = store.get(service)
        if not _listed(snap):
            # the first request for a name waits for etcd's first listing of it; a snapshot
            # published before that (revision 0, e.g. when the default policy changes) does
            # not tell whether the service exists
            loop = self._loop = asyncio.get_running_loop()
            deadline = loop.time() + self.resolve_timeout
            while not _listed(snap) and loop.time() < deadline:
                fut = loop.create_future()
                self._waiters.setdefault(service, []).append(fut)
                snap = store.get(service)  # published between the check and the wait?
                if _listed(snap):
                    break
                try:
                    await asyncio.wait_for(fut, deadline - loop.time())
                except TimeoutError:
                    pass
                snap = store.get(service)
        if snap is None or not _listed(snap):
            raise Refusal(503, f"service {service!r}: etcd has not answered within "
                          f"{self.resolve_timeout}s and no snapshot knows the service",
                          "discovery_unavailable")
        if not snap.endpoints and not snap.policy_revision:
            raise Refusal(404, f"{service!r} is not a registered mesh service (no instances "
                          "and no policy in etcd)", "unknown_service")
        r.known = True
        return r

    # ---------------------------------------------------------------- the handler
    async def handle(self, req: Request, resp: Responder) -> None:
        started = perf_counter()
        try:
            service, target = self.destination(req)
            route = await self.route(service)
        except Refusal as r:
            ShimMetrics.get().refuse(r.code)
            await resp.simple(r.status, r.reason, [(b"X-Mesh-Refused", r.code.encode())])
            return
        dest = route.dest
        timeout_value = req.timeout
        deadline = None
        if timeout_value is not None:
            deadline, expired = inbound_deadline(timeout_value, dest.now)
            if expired:  # the plan ends the call at once (504, recorded as the library does)
                deadline = Deadline(dest.now())
        try:
            body, replayable = await self._body(req)
        except BodyError as exc:
            status = req.body.error_status if req.body is not None else 400
            await resp.simple(status, str(exc))
            return
        headers = strip_hop_by_hop(req.headers, drop=_DROP_REQUEST, keep_upgrade=req.upgrade)
        headers.insert(0, (b"Host", service.encode()))
        if req.upgrade:
            replayable = False  # an upgrade is never sent twice
        if isinstance(body, bytes):
            if body or req.content_length is not None or req.chunked:
                headers.append((b"Content-Length", b"%d" % len(body)))
        elif req.content_length is not None:
            headers.append((b"Content-Length", b"%d" % req.content_length))
        else:
            headers.append((b"Transfer-Encoding", b"chunked"))
        if self.caller is not None:
            headers = [h for h in headers if h[0].lower() != CALLER_HEADER]
            headers.append((CALLER_HEADER, self.caller))

        token = None
        if tracing.state.tracer is not None or tracing.enabled():
            ctx = tracing.extract(req.headers)
            if ctx is not None:
                token = otel_context.attach(ctx)
        try:
            await self._call(req, resp, route, target, headers, body, replayable, deadline,
                             started)
        finally:
            if token is not None:
                otel_context.detach(token)

    async def _body(self, req: Request) -> tuple[bytes | _OnceBody, bool]:
        """The whole body when it is small enough to keep (replayable), else a stream."""
        b = req.body
        if b is None or b.consumed:
            return b"", True
        limit = self.config.retry_body_bytes
        if req.content_length is not None and req.content_length > limit:
            return _OnceBody([], aiter(b), b), False
        parts, complete = await b.read_upto(limit)
        if complete:
            return b"".join(parts), True
        return _OnceBody(parts, aiter(b), b), False

    async def _call(self, req: Request, resp: Responder, route: _Route, target: bytes,
                    headers: list[tuple[bytes, bytes]], body: bytes | _OnceBody,
                    replayable: bool, deadline: Any, started: float) -> None:
        dest = route.dest
        plan = dest.plan()
        method = req.method
        lookup = _HeaderLookup(headers)
        gen = run_call(
            dest, plan, method=method,
            path=target.partition(b"?")[0].decode("latin-1") if plan.has_header_routes else "/",
            header=lookup.get,
            has_idempotency_key=lambda: lookup.get("idempotency-key") is not None,
            replayable=replayable, deadline=deadline, observer=route.recorder,
        )
        retry = plan.retry
        # mesh mTLS: without an identity only a strict destination needs the decision (it
        # refuses); the shortcut is held to ``tls_target`` by tests/unit/test_shim_mtls_shortcut.py
        tls_of = (route if self.tls is not None or plan.policy.mtls.mode == STRICT
                  else None)
        idempotent = replayable and is_idempotent(
            method, method not in retry.methods and lookup.get("idempotency-key") is not None,
            retry)
        span = tracing.start_http_call(route.service, method)
        recorder = route.recorder
        now = dest.now
        pending: UpstreamResponse | None = None
        try:
            try:
                action = next(gen)
                while True:
                    if isinstance(action, Sleep):
                        await asyncio.sleep(action.seconds)
                        action = gen.send(None)
                        continue
                    if action.hedge_after is not None:
                        end = await self._hedged(cast(HedgedCallGen, gen), action, method,
                                                 target, headers, body, span, recorder, now,
                                                 tls_of)
                        break
                    if pending is not None:
                        pending.conn.abort()
                        pending = None
                    ep = action.endpoint
                    aspan = span.attempt(action.number, ep.address, ep.port)
                    result, seconds = await self._attempt(
                        action, method, target, headers, body, aspan, now, idempotent, tls_of)
                    if isinstance(result.value, UpstreamResponse):
                        pending = result.value
                    record_attempt(recorder, aspan, action.number, result, seconds)
                    action = gen.send(result)
            except StopIteration as stop:
                end = stop.value
        except BaseException:
            gen.close()
            if pending is not None:
                pending.conn.abort()
            raise
        try:
            response = finish(cast(httpx.Request, _MethodOnly(method)), route, end, span, started)
        except httpx.HTTPError as exc:
            await self._fail(resp, route.service, end, exc)
            return
        if isinstance(response, httpx.Response):  # fault injection abort (library response)
            await resp.simple(response.status_code, response.text,
                              [(b"X-Mesh-Fault", b"abort")])
            return
        up = cast(UpstreamResponse, response)
        if up.status == 101 and req.upgrade:
            resp.switch(strip_hop_by_hop(up.headers, keep_upgrade=True))
            Tunnel(resp.conn, up.conn).start(req.tail)
            return
        await self._relay(resp, up)

    async def _attempt(self, action: Attempt, method: str, target: bytes,
                       headers: list[tuple[bytes, bytes]], body: bytes | _OnceBody, aspan: Any,
                       now: Any, idempotent: bool, tls_of: _Route | None = None
                       ) -> tuple[AttemptResult, float]:
        """One attempt (``aspan``: its span, ended by the caller's ``record_attempt``):
        (result, seconds). ``tls_of``: the route when mesh mTLS may apply (the endpoint's
        ``tls`` field and the live ``mtls.mode`` decide, ``meshlib.http.mtls.tls_target``)."""
        ep = action.endpoint
        if ep.port in self.loop_ports and ep.address in self.own_addresses:
            err = LoopError(f"endpoint {ep.address}:{ep.port} of service {ep.service!r} is this "
                            "shim's own port: not sent (a loop)")
            return result_from_error(err), 0.0
        hdrs = list(headers)
        remaining = action.deadline.remaining(now())
        if remaining is not None:
            hdrs.append((_TIMEOUT_HEADER, encode_timeout(max(remaining, 0.0)).encode()))
        aspan.inject(hdrs, True)
        t0 = perf_counter()
        try:
            if isinstance(body, _OnceBody) and body.started:
                raise httpx.WriteError("the request body was streamed to an earlier attempt "
                                       "and cannot be sent again")
            tls = None if tls_of is None else tls_target(self.tls, tls_of, ep)
            try:
                up = await self.pool.request(ep.address, ep.port, method, target, hdrs,
                                             body if isinstance(body, bytes) else aiter(body),
                                             action.timeout, tls=tls)
            except StaleConnectionError:
                if not idempotent:
                    raise
                up = await self.pool.request(ep.address, ep.port, method, target, hdrs,
                                             cast(bytes, body), action.timeout, fresh=True,
                                             tls=tls)
            result = _result(up)
        except httpx.TransportError as exc:
            result = result_from_error(exc)
        except BodyError as exc:  # the app's body failed mid-stream: not the endpoint's fault
            status = self._status_of_body_error(body)
            result = AttemptResult(Outcome.LOCAL, None, ClientBodyError(str(exc), status))
        return result, perf_counter() - t0

    @staticmethod
    def _status_of_body_error(body: Any) -> int:
        return 400 if not isinstance(body, _OnceBody) else body.error_status

    async def _hedged(self, gen: HedgedCallGen, action: Any, method: str, target: bytes,
                      headers: list[tuple[bytes, bytes]], body: bytes | _OnceBody, span: Any,
                      recorder: Any, now: Any, tls_of: _Route | None = None) -> Any:
        """Hedged mode (``core.call``): one task per attempt; the first final result wins."""
        loop = asyncio.get_running_loop()
        running: dict[Attempt, tuple[asyncio.Task[Any], Any, float]] = {}
        delivered: list[Any] = []
        try:
            while True:
                if isinstance(action, Sleep):
                    await asyncio.sleep(action.seconds)
                    action = gen.send(None)
                    continue
                timer = None
                if action is not WAIT:
                    ep = action.endpoint
                    aspan = span.attempt(action.number, ep.address, ep.port)
                    task = loop.create_task(self._attempt(action, method, target, headers, body,
                                                          aspan, now, True, tls_of))
                    running[action] = (task, aspan, perf_counter())
                    if action.hedge_after is not None:
                        timer = perf_counter() + action.hedge_after
                if not running:
                    raise RuntimeError(f"hedged call plan waits with nothing in flight "
                                       f"({action!r})")
                wait_for = None if timer is None else max(0.0, timer - perf_counter())
                done, _ = await asyncio.wait([r[0] for r in running.values()], timeout=wait_for,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    action = gen.send(HEDGE)
                    continue
                att = next(a for a, r in running.items() if r[0] in done)
                task, aspan, _t0 = running.pop(att)
                result, seconds = task.result()
                record_attempt(recorder, aspan, att.number, result, seconds)
                delivered.append(result.value)
                action = gen.send(Done(att, result))
        except StopIteration as stop:
            end = stop.value
            keep = end.result.value if end.result is not None else None
            for value in delivered:
                if value is not keep and isinstance(value, UpstreamResponse):
                    value.conn.abort()
            for att, (task, aspan, t0) in running.items():
                task.cancel()
                task.add_done_callback(_abort_result)
                record_cancelled(recorder, aspan, att.number, perf_counter() - t0)
            return end
        except BaseException:
            gen.close()
            for att, (task, aspan, t0) in running.items():
                task.cancel()
                task.add_done_callback(_abort_result)
                record_cancelled(recorder, aspan, att.number, perf_counter() - t0)
            for value in delivered:
                if isinstance(value, UpstreamResponse):
                    value.conn.abort()
            raise

    # ---------------------------------------------------------------- answers
    async def _relay(self, resp: Responder, up: UpstreamResponse) -> None:
        """Stream the upstream response back to the app."""
        headers = strip_hop_by_hop(up.headers, drop=_DROP_RESPONSE)
        reader = up.reader
        length: int | None = None
        if reader.mode == "length":
            length = reader.remaining
        elif reader.mode == "none":
            for name, value in up.headers:
                if name.lower() == b"content-length" and value.isdigit():
                    length = int(value)  # HEAD: the length the GET would have had
        # hold the head back for one write with the body only when body bytes are already here
        resp.start(up.status, headers, length, hold=reader.done or bool(up.conn.buf))
        try:
            while (chunk := await up.next_chunk()) is not None:
                await resp.write(chunk)
        except (httpx.TransportError, OSError) as exc:
            log.info("upstream response body failed mid-stream: %s", exc)
            up.conn.abort()
            resp.abort()
            return
        except BaseException:
            up.conn.abort()
            raise
        resp.end()
        up.release()

    async def _fail(self, resp: Responder, service: str, end: Any, exc: BaseException) -> None:
        if isinstance(exc, MeshHTTPError) and not isinstance(exc, RetryBudgetExhaustedError):
            reason = exc.reason
            status = 504 if isinstance(exc, DeadlineExceededError) else 503
            if isinstance(exc, ConcurrencyLimitError):
                status = 503
            message = str(exc)
        else:
            cause = exc.__cause__ if isinstance(exc, RetryBudgetExhaustedError) else exc
            reason = type(cause).__name__ if cause is not None else "error"
            if isinstance(cause, httpx.TimeoutException):
                status = 504
            elif isinstance(cause, httpx.ConnectError):
                status = 503
            elif isinstance(cause, ClientBodyError):
                status = cause.status
            else:
                status = 502
            message = f"service {service!r}: {cause or exc} ({end.attempts} attempt(s))"
        await resp.simple(status, message, [(b"X-Mesh-Error", reason.encode())])


class _HeaderLookup:
    """Case-insensitive first-value lookup over a header list (for the plan's routes)."""

    __slots__ = ("headers", "_map")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        self._map: dict[str, str] | None = None

    def get(self, name: str) -> str | None:
        m = self._map
        if m is None:
            m = self._map = {}
            for k, v in self.headers:
                m.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        return m.get(name.lower())


def _result(up: UpstreamResponse) -> AttemptResult:
    status = up.status
    retry_after = None
    if status in _RETRY_AFTER_STATUSES:
        for name, value in up.headers:
            if name.lower() == b"retry-after":
                import time

                retry_after = parse_retry_after(value.decode("latin-1"), time.time())
                break
    outcome = classify_http(status, None) if status < 600 else Outcome.HTTP_5XX
    return AttemptResult(outcome, status, up, retry_after_s=retry_after)


def _listed(snap: Any) -> bool:
    """Whether a snapshot reflects etcd (a listing at some revision) or the snapshot file."""
    return snap is not None and bool(snap.revision or snap.from_cache)


def _abort_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is None:
        value = task.result()[0].value
        if isinstance(value, UpstreamResponse):
            value.conn.abort()
