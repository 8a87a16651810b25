"""Real HTTP upstreams and client adapters for the HTTP mesh tests.

:class:`Upstream` is a small threaded HTTP/1.1 server on loopback (``ThreadingHTTPServer``,
keep-alive, ``content-length`` on every answer) whose behaviour a test switches at run time:

* ``"ok"``: 200 with the instance name as the body;
* ``"503"``: 503, with ``Retry-After`` when ``retry_after`` is set;
* ``"hang"``: read the request and never answer (until :meth:`Upstream.release` or teardown);
* ``"close"``: read the request, then close the connection without answering (a FIN);
* ``"reset"``: read the request, then reset the connection (``SO_LINGER`` 0: an RST).

Every request is counted and recorded (method, path, headers, body; chunked request bodies are
decoded), so tests assert on what the server really received. :meth:`Upstream.kill` stops the
instance the way a crash does: the listening socket closes (new connections are refused) and
every open connection is shut down, while its etcd registration stays until its lease expires.

:class:`SyncCaller` and :class:`AsyncCaller` run the same calls through
``mesh.http_client()`` or ``mesh.async_http_client()`` (the async client lives on an event
loop in a background thread), so one table of tests covers both transports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from meshlib.discovery.registration import Registration
from meshlib.mesh import Mesh

MODES = ("ok", "503", "hang", "close", "reset")


@dataclass
class Received:
    """One request as the upstream saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    chunked: bool
    at: float = 0.0  # time.monotonic() when the request had been read


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256
    allow_reuse_address = True
    upstream: Upstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients dropping connections (kills, timeouts) are expected here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.upstream._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.upstream._track(self.connection, add=False)

    def log_message(self, *args: object) -> None:
        pass

    def _read_body(self) -> tuple[bytes, bool]:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks), True
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return (self.rfile.read(length) if length else b""), False

    def _handle(self) -> None:
        up = self.server.upstream
        body, chunked = self._read_body()
        mode = up.mode
        up._record(Received(self.command, self.path, {k.lower(): v for k, v in
                                                      self.headers.items()}, body, chunked,
                             time.monotonic()))
        if mode == "hang":
            up._release.wait(30)
            self.close_connection = True
            return
        if mode == "close":
            self.close_connection = True
            return
        if mode == "reset":
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()  # with linger 0: an RST, no FIN
            return
        if mode == "503":
            self._answer(503, f"{up.name} unavailable".encode(),
                         {"retry-after": up.retry_after} if up.retry_after is not None else {})
            return
        self._answer(200, up.name.encode(), {"x-upstream": up.name})

    def _answer(self, status: int, body: bytes, headers: dict[str, Any]) -> None:
        # Head and body in one write, as real servers do (writev): a kill then lands before
        # or after a response, never between its head and its body (a body cut short after
        # the head arrived is not retryable, by the client or by Envoy).
        self.send_response(status)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, str(v))
        head: list[bytes] = self.__dict__["_headers_buffer"]  # filled by send_header()
        head.append(b"\r\n")  # what end_headers() would add
        self.wfile.write(b"".join(head) + body)
        head.clear()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle  # noqa: N815


class Upstream:
    """A controllable HTTP/1.1 instance on 127.0.0.1 (see the module docstring)."""

    def __init__(self, name: str, *, mode: str = "ok", retry_after: int | str | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.name = name
        self.mode = mode
        self.retry_after = retry_after
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._release = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.upstream = self
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"upstream-{name}", daemon=True,
        )
        self._thread.start()
        self.alive = True

    # --- bookkeeping (called from handler threads) ---------------------------------------
    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _record(self, rec: Received) -> None:
        with self._lock:
            self.received.append(rec)

    @property
    def count(self) -> int:
        """Requests received so far (every mode counts)."""
        return len(self.received)

    def reset_counts(self) -> None:
        with self._lock:
            self.received.clear()

    def release(self) -> None:
        """Let hanging requests finish (their connections are closed without an answer)."""
        self._release.set()

    def kill(self) -> None:
        """Stop like a crashed process: refuse new connections, drop the open ones."""
        if not self.alive:
            return
        self.alive = False
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._release.set()

    def stop(self) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"Upstream({self.name!r}, port={self.port}, mode={self.mode!r}, count={self.count})"


# --------------------------------------------------------------------------- etcd helpers


def register(mesh: Mesh, service: str, up: Upstream, *, ttl: float = 10.0,
             **kwargs: Any) -> Registration:
    """Register ``up`` as an instance of ``service`` (instance id = upstream name)."""
    return mesh.register(service, up.port, instance_id=up.name, ttl=ttl, **kwargs)


def set_policy(mesh: Mesh, service: str, policy: dict[str, Any] | str,
               timeout: float = 5.0) -> int:
    """Write ``policy`` to ``service``'s etcd key and wait until the mesh has it in force."""
    mesh.snapshot(service)  # make sure the service is watched
    text = policy if isinstance(policy, str) else json.dumps(policy)
    rev = mesh.client.put(mesh.layout.policy_key(service), text.encode())
    deadline = time.monotonic() + timeout
    while mesh.snapshot(service).policy_revision < rev:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"policy for {service!r} (revision {rev}) not in force after {timeout}s; "
                f"refused as invalid? {text}"
            )
        time.sleep(0.005)
    return rev


def wait_endpoints(mesh: Mesh, service: str, n: int, timeout: float = 5.0) -> None:
    """Wait until ``service`` has exactly ``n`` endpoints in the mesh's snapshot."""
    deadline = time.monotonic() + timeout
    while len(mesh.snapshot(service).endpoints) != n:
        if time.monotonic() > deadline:
            have = len(mesh.snapshot(service).endpoints)
            raise AssertionError(f"{service!r}: {have} endpoints after {timeout}s, wanted {n}")
        time.sleep(0.005)


def eventually(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    return pred()


# --------------------------------------------------------------------------- client adapters


@dataclass
class Outcomes:
    """What a batch of calls returned: responses and raised exceptions, in call order."""

    results: list[httpx.Response | BaseException] = field(default_factory=list)

    @property
    def responses(self) -> list[httpx.Response]:
        return [r for r in self.results if isinstance(r, httpx.Response)]

    @property
    def errors(self) -> list[BaseException]:
        return [r for r in self.results if isinstance(r, BaseException)]

    def bodies(self) -> list[str]:
        return [r.text for r in self.responses]

    def failed(self) -> list[httpx.Response | BaseException]:
        """Errors and non-2xx responses."""
        return [r for r in self.results
                if isinstance(r, BaseException) or r.status_code >= 300]


class SyncCaller:
    """Calls through ``mesh.http_client()``; concurrency with threads."""

    kind = "sync"

    def __init__(self, mesh: Mesh, **client_kwargs: Any) -> None:
        self.client = mesh.http_client(**client_kwargs)
        self._pool = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="caller")

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.client.request(method, url, **kwargs)

    def submit(self, method: str, url: str, **kwargs: Any) -> concurrent.futures.Future[Any]:
        return self._pool.submit(self.client.request, method, url, **kwargs)

    def many(self, n: int, method: str, url: str, *, concurrency: int = 8,
             **kwargs: Any) -> Outcomes:
        def one(_i: int) -> httpx.Response | BaseException:
            try:
                return self.client.request(method, url, **kwargs)
            except Exception as exc:
                return exc

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            return Outcomes(list(pool.map(one, range(n))))

    def for_duration(self, seconds: float, method: str, url: str, *, concurrency: int = 4,
                     **kwargs: Any) -> Outcomes:
        """Call in ``concurrency`` loops for ``seconds``."""
        stop = time.monotonic() + seconds
        out: list[httpx.Response | BaseException] = []

        def loop() -> None:
            while time.monotonic() < stop:
                try:
                    out.append(self.client.request(method, url, **kwargs))
                except Exception as exc:
                    out.append(exc)

        threads = [threading.Thread(target=loop) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return Outcomes(out)

    @staticmethod
    def stream_body(chunks: list[bytes]) -> Iterator[bytes]:
        yield from chunks

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


class AsyncCaller:
    """Calls through ``mesh.async_http_client()`` on an event loop in a background thread."""

    kind = "async"

    def __init__(self, mesh: Mesh, **client_kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="async-caller",
                                        daemon=True)
        self._thread.start()

        async def make() -> httpx.AsyncClient:
            return mesh.async_http_client(**client_kwargs)

        self.client: httpx.AsyncClient = self._run(make())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self._run(self.client.request(method, url, **kwargs))  # type: ignore[no-any-return]

    def submit(self, method: str, url: str, **kwargs: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(self.client.request(method, url, **kwargs),
                                                self.loop)

    def many(self, n: int, method: str, url: str, *, concurrency: int = 8,
             **kwargs: Any) -> Outcomes:
        async def run() -> list[Any]:
            sem = asyncio.Semaphore(concurrency)

            async def one() -> Any:
                async with sem:
                    return await self.client.request(method, url, **kwargs)

            return await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)

        return Outcomes(self._run(run()))

    def for_duration(self, seconds: float, method: str, url: str, *, concurrency: int = 4,
                     **kwargs: Any) -> Outcomes:
        async def run() -> list[Any]:
            stop = time.monotonic() + seconds
            out: list[Any] = []

            async def loop() -> None:
                while time.monotonic() < stop:
                    try:
                        out.append(await self.client.request(method, url, **kwargs))
                    except Exception as exc:
                        out.append(exc)

            await asyncio.gather(*(loop() for _ in range(concurrency)))
            return out

        return Outcomes(self._run(run()))

    @staticmethod
    def stream_body(chunks: list[bytes]) -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            for c in chunks:
                yield c

        return gen()

    def close(self) -> None:
        try:
            self._run(self.client.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()


CALLERS: dict[str, type[SyncCaller] | type[AsyncCaller]] = {
    "sync": SyncCaller, "async": AsyncCaller,
}
