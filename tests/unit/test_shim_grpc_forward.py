"""Pure parts of the shim's gRPC forwarding (meshlib.shim.grpc_forward): what metadata is
carried, how the caller's deadline is read, and the listener's option checks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshlib.core.deadline import MAX_TIMEOUT_SECONDS
from meshlib.shim.grpc_forward import (
    CallForwarder,
    _requests,
    caller_timeout,
    forwarded_metadata,
    response_metadata,
)
from meshlib.shim.grpc_proxy import parse_upstream


def test_request_metadata_keeps_the_apps_and_drops_grpcs_own() -> None:
    md = [("user-agent", "grpc-node-js/1.14"), ("grpc-timeout", "1S"),
          ("grpc-accept-encoding", "gzip"), ("te", "trailers"), ("content-type", "application/grpc"),
          ("x-mesh-caller", "spoofed"), ("grpc-previous-rpc-attempts", "1"),
          ("x-tenant", "t1"), ("x-blob-bin", b"\x00\x01"), ("authorization", "Bearer x")]
    out, traced = forwarded_metadata(md)
    assert out == [("x-tenant", "t1"), ("x-blob-bin", b"\x00\x01"), ("authorization", "Bearer x")]
    assert traced is False


def test_request_metadata_notices_a_trace_context() -> None:
    out, traced = forwarded_metadata([("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")])
    assert traced is True and out[0][0] == "traceparent"
    assert forwarded_metadata(None) == ([], False)


def test_response_metadata_keeps_status_details_and_pushback() -> None:
    md = [("x-server", "a"), ("grpc-status-details-bin", b"\x08\x05"),
          ("grpc-retry-pushback-ms", "10"), ("grpc-encoding", "gzip"), ("content-type", "x")]
    assert response_metadata(md) == [("x-server", "a"), ("grpc-status-details-bin", b"\x08\x05"),
                                     ("grpc-retry-pushback-ms", "10")]
    assert response_metadata(None) == []


@pytest.mark.parametrize(("remaining", "expected"), [
    (None, None),                           # grpc.aio: the caller set no deadline
    (MAX_TIMEOUT_SECONDS, None),            # sync grpcio's "no deadline" (grpc#26236)
    (9.2e18, None),
    (2.5, 2.5),
    (0.0, 0.0),
    (-0.3, 0.0),                            # already passed: the plan fails it at once
])
def test_caller_timeout(remaining: float | None, expected: float | None) -> None:
    assert caller_timeout(remaining) == expected


def test_forwarder_refuses_a_negative_window() -> None:
    with pytest.raises(ValueError, match="unary_window: must be >= 0 seconds, got -1"):
        CallForwarder(object(), unary_window=-1)


def test_parse_upstream_accepts_spaces_and_port_zero() -> None:
    assert parse_upstream(" orders = 0 ") == ("orders", 0)


# --------------------------------------------------------------------------- shape reads


class Requests:
    """An async request iterator that yields ``messages`` and then either ends or, with
    ``hang``, waits forever (a client that sends and then waits for a reply)."""

    def __init__(self, *messages: bytes, hang: bool = False) -> None:
        self.messages = list(messages)
        self.hang = hang

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> bytes:
        if self.messages:
            return self.messages.pop(0)
        if self.hang:
            await asyncio.Event().wait()
        raise StopAsyncIteration


async def collect(gen: Any) -> list[bytes]:
    return [m async for m in gen]


async def test_one_message_then_end_is_a_unary_request() -> None:
    f = CallForwarder(object(), unary_window=1.0)
    unary, first, pending = await f._read_shape(Requests(b"a"))
    assert (unary, first, pending) == (True, b"a", None)


async def test_two_messages_are_a_stream_forwarded_in_order() -> None:
    f = CallForwarder(object(), unary_window=1.0)
    reqs = Requests(b"a", b"b", b"c")
    unary, first, pending = await f._read_shape(reqs)
    assert not unary and first == b"a" and pending is not None
    assert await collect(_requests(first, pending, reqs)) == [b"a", b"b", b"c"]


async def test_no_message_is_an_empty_stream() -> None:
    f = CallForwarder(object(), unary_window=1.0)
    unary, first, pending = await f._read_shape(Requests())
    assert not unary and pending is None
    assert await collect(_requests(first, pending, Requests())) == []


async def test_a_client_waiting_after_its_first_message_is_not_held() -> None:
    f = CallForwarder(object(), unary_window=0.01)
    reqs = Requests(b"ping", hang=True)
    unary, first, pending = await f._read_shape(reqs)
    assert not unary and first == b"ping" and pending is not None and not pending.done()
    gen = _requests(first, pending, reqs)
    assert await gen.__anext__() == b"ping"  # forwarded while the second read still waits
    pending.cancel()


async def test_handle_remembers_proven_streams_only() -> None:
    class Context:
        def invocation_metadata(self) -> tuple[()]:
            return ()

        def time_remaining(self) -> None:
            return None

    class Call:  # drains the request stream (as grpc.aio's writer does), then fails
        def __init__(self, requests: Any) -> None:
            self.requests = requests

        def __aiter__(self) -> Call:
            return self

        async def __anext__(self) -> bytes:
            if hasattr(self.requests, "__aiter__"):
                async for _ in self.requests:
                    pass
            raise RuntimeError("stop here")

        def cancel(self) -> bool:
            return True

    class Channel:  # records which kind of upstream call each call got
        def __init__(self) -> None:
            self.kinds: list[str] = []

        def _factory(self, kind: str) -> Any:
            def mc(request: Any, **kw: Any) -> Call:
                self.kinds.append(kind)
                return Call(request)
            return lambda method: mc

        @property
        def unary_stream(self) -> Any:
            return self._factory("unary_stream")

        @property
        def stream_stream(self) -> Any:
            return self._factory("stream_stream")

    ch = Channel()
    f = CallForwarder(ch, unary_window=0.01)
    for reqs in (Requests(b"a"), Requests(b"a", b"b"), Requests(b"a")):
        with pytest.raises(RuntimeError):
            await f.handle("/s.S/Chat", reqs, Context())
    # another method with two messages in its first call: proven at once
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(f.handle("/s.S/Get", Requests(b"x", b"y"), Context()), 5)
    assert ch.kinds == ["unary_stream", "stream_stream", "stream_stream", "stream_stream"]
    assert f._streaming == {"/s.S/Chat", "/s.S/Get"}
    with pytest.raises(RuntimeError):
        await f.handle("/s.S/Empty", Requests(), Context())
    assert "/s.S/Empty" in f._streaming
