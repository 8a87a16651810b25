"""Mesh mTLS connections over memory BIOs (``meshlib.http.backends``) stay reusable when the
server sends TLS 1.3 session tickets (records without application data after the
handshake), in the sync and the async pool, against a real TLS server on a real socket."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

import httpx

from meshlib.http._async.pool import AsyncPool
from meshlib.http._sync.pool import SyncPool
from meshlib.identity.testing import TestCA
from meshlib.tls import client_context, server_context

RESP = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class TicketServer:
    """Keep-alive HTTP/1.1 over TLS 1.3 with two session tickets per handshake (OpenSSL's
    default, unlike the mesh's server contexts)."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        ctx.num_tickets = 2
        self.ctx = ctx
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            tconn = self.ctx.wrap_socket(conn, server_side=True)
            buf = b""
            while True:
                data = tconn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    tconn.sendall(RESP)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.lsock.close()


def _setup() -> tuple[TicketServer, tuple[ssl.SSLContext, str]]:
    ca = TestCA()
    server = TicketServer(server_context(ca.issue("tickets")))
    target = (client_context(ca.issue("caller")), "spiffe://meshlib.local/svc/tickets")
    return server, target


def test_sync_tls_connection_reused_after_session_tickets() -> None:
    server, target = _setup()
    pool = SyncPool()
    try:
        for _ in range(5):
            r = pool.request("127.0.0.1", server.port, "GET", b"/", [(b"host", b"x")], httpx.ByteStream(b""),
                             {"connect": 5.0, "read": 5.0, "write": 5.0}, tls=target)
            assert r.status_code == 200
            assert r.read() == b"ok"
            r.close()
        assert pool.opened == 1
        assert server.accepted == 1
        (conn,) = [c for stack in pool._idle.values() for c in stack]
        assert conn.tls is not None and conn.tls.session.has_ticket  # tickets were read
    finally:
        pool.close()
        server.close()


def test_async_tls_connection_reused_after_session_tickets() -> None:
    server, target = _setup()

    async def run() -> int:
        pool = AsyncPool()
        try:
            for _ in range(5):
                r = await pool.request("127.0.0.1", server.port, "GET", b"/",
                                       [(b"host", b"x")], httpx.ByteStream(b""),
                                       {"connect": 5.0, "read": 5.0, "write": 5.0}, tls=target)
                assert r.status_code == 200
                assert await r.aread() == b"ok"
                await r.aclose()
            return pool.opened
        finally:
            await pool.aclose()

    try:
        assert asyncio.run(run()) == 1
        assert server.accepted == 1
    finally:
        server.close()
