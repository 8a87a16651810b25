"""etcd authentication for :class:`~meshlib.discovery.etcd_client.EtcdClient`.

Two mechanisms, as etcd documents them (etcd.io "Role-based access control" and "Transport
security model"):

* **User and password.** ``Auth.Authenticate(name, password)`` returns a token that every later
  request carries in the gRPC metadata key ``token``. Tokens expire: a *simple* token after
  ``--auth-token-ttl`` (default 300 s) without use, a JWT at its ``exp``. python3-etcd3 fetches
  the token once and never again (kragniz/python-etcd3#1227, #580), so its clients fail after
  five idle minutes. Here the token is fetched lazily, refreshed before it is ``refresh_after``
  seconds old (default 240 s, under etcd's default TTL) when a call or a stream starts, and a
  unary call that fails with ``invalid auth token`` or ``auth token is expired`` re-authenticates
  and retries once (:meth:`TokenAuth.invalidate`). A stream (watch, keepalive) is authorised when
  it is opened, and etcd refuses later watch creates on it once its token is stale (the watch
  manager then reopens the stream), so a stream opens with a token at most
  ``stream_refresh_after`` seconds old (default 10 s): a fresh one after any trouble.
* **Client certificates (TLS).** ``https://`` endpoints, or any of ``ca_cert``/``cert``/``key``,
  make every channel a TLS channel (``grpc.ssl_channel_credentials``). With
  ``--client-cert-auth`` etcd takes the user name from the certificate's CN when no token is
  sent; a server certificate must name the address the client dials (an IP SAN for IPs).

Settings come from arguments or the environment: ``MESHLIB_ETCD_USER``,
``MESHLIB_ETCD_PASSWORD`` (or ``MESHLIB_ETCD_PASSWORD_FILE``), ``MESHLIB_ETCD_CACERT``,
``MESHLIB_ETCD_CERT``, ``MESHLIB_ETCD_KEY`` (file paths), so the library, ``meshctl``, the
signer and the shim all authenticate the same way without new options.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc

ENV_USER = "MESHLIB_ETCD_USER"
ENV_PASSWORD = "MESHLIB_ETCD_PASSWORD"
ENV_PASSWORD_FILE = "MESHLIB_ETCD_PASSWORD_FILE"
ENV_CACERT = "MESHLIB_ETCD_CACERT"
ENV_CERT = "MESHLIB_ETCD_CERT"
ENV_KEY = "MESHLIB_ETCD_KEY"

#: etcd's messages for a token it no longer accepts (etcdserver/api/v3rpc/rpctypes).
TOKEN_ERRORS = ("invalid auth token", "auth token is expired", "revision of auth store is old")


@dataclass(frozen=True)
class EtcdAuth:
    """How to authenticate to etcd: user/password, TLS files, or nothing."""

    user: str | None = None
    password: str | None = None
    ca_cert: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    refresh_after: float = 240.0
    #: a stream (re)opened with an older token gets a fresh one first; streams open at start
    #: and after failures only, and the watch manager's reopen backoff (<= 1 s) bounds the rate
    stream_refresh_after: float = 10.0

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ValueError("etcd auth: give both a user and a password (or neither)")
        if (self.cert is None) != (self.key is None):
            raise ValueError("etcd auth: a client certificate needs its key (cert and key)")

    @property
    def tls(self) -> bool:
        return self.ca_cert is not None or self.cert is not None

    @classmethod
    def from_env(cls, environ: Any = None) -> EtcdAuth:
        env = os.environ if environ is None else environ
        password = env.get(ENV_PASSWORD)
        if password is None and env.get(ENV_PASSWORD_FILE):
            password = _read(env[ENV_PASSWORD_FILE], ENV_PASSWORD_FILE).decode().strip()
        user = env.get(ENV_USER) or None
        return cls(
            user=user,
            password=password if user else None,
            ca_cert=_read(env[ENV_CACERT], ENV_CACERT) if env.get(ENV_CACERT) else None,
            cert=_read(env[ENV_CERT], ENV_CERT) if env.get(ENV_CERT) else None,
            key=_read(env[ENV_KEY], ENV_KEY) if env.get(ENV_KEY) else None,
        )

    @classmethod
    def from_files(
        cls,
        *,
        user: str | None = None,
        password: str | None = None,
        ca_cert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> EtcdAuth:
        return cls(
            user=user,
            password=password,
            ca_cert=_read(ca_cert, "ca_cert") if ca_cert else None,
            cert=_read(cert, "cert") if cert else None,
            key=_read(key, "key") if key else None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert, private_key=self.key, certificate_chain=self.cert
        )

    def __repr__(self) -> str:  # never print the password
        return (f"EtcdAuth(user={self.user!r}, password={'***' if self.password else None}, "
                f"tls={self.tls}, client_cert={self.cert is not None})")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"etcd auth: {what} file {path!r}: {e.strerror}") from None


class TokenAuth:
    """Holds the current token for one user; fetched and refreshed through ``raw_channel``."""

    def __init__(self, raw_channel: grpc.Channel, user: str, password: str, refresh_after: float,
                 timeout: float, stream_refresh_after: float = 10.0) -> None:
        self._stub = rpc_pb2_grpc.AuthStub(raw_channel)
        self._user = user
        self._password = password
        self._refresh_after = refresh_after
        self.stream_refresh_after = stream_refresh_after
        self._timeout = timeout
        self._lock = threading.Lock()
        self._token: str | None = None
        self._at = 0.0
        self.authentications = 0

    def token(self, max_age: float | None = None) -> str:
        """The current token, fetched again when none, or older than ``max_age`` (default
        ``refresh_after``)."""
        limit = self._refresh_after if max_age is None else min(max_age, self._refresh_after)
        with self._lock:
            if self._token is None or time.monotonic() - self._at > limit:
                self._authenticate()
            assert self._token is not None
            return self._token

    def invalidate(self, token: str | None = None) -> None:
        """Forget ``token`` (or the current one): the next call authenticates again."""
        with self._lock:
            if token is None or token == self._token:
                self._token = None

    def _authenticate(self) -> None:
        req = rpc_pb2.AuthenticateRequest(name=self._user, password=self._password)
        try:
            resp = self._stub.Authenticate(req, timeout=self._timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise  # the caller's retry loop handles an unreachable etcd
            from .etcd_client import EtcdAuthError

            raise EtcdAuthError(
                f"etcd authenticate as {self._user!r}: {code.name if code else 'UNKNOWN'}: "
                f"{details} (check MESHLIB_ETCD_USER / MESHLIB_ETCD_PASSWORD and that etcd has "
                "this user: etcdctl user get NAME)"
            ) from e
        self._token = resp.token
        self._at = time.monotonic()
        self.authentications += 1


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``token: <current token>`` to the metadata of every call on a channel."""

    def __init__(self, auth: TokenAuth) -> None:
        self._auth = auth

    def _details(
        self, d: grpc.ClientCallDetails, max_age: float | None = None
    ) -> grpc.ClientCallDetails:
        metadata = [*(d.metadata or ()), ("token", self._auth.token(max_age))]
        return _CallDetails(
            d.method, d.timeout, metadata, d.credentials,
            getattr(d, "wait_for_ready", None), getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        # Watch and LeaseKeepAlive: long-lived, authorised by the token they open with
        return continuation(
            self._details(details, self._auth.stream_refresh_after), request_iterator
        )


def is_token_error(e: grpc.RpcError) -> bool:
    details = (e.details() if hasattr(e, "details") else str(e)) or ""
    return any(t in details for t in TOKEN_ERRORS)
