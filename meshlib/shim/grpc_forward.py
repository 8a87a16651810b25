"""Forwarding one gRPC call, as raw bytes, through the library's own aio mesh channel.

The shim's gRPC upstream listener (:mod:`meshlib.shim.grpc_proxy`) accepts every method with
a generic ``stream_stream`` handler that has no serializers, so it sees messages as bytes and
needs no protobuf knowledge (all four call shapes look like a stream-stream on the wire: gRPC
over HTTP/2, "Requests"/"Responses"). Each call is handed to the mesh channel of
:mod:`meshlib.grpc.aio` (``channel.unary_stream(method)`` / ``channel.stream_stream(method)``,
no serializers), so discovery, balancing, breakers, routes, fault injection, deadlines, A6
retries, metrics and traces are decided by the one call plan (``meshlib.core.call``) exactly as
for a Python caller; this module only moves bytes and metadata.

Per call:

1. **Shape.** A request of exactly one message can be replayed, so it goes out as
   ``unary_stream`` (retried per gRPC A6 until the response is committed, like the library's
   unary and server-streaming calls); anything else goes out as ``stream_stream`` (never
   retried: request streams are not replayed, as in the library). A gRPC server cannot see the
   method's declared shape, only the messages, so the first two reads decide: one message and
   then end-of-stream means "unary request". A client that sends nothing, or one message and
   then waits for a reply (a bidi "ping-pong", a server-speaks-first protocol), would block
   that decision, so each of the two reads waits at most ``unary_window`` seconds in total;
   when the window passes first the call is forwarded as a stream at once (correct, only not
   retried). Unary clients send the message and the half-close together (measured here: the
   end-of-stream read returns 25-55 us after the message), so they are never misjudged
   unless the shim is starved for the whole window. A method seen once with no message or
   with a second one takes a request stream (a unary request has exactly one message), so
   its later calls are forwarded as streams at once, without the window.
2. **Metadata.** The caller's metadata is carried, except what gRPC itself owns
   (``grpc-*``, pseudo-headers, ``user-agent``, ``te``, ``content-type``) and the caller
   identity ``x-mesh-caller`` (the shim's mesh sends the app's own). grpcio cannot forward
   ``user-agent`` (it sets its own) nor ``:authority`` (grpc#38906, grpc#12400).
3. **Trace.** When tracing is on (or pass-through is enabled) the caller's ``traceparent`` /
   ``tracestate`` become the parent of the mesh call's spans (the shim is a hop with its own
   spans), and the channel injects the new context; otherwise they pass unchanged.
4. **Deadline.** ``context.time_remaining()`` is the caller's ``grpc-timeout``; None (aio, no
   deadline) or the huge value sync grpcio reports without one (grpc#26236) means no
   deadline. The policy's ``timeout`` still applies, as for every library call: the earlier
   wins (clamped), so a call without a deadline gets only the policy's (none when it is null).
5. **Response.** Initial metadata, each message (one at a time: a message is read from the
   upstream only after the previous one was written to the caller, so a slow side slows the
   other instead of filling a queue), then code, details and trailing metadata, including
   ``grpc-status-details-bin``, exactly as received. A failure of the mesh itself (no
   endpoints, open breakers, the concurrency limit, the deadline) reaches the caller as the
   status :mod:`meshlib.grpc.errors` gives it, with the library's details text.
6. **Cancellation.** When the caller cancels (or its deadline passes) grpcio cancels this
   handler's task; the upstream call is cancelled with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Any

import grpc
import grpc.aio
from opentelemetry import context as otel_context

from meshlib.context import CALLER_KEY
from meshlib.core.deadline import MAX_TIMEOUT_SECONDS
from meshlib.telemetry import tracing

__all__ = ["DEFAULT_UNARY_WINDOW", "CallForwarder", "forwarded_metadata", "caller_timeout"]

#: Seconds the two first reads of a call may take before it is forwarded as a stream.
DEFAULT_UNARY_WINDOW = 0.01

_EOF: Any = grpc.aio.EOF
_DROPPED = frozenset({"user-agent", "te", "content-type", "host", CALLER_KEY})
_TRACE_KEYS = frozenset({"traceparent", "tracestate", "baggage"})
#: Mesh multicallables kept per listener (a method is a label value of the library's metrics
#: as well, so any real service has far fewer).
_MAX_CACHED_METHODS = 1024


def _own_key(key: str) -> bool:
    return key.startswith(("grpc-", ":")) or key in _DROPPED


def forwarded_metadata(metadata: Sequence[Any] | None) -> tuple[list[tuple[str, Any]], bool]:
    """The caller's metadata minus what gRPC and the mesh set themselves; and whether it
    carries a W3C trace context (``traceparent``)."""
    out: list[tuple[str, Any]] = []
    traced = False
    for item in metadata or ():
        key, value = item[0], item[1]
        if _own_key(key):
            continue
        if key == "traceparent":
            traced = True
        out.append((key, value))
    return out, traced


def response_metadata(metadata: Any) -> list[tuple[str, Any]]:
    """Upstream metadata to send on to the caller (grpcio refuses its own keys)."""
    return [(k, v) for k, v in (metadata or ()) if not k.startswith(":") and k not in _DROPPED
            and (not k.startswith("grpc-") or k == "grpc-status-details-bin"
                 or k == "grpc-retry-pushback-ms")]


def caller_timeout(remaining: float | None) -> float | None:
    """The caller's remaining deadline in seconds, or None when it set none."""
    if remaining is None or remaining >= MAX_TIMEOUT_SECONDS:
        return None
    return remaining if remaining > 0.0 else 0.0


class CallForwarder:
    """Forwards calls to one mesh service through ``channel`` (an ``AioMeshChannel``).

    One per upstream listener; :meth:`handle` is the generic ``stream_stream`` behaviour."""

    def __init__(self, channel: Any, *, unary_window: float = DEFAULT_UNARY_WINDOW) -> None:
        if unary_window < 0:
            raise ValueError(f"unary_window: must be >= 0 seconds, got {unary_window!r}")
        self.channel = channel
        self.unary_window = unary_window
        self._unary: dict[str, Any] = {}
        self._stream: dict[str, Any] = {}
        #: Methods proven to take a request stream (a call sent 0 or 2+ messages): their calls
        #: skip the shape reads (and their window).
        self._streaming: set[str] = set()

    def _remember_streaming(self, method: str) -> None:
        if len(self._streaming) < _MAX_CACHED_METHODS:
            self._streaming.add(method)

    # --- multicallables (cached per method) ----------------------------------------------------
    def _mc(self, cache: dict[str, Any], factory: Any, method: str) -> Any:
        mc = cache.get(method)
        if mc is None:
            mc = factory(method)  # no serializers: bytes in, bytes out
            if len(cache) < _MAX_CACHED_METHODS:
                cache[method] = mc
        return mc

    # --- the call -----------------------------------------------------------------------------
    async def handle(self, method: str, requests: AsyncIterator[bytes], context: Any) -> None:
        """Forward one call (``method`` is ``/package.Service/Method``)."""
        metadata, traced = forwarded_metadata(context.invocation_metadata())
        if method in self._streaming:  # seen with 0 or 2+ request messages: a request stream
            unary, first, pending = False, None, None
        else:
            unary, first, pending = await self._read_shape(requests)
        call = None
        try:
            timeout = caller_timeout(context.time_remaining())  # what is left after the reads
            parent = tracing.extract(metadata) if traced else None
            token = None
            if parent is not None:
                metadata = [m for m in metadata if m[0] not in _TRACE_KEYS]
                token = otel_context.attach(parent)
            try:
                if unary:
                    mc = self._mc(self._unary, self.channel.unary_stream, method)
                    call = mc(first, timeout=timeout, metadata=metadata)
                else:
                    mc = self._mc(self._stream, self.channel.stream_stream, method)
                    call = mc(_requests(first, pending, requests,
                                        partial(self._remember_streaming, method)),
                              timeout=timeout, metadata=metadata)
            finally:
                if token is not None:
                    otel_context.detach(token)
            await _relay(call, context)
        except BaseException:  # the caller went away, or the call could not start
            if call is not None:
                call.cancel()
            if pending is not None and not pending.done():
                pending.cancel()
            raise

    async def _read_shape(self, requests: AsyncIterator[bytes]
                          ) -> tuple[bool, Any, asyncio.Future[Any] | None]:
        """``(unary, first, pending)``: ``unary`` when the request is exactly one message
        (``first``); otherwise ``first`` is the first message (or ``_EOF`` / None when unread)
        and ``pending`` a read still in flight (its result comes next)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.unary_window
        read = asyncio.ensure_future(_next(requests))
        await _wait(read, self.unary_window)
        if not read.done():
            return False, None, read
        first = read.result()
        if first is _EOF:
            return False, _EOF, None
        read = asyncio.ensure_future(_next(requests))
        await _wait(read, max(0.0, end - loop.time()))
        if not read.done():
            return False, first, read
        if read.result() is _EOF:
            return True, first, None
        return False, first, read


async def _wait(read: asyncio.Future[Any], timeout: float) -> None:
    """Wait up to ``timeout`` for ``read``; it is cancelled if the caller goes away."""
    try:
        await asyncio.wait((read,), timeout=timeout)
    except BaseException:
        read.cancel()
        raise


async def _next(requests: AsyncIterator[bytes]) -> Any:
    try:
        return await requests.__anext__()
    except StopAsyncIteration:
        return _EOF


async def _requests(first: Any, pending: asyncio.Future[Any] | None,
                    requests: AsyncIterator[bytes],
                    proven: Callable[[], None] | None = None) -> AsyncIterator[bytes]:
    """The caller's request stream for a ``stream_stream`` upstream call: what the shape
    reads took, then the rest, one message at a time. ``proven`` is called once the stream
    has shown 0 or 2+ messages (the method takes a request stream)."""
    count = 0
    async for msg in _chain(first, pending, requests):
        count += 1
        if count == 2 and proven is not None:
            proven()
        yield msg
    if count == 0 and proven is not None:
        proven()


async def _chain(first: Any, pending: asyncio.Future[Any] | None,
                 requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first is _EOF:
        return
    if first is not None:
        yield first
    if pending is not None:
        msg = await pending
        if msg is _EOF:
            return
        yield msg
    async for msg in requests:
        yield msg


async def _relay(call: Any, context: Any) -> None:
    """Send the upstream's response (headers, messages, status, trailers) to the caller."""
    headers_sent = False
    try:
        async for message in call:
            if not headers_sent:
                headers_sent = True
                initial = response_metadata(await call.initial_metadata())
                if initial:
                    await context.send_initial_metadata(initial)
            await context.write(message)
        trailing = response_metadata(await call.trailing_metadata())
        code = await call.code()
        details = await call.details()
    except grpc.aio.AioRpcError as err:
        if not headers_sent:
            initial = response_metadata(err.initial_metadata())
            if initial:
                await context.send_initial_metadata(initial)
        trailing = response_metadata(err.trailing_metadata())
        code = err.code()
        details = err.details()
    if trailing:
        context.set_trailing_metadata(trailing)
    if code is not grpc.StatusCode.OK:
        context.set_code(code)
        if details:
            context.set_details(details)
