"""meshlib's own HTTP/1.1 connections (``SyncPool``, ``AsyncPool``) against scripted servers.

:class:`ScriptedServer` is a raw-socket server on loopback (a thread per connection): for
each accepted connection it plays one list of :class:`Reply` steps: read one request (the
exact bytes are recorded), write the reply's bytes in the given TCP segments with a pause
between them (``TCP_NODELAY``, so they really leave as separate segments), then close or
keep the connection. After its last step a kept connection is drained until the client
closes it, which is recorded too, so tests can assert "the client closed / kept it". A write
that can make no progress for ``_BLOCKED`` seconds (the client is not reading and the socket
buffers are full) is recorded in ``send_blocked``.

Tests wait for events (a server-side state, or the client's view of an idle connection),
never for a fixed time: a check of something that must *not* happen is made only once the
event that would have caused it has happened.

Every case runs against both pools through a tiny adapter (``pool`` fixture) and reads the
body the way users do (``Response.read``/``aread``, ``iter_bytes``/``aiter_bytes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from meshlib.http._async.pool import AsyncPool
from meshlib.http._sync.pool import SyncPool

TIMEOUTS: dict[str, float | None] = {"connect": 2.0, "read": 2.0, "write": 2.0}
_BLOCKED = 0.2  # seconds without progress after which a server write counts as blocked
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

# --------------------------------------------------------------------------- the server


@dataclass
class Reply:
    """One step on a server connection."""

    segments: list[bytes] = field(default_factory=list)
    pause: float = 0.002  # seconds between segments
    close: bool = False  # close the connection after writing
    read_request: bool = True
    stall: float = 0.0  # first sleep this long without reading anything


def split(data: bytes, *cuts: int) -> list[bytes]:
    """``data`` cut at the given offsets."""
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


class _Reader:
    """Reads whole HTTP/1.1 requests (head + Content-Length or chunked body) off a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _more(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _until(self, marker: bytes, start: int) -> int:
        while (i := self.buf.find(marker, start)) < 0:
            if not self._more():
                raise EOFError
        return i + len(marker)

    def _exactly(self, end: int) -> None:
        while len(self.buf) < end:
            if not self._more():
                raise EOFError

    def request(self) -> bytes | None:
        """The next request's exact bytes, or None if the client closed the connection."""
        try:
            return self._request()
        except EOFError:
            return None

    def _request(self) -> bytes:
        end = self._until(b"\r\n\r\n", 0)
        head = bytes(self.buf[:end]).lower()
        if b"\r\ntransfer-encoding: chunked" in head:
            pos = end
            while True:  # size line, data, CRLF ... until the last chunk and its blank line
                line_end = self._until(b"\r\n", pos)
                size = int(self.buf[pos:line_end - 2].split(b";")[0], 16)
                if size == 0:
                    end = self._until(b"\r\n\r\n", pos)
                    break
                pos = line_end + size + 2
                self._exactly(pos)
        elif b"\r\ncontent-length:" in head:
            i = head.index(b"\r\ncontent-length:") + 17
            end += int(head[i:head.index(b"\r\n", i)])
            self._exactly(end)
        raw = bytes(self.buf[:end])
        del self.buf[:end]
        return raw


class ScriptedServer:
    """Plays ``script[i]`` on the i-th accepted connection (``forever`` once it runs out)."""

    def __init__(self, script: list[list[Reply]],
                 forever: Callable[[bytes], bytes] | None = None) -> None:
        self.script = script
        self.forever = forever  # keep-alive echo mode for connections beyond the script
        self.requests: list[tuple[int, bytes]] = []  # (connection index, raw request)
        self.accepted = 0
        self.client_closed: set[int] = set()  # connections the client closed
        self.server_closed: set[int] = set()  # connections the server closed by script
        self.replies_sent = 0  # steps whose segments were all written
        self.send_blocked: set[int] = set()  # connections whose writes stalled (see _send)
        self.changed = threading.Condition()
        self._lsock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self._lsock.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._lsock.accept()
            except OSError:
                return
            with self.changed:
                index = self.accepted
                self.accepted += 1
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock, index), daemon=True).start()

    def _serve(self, sock: socket.socket, index: int) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10)
        reader = _Reader(sock)
        steps = self.script[index] if index < len(self.script) else None
        try:
            for step in steps or []:
                if step.stall:
                    time.sleep(step.stall)
                if step.read_request:
                    raw = reader.request()
                    if raw is None:
                        self._note(self.client_closed, index)
                        return
                    with self.changed:
                        self.requests.append((index, raw))
                for n, seg in enumerate(step.segments):
                    if n and step.pause:
                        time.sleep(step.pause)
                    self._send(sock, seg, index)
                with self.changed:
                    self.replies_sent += 1
                if step.close:
                    sock.close()
                    self._note(self.server_closed, index)
                    return
            while True:  # drain (or echo) until the client closes
                raw = reader.request()
                if raw is None:
                    self._note(self.client_closed, index)
                    return
                with self.changed:
                    self.requests.append((index, raw))
                if self.forever is None:  # unscripted request: hang up without answering
                    sock.close()
                    self._note(self.server_closed, index)
                    return
                sock.sendall(self.forever(raw))
        except OSError:
            if not self._stop:
                self._note(self.client_closed, index)
        finally:
            sock.close()

    def _send(self, sock: socket.socket, data: bytes, index: int) -> None:
        """``sendall``, noting in ``send_blocked`` when no byte could be written for
        ``_BLOCKED`` seconds (gives up, like the 10 s socket timeout, after 10 s)."""
        view = memoryview(data)
        stalled = 0.0
        sock.settimeout(_BLOCKED)
        try:
            while view:
                try:
                    n = sock.send(view)
                except TimeoutError:
                    self._note(self.send_blocked, index)
                    stalled += _BLOCKED
                    if stalled >= 10:
                        raise
                    continue
                view = view[n:]
                stalled = 0.0
        finally:
            sock.settimeout(10)

    def _note(self, which: set[int], index: int) -> None:
        with self.changed:
            which.add(index)
            self.changed.notify_all()

    async def until(self, predicate: Callable[[], bool], timeout: float = 3.0) -> None:
        """Wait for a server-side state without blocking the event loop (an asyncio
        transport closes its socket only when the loop runs)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.changed:
                if predicate():
                    return
            assert time.monotonic() < deadline, (
                f"server state not reached: client_closed={self.client_closed} "
                f"server_closed={self.server_closed} accepted={self.accepted}")
            await asyncio.sleep(0.005)

    def close(self) -> None:
        self._stop = True
        self._lsock.close()
        with self.changed:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()


@pytest.fixture
def serve():
    servers: list[ScriptedServer] = []

    def start(*conns: list[Reply], forever: Callable[[bytes], bytes] | None = None
              ) -> ScriptedServer:
        server = ScriptedServer(list(conns), forever)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.close()


# --------------------------------------------------------------------------- the adapter


class SyncAdapter:
    """Runs the sync pool's blocking calls (the server is in other threads)."""

    kind = "sync"

    def __init__(self, max_idle: int = 64) -> None:
        self.pool = SyncPool(max_idle=max_idle)

    async def request(self, port: int, method: str = "GET", target: bytes = b"/",
                      headers: list[tuple[bytes, bytes]] | None = None,
                      body: Any = None, timeouts: dict[str, float | None] | None = None
                      ) -> httpx.Response:
        return self.pool.request("127.0.0.1", port, method, target,
                                 headers if headers is not None else [(b"Host", b"svc")],
                                 httpx.ByteStream(b"") if body is None else body,
                                 TIMEOUTS if timeouts is None else timeouts)

    async def read(self, resp: httpx.Response) -> bytes:
        return resp.read()

    async def chunks(self, resp: httpx.Response) -> list[bytes]:
        try:
            return list(resp.iter_bytes())
        finally:
            resp.close()

    async def first_chunk_then_close(self, resp: httpx.Response) -> bytes:
        for chunk in resp.iter_raw():
            resp.close()
            return chunk
        raise AssertionError("no body")

    async def close(self, resp: httpx.Response) -> None:
        resp.close()

    def stream(self, parts: list[bytes]) -> Iterator[bytes]:
        yield from parts

    @property
    def opened(self) -> int:
        return self.pool.opened

    def idle(self) -> int:
        return self.pool.idle_count()

    def idle_connections(self) -> list[Any]:
        return [c for stack in self.pool._idle.values() for c in stack]

    async def until_body_buffered(self, resp: httpx.Response) -> None:
        """Nothing to wait for: a blocking connection reads only when asked to."""

    async def shutdown(self) -> None:
        self.pool.close()


class AsyncAdapter(SyncAdapter):
    kind = "async"

    def __init__(self, max_idle: int = 64) -> None:
        self.pool = AsyncPool(max_idle=max_idle)  # type: ignore[assignment]

    async def request(self, port: int, method: str = "GET", target: bytes = b"/",
                      headers: list[tuple[bytes, bytes]] | None = None,
                      body: Any = None, timeouts: dict[str, float | None] | None = None
                      ) -> httpx.Response:
        return await self.pool.request(  # type: ignore[misc]
            "127.0.0.1", port, method, target,
            headers if headers is not None else [(b"Host", b"svc")],
            httpx.ByteStream(b"") if body is None else body,
            TIMEOUTS if timeouts is None else timeouts)

    async def read(self, resp: httpx.Response) -> bytes:
        return await resp.aread()

    async def chunks(self, resp: httpx.Response) -> list[bytes]:
        try:
            return [c async for c in resp.aiter_bytes()]
        finally:
            await resp.aclose()

    async def first_chunk_then_close(self, resp: httpx.Response) -> bytes:
        it = resp.aiter_raw()
        chunk = await it.__anext__()
        await it.aclose()  # type: ignore[attr-defined]
        await resp.aclose()
        return chunk

    async def close(self, resp: httpx.Response) -> None:
        await resp.aclose()

    async def stream(self, parts: list[bytes]) -> AsyncIterator[bytes]:  # type: ignore[override]
        for p in parts:
            await asyncio.sleep(0)
            yield p

    async def until_body_buffered(self, resp: httpx.Response, timeout: float = 3.0) -> None:
        """Wait until the protocol, with nobody reading, buffered enough to pause reading."""
        conn = resp.stream.conn  # type: ignore[attr-defined]
        deadline = time.monotonic() + timeout
        while not conn.reading_paused:
            assert time.monotonic() < deadline, f"reading never paused ({len(conn.buf)} bytes)"
            await asyncio.sleep(0.005)

    async def shutdown(self) -> None:
        await self.pool.aclose()  # type: ignore[attr-defined]


@pytest.fixture(params=["sync", "async"])
async def make(request):
    adapters: list[SyncAdapter] = []
    cls = SyncAdapter if request.param == "sync" else AsyncAdapter

    def new(max_idle: int = 64) -> SyncAdapter:
        a = cls(max_idle)
        adapters.append(a)
        return a

    yield new
    for a in adapters:
        await a.shutdown()


@pytest.fixture
def pool(make):
    return make()


async def until_no_usable_idle(pool: SyncAdapter, timeout: float = 3.0) -> None:
    """Wait until the client sees that none of its idle connections can be reused (the
    server's FIN or stray bytes reached it: the event loop ran ``eof_received`` /
    ``data_received``, or the blocking socket's peek sees them)."""
    deadline = time.monotonic() + timeout
    while any(c.usable() for c in pool.idle_connections()):
        assert time.monotonic() < deadline, "the client never saw its idle connection die"
        await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- bodies


BIG = bytes(range(256)) * 4096  # 1 MiB


def length_response(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


CL_SMALL = length_response(b"hello world")
CL_HEAD_LEN = CL_SMALL.index(b"\r\n\r\n") + 4
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"4;ext=1\r\nwiki\r\n5 ; a=\"b\"\r\npedia\r\nA\r\n in chunks\r\n"
           b"0\r\nX-Trailer: t\r\n\r\n")
CHUNKED_HEAD_LEN = CHUNKED.index(b"\r\n\r\n") + 4


def _awkward_chunked_cuts() -> list[int]:
    """Cut inside the size line, between the CRs and LFs, inside the extension and data,
    between the last chunk and the trailer and between the final CR and LF."""
    h = CHUNKED_HEAD_LEN
    body = CHUNKED[h:]
    cuts = {h - 1, h + 1, h + 2}
    for pat in (b"\r\n", b";", b"=", b"0\r\n"):
        start = 0
        while (i := body.find(pat, start)) >= 0:
            cuts.update({h + i, h + i + 1})
            start = i + 1
    return sorted(c for c in cuts if 0 < c < len(CHUNKED))


RESPONSE_CASES = {
    "content-length-small": ([CL_SMALL], b"hello world"),
    "content-length-split-across-head-and-body": (
        split(CL_SMALL, CL_HEAD_LEN - 3, CL_HEAD_LEN - 1, CL_HEAD_LEN + 2, CL_HEAD_LEN + 5),
        b"hello world"),
    "content-length-head-byte-by-byte": (pieces(CL_SMALL, 1), b"hello world"),
    "content-length-1mib-one-write": ([length_response(BIG)], BIG),
    "content-length-1mib-many-segments": (
        [length_response(BIG)[:40]] + pieces(length_response(BIG)[40:], 65536 + 17), BIG),
    "chunked": ([CHUNKED], b"wikipedia in chunks"),
    "chunked-awkward-splits": (split(CHUNKED, *_awkward_chunked_cuts()), b"wikipedia in chunks"),
    "chunked-byte-by-byte": (pieces(CHUNKED, 1), b"wikipedia in chunks"),
    "chunked-1mib": (
        pieces(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces(BIG, 100_000))
               + b"0\r\n\r\n", 150_000), BIG),
}


@pytest.mark.parametrize("how", ["read", "iter"])
@pytest.mark.parametrize("case", list(RESPONSE_CASES))
async def test_response_body_and_keep_alive(pool, serve, case, how):
    segments, body = RESPONSE_CASES[case]
    pause = 0.0 if len(segments) > 100 else 0.002
    server = serve([Reply(segments, pause=pause), Reply([OK])])
    resp = await pool.request(server.port)
    assert resp.status_code == 200
    got = await pool.read(resp) if how == "read" else b"".join(await pool.chunks(resp))
    assert got == body
    assert pool.idle() == 1  # framed body read to its end: the connection is kept
    resp2 = await pool.request(server.port)
    assert await pool.read(resp2) == b"hello"
    assert pool.opened == 1 and server.accepted == 1
    assert len(server.requests) == 2


async def test_bytes_after_a_complete_body_make_the_connection_unusable(pool, serve):
    server = serve([Reply([CHUNKED + OK[:10]]), Reply([OK[10:]], read_request=False)],
                   [Reply([OK])])
    # The server pushes the start of a second response early: the connection is not
    # reusable (bytes pending), and the first body is unaffected.
    resp = await pool.request(server.port)
    assert await pool.read(resp) == b"wikipedia in chunks"
    await server.until(lambda: server.replies_sent == 2)
    await until_no_usable_idle(pool)
    resp2 = await pool.request(server.port)
    assert pool.opened == 2
    await pool.close(resp2)


async def test_close_delimited_body_is_read_to_eof_and_not_reused(pool, serve):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
    server = serve([Reply([head, b"until ", b"the server ", b"closes"], close=True)],
                   [Reply([OK])])
    resp = await pool.request(server.port)
    assert await pool.read(resp) == b"until the server closes"
    assert pool.idle() == 0
    resp2 = await pool.request(server.port)
    assert await pool.read(resp2) == b"hello"
    assert pool.opened == 2


async def test_head_with_content_length_reads_no_body_and_reuses(pool, serve):
    server = serve([Reply([b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"]), Reply([OK])])
    resp = await pool.request(server.port, "HEAD")
    assert resp.headers["content-length"] == "1234"
    assert await pool.read(resp) == b""
    assert pool.idle() == 1
    resp2 = await pool.request(server.port)
    assert await pool.read(resp2) == b"hello"
    assert pool.opened == 1
    assert server.requests[0][1].startswith(b"HEAD / HTTP/1.1\r\n")


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses(pool, serve, status):
    # A 304 may carry the Content-Length of the representation; no body follows either way.
    resp_head = b"HTTP/1.1 %d X\r\nContent-Length: 99\r\nETag: \"e\"\r\n\r\n" % status
    server = serve([Reply([resp_head]), Reply([OK])])
    resp = await pool.request(server.port)
    assert resp.status_code == status
    assert await pool.read(resp) == b""
    resp2 = await pool.request(server.port)
    assert await pool.read(resp2) == b"hello"
    assert pool.opened == 1


async def test_interim_100_continue_is_skipped(pool, serve):
    server = serve([Reply([b"HTTP/1.1 100 Continue\r\n\r\n",
                           b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n",
                           b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"]),
                    Reply([OK])])
    resp = await pool.request(server.port, "POST", headers=[(b"Content-Length", b"3")],
                              body=httpx.ByteStream(b"abc"))
    assert resp.status_code == 201
    assert "link" not in resp.headers
    assert await pool.read(resp) == b"ok"
    resp2 = await pool.request(server.port)
    assert await pool.read(resp2) == b"hello"
    assert pool.opened == 1


@pytest.mark.parametrize(
    ("head", "reused"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\n", True),
    ],
    ids=["http10", "http10-keep-alive", "connection-close", "http11-keep-alive"],
)
async def test_connection_reuse_rules(pool, serve, head, reused):
    # The server keeps every connection open: only the response decides reuse.
    server = serve([Reply([head + b"first"]), Reply([OK])], [Reply([OK])])
    resp = await pool.request(server.port)
    assert resp.extensions["http_version"] == head[:8]
    assert await pool.read(resp) == b"first"
    assert pool.idle() == (1 if reused else 0)
    if not reused:
        await server.until(lambda: 0 in server.client_closed)  # the client really closed it
    resp2 = await pool.request(server.port)
    assert await pool.read(resp2) == b"hello"
    assert pool.opened == (1 if reused else 2)


async def test_client_connection_close_header_is_not_reused(pool, serve):
    server = serve([Reply([OK])], [Reply([OK])])
    resp = await pool.request(server.port, headers=[(b"Host", b"svc"), (b"Connection", b"close")])
    assert await pool.read(resp) == b"hello"
    assert pool.idle() == 0
    await server.until(lambda: 0 in server.client_closed)


async def test_keep_alive_reuse_many_requests_one_connection(pool, serve):
    server = serve([Reply([OK]) for _ in range(20)])
    for _ in range(20):
        resp = await pool.request(server.port)
        assert await pool.read(resp) == b"hello"
    assert pool.opened == 1 and server.accepted == 1


async def test_idle_connection_closed_by_server_is_replaced(pool, serve):
    server = serve([Reply([OK], close=True)], [Reply([OK])])
    resp = await pool.request(server.port)
    assert await pool.read(resp) == b"hello"
    assert pool.idle() == 1  # nothing in the response said close
    await server.until(lambda: 0 in server.server_closed)
    await until_no_usable_idle(pool)
    resp2 = await pool.request(server.port)  # no error: the dead one is detected and dropped
    assert await pool.read(resp2) == b"hello"
    assert pool.opened == 2 and server.accepted == 2
    assert [i for i, _ in server.requests] == [0, 1]


# --------------------------------------------------------------------------- errors


async def test_server_closes_before_any_response(pool, serve):
    server = serve([Reply([], close=True)])
    with pytest.raises(httpx.RemoteProtocolError,
                       match=r"^Server disconnected without sending a response\.$"):
        await pool.request(server.port)
    assert pool.idle() == 0


async def test_server_closes_in_the_middle_of_a_head(pool, serve):
    server = serve([Reply([b"HTTP/1.1 200 OK\r\nContent-Le"], close=True)])
    with pytest.raises(httpx.RemoteProtocolError, match="Server disconnected"):
        await pool.request(server.port)


@pytest.mark.parametrize(
    "segments",
    [
        [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only ten b"],
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"a\r\nonly"],
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"4\r\nonly\r\n"],
    ],
    ids=["content-length", "chunked-in-data", "chunked-before-last-chunk"],
)
@pytest.mark.parametrize("how", ["read", "iter"])
async def test_server_closes_mid_body(pool, serve, segments, how):
    server = serve([Reply(segments, close=True)], [Reply([OK])])
    resp = await pool.request(server.port)
    assert resp.status_code == 200
    with pytest.raises(httpx.RemoteProtocolError, match="server closed the connection"):
        if how == "read":
            await pool.read(resp)
        else:
            await pool.chunks(resp)
    await pool.close(resp)
    assert pool.idle() == 0
    resp2 = await pool.request(server.port)
    assert await pool.read(resp2) == b"hello"


@pytest.mark.parametrize(
    ("head", "what"),
    [
        (b"HTP/1.1 200 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", "malformed status line"),
        (b"hello there\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nA: 1\r\n folded: x\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
         "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabcd", "invalid Content-Length"),
    ],
)
async def test_malformed_response_heads(pool, serve, head, what):
    server = serve([Reply([head])])
    with pytest.raises(httpx.RemoteProtocolError, match=what):
        await pool.request(server.port)
    assert pool.idle() == 0
    await server.until(lambda: 0 in server.client_closed)  # the broken connection was closed


async def test_malformed_chunk_size_line(pool, serve):
    server = serve([Reply([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello"])])
    resp = await pool.request(server.port)
    with pytest.raises(httpx.RemoteProtocolError, match="invalid chunk size line"):
        await pool.read(resp)
    await pool.close(resp)
    await server.until(lambda: 0 in server.client_closed)


@pytest.mark.parametrize("terminated", [True, False])
async def test_response_head_over_64_kib(pool, serve, terminated):
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024)
    if terminated:
        big += b"\r\nContent-Length: 0\r\n\r\n"
    server = serve([Reply(pieces(big, 16 * 1024), pause=0.0)])
    with pytest.raises(httpx.RemoteProtocolError, match="64 KiB"):
        await pool.request(server.port)


async def test_read_timeout_when_the_server_never_answers(pool, serve):
    server = serve([Reply([])])  # reads the request, then waits for the client to go
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await pool.request(server.port, timeouts={"connect": 2.0, "read": 0.3, "write": 2.0})
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 2.0, elapsed
    await server.until(lambda: 0 in server.client_closed)
    assert pool.idle() == 0


async def test_read_timeout_in_the_middle_of_a_body(pool, serve):
    server = serve([Reply([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"])])
    resp = await pool.request(server.port, timeouts={"connect": 2.0, "read": 0.3, "write": 2.0})
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await pool.read(resp)
    assert time.monotonic() - t0 < 2.0
    await pool.close(resp)
    assert pool.idle() == 0


async def test_connect_refused(pool):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(httpx.ConnectError, match=f"127.0.0.1:{port}"):
        await pool.request(port)
    assert pool.opened == 0


# --------------------------------------------------------------------------- request bodies


async def test_in_memory_body_with_content_length_exact_bytes(pool, serve):
    server = serve([Reply([OK])])
    headers = [(b"Host", b"orders"), (b"Content-Type", b"application/json"),
               (b"Content-Length", b"12"), (b"X-Mesh-Caller", b"web")]
    resp = await pool.request(server.port, "PUT", b"/items/7?q=a%20b", headers,
                              httpx.ByteStream(b'{"a": "b\r\n"}'))
    assert await pool.read(resp) == b"hello"
    assert server.requests == [(0, (
        b"PUT /items/7?q=a%20b HTTP/1.1\r\nHost: orders\r\nContent-Type: application/json\r\n"
        b"Content-Length: 12\r\nX-Mesh-Caller: web\r\n\r\n"
        b'{"a": "b\r\n"}'))]


async def test_in_memory_body_with_chunked_encoding_exact_bytes(pool, serve):
    server = serve([Reply([OK])])
    headers = [(b"Host", b"orders"), (b"Transfer-Encoding", b"chunked")]
    resp = await pool.request(server.port, "POST", b"/c", headers, httpx.ByteStream(b"abc"))
    assert await pool.read(resp) == b"hello"
    assert server.requests[0][1] == (
        b"POST /c HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n")


async def test_streaming_body_is_sent_chunked_exact_bytes(pool, serve):
    server = serve([Reply([OK]), Reply([OK])])
    headers = [(b"Host", b"orders"), (b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")]
    parts = [b"first", b"", b"x" * 300, b"\r\n0\r\n\r\n"]
    resp = await pool.request(server.port, "POST", b"/upload", headers, pool.stream(parts))
    assert await pool.read(resp) == b"hello"
    assert server.requests[0][1] == (
        b"POST /upload HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"5\r\nfirst\r\n12c\r\n" + b"x" * 300 + b"\r\n7\r\n\r\n0\r\n\r\n\r\n0\r\n\r\n")
    # the connection stays usable after a streamed body
    resp2 = await pool.request(server.port)
    assert await pool.read(resp2) == b"hello"
    assert pool.opened == 1


async def test_streaming_body_with_content_length_is_sent_raw(pool, serve):
    server = serve([Reply([OK])])
    headers = [(b"Host", b"orders"), (b"Content-Length", b"6")]
    resp = await pool.request(server.port, "POST", b"/", headers, pool.stream([b"abc", b"def"]))
    assert await pool.read(resp) == b"hello"
    assert server.requests[0][1].endswith(b"Content-Length: 6\r\n\r\nabcdef")


async def test_streaming_body_to_a_server_that_does_not_read_times_out(pool, serve):
    # 64 MiB, far beyond the loopback socket buffers: the client must block on the
    # socket / transport (not buffer the whole stream) and give up after `write` seconds.
    server = serve([Reply([], read_request=False, stall=3.0)])
    chunk = b"x" * 65536
    headers = [(b"Host", b"orders"), (b"Transfer-Encoding", b"chunked")]
    t0 = time.monotonic()
    with pytest.raises(httpx.WriteTimeout):
        await pool.request(server.port, "POST", b"/", headers, pool.stream([chunk] * 1024),
                           timeouts={"connect": 2.0, "read": 2.0, "write": 0.3})
    assert time.monotonic() - t0 < 2.5
    assert pool.idle() == 0


async def test_server_closing_while_a_streamed_body_is_blocked_is_a_write_error(pool, serve):
    # Closing with unread data makes the server's kernel reset the connection: the client,
    # blocked on a full send buffer, must fail at once, not wait out the write timeout.
    server = serve([Reply([], read_request=False, stall=0.3, close=True)])
    headers = [(b"Host", b"orders"), (b"Transfer-Encoding", b"chunked")]
    t0 = time.monotonic()
    with pytest.raises(httpx.WriteError):
        await pool.request(server.port, "POST", b"/", headers,
                           pool.stream([b"x" * 65536] * 1024),
                           timeouts={"connect": 2.0, "read": 10.0, "write": 10.0})
    assert time.monotonic() - t0 < 5.0


async def test_streaming_body_to_a_slow_reader_is_delivered_whole(pool, serve):
    # The server reads nothing for 0.4 s: the client is held back, then resumes.
    server = serve([Reply([OK], stall=0.4)])
    parts = [bytes([i]) * 65536 for i in range(128)]  # 8 MiB
    headers = [(b"Host", b"orders"), (b"Transfer-Encoding", b"chunked")]
    resp = await pool.request(server.port, "POST", b"/", headers, pool.stream(parts),
                              timeouts={"connect": 2.0, "read": 5.0, "write": 5.0})
    assert await pool.read(resp) == b"hello"
    raw = server.requests[0][1]
    body = raw[raw.index(b"\r\n\r\n") + 4:]
    assert body == b"".join(b"10000\r\n%s\r\n" % p for p in parts) + b"0\r\n\r\n"


async def test_large_in_memory_body(pool, serve):
    server = serve([Reply([OK])])
    headers = [(b"Host", b"orders"), (b"Content-Length", b"%d" % len(BIG))]
    resp = await pool.request(server.port, "POST", b"/big", headers, httpx.ByteStream(BIG))
    assert await pool.read(resp) == b"hello"
    assert server.requests[0][1].endswith(b"\r\n\r\n" + BIG)


# --------------------------------------------------------------------------- pool rules


async def test_a_slow_reader_holds_the_server_back(pool, serve):
    # 32 MiB is far more than the loopback socket buffers hold: while the user has read
    # only the first chunk, the server's writes must stall (the client does not buffer the
    # rest of the body in memory: at most its read buffer), and the body completes once read.
    # A client that swallowed the body would never make the server stall: the wait fails.
    body = bytes(range(256)) * (32 * 4096)
    server = serve([Reply([length_response(body)])])
    resp = await pool.request(server.port)
    chunks = resp.aiter_raw() if pool.kind == "async" else resp.iter_raw()
    first = await chunks.__anext__() if pool.kind == "async" else next(chunks)  # type: ignore
    await server.until(lambda: 0 in server.send_blocked)
    assert server.replies_sent == 0
    assert len(resp.stream.conn.buf) <= 2 << 20  # type: ignore[attr-defined]
    rest = [c async for c in chunks] if pool.kind == "async" else list(chunks)  # type: ignore
    assert first + b"".join(rest) == body
    assert pool.idle() == 1


async def test_server_close_after_a_large_body_is_still_detected_when_idle(pool, serve):
    # A body just over the async read buffer limit arrives whole while nobody reads (the
    # transport pauses reading); once the connection is idle it must watch for the FIN again.
    body = b"z" * ((1 << 20) + 100)
    server = serve([Reply([length_response(body)], close=True)], [Reply([OK])])
    resp = await pool.request(server.port)
    await pool.until_body_buffered(resp)
    assert await pool.read(resp) == body
    assert pool.idle() == 1
    await server.until(lambda: 0 in server.server_closed)
    await until_no_usable_idle(pool)
    resp2 = await pool.request(server.port)
    assert await pool.read(resp2) == b"hello"
    assert pool.opened == 2


async def test_partly_read_body_closed_early_is_not_reused(pool, serve):
    server = serve([Reply([length_response(BIG)[:100_000]])], [Reply([OK])])
    resp = await pool.request(server.port)
    first = await pool.first_chunk_then_close(resp)
    assert first and BIG.startswith(first) and len(first) < len(BIG)
    assert pool.idle() == 0
    await server.until(lambda: 0 in server.client_closed)
    resp2 = await pool.request(server.port)
    assert await pool.read(resp2) == b"hello"
    assert pool.opened == 2


async def test_unread_body_closed_is_not_reused(pool, serve):
    server = serve([Reply([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"])], [Reply([OK])])
    resp = await pool.request(server.port)  # the body has not even arrived yet
    await pool.close(resp)
    assert pool.idle() == 0
    await server.until(lambda: 0 in server.client_closed)


async def test_max_idle_is_respected(make, serve):
    pool = make(max_idle=2)
    server = serve(*[[Reply([OK]) for _ in range(3)] for _ in range(4)])
    responses = [await pool.request(server.port) for _ in range(4)]  # 4 in flight: 4 conns
    assert pool.opened == 4
    for resp in responses:
        assert await pool.read(resp) == b"hello"
    assert pool.idle() == 2
    await server.until(lambda: server.client_closed == {2, 3})  # the two given back last: closed
    # LIFO: the most recently given back (connection 1) serves the next requests
    for _ in range(2):
        assert await pool.read(await pool.request(server.port)) == b"hello"
    assert pool.opened == 4
    assert [i for i, _ in server.requests[4:]] == [1, 1]
    assert pool.idle() == 2


async def test_pool_close_closes_idle_connections(make, serve):
    pool = make()
    server = serve([Reply([OK])], [Reply([OK])])
    a = await pool.request(server.port)
    b = await pool.request(server.port)
    await pool.read(a)
    await pool.read(b)
    assert pool.idle() == 2
    await pool.shutdown()
    assert pool.idle() == 0
    await server.until(lambda: server.client_closed == {0, 1})


# --------------------------------------------------------------------------- concurrency


def echo(raw: bytes) -> bytes:
    target = raw.split(b" ", 2)[1]
    body = b"reply to " + target * 20
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_async_pool_16_tasks_x_50_requests(serve):
    server = serve(forever=echo)
    pool = AsyncPool()

    async def worker(w: int) -> None:
        for i in range(50):
            target = b"/w%d/r%d" % (w, i)
            resp = await pool.request("127.0.0.1", server.port, "GET", target,
                                      [(b"Host", b"svc")], httpx.ByteStream(b""), TIMEOUTS)
            assert resp.status_code == 200
            assert await resp.aread() == b"reply to " + target * 20

    try:
        await asyncio.gather(*(worker(w) for w in range(16)))
        assert pool.opened <= 16
        assert len(server.requests) == 800
    finally:
        await pool.aclose()


def test_sync_pool_8_threads_x_50_requests(serve):
    server = serve(forever=echo)
    pool = SyncPool()
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(50):
                target = b"/w%d/r%d" % (w, i)
                resp = pool.request("127.0.0.1", server.port, "GET", target,
                                    [(b"Host", b"svc")], httpx.ByteStream(b""), TIMEOUTS)
                assert resp.status_code == 200
                assert resp.read() == b"reply to " + target * 20
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    pool.close()
    assert not errors, errors
    assert pool.opened <= 8
    assert len(server.requests) == 400
