"""Client and server spans, and W3C trace-context propagation, on opentelemetry-api only.

What is created (semantic conventions v1.27.0 HTTP, RPC as in :mod:`semconv`):

* Client: one span per logical call (kind INTERNAL, named ``"GET orders"`` /
  ``"shop.Orders/Get"``) and one child span per attempt (kind CLIENT, named ``"GET"`` /
  ``"shop.Orders/Get"``), as gRPC does with its call and attempt spans (gRFC A45/A72). The
  attempt span is what goes on the wire: its context is injected, so the server span's parent
  is a CLIENT span and service-graph tools (Tempo, Jaeger) pair them. Attempts carry
  ``http.request.resend_count`` (semconv: one span per resend) and ``network.peer.*`` of the
  chosen endpoint; ``server.address`` is the mesh service name. No ``url.full`` (cardinality,
  and it may hold secrets).
* Server: :func:`extract` reads traceparent/tracestate/baggage from ASGI header lists, gRPC
  metadata or a WSGI environ; :func:`start_server_span` opens a SERVER span under it and
  ``attach()`` makes it current while the application runs.
* :func:`inject_headers` writes the current (or given) context into a list of ``(bytes,
  bytes)`` header tuples (httpcore) or ``(str, str)`` metadata tuples (gRPC), replacing any
  existing field of the same name. It uses the global propagator (W3C trace context and
  baggage by default; ``OTEL_PROPAGATORS`` applies).

Cost without an SDK: the global tracer provider is looked up at most once per
``RECHECK_SECONDS`` while none is configured (``get_tracer_provider()`` alone costs ~0.85 us
because it reads ``os.environ``); in between every entry point returns a shared no-op object,
so a whole call costs a few attribute lookups. Once an SDK provider is seen it is kept (the
global provider can be set only once). Without an SDK nothing is propagated unless
``configure(propagate_without_sdk=True)``: then inbound context is extracted and forwarded
unchanged, as a non-participating intermediary should (W3C trace-context section 3).
Measured numbers are in docs/tracing.md.

W3C trace context details (https://www.w3.org/TR/trace-context/ section 3):

* Several fields of one name are combined into one value joined by ``", "`` (RFC 9110
  5.3) before parsing, so two ``traceparent`` fields make one invalid value and a new trace
  starts (OpenTelemetry's getter contract would otherwise take the first); several
  ``tracestate`` fields combine into one list, as the spec allows.
* Without an SDK and with ``propagate_without_sdk``, meshlib does not change the parent, so
  it forwards the received ``traceparent`` and ``tracestate`` values byte for byte (spec
  3.3: "tracestate MUST NOT be modified" then), a future version (``cc-...-01-extra``)
  included; OpenTelemetry's propagator would rewrite the version to ``00`` and re-normalise
  or drop ``tracestate``. Validity (versions, ``ff``, lengths, zero ids, case) is decided by
  OpenTelemetry's parser, which follows the spec's versioning rules; only a context it
  accepts is forwarded, and baggage goes through the global propagator.
* Non-mesh calls get one CLIENT span (:func:`start_outbound_span`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, MutableSequence
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshlib.telemetry import semconv as sc

__all__ = [
    "RECHECK_SECONDS",
    "AttemptSpan",
    "CallSpan",
    "ServerSpan",
    "configure",
    "enabled",
    "extract",
    "inject_headers",
    "start_http_call",
    "start_outbound_span",
    "start_rpc_call",
    "start_server_span",
]

RECHECK_SECONDS: Final = 1.0
_TRACER_NAME: Final = "meshlib"


class _State:
    """``tracer`` (None while tracing is off) and ``off_until``: tracing is off for every
    ``time.perf_counter()`` reading below it. While no tracer is known it is the time of the
    next look for a configured SDK (``RECHECK_SECONDS`` after the last look; 0 after
    :func:`configure`: look now); once a tracer is found it is ``-inf``. It is kept current
    where ``tracer`` is written (:func:`_tracer`, :func:`configure`), so "is tracing off?" is
    one comparison, ``now < state.off_until``, read by :func:`_tracer` and by a driver that
    has just read the clock (it then uses :data:`NOOP_CALL` without calling
    ``start_*_call``)."""

    __slots__ = ("off_until", "override", "passthrough", "tracer")

    def __init__(self) -> None:
        self.tracer: trace.Tracer | None = None
        self.override: trace.TracerProvider | None = None
        self.off_until = 0.0
        self.passthrough = False


_state = _State()

#: The received traceparent/tracestate values, kept in the context by :func:`extract` in
#: pass-through mode (no SDK) so that the outbound side forwards them unchanged.
_RAW_W3C: Final = otel_context.create_key("meshlib.w3c-received")
_TRACEPARENT: Final = "traceparent"
_TRACESTATE: Final = "tracestate"


def configure(tracer_provider: trace.TracerProvider | None = None,
              propagate_without_sdk: bool | None = None) -> None:
    """Use ``tracer_provider`` instead of the global one (tests, embedding), and/or forward
    inbound trace context when no SDK is configured. Re-checks the provider at once."""
    _state.override = tracer_provider
    if propagate_without_sdk is not None:
        _state.passthrough = propagate_without_sdk
    _state.tracer = None
    _state.off_until = 0.0


def _tracer() -> trace.Tracer | None:
    t = _state.tracer
    if t is not None:
        return t
    now = time.perf_counter()
    if now < _state.off_until:
        return None
    _state.off_until = now + RECHECK_SECONDS
    provider = _state.override or trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    t = _state.tracer = provider.get_tracer(_TRACER_NAME, schema_url=sc.SCHEMA_URL)
    _state.off_until = -math.inf
    return t


def enabled() -> bool:
    """True when spans are recorded (an SDK tracer provider is configured)."""
    return _tracer() is not None


# --------------------------------------------------------------------------- carriers


class _HeaderListSetter(Setter[MutableSequence[Any]]):
    """Sets a field in a list of (name, value) tuples, replacing any field of the same name
    (case-insensitive). ``binary``: True = bytes tuples (httpcore), False = str tuples (gRPC
    metadata), None = like the first tuple present, str for an empty list."""

    def __init__(self, binary: bool | None) -> None:
        self.binary = binary

    def set(self, carrier: MutableSequence[Any], key: str, value: str) -> None:
        use_bytes = self.binary
        if use_bytes is None:
            use_bytes = bool(carrier) and isinstance(carrier[0][0], bytes | bytearray)
        if use_bytes:
            k: Any = key.encode("latin-1")
            v: Any = value.encode("latin-1")
        else:
            k, v = key, value
        lk = k.lower()
        carrier[:] = [h for h in carrier if h[0].lower() != lk]
        carrier.append((k, v))


class _HeaderListGetter(Getter[Any]):
    """Reads ASGI header lists (bytes), gRPC metadata (str), mappings and WSGI environs."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        if isinstance(carrier, Mapping):
            v = carrier.get(key)
            if v is None:
                v = carrier.get("HTTP_" + key.upper().replace("-", "_"))
            if v is None:
                return None
            return [v.decode("latin-1") if isinstance(v, bytes) else str(v)]
        out = []
        bkey = key.encode("latin-1")
        for name, value in carrier:
            if name in (key, bkey) or name.lower() in (key, bkey):
                out.append(value.decode("latin-1") if isinstance(value, bytes) else value)
        if len(out) > 1:  # RFC 9110 5.3: one field value, members joined by ", "
            return [", ".join(out)]
        return out or None

    def keys(self, carrier: Any) -> list[str]:
        if isinstance(carrier, Mapping):
            return [k.decode("latin-1") if isinstance(k, bytes) else k for k in carrier]
        return [n.decode("latin-1") if isinstance(n, bytes) else n for n, _ in carrier]


_SETTERS: Final = {
    None: _HeaderListSetter(None), True: _HeaderListSetter(True), False: _HeaderListSetter(False),
}
_GETTER: Final = _HeaderListGetter()


def inject_headers(carrier: MutableSequence[Any], context: Context | None = None,
                   binary: bool | None = None) -> None:
    """Write traceparent/tracestate/baggage of ``context`` (default: the current one) into a
    header list (``binary``: see above). Drivers use :meth:`AttemptSpan.inject`, which skips
    the work when tracing is off."""
    propagate.inject(carrier, context=context, setter=_SETTERS[binary])


def extract(headers: Iterable[Any] | Mapping[Any, Any]) -> Context | None:
    """The context carried by inbound ``headers`` (ASGI list, gRPC metadata, WSGI environ),
    or None when tracing is off and pass-through is not enabled."""
    if _tracer() is None and not _state.passthrough:
        return None
    if not isinstance(headers, Mapping) and not isinstance(headers, list | tuple):
        headers = list(headers)
    ctx = propagate.extract(headers, getter=_GETTER)
    if _state.tracer is None and trace.get_current_span(ctx).get_span_context().is_valid:
        # pass-through: keep the received values to forward byte for byte
        parent = _GETTER.get(headers, _TRACEPARENT)
        if parent:
            tstate = _GETTER.get(headers, _TRACESTATE)
            ctx = otel_context.set_value(
                _RAW_W3C, (parent[0].strip(" \t"), tstate[0] if tstate else None), ctx)
    return ctx


def _forward_received(headers: MutableSequence[Any], binary: bool | None) -> None:
    """Pass-through inject: the global propagator (baggage, other formats), then the
    received traceparent/tracestate values unchanged (or none)."""
    propagate.inject(headers, setter=_SETTERS[binary])
    raw = otel_context.get_value(_RAW_W3C)
    if raw is None:
        return
    parent: str = raw[0]  # type: ignore[index]
    tstate: str | None = raw[1]  # type: ignore[index]
    setter = _SETTERS[binary]
    setter.set(headers, _TRACEPARENT, parent)
    if tstate is not None:
        setter.set(headers, _TRACESTATE, tstate)
    else:
        remove_fields(headers, _NO_TRACESTATE)


_NO_TRACESTATE: Final = frozenset({_TRACESTATE, _TRACESTATE.encode()})
#: The fields trace propagation writes (W3C trace context and baggage), str and bytes.
TRACE_FIELDS: Final = frozenset(
    {n for f in ("traceparent", "tracestate", "baggage") for n in (f, f.encode())})


def remove_fields(headers: MutableSequence[Any], names: frozenset[Any]) -> None:
    """Drop every field whose lower-cased name is in ``names`` (str and/or bytes)."""
    headers[:] = [h for h in headers if h[0].lower() not in names]


# --------------------------------------------------------------------------- client spans


def _is_error_status(status: object) -> bool:
    return isinstance(status, int) and status >= 400


class AttemptSpan:
    """One attempt of a client call (kind CLIENT)."""

    __slots__ = ("_rpc", "span")

    def __init__(self, span: trace.Span, rpc: bool) -> None:
        self.span = span
        self._rpc = rpc

    def inject(self, headers: MutableSequence[Any], binary: bool | None = None) -> None:
        """Write this attempt's trace context into the outgoing header/metadata list
        (``binary=True`` for httpcore's bytes tuples, False for gRPC metadata)."""
        propagate.inject(headers, context=trace.set_span_in_context(self.span),
                         setter=_SETTERS[binary])

    def end(self, status: object = None, error_type: str | None = None) -> None:
        """``status``: HTTP status code, or gRPC status (name, enum or int) for RPC."""
        _finish(self.span, self._rpc, status, error_type, client=True)


class CallSpan:
    """One logical client call (kind INTERNAL); attempts are its children."""

    __slots__ = ("_attrs", "_name", "_rpc", "_tracer", "ctx", "span")

    def __init__(self, tracer: trace.Tracer, name: str, attempt_name: str,
                 attrs: dict[str, Any], rpc: bool) -> None:
        self._tracer = tracer
        self.span = tracer.start_span(name, kind=SpanKind.INTERNAL, attributes=attrs)
        self.ctx = trace.set_span_in_context(self.span)
        self._name = attempt_name
        self._attrs = attrs
        self._rpc = rpc

    def attempt(self, n: int, peer_address: str | None = None,
                peer_port: int | None = None) -> AttemptSpan:
        """Start attempt ``n`` (1-based) to the endpoint ``peer_address:peer_port``."""
        attrs = dict(self._attrs)
        if peer_address:
            attrs[sc.ATTR_NETWORK_PEER_ADDRESS] = peer_address
        if peer_port:
            attrs[sc.ATTR_NETWORK_PEER_PORT] = peer_port
            attrs[sc.ATTR_SERVER_PORT] = peer_port
        attrs[sc.ATTR_MESHLIB_ATTEMPT] = n
        if n > 1 and not self._rpc:
            attrs[sc.ATTR_HTTP_RESEND_COUNT] = n - 1
        span = self._tracer.start_span(self._name, context=self.ctx, kind=SpanKind.CLIENT,
                                       attributes=attrs)
        return AttemptSpan(span, self._rpc)

    def end(self, status: object = None, error_type: str | None = None) -> None:
        _finish(self.span, self._rpc, status, error_type, client=True)


def _finish(span: trace.Span, rpc: bool, status: object, error_type: str | None,
            client: bool) -> None:
    if rpc:
        code = sc.grpc_status_label(status)
        if code:
            span.set_attribute(sc.ATTR_RPC_RESPONSE_STATUS_CODE, code)
        failed = bool(error_type) or (code not in ("", "OK") if client else code in _SERVER_RPC_ERR)
        err = error_type or (code if failed else "")
    else:
        if isinstance(status, int):
            span.set_attribute(sc.ATTR_HTTP_RESPONSE_STATUS_CODE, status)
        limit = 400 if client else 500
        failed = bool(error_type) or (isinstance(status, int) and status >= limit)
        err = error_type or (str(status) if failed else "")
    if failed:
        span.set_attribute(sc.ATTR_ERROR_TYPE, err)
        span.set_status(Status(StatusCode.ERROR))
    span.end()


_SERVER_RPC_ERR: Final = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


class _NoopAttempt:
    __slots__ = ()

    def inject(self, headers: MutableSequence[Any], binary: bool | None = None) -> None:
        if _state.passthrough:
            _forward_received(headers, binary)

    def end(self, status: object = None, error_type: str | None = None) -> None:
        return None


class _NoopCall:
    __slots__ = ()
    span = trace.INVALID_SPAN

    def attempt(self, n: int, peer_address: str | None = None,
                peer_port: int | None = None) -> _NoopAttempt:
        return _NOOP_ATTEMPT

    def end(self, status: object = None, error_type: str | None = None) -> None:
        return None


_NOOP_ATTEMPT: Final = _NoopAttempt()
_NOOP_CALL: Final = _NoopCall()
#: The call and attempt spans of every call while tracing is off (drivers compare by
#: identity and skip the no-op calls).
NOOP_CALL: Final = _NOOP_CALL
NOOP_ATTEMPT: Final = _NOOP_ATTEMPT
#: Tracing settings (read-only outside this module; ``passthrough``: forward inbound trace
#: context without an SDK, see :func:`configure`).
state: Final = _state


def start_http_call(service: str, method: str | bytes) -> CallSpan | _NoopCall:
    """Open the span of one logical HTTP call to mesh service ``service``."""
    tracer = _tracer()
    if tracer is None:
        return _NOOP_CALL
    name, attrs = _http_client_attrs(method, service)
    return CallSpan(tracer, f"{name} {service}", name, attrs, rpc=False)


def _http_client_attrs(method: str | bytes, address: str) -> tuple[str, dict[str, Any]]:
    """The span name (``GET``; ``HTTP`` for ``_OTHER``) and the method and server
    attributes of an HTTP client span."""
    label = sc.http_method_label(method)
    attrs: dict[str, Any] = {
        sc.ATTR_HTTP_REQUEST_METHOD: label,
        sc.ATTR_SERVER_ADDRESS: address,
    }
    if label == sc.OTHER:
        attrs[sc.ATTR_HTTP_REQUEST_METHOD_ORIGINAL] = (
            method.decode("latin-1") if isinstance(method, bytes) else method
        )
    return ("HTTP" if label == sc.OTHER else label), attrs


def start_outbound_span(host: str, port: int | None,
                        method: str | bytes) -> AttemptSpan | _NoopAttempt:
    """Open the CLIENT span of one call to ``host`` outside the mesh (no retries there, so
    no call/attempt pair): named like an attempt (``"GET"``), ``server.address`` = host."""
    tracer = _tracer()
    if tracer is None:
        return _NOOP_ATTEMPT
    name, attrs = _http_client_attrs(method, host)
    if port:
        attrs[sc.ATTR_SERVER_PORT] = port
    return AttemptSpan(tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attrs), False)


def start_rpc_call(service: str, rpc_service: str, rpc_method: str,
                   system: str = "grpc") -> CallSpan | _NoopCall:
    """Open the span of one logical RPC to mesh service ``service``."""
    tracer = _tracer()
    if tracer is None:
        return _NOOP_CALL
    attrs: dict[str, Any] = {
        sc.ATTR_RPC_SYSTEM: system,
        sc.ATTR_RPC_SERVICE: rpc_service,
        sc.ATTR_RPC_METHOD: rpc_method,
        sc.ATTR_SERVER_ADDRESS: service,
    }
    name = f"{rpc_service}/{rpc_method}"
    return CallSpan(tracer, name, name, attrs, rpc=True)


# --------------------------------------------------------------------------- server spans


class ServerSpan:
    """The SERVER span of one inbound request; ``attach()`` makes it current."""

    __slots__ = ("_rpc", "_token", "span")

    def __init__(self, span: trace.Span, rpc: bool) -> None:
        self.span = span
        self._rpc = rpc
        self._token: object | None = None

    def attach(self) -> None:
        self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def set_route(self, route: str) -> None:
        """Set ``http.route`` once the framework has matched a route template."""
        self.span.set_attribute(sc.ATTR_HTTP_ROUTE, route)

    def end(self, status: object = None, error_type: str | None = None) -> None:
        """Detach (if attached) and end with the response status."""
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None
        _finish(self.span, self._rpc, status, error_type, client=False)


class _PassthroughServerSpan:
    """No SDK, pass-through on: make the inbound context current, record nothing."""

    __slots__ = ("_ctx", "_token")

    def __init__(self, ctx: Context | None) -> None:
        self._ctx = ctx
        self._token: object | None = None

    def attach(self) -> None:
        if self._ctx is not None:
            self._token = otel_context.attach(self._ctx)

    def set_route(self, route: str) -> None:
        return None

    def end(self, status: object = None, error_type: str | None = None) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None


class _NoopServerSpan:
    __slots__ = ()

    def attach(self) -> None:
        return None

    def set_route(self, route: str) -> None:
        return None

    def end(self, status: object = None, error_type: str | None = None) -> None:
        return None


_NOOP_SERVER: Final = _NoopServerSpan()


def start_server_span(
    headers: Iterable[Any] | Mapping[Any, Any],
    *,
    method: str | bytes | None = None,
    route: str | None = None,
    rpc_service: str | None = None,
    rpc_method: str | None = None,
    caller: str = "",
    system: str = "grpc",
) -> ServerSpan | _PassthroughServerSpan | _NoopServerSpan:
    """Open the SERVER span of an inbound HTTP request (``method``, ``route``) or RPC
    (``rpc_service``, ``rpc_method``), child of the context in ``headers``."""
    tracer = _tracer()
    if tracer is None:
        if _state.passthrough:
            return _PassthroughServerSpan(extract(headers))
        return _NOOP_SERVER
    parent = extract(headers)
    attrs: dict[str, Any] = {}
    if caller:
        attrs[sc.ATTR_MESHLIB_CALLER] = caller
    if rpc_method is not None:
        attrs[sc.ATTR_RPC_SYSTEM] = system
        attrs[sc.ATTR_RPC_SERVICE] = rpc_service or sc.OTHER
        attrs[sc.ATTR_RPC_METHOD] = rpc_method
        name = f"{rpc_service}/{rpc_method}"
        rpc = True
    else:
        label = sc.http_method_label(method or "")
        attrs[sc.ATTR_HTTP_REQUEST_METHOD] = label
        if label == sc.OTHER and method:
            attrs[sc.ATTR_HTTP_REQUEST_METHOD_ORIGINAL] = (
                method.decode("latin-1") if isinstance(method, bytes) else method
            )
        name = "HTTP" if label == sc.OTHER else label
        if route:
            attrs[sc.ATTR_HTTP_ROUTE] = route
            name = f"{name} {route}"
        rpc = False
    span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attrs)
    return ServerSpan(span, rpc)
