"""A real shim process for the shim tests, raw-socket helpers and a raw upstream.

:class:`ShimProcess` starts ``python -m meshlib.shim`` on free loopback ports against the
test's etcd and prefix, waits until its admin port answers ``/live`` (or ``/ready``), and
stops it at teardown (SIGTERM, then SIGKILL), keeping its log for failure messages.

:func:`exchange` sends bytes over a fresh TCP connection and reads until the server closes
it (or a complete response arrived when ``until_response``), so tests see exactly what went
over the wire. :class:`RawUpstream` answers every request with fixed bytes and counts the
requests it read (a malformed-response upstream, or a canary).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

from meshlib.testing.etcd import free_port


class HeldPort:
    """A loopback port kept from other processes until a server here listens on it.

    For a port a test must name before its server starts (an app that comes up after its
    shim): a socket bound with ``SO_REUSEADDR`` and not listening holds it. Connections to it
    are refused, as to a free port; the kernel hands it to no ``bind(0)`` or ``connect()``
    elsewhere; a server binding it with ``SO_REUSEADDR`` (http.server, asyncio, Node do)
    may, since nothing listens. :meth:`close` once the test is done with the port."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> HeldPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _port_arg(entry: str, port: int) -> tuple[str, str]:
    """``("--upstream", "orders=5001")`` for ``"--upstream orders={}"`` and 5001."""
    flag, _, value = entry.partition(" ")
    return flag, (value or "{}").format(port)


class ShimProcess:
    def __init__(self, etcd: str, prefix: str, *args: str, wait: str = "/live",
                 env: dict[str, str] | None = None, drain: float = 0.5,
                 port: int | None = None, admin_port: int | None = None,
                 free_ports: tuple[str, ...] = ()) -> None:
        """``free_ports``: more listening flags given a ``free_port()`` of their own, picked
        anew on each start like ``--port``: ``"--inbound-port"``, or a flag and a value with
        ``{}`` for the port (``"--upstream orders={}"``). Their ports: ``self.ports[entry]``."""
        full_env = dict(os.environ)
        full_env.pop("HTTP_PROXY", None)
        full_env.pop("http_proxy", None)
        if env:
            full_env.update(env)
        for attempt in range(3):
            # free_port() only finds a port that was free a moment ago: another process on
            # this shared machine may take it first; then start again on new ports
            self.port = port or free_port()
            self.admin_port = admin_port or free_port()
            self.ports = {flag: free_port() for flag in free_ports}
            fd, self.log_path = tempfile.mkstemp(prefix="shim-", suffix=".log")
            self.log_file = os.fdopen(fd, "wb")
            argv = [sys.executable, "-m", "meshlib.shim", "--etcd", etcd, "--prefix", prefix,
                    "--port", str(self.port), "--admin-port", str(self.admin_port),
                    "--drain-seconds", str(drain), *args,
                    *(a for entry, p in self.ports.items() for a in _port_arg(entry, p))]
            self.proc = subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                         env=full_env)
            if not wait:
                return
            try:
                self.wait_status(wait, 200, timeout=20)
                return
            except AssertionError:
                mine = [f"--port {self.port}:"] if not port else []
                mine += [f"--admin-port {self.admin_port}:"] if not admin_port else []
                mine += [" ".join(_port_arg(entry, p)) + ":" for entry, p in self.ports.items()]
                taken = self.proc.poll() == 2 and any(m in self.log() for m in mine)
                self.close()
                if not taken or attempt == 2:
                    raise

    # ------------------------------------------------------------------ admin
    def admin(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def admin_json(self, path: str) -> Any:
        return json.loads(self.admin(path)[1])

    def wait_status(self, path: str, status: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"shim exited with {self.proc.returncode}:\n{self.log()}")
            try:
                last = self.admin(path)
                if last[0] == status:
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.02)
        raise AssertionError(f"shim {path} never answered {status} (last {last!r}):\n"
                             f"{self.log()}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-6000:]

    # ------------------------------------------------------------------ lifecycle
    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"shim did not exit {timeout}s after SIGTERM:\n"
                                 f"{self.log()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        try:
            self.log_file.close()
            os.unlink(self.log_path)
        except OSError:
            pass

    def __enter__(self) -> ShimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- raw sockets


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection and read until the peer closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = bytearray()
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return bytes(out)


def status_of(response: bytes) -> int:
    line = response.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise AssertionError(f"not an HTTP response: {response[:200]!r}")
    return int(parts[1])


def split_response(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.decode().lower()] = v.decode().strip()
    return status_of(response), headers, body


class RawUpstream:
    """Answers every request head with ``reply`` (bytes) and closes when ``close``; counts
    the request heads it read in ``count``."""

    def __init__(self, reply: bytes, *, close: bool = True) -> None:
        self.reply = reply
        self.close_after = close
        self.count = 0
        self.connections = 0
        self.heads: list[bytes] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.alive = True
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while self.alive:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        buf = b""
        served = 0
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    self.heads.append(head)
                    self.count += 1
                    if not self._respond(conn, served):
                        return
                    served += 1

    def _respond(self, conn: socket.socket, served: int) -> bool:
        """Answer the request that arrived after ``served`` answered ones on ``conn``;
        False closes the connection."""
        try:
            conn.sendall(self.reply)
        except OSError:
            return False
        return not self.close_after

    def stop(self) -> None:
        self.alive = False
        self.sock.close()


class RacingUpstream(RawUpstream):
    """Keep-alive race: answers the first request of each connection (keep-alive, no
    ``Connection: close``), then reads the second request and closes without answering,
    the way a server whose idle timeout fires as a request arrives does."""

    def _respond(self, conn: socket.socket, served: int) -> bool:
        if served:
            return False  # closed under the reused connection
        conn.sendall(self.reply)
        return True


class SimpleApp:
    """An HTTP/1.1 app on a fixed loopback port (0 = any) that answers ``200 name`` after
    ``delay`` seconds; :meth:`stop` and :meth:`start` restart it on the same port."""

    def __init__(self, name: str, port: int = 0, delay: float = 0.0) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.name = name
        self.delay = delay
        self.count = 0
        self.status = 200
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                app.count += 1
                if app.delay:
                    time.sleep(app.delay)
                body = app.name.encode()
                self.send_response(app.status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET  # noqa: N815

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server_cls = Server
        self._handler = Handler
        self.server: Any = None
        self.port = port
        self.start()

    def start(self) -> None:
        self.server = self._server_cls(("127.0.0.1", self.port), self._handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
