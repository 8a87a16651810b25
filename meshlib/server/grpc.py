"""gRPC server interceptors (sync ``grpc.ServerInterceptor`` and ``grpc.aio.ServerInterceptor``):
the inbound half of the mesh for grpcio servers.

``intercept_service`` runs once per RPC; it asks grpcio for the method's handler and returns a
copy whose behaviour (unary_unary, unary_stream, stream_unary or stream_stream) is wrapped.
The wrapper, per call (decisions in :mod:`meshlib.server.common`):

1. Caller: the mTLS peer's ``x509_common_name`` from ``context.auth_context()``, else the
   ``x-mesh-caller`` metadata meshlib channels send, else unknown.
2. SERVER span from the trace context in the invocation metadata.
3. Access policy: a caller not allowed gets ``PERMISSION_DENIED`` (handler not called).
4. Deadline: ``context.time_remaining()`` (grpcio's view of the client's ``grpc-timeout``).
   None left: ``DEADLINE_EXCEEDED`` without calling the handler. Otherwise
   :data:`meshlib.context.current_deadline` is set while the handler runs, so its outgoing mesh
   calls inherit the remaining budget (gRPC deadline propagation). grpcio itself cancels the
   RPC when the deadline passes (aio: the handler task is cancelled; sync: ``is_active()``
   turns false).
5. Status: the handler's ``context.code()`` (set by ``abort``/``set_code``), else OK on return,
   UNKNOWN (with the exception class as ``error.type``) on an exception, DEADLINE_EXCEEDED or
   CANCELLED when the RPC ended under the handler. Streaming responses are measured until the
   last message (sync: the wrapped iterator; aio: the wrapped handler writes each message).
   A stream abandoned by the client is recorded from grpcio's termination callback.

Not recorded: calls to methods the server does not implement (grpcio answers UNIMPLEMENTED
before any handler exists) and unary calls grpcio drops itself because their deadline passed
while they waited for a worker thread (the request is never handed to a handler).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

import grpc

from meshlib.context import CALLER_KEY, current_deadline
from meshlib.core.deadline import MAX_TIMEOUT_SECONDS, Deadline
from meshlib.core.mtls import service_of
from meshlib.server.common import (
    AccessGate,
    denied_message,
    detach_span,
    resolve_service,
)
from meshlib.telemetry.metrics import MeshMetrics
from meshlib.telemetry.recorders import RpcServerRecorder, error_type_of, split_full_method
from meshlib.telemetry.tracing import start_server_span

if TYPE_CHECKING:
    from meshlib.ports import MeshPort

__all__ = ["AioMeshServerInterceptor", "MeshServerInterceptor"]

_OK = grpc.StatusCode.OK
_UNKNOWN = grpc.StatusCode.UNKNOWN
_CANCELLED = grpc.StatusCode.CANCELLED
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
_DENIED = grpc.StatusCode.PERMISSION_DENIED
_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
_EXPIRED_MESSAGE = "deadline expired before the handler started (meshlib)"


def _tls_peer(context: Any) -> str | None:
    """The verified peer: the service of its SPIFFE ID (grpc core's ``peer_spiffe_id``
    property, set for a certificate with exactly one spiffe:// URI SAN), else its CN."""
    try:
        auth = context.auth_context()
    except Exception:  # a context without auth_context (test doubles, odd servers)
        return None
    ids = auth.get("peer_spiffe_id")
    if ids:  # a SPIFFE ID decides, never the CN next to it
        sid = ids[0]
        return service_of(sid.decode() if isinstance(sid, bytes) else str(sid))
    names = auth.get("x509_common_name")
    if not names:
        return None
    name = names[0]
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def _metadata_value(metadata: Any, key: str) -> str | None:
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


#: How close to its deadline a call that grpc ended under the handler counts as expired.
#: grpc core cancels at its monotonic deadline, but ``time_remaining()`` compares the
#: wall clock with that deadline converted to wall-clock time (two clock reads that a busy
#: machine can preempt apart), so at the cancellation it may still report a few ms left.
_DEADLINE_SLACK = 0.05


def _ended_under_handler(context: Any) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED when the call ended at its deadline, else CANCELLED (the client)."""
    remaining = context.time_remaining()
    return _DEADLINE if remaining is not None and remaining <= _DEADLINE_SLACK else _CANCELLED


def _outcome(context: Any, exc: BaseException | None, active: bool = True
             ) -> tuple[Any, str | None]:
    """The final status of a handler that returned (``exc`` None) or raised ``exc``."""
    code = context.code()
    if code is not None and code != _OK:
        return code, None  # abort() / set_code()
    if exc is None:
        if not active:
            return _ended_under_handler(context), None
        return code or _OK, None
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return _ended_under_handler(context), None
    return _UNKNOWN, error_type_of(exc)


class _Call:
    """One inbound RPC: identity, span, deadline and the once-only recording.

    ``with call:`` runs a piece of the handler (the whole unary handler, or one ``next()`` of
    a sync response stream) with the call's deadline and span current; leaving it records
    the call when it ended: with the status the wrapper set in ``result`` (the handler
    returned, the stream ended), or with the status an exception gives (:func:`_outcome`)."""

    __slots__ = ("caller", "context", "deadline", "done", "lock", "metadata", "method", "owner",
                 "result", "service", "span", "start", "token")

    def __init__(self, owner: _Interceptor, full_method: str, metadata: Any) -> None:
        self.owner = owner
        self.service, self.method = split_full_method(full_method)
        self.metadata = metadata
        self.start = 0.0
        self.span: Any = None
        self.caller = ""
        self.deadline: Deadline | None = None
        self.done = False
        self.lock = threading.Lock()
        self.context: Any = None
        self.token: Any = None
        #: The end status, set by the wrapper when the handler (or stream) ended normally.
        self.result: tuple[Any, str | None] | None = None

    def begin(self, context: Any) -> tuple[grpc.StatusCode, str] | None:
        """Start the span and check access and deadline; a status to abort with, or None."""
        self.start = perf_counter()
        self.context = context
        owner = self.owner
        verified = owner.gate.identify(_metadata_value(self.metadata, CALLER_KEY),
                                       _tls_peer(context))
        self.caller = caller = "" if verified is None else verified
        self.span = start_server_span(self.metadata, rpc_service=self.service,
                                      rpc_method=self.method, caller=caller)
        if verified is None:  # strict mTLS and no verified certificate
            self.finish(_UNAUTHENTICATED, None)
            return _UNAUTHENTICATED, owner.gate.unverified_message()
        if not owner.gate.allows(caller):
            owner.recorder.access_denied(caller)
            self.finish(_DENIED, None)
            return _DENIED, denied_message(caller, owner.service)
        remaining = context.time_remaining()
        if remaining is not None and remaining < MAX_TIMEOUT_SECONDS:  # sync: ~9e18 = none
            if remaining <= 0:
                self.finish(_DEADLINE, None)
                return _DEADLINE, _EXPIRED_MESSAGE
            self.deadline = Deadline(time.monotonic() + remaining)
        return None

    def __enter__(self) -> None:
        self.token = current_deadline.set(self.deadline) if self.deadline is not None else None
        self.span.attach()

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        detach_span(self.span)
        token, self.token = self.token, None
        if token is not None:
            current_deadline.reset(token)
        end = self.result
        if end is None and exc is not None:
            end = _outcome(self.context, exc)
        if end is not None:
            self.finish(*end)

    def finish(self, code: Any, error: str | None) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        self.owner.recorder.call(self.service, self.method, code, error,
                                 perf_counter() - self.start, self.caller)
        self.span.end(code, error)


#: The four behaviour fields of a ``grpc.RpcMethodHandler`` (exactly one is set), and
#: whether its response is a stream.
_BEHAVIOURS: tuple[tuple[str, bool], ...] = (
    ("unary_unary", False), ("stream_unary", False),
    ("unary_stream", True), ("stream_stream", True),
)


class _Interceptor:
    """What the sync and aio interceptors share: settings and the handler dispatch.

    Subclasses give the wrappers of their flavour (``_unary_response``, ``_stream_response``:
    ``(call, behaviour) -> behaviour``)."""

    _unary_response: Callable[[_Call, Callable[..., Any]], Callable[..., Any]]
    _stream_response: Callable[[_Call, Callable[..., Any]], Callable[..., Any]]

    def __init__(self, mesh: MeshPort | None, service: str | None, metrics: MeshMetrics | None,
                 where: str) -> None:
        self.service = resolve_service(mesh, service, where)
        self.gate = AccessGate(mesh, self.service)
        self.recorder = RpcServerRecorder.get(metrics)

    def _wrap(self, handler: Any, handler_call_details: Any) -> Any:
        """``handler`` (None: a method the server does not implement) with its behaviour
        wrapped for one RPC."""
        if handler is None:
            return None
        for field, streaming in _BEHAVIOURS:
            behaviour = getattr(handler, field)
            if behaviour is not None:
                call = _Call(self, handler_call_details.method,
                             handler_call_details.invocation_metadata)
                wrap = self._stream_response if streaming else self._unary_response
                return handler._replace(**{field: wrap(call, behaviour)})
        return handler


# --------------------------------------------------------------------------- sync


class _SyncStream:
    """A streaming response: each ``next()`` runs with the call's context; the end records."""

    __slots__ = ("call", "context", "it")

    def __init__(self, call: _Call, it: Iterator[Any], context: Any) -> None:
        self.call = call
        self.it = it
        self.context = context

    def __iter__(self) -> _SyncStream:
        return self

    def __next__(self) -> Any:
        call = self.call
        with call:
            try:
                return next(self.it)
            except StopIteration:
                call.result = _outcome(self.context, None)
                raise


def _sync_unary_response(call: _Call, behavior: Callable[..., Any]) -> Callable[..., Any]:
    def handler(request: Any, context: Any) -> Any:
        refused = call.begin(context)
        if refused is not None:
            context.abort(*refused)
        with call:
            response = behavior(request, context)
            call.result = _outcome(context, None, context.is_active())
        return response

    return handler


def _sync_stream_response(call: _Call, behavior: Callable[..., Any]) -> Callable[..., Any]:
    def handler(request: Any, context: Any) -> Any:
        refused = call.begin(context)
        if refused is not None:
            context.abort(*refused)
        with call:  # records only if the handler raised
            it = iter(behavior(request, context))
        # The client may abandon the stream: grpcio then stops iterating; record at termination.
        context.add_callback(lambda: call.finish(_ended_under_handler(context), None))
        return _SyncStream(call, it, context)

    return handler


class MeshServerInterceptor(_Interceptor, grpc.ServerInterceptor):  # type: ignore[misc]
    """For ``grpc.server(executor, interceptors=[MeshServerInterceptor(mesh)])``.

    ``service`` (this server's mesh service name) defaults to ``mesh.service``; ``mesh=None``
    enforces no access policy; ``metrics``: a ``MeshMetrics`` (default: process registry).
    """

    def __init__(self, mesh: MeshPort | None = None, *, service: str | None = None,
                 metrics: MeshMetrics | None = None) -> None:
        super().__init__(mesh, service, metrics, "MeshServerInterceptor")

    _unary_response = staticmethod(_sync_unary_response)
    _stream_response = staticmethod(_sync_stream_response)

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        return self._wrap(continuation(handler_call_details), handler_call_details)


# --------------------------------------------------------------------------- aio


def _aio_unary_response(call: _Call, behavior: Callable[..., Any]
                        ) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: Any) -> Any:
        refused = call.begin(context)
        if refused is not None:
            await context.abort(*refused)
        with call:
            response = behavior(request, context)
            if inspect.isawaitable(response):
                response = await response
            call.result = _outcome(context, None)
        return response

    return handler


def _aio_stream_response(call: _Call, behavior: Callable[..., Any]
                         ) -> Callable[..., Awaitable[None]]:
    """Always a coroutine handler: an async (or sync) generator's messages are written with
    ``context.write`` so the whole stream is measured in this task."""

    async def handler(request: Any, context: Any) -> None:
        refused = call.begin(context)
        if refused is not None:
            await context.abort(*refused)
        with call:
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                async for message in result:
                    await context.write(message)
            elif inspect.isawaitable(result):
                await result
            elif result is not None:
                for message in result:
                    await context.write(message)
            call.result = _outcome(context, None)

    return handler


class AioMeshServerInterceptor(_Interceptor, grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """For ``grpc.aio.server(interceptors=[AioMeshServerInterceptor(mesh)])``; same options
    as :class:`MeshServerInterceptor`."""

    def __init__(self, mesh: MeshPort | None = None, *, service: str | None = None,
                 metrics: MeshMetrics | None = None) -> None:
        super().__init__(mesh, service, metrics, "AioMeshServerInterceptor")

    _unary_response = staticmethod(_aio_unary_response)
    _stream_response = staticmethod(_aio_stream_response)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: Any) -> Any:
        return self._wrap(await continuation(handler_call_details), handler_call_details)
