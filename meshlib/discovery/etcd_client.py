"""A small, thread-safe etcd v3 client built on the generated gRPC stubs only.

Why not ``python3-etcd3``'s client: its watch thread dies with ``NameError`` when etcd goes
away and its failover shuns every member for 300 s after an election (see the project field
notes). meshlib uses just its generated protobuf/gRPC code (``etcd3.etcdrpc``) and owns the
connection, retry and failover logic here.

Connection (gRPC name resolution and load-balancing docs, gRPC A6 for why retries are off):

* One ``grpc`` channel over *all* members, target ``ipv4:A,B,C`` (or ``ipv6:``/``dns:``), with the
  ``round_robin`` policy. Each member gets a subchannel; a dead member's subchannel goes to
  TRANSIENT_FAILURE and is skipped, so a call lands on a live member without any client-side
  shunning. Reconnect backoff is capped at 1 s, so a restarted member is used again within about
  a second. HTTP/2 keepalive pings (10 s, 3 s timeout) detect a silent partition; etcd's default
  ``--grpc-keepalive-min-time`` is 5 s, so 10 s is not treated as abuse.
* gRPC's own retries are disabled (``grpc.enable_retries=0``); the application retry loop below is
  the only one, so attempts do not multiply.
* Long-lived streams (the Watch stream, the LeaseKeepAlive stream) are *placed* on one endpoint
  each, through a per-endpoint channel (:meth:`EtcdClient.stream_channel`), instead of being left to
  round robin: a SIGSTOPped member or proxy keeps its TCP connection and its subchannel stays
  READY, so round robin could put the replacement of a silent stream right back on it. When a
  stream user finds its stream dead or silent it calls :meth:`EtcdClient.stream_failed`, which
  moves the shared position to the next endpoint (once per failure, however many streams noticed
  it). The first position is random, so the clients of a fleet spread over the proxies.

Unary calls: each call has a total budget (``timeout``). An attempt that fails with UNAVAILABLE
(member down, "no leader", "leader changed") or runs out its per-attempt deadline is retried after a
short backoff (25 ms doubling to 250 ms, Envoy's defaults) while budget remains; round robin sends
the next attempt to another member. When the budget is spent, :class:`EtcdUnavailable` names the
endpoints and the last gRPC status. A write whose connection broke after etcd applied it is
applied again by the retry (etcd's history then shows it at two revisions); meshlib's writes
(records, policies) are idempotent by value, so this is accepted rather than failing the call.

Authentication (user/password with token refresh, TLS client certificates) is in
:mod:`meshlib.discovery.etcd_auth`: every channel is made by :meth:`EtcdClient._new_channel`, which
adds TLS and a token interceptor when configured, so streams get them too; a unary call whose
token etcd no longer accepts re-authenticates and is retried once.

Prefix reads follow the etcd API docs: the range end of a prefix is the prefix with its last byte
incremented (trailing 0xff bytes dropped first; an empty prefix means "all keys", range end
``\\0``). Large prefixes are paged with ``limit``; every page after the first is read at the first
page's header revision, so the whole result is one consistent snapshot at that revision.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar

import grpc
from etcd3.etcdrpc import kv_pb2, rpc_pb2, rpc_pb2_grpc

from .etcd_auth import EtcdAuth, TokenAuth, TokenInterceptor, is_token_error

log = logging.getLogger("meshlib.discovery")

T = TypeVar("T")

_SERVICE_CONFIG = '{"loadBalancingConfig": [{"round_robin": {}}]}'

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    # etcd refuses pings on a connection without an active call (GOAWAY too_many_pings)
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]

#: Per-endpoint channels carry long-lived streams only: default pick_first, the same keepalive.
STREAM_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    o for o in CHANNEL_OPTIONS if o[0] != "grpc.service_config"
]

_RETRY_BASE = 0.025
_RETRY_MAX = 0.25
_MIN_ATTEMPT = 1.0


class EtcdError(Exception):
    """Any failure talking to etcd."""


class EtcdUnavailable(EtcdError):
    """No member answered within the call's timeout."""


class EtcdAuthError(EtcdError):
    """etcd refused the credentials, or the user lacks the permission for a key."""


class EtcdCompacted(EtcdError):
    """The requested revision has been compacted away."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class LeaseNotFound(EtcdError):
    """The lease does not exist (expired or revoked)."""


@dataclass(frozen=True, slots=True)
class KV:
    """One key-value pair as etcd stores it."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


class Event(NamedTuple):
    """One watch event: ``("put", kv)`` or ``("delete", kv)`` (a delete's value is empty)."""

    type: Literal["put", "delete"]
    kv: KV


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    id: int
    ttl: int
    granted_ttl: int
    keys: tuple[str, ...]


def _b(s: str | bytes) -> bytes:
    return s.encode("utf-8") if isinstance(s, str) else s


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd ``--prefix``)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)


def kv_from_pb(kv: kv_pb2.KeyValue) -> KV:
    return KV(
        key=kv.key.decode("utf-8", "surrogateescape"),
        value=bytes(kv.value),
        mod_revision=kv.mod_revision,
        create_revision=kv.create_revision,
        version=kv.version,
        lease=kv.lease,
    )


def event_from_pb(ev: kv_pb2.Event) -> Event:
    kind: Literal["put", "delete"] = "delete" if ev.type == kv_pb2.Event.DELETE else "put"
    return Event(kind, kv_from_pb(ev.kv))


def parse_endpoints(endpoints: Iterable[str] | str) -> list[tuple[str, int]]:
    """``["http://127.0.0.1:2379", "[::1]:2379", "etcd-a:2379"]`` -> ``[(host, port), ...]``."""
    if isinstance(endpoints, str):
        items = [e for e in (p.strip() for p in endpoints.split(",")) if e]
    else:
        items = [e.strip() for e in endpoints if e and e.strip()]
    if not items:
        raise ValueError("etcd endpoints: empty list (expected e.g. '127.0.0.1:2379')")
    out: list[tuple[str, int]] = []
    for raw in items:
        e = raw
        for scheme in ("https://", "http://"):  # https: TLS, see EtcdClient(auth=...)
            if e.startswith(scheme):
                e = e[len(scheme):]
        e = e.rstrip("/")
        if e.startswith("["):
            host, sep, rest = e[1:].partition("]")
            port_s = rest[1:] if rest.startswith(":") else ""
            if not sep:
                raise ValueError(f"etcd endpoint {raw!r}: unterminated IPv6 literal")
        else:
            host, _, port_s = e.rpartition(":")
            if not host:
                host, port_s = e, ""
        port = 2379
        if port_s:
            try:
                port = int(port_s)
            except ValueError:
                raise ValueError(f"etcd endpoint {raw!r}: port {port_s!r} is not a number") from None
        if not host or not 0 < port < 65536:
            raise ValueError(f"etcd endpoint {raw!r}: expected host:port")
        out.append((host, port))
    return out


def _ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def grpc_target(hosts: list[tuple[str, int]]) -> str:
    """Build one gRPC target naming every member.

    IP literals use the static ``ipv4:``/``ipv6:`` resolvers (gRPC naming doc). A single hostname
    uses ``dns:`` (re-resolved by gRPC). Several hostnames are resolved once here, because the
    ``dns:`` scheme names one host only.
    """
    if len(hosts) == 1 and _ip_version(hosts[0][0]) is None:
        return f"dns:///{hosts[0][0]}:{hosts[0][1]}"
    v4: list[str] = []
    v6: list[str] = []
    for host, port in hosts:
        ver = _ip_version(host)
        if ver == 4:
            v4.append(f"{host}:{port}")
        elif ver == 6:
            v6.append(f"[{host}]:{port}")
        else:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            for fam, _, _, _, sa in infos:
                if fam == socket.AF_INET:
                    v4.append(f"{sa[0]}:{port}")
                elif fam == socket.AF_INET6:
                    v6.append(f"[{sa[0]}]:{port}")
    v4 = list(dict.fromkeys(v4))
    v6 = list(dict.fromkeys(v6))
    if v4:
        if v6:
            log.warning("etcd endpoints mix IPv4 and IPv6; using the IPv4 ones only: %s", v4)
        return "ipv4:" + ",".join(v4)
    if v6:
        return "ipv6:" + ",".join(v6)
    raise ValueError(f"etcd endpoints {hosts}: no address could be resolved")


class RequestQueue(queue.Queue[Any]):
    """The request side of a bidirectional stream: ``put`` messages, ``end()`` to finish.

    Iterating it (grpc does, from its own thread) yields what was put until ``end()``, so that
    thread never blocks past the stream's end."""

    def end(self) -> None:
        self.put(None)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self.get()
            if item is None:
                return
            yield item


class EtcdClient:
    """Thread-safe etcd v3 client over one round-robin gRPC channel.

    >>> with EtcdClient("127.0.0.1:2379") as c:          # doctest: +SKIP
    ...     c.put("/a", b"1")
    ...     c.get("/a")
    (b'1', 7)
    """

    def __init__(
        self, endpoints: Iterable[str] | str, *, timeout: float = 5.0, auth: EtcdAuth | None = None
    ) -> None:
        self.hosts = parse_endpoints(endpoints)
        raw_list = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        #: credentials: given, else from MESHLIB_ETCD_* (etcd_auth); https:// endpoints mean TLS
        self.auth = auth if auth is not None else EtcdAuth.from_env()
        self.tls = self.auth.tls or any("https://" in e for e in raw_list)
        self._token_auth: TokenAuth | None = None
        self.endpoints = [
            f"[{h}]:{p}" if _ip_version(h) == 6 else f"{h}:{p}" for h, p in self.hosts
        ]
        self.timeout = float(timeout)
        self.target = grpc_target(self.hosts)
        self.channel = self._new_channel(self.target, CHANNEL_OPTIONS)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.watch_stub = rpc_pb2_grpc.WatchStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.maintenance = rpc_pb2_grpc.MaintenanceStub(self.channel)
        self._closed = threading.Event()
        self._stream_lock = threading.Lock()
        self._stream_channels: dict[str, grpc.Channel] = {}
        self._stream_pos = random.randrange(len(self.endpoints))
        self._keepalive: Any = None  # KeepAliveStream, created on the first keepalive

    # ------------------------------------------------------------------ plumbing
    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            if self._keepalive is not None:
                self._keepalive.close()
            with self._stream_lock:
                channels = list(self._stream_channels.values())
                self._stream_channels.clear()
            for ch in channels:
                ch.close()
            self.channel.close()

    def _new_channel(self, target: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        """A channel to ``target``: TLS when configured, with the token interceptor when a user
        is configured (the token is fetched through the first channel made, uninterceptable)."""
        if self.tls:
            opts = [*options, ("grpc.ssl_target_name_override", self.hosts[0][0])]
            raw = grpc.secure_channel(target, self.auth.channel_credentials(), options=opts)
        else:
            raw = grpc.insecure_channel(target, options=options)
        if self.auth.user is None or self.auth.password is None:
            return raw
        if self._token_auth is None:
            self._token_auth = TokenAuth(
                raw, self.auth.user, self.auth.password, self.auth.refresh_after, self.timeout,
                self.auth.stream_refresh_after,
            )
        return grpc.intercept_channel(raw, TokenInterceptor(self._token_auth))

    # ------------------------------------------------------------------ stream placement
    @property
    def stream_endpoint(self) -> str:
        """The endpoint new long-lived streams are opened on."""
        return self.endpoints[self._stream_pos]

    def stream_channel(self) -> tuple[grpc.Channel, str]:
        """``(channel, endpoint)`` for a new long-lived stream: the current stream endpoint."""
        with self._stream_lock:
            if self._closed.is_set():
                raise EtcdError("etcd stream: client is closed")
            endpoint = self.endpoints[self._stream_pos]
            ch = self._stream_channels.get(endpoint)
            if ch is None:
                ch = self._new_channel(
                    grpc_target([self.hosts[self._stream_pos]]), STREAM_CHANNEL_OPTIONS
                )
                self._stream_channels[endpoint] = ch
            return ch, endpoint

    def stream_failed(self, endpoint: str, *, silent: bool = False) -> str:
        """A stream on ``endpoint`` ended or went silent: move on to the next endpoint.

        Only moves when ``endpoint`` is still the current one, so two streams noticing the same
        failure skip one endpoint, not two. Returns the endpoint new streams now use.
        """
        with self._stream_lock:
            if len(self.endpoints) > 1 and self.endpoints[self._stream_pos] == endpoint:
                self._stream_pos = (self._stream_pos + 1) % len(self.endpoints)
                log.log(
                    logging.WARNING if silent else logging.DEBUG,
                    "etcd: %s %s; long-lived streams move to %s",
                    endpoint, "is silent" if silent else "ended a stream",
                    self.endpoints[self._stream_pos],
                )
            current = self.endpoints[self._stream_pos]
        ka = self._keepalive
        if silent and ka is not None and current != endpoint:
            # A hung endpoint found by one stream: the keepalive stream leaves it too, now,
            # rather than after its own unanswered keepalive (TTL/3 + 1 s later).
            ka.abandon(endpoint)
        return current

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __repr__(self) -> str:
        return f"EtcdClient({','.join(self.endpoints)!r})"

    def _call(
        self, op: str, what: str, fn: Callable[[float], T], timeout: float | None = None
    ) -> T:
        """Run ``fn(attempt_timeout)`` with the retry loop described in the module docstring."""
        if self._closed.is_set():
            raise EtcdError(f"etcd {op} {what}: client is closed")
        budget = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + budget
        slice_ = max(_MIN_ATTEMPT, budget / 2)
        delay = _RETRY_BASE
        last: grpc.RpcError | None = None
        reauthenticated = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return fn(min(remaining, slice_))
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    if self._closed.is_set():
                        raise EtcdError(f"etcd {op} {what}: client is closed") from e
                    last = e
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    time.sleep(min(delay, remaining))
                    delay = min(delay * 2, _RETRY_MAX)
                    continue
                if self._token_auth is not None and not reauthenticated and is_token_error(e):
                    # etcd dropped our token (expired, or etcd restarted): log in again, once
                    log.info("etcd %s %s: auth token refused (%s); authenticating again",
                             op, what, e.details() if hasattr(e, "details") else e)
                    self._token_auth.invalidate()
                    reauthenticated = True
                    continue
                raise self._translate(op, what, e) from e
        code_name, details = "DEADLINE_EXCEEDED", "no attempt made"
        if last is not None:
            code = last.code() if hasattr(last, "code") else None
            code_name = code.name if code is not None else "UNKNOWN"
            details = last.details() if hasattr(last, "details") else str(last)
        raise EtcdUnavailable(
            f"etcd {op} {what}: no member of [{', '.join(self.endpoints)}] answered within "
            f"{budget:g}s; last gRPC status {code_name}: {details}"
        ) from last

    @staticmethod
    def _translate(op: str, what: str, e: grpc.RpcError) -> EtcdError:
        code = e.code() if hasattr(e, "code") else None
        details = (e.details() if hasattr(e, "details") else str(e)) or ""
        msg = f"etcd {op} {what}: {code.name if code else 'UNKNOWN'}: {details}"
        if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
            return EtcdCompacted(msg)
        if code == grpc.StatusCode.NOT_FOUND and "lease" in details:
            return LeaseNotFound(msg)
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED) or (
            code == grpc.StatusCode.INVALID_ARGUMENT and "user name" in details
        ):
            return EtcdAuthError(
                msg + " (etcd authentication is on: set MESHLIB_ETCD_USER/MESHLIB_ETCD_PASSWORD or "
                "a client certificate, and grant the user's role this key: "
                "etcdctl role grant-permission ROLE readwrite --prefix KEY)"
            )
        return EtcdError(msg)

    # ------------------------------------------------------------------ KV
    def get(self, key: str, *, timeout: float | None = None) -> tuple[bytes, int] | None:
        """``(value, mod_revision)`` of ``key``, or None when it does not exist."""
        req = rpc_pb2.RangeRequest(key=_b(key))
        resp = self._call("get", repr(key), lambda t: self.kv.Range(req, timeout=t), timeout)
        if not resp.kvs:
            return None
        return bytes(resp.kvs[0].value), resp.kvs[0].mod_revision

    def get_prefix(
        self,
        prefix: str,
        *,
        keys_only: bool = False,
        page_size: int = 500,
        timeout: float | None = None,
    ) -> tuple[list[KV], int]:
        """Every key under ``prefix`` (sorted by key) and the revision the whole read is at."""
        start = _b(prefix) if prefix else b"\0"
        end = prefix_range_end(_b(prefix))
        for _attempt in range(3):
            try:
                return self._read_range(prefix, start, end, keys_only, page_size, timeout)
            except EtcdCompacted:
                # Compaction raced with the later pages: read again at a newer revision.
                log.info("etcd get_prefix %r: revision compacted between pages, rereading", prefix)
        return self._read_range(prefix, start, end, keys_only, page_size, timeout)

    def _read_range(
        self,
        prefix: str,
        start: bytes,
        end: bytes,
        keys_only: bool,
        page_size: int,
        timeout: float | None,
    ) -> tuple[list[KV], int]:
        out: list[KV] = []
        revision = 0
        key = start
        while True:
            req = rpc_pb2.RangeRequest(
                key=key, range_end=end, limit=page_size, revision=revision, keys_only=keys_only
            )
            resp = self._call("get_prefix", repr(prefix), self._range_fn(req), timeout)
            if revision == 0:
                revision = resp.header.revision
            out.extend(kv_from_pb(kv) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return out, revision
            key = bytes(resp.kvs[-1].key) + b"\0"

    def _range_fn(self, req: rpc_pb2.RangeRequest) -> Callable[[float], Any]:
        return lambda t: self.kv.Range(req, timeout=t)

    def put(self, key: str, value: bytes | str, lease: int = 0, *, timeout: float | None = None) -> int:
        """Store ``value`` at ``key`` (attached to ``lease`` when non-zero); returns the revision."""
        req = rpc_pb2.PutRequest(key=_b(key), value=_b(value), lease=lease)
        resp = self._call("put", repr(key), lambda t: self.kv.Put(req, timeout=t), timeout)
        return resp.header.revision

    def put_if_absent(
        self, key: str, value: bytes | str, lease: int = 0, *, timeout: float | None = None
    ) -> bool:
        """Create ``key`` only if it does not exist (a txn on create_revision == 0)."""
        k = _b(key)
        req = rpc_pb2.TxnRequest(
            compare=[
                rpc_pb2.Compare(
                    result=rpc_pb2.Compare.EQUAL,
                    target=rpc_pb2.Compare.CREATE,
                    key=k,
                    create_revision=0,
                )
            ],
            success=[
                rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k, value=_b(value), lease=lease))
            ],
        )
        resp = self._call("put_if_absent", repr(key), lambda t: self.kv.Txn(req, timeout=t), timeout)
        return bool(resp.succeeded)

    def delete(self, key: str, *, timeout: float | None = None) -> int:
        req = rpc_pb2.DeleteRangeRequest(key=_b(key))
        resp = self._call("delete", repr(key), lambda t: self.kv.DeleteRange(req, timeout=t), timeout)
        return resp.deleted

    def delete_prefix(self, prefix: str, *, timeout: float | None = None) -> int:
        req = rpc_pb2.DeleteRangeRequest(
            key=_b(prefix) if prefix else b"\0", range_end=prefix_range_end(_b(prefix))
        )
        resp = self._call(
            "delete_prefix", repr(prefix), lambda t: self.kv.DeleteRange(req, timeout=t), timeout
        )
        return resp.deleted

    def compact(self, revision: int, *, physical: bool = False, timeout: float | None = None) -> None:
        req = rpc_pb2.CompactionRequest(revision=revision, physical=physical)
        with contextlib.suppress(EtcdCompacted):  # already compacted at or past this revision
            self._call(
                "compact", f"revision {revision}", lambda t: self.kv.Compact(req, timeout=t), timeout
            )

    def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Maintenance.Status of the member the channel picks for this call."""
        req = rpc_pb2.StatusRequest()
        r = self._call("status", "", lambda t: self.maintenance.Status(req, timeout=t), timeout)
        return {
            "version": r.version,
            "db_size": r.dbSize,
            "leader": r.leader,
            "member_id": r.header.member_id,
            "cluster_id": r.header.cluster_id,
            "revision": r.header.revision,
            "raft_index": r.raftIndex,
            "raft_term": r.raftTerm,
        }

    # ------------------------------------------------------------------ leases
    def lease_grant(self, ttl: int, *, timeout: float | None = None) -> tuple[int, int]:
        """Grant a lease; returns ``(lease_id, granted_ttl)``."""
        req = rpc_pb2.LeaseGrantRequest(TTL=int(ttl))
        r = self._call(
            "lease_grant", f"ttl {ttl}", lambda t: self.lease.LeaseGrant(req, timeout=t), timeout
        )
        if r.error:
            raise EtcdError(f"etcd lease_grant ttl {ttl}: {r.error}")
        return r.ID, r.TTL

    def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> None:
        req = rpc_pb2.LeaseRevokeRequest(ID=lease_id)
        self._call(
            "lease_revoke", f"lease {lease_id:x}", lambda t: self.lease.LeaseRevoke(req, timeout=t),
            timeout,
        )

    def lease_keepalive_once(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Send one keepalive on the client's long-lived keepalive stream; returns the TTL.

        Raises :class:`LeaseNotFound` if the lease is gone and :class:`EtcdUnavailable` when no
        answer came within ``timeout`` (see :mod:`meshlib.discovery.keepalive`).
        """
        ka = self._keepalive
        if ka is None:
            from .keepalive import KeepAliveStream

            with self._stream_lock:
                if self._keepalive is None:
                    self._keepalive = KeepAliveStream(self)
                ka = self._keepalive
        return int(ka.keepalive(lease_id, self.timeout if timeout is None else float(timeout)))

    def lease_time_to_live(
        self, lease_id: int, *, keys: bool = False, timeout: float | None = None
    ) -> LeaseInfo:
        req = rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id, keys=keys)
        r = self._call(
            "lease_time_to_live", f"lease {lease_id:x}",
            lambda t: self.lease.LeaseTimeToLive(req, timeout=t), timeout,
        )
        if r.TTL < 0:
            raise LeaseNotFound(f"etcd lease_time_to_live lease {lease_id:x}: lease not found")
        return LeaseInfo(
            id=r.ID, ttl=r.TTL, granted_ttl=r.grantedTTL,
            keys=tuple(k.decode("utf-8", "surrogateescape") for k in r.keys),
        )
