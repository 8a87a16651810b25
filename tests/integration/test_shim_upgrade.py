"""Upgrade (WebSocket) requests through the shim: the 101 is relayed, then bytes flow both
ways unparsed, with half-close passed on."""

from __future__ import annotations

import socket
import threading
import uuid

from http_servers import wait_endpoints
from shim_harness import RawUpstream, ShimProcess, exchange, status_of


class EchoUpgrade(RawUpstream):
    """Answers an Upgrade request with 101, then echoes every byte upper-cased; on the app's
    FIN it sends ``BYE`` and closes. A request without Upgrade gets 426."""

    def _conn(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            self.heads.append(head)
            self.count += 1
            if b"\r\nupgrade: websocket" not in head.lower():
                conn.sendall(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                return
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
                         b"\r\n\r\nhello")
            if rest:
                conn.sendall(rest.upper())
            while data := conn.recv(65536):
                conn.sendall(data.upper())
            conn.sendall(b"BYE")


def test_websocket_upgrade_is_tunnelled(etcd_server, mesh):
    up = EchoUpgrade(b"")
    name = f"ws-{uuid.uuid4().hex[:6]}"
    mesh.register(name, up.port, instance_id="ws")
    wait_endpoints(mesh, name, 1)
    try:
        with ShimProcess(etcd_server.endpoint, mesh.layout.prefix) as shim:
            with socket.create_connection(("127.0.0.1", shim.port), timeout=5) as s:
                s.sendall(f"GET /chat HTTP/1.1\r\nHost: {name}\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\nearly".encode())
                got = b""
                while b"helloEARLY" not in got:
                    chunk = s.recv(65536)
                    assert chunk, got
                    got += chunk
                head = got.split(b"\r\n\r\n")[0].lower()
                assert head.startswith(b"http/1.1 101")
                assert b"upgrade: websocket" in head and b"connection: upgrade" in head
                assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in head
                payload = bytes(range(97, 123)) * 20000  # 520 KB: flow control both ways
                reader_out = bytearray()

                def read_all() -> None:
                    while chunk := s.recv(65536):
                        reader_out.extend(chunk)

                t = threading.Thread(target=read_all)
                t.start()
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)  # half-close: the endpoint answers BYE and closes
                t.join(10)
                assert bytes(reader_out) == payload.upper() + b"BYE"
            sent = up.heads[0].lower()
            assert b"upgrade: websocket" in sent and b"connection: upgrade" in sent
            assert b"sec-websocket-key: dghlihnhbxbszsbub25jzq==" in sent
            # a plain request to the same endpoint is an ordinary exchange
            r = exchange(shim.port, f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close"
                         "\r\n\r\n".encode())
            assert status_of(r) == 426
    finally:
        up.stop()
