"""Mesh mTLS for Python servers: uvicorn (ASGI), any ``ssl``-wrapping server, and gRPC.

* :class:`~meshlib.tls.ServerTLS` keeps the server's certificate current: its ``front``
  context switches each new handshake to the newest credentials (``sni_callback``), so a
  rotation needs no restart and kept-alive connections keep working.
* uvicorn does not fill the ASGI TLS extension, so :func:`uvicorn_protocol` wraps its HTTP
  protocol class: on each connection it reads the verified client certificate from the
  transport's ``ssl_object`` and adds ``scope["extensions"]["tls"]`` (ASGI TLS extension:
  ``client_cert_chain``, ``client_cert_name``, ``tls_version``, ``cipher_suite``) with two
  meshlib keys, ``meshlib.peer_spiffe_id`` and ``meshlib.peer_service``, which
  :class:`~meshlib.server.asgi.MeshASGIMiddleware` uses as the caller identity.
* :func:`uvicorn_config` puts both together::

      tls = ServerTLS(mesh.identity)
      config = uvicorn_config(app, tls, host="0.0.0.0", port=8443)
      uvicorn.Server(config).run()

* gRPC: :func:`grpc_server_credentials` returns ``grpc.dynamic_ssl_server_credentials`` whose
  fetcher hands gRPC the newest certificate at the next handshake (grpcio calls it before each
  new connection's handshake and keeps the previous one when it returns None).
"""

from __future__ import annotations

from typing import Any

from meshlib.tls import ServerTLS, peer_identity

__all__ = ["ServerTLS", "grpc_server_credentials", "tls_extension", "uvicorn_config",
           "uvicorn_protocol"]


def tls_extension(ssl_object: Any, trust_domain: str | None = None) -> dict[str, Any]:
    """The ASGI TLS extension of one connection, plus the verified mesh identity (of
    ``trust_domain`` when given)."""
    sid, service = peer_identity(ssl_object, trust_domain)
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    cn = None
    if cert:
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    cn = f"CN={value}"
    cipher = ssl_object.cipher() if ssl_object is not None else None
    return {
        "server_cert": None,
        "client_cert_chain": [],
        "client_cert_name": cn,
        "client_cert_error": None,
        "tls_version": 0x0304 if ssl_object is not None and ssl_object.version() == "TLSv1.3"
        else None,
        "cipher_suite": None if cipher is None else cipher[0],
        "meshlib.peer_spiffe_id": sid,
        "meshlib.peer_service": service,
    }


def uvicorn_protocol(base: type | None = None, tls: ServerTLS | None = None) -> type:
    """A uvicorn HTTP protocol class (``uvicorn.Config(http=...)``) that adds the verified
    peer to each request's scope (see the module docstring). ``base``: the uvicorn protocol
    to extend (default ``H11Protocol``); ``tls``: the server's ``ServerTLS``, whose trust
    domain a peer must belong to."""
    if base is None:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol

    class MeshTLSProtocol(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None:
                return
            ext = tls_extension(ssl_object, None if tls is None else tls.trust_domain)
            app: Any = getattr(self, "app")  # noqa: B009 (uvicorn sets it in __init__)

            async def with_tls(scope: Any, receive: Any, send: Any) -> None:
                if scope.get("type") in ("http", "websocket"):
                    extensions = scope.setdefault("extensions", {})
                    extensions["tls"] = ext
                await app(scope, receive, send)

            setattr(self, "app", with_tls)  # noqa: B010

    MeshTLSProtocol.__name__ = f"MeshTLS{base.__name__}"
    return MeshTLSProtocol


def uvicorn_config(app: Any, tls: ServerTLS, **kwargs: Any) -> Any:
    """A ``uvicorn.Config`` serving ``app`` with mesh mTLS (rotating certificate, verified
    peer in the scope). ``kwargs`` go to ``uvicorn.Config`` (host, port, log_level...)."""
    import uvicorn

    kwargs.setdefault("http", uvicorn_protocol(tls=tls))
    return uvicorn.Config(app, ssl_context_factory=tls.uvicorn_ssl_context_factory, **kwargs)


def grpc_server_credentials(source: Any, *, require_client_auth: bool = True) -> Any:
    """``grpc.dynamic_ssl_server_credentials`` from an IdentitySource: the certificate and
    trust bundle in force at each new handshake are the source's newest. Client certificates
    are required by default (mesh clients always present one when they speak TLS; clear-text
    callers use a plain port, refused in ``strict`` by the interceptor)."""
    import grpc

    def config(creds: Any) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(creds.private_key_pem, creds.cert_chain_pem)],
            root_certificates=creds.trust_bundle_pem)

    state = {"creds": source.current()}
    state["served"] = state["creds"]

    def rotated(creds: Any) -> None:
        state["creds"] = creds

    unsubscribe = source.subscribe(rotated)

    def fetch() -> Any:
        creds = state["creds"]
        if creds is state["served"]:
            return None  # unchanged: gRPC keeps the current configuration
        state["served"] = creds
        return config(creds)

    credentials = grpc.dynamic_ssl_server_credentials(
        config(state["creds"]), fetch, require_client_authentication=require_client_auth)
    credentials._meshlib_unsubscribe = unsubscribe  # kept alive with the credentials
    return credentials
