"""Servers and load loops for the mesh mTLS tests: uvicorn with a rotating server certificate
(meshlib.server.tls) behind the ASGI middleware, which answers with the caller it acted on."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from meshlib.identity import StaticIdentitySource
from meshlib.identity.testing import TestCA
from meshlib.server import MeshASGIMiddleware
from meshlib.server.tls import ServerTLS, uvicorn_config


def wait_until(pred: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.005)


async def caller_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers 200 with ``caller=<verified or header caller>``: what the middleware acted on
    (the middleware reads it; the app sees the TLS extension it added)."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    body = f"peer={tls.get('meshlib.peer_service')}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class TLSUvicorn:
    """uvicorn on a free loopback port with mesh mTLS from ``source``; the app runs behind
    ``MeshASGIMiddleware(mesh, service)`` (access policy and mtls.mode of ``service``)."""

    def __init__(self, source: Any, mesh: Any, service: str, app: Any = caller_app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.tls = ServerTLS(source)
        wrapped = MeshASGIMiddleware(app, mesh, service=service)
        config = uvicorn_config(wrapped, self.tls, lifespan="off", log_level="warning",
                                loop="asyncio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> TLSUvicorn:
        self.thread.start()
        wait_until(lambda: self.server.started)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        self.tls.close()


def source_for(ca: TestCA, service: str, **kw: Any) -> StaticIdentitySource:
    return StaticIdentitySource(ca.issue(service, **kw))


def rotate_ca(server_src: Any, client_src: Any, ca2: TestCA, old_bundle: bytes,
              server: str, client: str, pause: float) -> None:
    """A CA rotation with an overlapping bundle, one step every ``pause`` seconds (each step is
    a rotation of one or both sources): 1. both trust both roots, leaves still from the old CA;
    2. leaves from the new CA, one side at a time; 3. the old root leaves the bundle."""
    both = old_bundle + ca2.bundle_pem
    steps = [
        lambda: (server_src.set(server_src.current().with_trust_bundle(both)),
                 client_src.set(client_src.current().with_trust_bundle(both))),
        lambda: server_src.set(ca2.issue(server, trust_bundle_pem=both)),
        lambda: client_src.set(ca2.issue(client, trust_bundle_pem=both)),
        lambda: (server_src.set(server_src.current().with_trust_bundle(ca2.bundle_pem)),
                 client_src.set(client_src.current().with_trust_bundle(ca2.bundle_pem))),
    ]
    for step in steps:
        time.sleep(pause)
        step()
    time.sleep(pause)
