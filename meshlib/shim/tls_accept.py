"""The inbound port with mesh mTLS: TLS and clear-text callers on one port, told apart by the
first byte each connection sends.

A TLS connection starts with a handshake record, content type 22 (``0x16``, RFC 8446 5.1);
an HTTP/1.1 request starts with a method token (RFC 9112 3), never that byte. Istio's
permissive mode tells the two apart the same way (Envoy's ``tls_inspector`` listener filter).
So the shim's inbound port needs no second port and no flag day: callers with a mesh identity
connect with TLS (the app is registered with ``"tls": true``), callers without one keep
working in ``off`` and ``permissive``, and in ``strict`` the server middleware refuses them per
request with 403 ``mtls_required`` and a readable reason (``MeshASGIMiddleware``, the mode
read live from etcd), instead of a handshake failure the caller cannot read.

Algorithm, per accepted socket: wait until it is readable (at most ``head_timeout``: a client
that sends nothing is closed, as the front end closes a slow head), peek one byte
(``MSG_PEEK``: nothing is consumed), then hand the socket to the event loop with
``connect_accepted_socket(ssl=ServerTLS.front)`` for ``0x16`` or without TLS otherwise. The
``front`` context switches every handshake to the newest certificate (rotation without a
restart, ``meshlib.tls.ServerTLS``). The verified peer of a TLS connection is read once per
connection (:func:`peer_extension`) and given to every request on it as the ASGI TLS
extension (``meshlib.server.tls.tls_extension``), which the middleware trusts over
``x-mesh-caller``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any, Final

from meshlib.core.mtls import HANDSHAKE
from meshlib.server.tls import tls_extension
from meshlib.tls import ServerTLS, count_refusal

log = logging.getLogger("meshlib.shim")

TLS_HANDSHAKE: Final = 0x16  # RFC 8446 5.1: ContentType handshake(22)


def peer_extension(transport: Any, tls: ServerTLS) -> dict[str, Any] | None:
    """The ASGI TLS extension of a connection (verified peer identity), None in clear text."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    return tls_extension(ssl_object, tls.trust_domain)


class SniffingListener:
    """A listening socket whose connections get ``factory()`` as protocol, with TLS when the
    client's first byte starts a TLS handshake (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol],
                 tls: ServerTLS, head_timeout: float) -> None:
        self.loop = loop
        self.factory = factory
        self.tls = tls
        self.head_timeout = head_timeout if head_timeout and head_timeout > 0 else 10.0
        self.sock: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def listen(self, host: str, port: int) -> int:
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                            flags=socket.AI_PASSIVE)
        family, _type, _proto, _canon, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self._acceptor = self.loop.create_task(self._accept(sock))
        return int(sock.getsockname()[1])

    async def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                conn, _addr = await self.loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and the like: wait a little, keep serving
                log.warning("shim inbound: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = self.loop.create_task(self._sniff(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _sniff(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        fd = conn.fileno()
        readable = self.loop.create_future()

        def ready() -> None:
            if not readable.done():
                readable.set_result(None)

        self.loop.add_reader(fd, ready)
        try:
            await asyncio.wait_for(readable, self.head_timeout)
            first = conn.recv(1, socket.MSG_PEEK)
        except (TimeoutError, OSError):
            first = b""
        except BaseException:  # cancelled (the listener closes)
            conn.close()
            raise
        finally:
            self.loop.remove_reader(fd)
        if not first:  # closed, or nothing sent in time
            conn.close()
            return
        use_tls = first[0] == TLS_HANDSHAKE
        try:
            if use_tls:
                await self.loop.connect_accepted_socket(
                    self.factory, conn, ssl=self.tls.front,
                    ssl_handshake_timeout=self.head_timeout)
            else:
                await self.loop.connect_accepted_socket(self.factory, conn)
        except Exception as exc:  # a failed handshake: untrusted or expired client certificate
            count_refusal("server", HANDSHAKE)
            log.info("shim inbound: TLS handshake refused: %s", exc)
            conn.close()

    def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
            self._acceptor = None
        for task in list(self._pending):
            task.cancel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
