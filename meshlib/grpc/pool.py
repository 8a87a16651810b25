"""One gRPC channel per endpoint, created on first use and closed when the endpoint leaves.

gRPC interceptors cannot change a call's target channel, so client-side balancing over
discovered endpoints needs one channel per endpoint and a pick before the call (as gRPC's
own ``pick_first`` subchannels, or Finagle's per-endpoint services). Each channel is a plain
``grpc.insecure_channel`` / ``grpc.aio.insecure_channel`` to ``host:port`` with grpcio's own
retries disabled (``grpc.enable_retries`` 0): the mesh retries, and two retry layers would
multiply attempts (field notes).

Lifecycle: channels are created lazily by the call path (an aio channel must be created on
its event loop) and retired from the discovery watch thread (``Mesh.add_listener``) when their
endpoint leaves the snapshot. A retired channel is closed after ``drain_timeout`` seconds so
calls in flight on it can finish (sync grpcio has no graceful close; ``grpc.aio``'s
``close(grace)`` waits for them). Every retirement bumps ``generation``, which tells the
multicallables to drop their cached per-endpoint callables (one integer compare per call).

Mesh mTLS (docs/mtls.md): with an identity (``identity=`` or ``mesh.identity``), an endpoint
gets a ``grpc.secure_channel`` when :func:`meshlib.core.mtls.use_tls` says so for the
destination's live ``mtls.mode`` and the endpoint's ``tls`` record field. Its credentials are
``grpc.ssl_channel_credentials`` with the trust bundle, our chain and key; the server is
verified by its certificate's DNS SAN, which mesh certificates set to the service name next to
the SPIFFE URI SAN (``grpc.ssl_target_name_override`` = the service: grpcio's client has no
hook to check a URI SAN, and the signer only issues a leaf whose DNS SAN and SPIFFE ID name the
same service). grpcio cannot change a channel's credentials, so a rotation makes new channels
with the new credentials and drains the old ones as above (calls in flight finish on them);
a change of mode or of an endpoint's ``tls`` field does the same for the endpoints concerned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from meshlib.core.endpoints import Endpoint, ServiceSnapshot
from meshlib.core.mtls import MtlsRefused, use_tls
from meshlib.tls import count_refusal

if TYPE_CHECKING:
    from meshlib.ports import MeshPort

log = logging.getLogger("meshlib.grpc")

NO_RETRIES: tuple[str, int] = ("grpc.enable_retries", 0)


def channel_options(options: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """User channel arguments with grpcio's retries forced off."""
    opts = [o for o in (options or ()) if o[0] != NO_RETRIES[0]]
    opts.append(NO_RETRIES)
    return opts


class ChannelPool:
    """Per-endpoint channels of one destination service (``aio`` selects grpc.aio)."""

    def __init__(
        self,
        mesh: MeshPort,
        service: str,
        *,
        options: Sequence[tuple[str, Any]] | None = None,
        compression: grpc.Compression | None = None,
        aio: bool = False,
        drain_timeout: float = 30.0,
        identity: Any = None,
    ) -> None:
        self.service = service
        self.aio = aio
        self.drain_timeout = drain_timeout
        self._options = channel_options(options)
        self._compression = compression
        self._channels: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._retiring: dict[threading.Timer, Any] = {}
        self.generation = 0
        self.opened = 0
        self._source = identity if identity is not None else getattr(mesh, "identity", None)
        self._creds: Any = None  # grpc.ChannelCredentials of the current identity
        self._secure: set[str] = set()  # keys of the endpoints with a secure channel
        self._unsubscribe: Callable[[], None] | None = None
        if self._source is not None:
            self._creds = _channel_credentials(self._source.current())
            self._unsubscribe = self._source.subscribe(self._rotated)
        snap = mesh.snapshot(service)
        self._mode = snap.policy.mtls.mode
        self._tls_eps = frozenset(e.key for e in snap.endpoints if e.tls)
        self._remove_listener: Callable[[], None] | None = mesh.add_listener(self._on_snapshot)

    # --- call path --------------------------------------------------------------------
    def channel(self, ep: Endpoint) -> Any:
        """The endpoint's channel (created on first use; secure when mesh mTLS applies)."""
        ch = self._channels.get(ep.key)
        if ch is not None:
            return ch
        with self._lock:
            ch = self._channels.get(ep.key)
            if ch is None:
                if self._closed:
                    raise RuntimeError(f"gRPC channel to service {self.service!r} is closed")
                if self.aio:
                    self._loop = asyncio.get_running_loop()
                creds = self._credentials_for(ep)
                mod: Any = grpc.aio if self.aio else grpc
                if creds is None:
                    ch = mod.insecure_channel(ep.authority, options=self._options,
                                              compression=self._compression)
                else:
                    opts = [*self._options, ("grpc.ssl_target_name_override", self.service)]
                    ch = mod.secure_channel(ep.authority, creds, options=opts,
                                            compression=self._compression)
                    self._secure.add(ep.key)
                self._channels[ep.key] = ch
                self.opened += 1
        return ch

    def _credentials_for(self, ep: Endpoint) -> Any:
        """Channel credentials when the endpoint is called with mesh mTLS, else None; a
        strict destination without an identity raises (a ``RuntimeError`` naming why)."""
        try:
            on = use_tls(self._mode, ep.tls, self._creds is not None)
        except MtlsRefused as exc:
            count_refusal("client", exc.reason)
            raise RuntimeError(f"gRPC service {self.service!r}: {exc}") from None
        return self._creds if on else None

    def _rotated(self, creds: Any) -> None:
        """A new identity (source thread): new credentials; secure channels are replaced
        (the old ones drain, see the module docstring)."""
        new = _channel_credentials(creds)
        with self._lock:
            self._creds = new
        self._retire(lambda key: True, secure_only=True)

    def _retire(self, which: Callable[[str], bool], *, secure_only: bool = False) -> None:
        with self._lock:
            gone = [(k, ch) for k, ch in self._channels.items()
                    if which(k) and (not secure_only or k in self._secure)]
            for k, _ in gone:
                del self._channels[k]
                self._secure.discard(k)
            self.generation += 1
        for _key, ch in gone:
            self._close_later(ch)

    def keys(self) -> list[str]:
        return list(self._channels)

    # --- discovery (watch thread) -----------------------------------------------------
    def _on_snapshot(self, service: str, snap: ServiceSnapshot) -> None:
        if service != self.service:
            return
        self.retain({e.key for e in snap.endpoints})
        mode = snap.policy.mtls.mode
        tls_eps = frozenset(e.key for e in snap.endpoints if e.tls)
        if mode != self._mode or tls_eps != self._tls_eps:
            changed = tls_eps ^ self._tls_eps
            all_changed = mode != self._mode
            self._mode, self._tls_eps = mode, tls_eps
            self._retire(lambda key: all_changed or key in changed)

    def retain(self, alive: set[str]) -> None:
        """Retire the channels of endpoints not in ``alive``."""
        with self._lock:
            gone = [(k, ch) for k, ch in self._channels.items() if k not in alive]
            for k, _ in gone:
                del self._channels[k]
                self._secure.discard(k)
            if gone:
                self.generation += 1
        for key, ch in gone:
            log.debug("service %r: endpoint %s left; closing its channel in %.1fs",
                      self.service, key, self.drain_timeout)
            self._close_later(ch)

    def _close_later(self, ch: Any) -> None:
        if self.aio:
            loop = self._loop
            if loop is None or loop.is_closed():
                return
            grace = self.drain_timeout
            with contextlib.suppress(RuntimeError):  # loop already stopped
                loop.call_soon_threadsafe(lambda: loop.create_task(ch.close(grace)))
            return
        timer = threading.Timer(self.drain_timeout, self._close_now, (ch,))
        timer.daemon = True
        with self._lock:
            self._retiring[timer] = ch
        timer.start()

    def _close_now(self, ch: Any) -> None:
        with self._lock:
            self._retiring = {t: c for t, c in self._retiring.items() if c is not ch}
        ch.close()

    # --- lifecycle ----------------------------------------------------------------------
    def _take_all(self) -> list[Any]:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        with self._lock:
            self._closed = True
            chans = list(self._channels.values())
            self._channels.clear()
            self.generation += 1
        return chans

    def close(self) -> None:
        """Close every channel now (sync pool)."""
        with self._lock:
            retiring, self._retiring = self._retiring, {}
        for t, ch in retiring.items():
            t.cancel()
            ch.close()
        for ch in self._take_all():
            ch.close()

    async def aclose(self, grace: float | None = None) -> None:
        """Close every channel (aio pool), letting calls finish for ``grace`` seconds."""
        for ch in self._take_all():
            await ch.close(grace)


def _channel_credentials(creds: Any) -> Any:
    return grpc.ssl_channel_credentials(
        root_certificates=creds.trust_bundle_pem, private_key=creds.private_key_pem,
        certificate_chain=creds.cert_chain_pem)
