"""The shim's configuration: one table of options read from flags, environment and a file.

Every option is declared once in :data:`OPTIONS` (flag, type, default, help); from that table
come the ``--help`` text, the environment variable (``MESHLIB_SHIM_`` + the flag in upper
case with ``_``: ``--admin-port`` -> ``MESHLIB_SHIM_ADMIN_PORT``), the key of the optional
YAML/JSON file (``--config FILE``; keys are the flag names, ``admin_port`` or
``admin-port``) and the reference table in docs/shim.md. Precedence, lowest first:
defaults, file, environment, flags (the usual twelve-factor order).

Bad input stops the shim at start (:class:`ConfigError`) with a message naming where the
value came from (``--admin-port``, ``MESHLIB_SHIM_ADMIN_PORT`` or ``file.yaml: admin_port``),
the value and what is accepted; nothing is half-applied.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from meshlib.core.endpoints import Protocol
from meshlib.discovery.keys import check_service_name

ENV_PREFIX: Final = "MESHLIB_SHIM_"


class ConfigError(ValueError):
    """A bad flag, environment variable or file key (the message names it and the value)."""


@dataclass(frozen=True)
class UpstreamSpec:
    """One ``--upstream SERVICE=PORT``: a local gRPC port forwarding to mesh ``service``."""

    service: str
    port: int
    bind: str = "127.0.0.1"


@dataclass(frozen=True)
class ShimConfig:
    """The effective configuration (see :data:`OPTIONS` for each field's meaning)."""

    etcd: str | None = None
    prefix: str | None = None
    zone: str | None = None
    snapshot: str | None = None
    service: str | None = None
    app_port: int | None = None
    app_address: str = "127.0.0.1"
    protocol: Protocol = "http"
    labels: tuple[tuple[str, str], ...] = ()
    instance_id: str | None = None
    ttl: float = 10.0
    health: str = "auto"
    health_path: str = "/"
    health_interval: float = 1.0
    health_timeout: float = 1.0
    health_failures: int = 3
    health_passes: int = 1
    bind: str = "127.0.0.1"
    port: int = 15001
    admin_port: int = 15000
    inbound_port: int | None = None
    upstreams: tuple[UpstreamSpec, ...] = ()
    grpc_max_message_bytes: int = 64 * 1024 * 1024
    max_head_bytes: int = 60 * 1024
    max_header_fields: int = 100
    max_body_bytes: int = 0
    retry_body_bytes: int = 64 * 1024
    head_timeout: float = 10.0
    client_idle_timeout: float = 60.0
    upstream_idle_timeout: float = 4.0
    upstream_connect_timeout: float = 2.0
    max_idle_per_endpoint: int = 64
    drain_seconds: float = 5.0
    tracing: str = "passthrough"
    log_level: str = "info"
    identity: str = "off"
    trust_domain: str | None = None

    def own_ports(self) -> frozenset[int]:
        """Every port this shim listens on (refused as a destination: no proxy loops)."""
        ports = {self.port, self.admin_port}
        if self.inbound_port:
            ports.add(self.inbound_port)
        ports.update(u.port for u in self.upstreams)
        return frozenset(p for p in ports if p)

    def registers(self) -> bool:
        return bool(self.service and self.app_port)

    def inbound_tls(self) -> bool:
        """The inbound port accepts mesh mTLS (``--identity on``): the app is registered with
        ``"tls": true`` so that callers with an identity connect with TLS (docs/shim.md)."""
        return bool(self.inbound_port) and self.identity == "on"

    def health_kind(self) -> str:
        """The effective health check: ``auto`` = grpc for gRPC apps, http otherwise."""
        if self.health != "auto":
            return self.health
        return "grpc" if self.protocol == "grpc" else "http"

    def public(self) -> dict[str, Any]:
        """JSON-able view for ``/config``."""
        out: dict[str, Any] = {}
        for opt in OPTIONS:
            v = getattr(self, opt.field)
            if opt.field == "labels":
                v = dict(v)
            elif opt.field == "upstreams":
                v = [{"service": u.service, "port": u.port, "bind": u.bind} for u in v]
            out[opt.field] = v
        return out


# --------------------------------------------------------------------------- option table


def _port(text: str) -> int:
    n = int(text)
    if not 0 < n < 65536:
        raise ValueError("must be a TCP port 1-65535")
    return n


def _port_or_off(text: str) -> int | None:
    if text.strip().lower() in ("", "0", "off", "none"):
        return None
    return _port(text)


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError("must be an integer >= 1")
    return n


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024); 0 = no limit where allowed."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in "KMG":
        mult = 1024 ** ("KMG".index(t[-1]) + 1)
        t = t[:-1]
    n = int(t) * mult
    if n < 0:
        raise ValueError("must be >= 0")
    return n


def _seconds(text: str) -> float:
    from meshlib.config.durations import parse_duration

    v = parse_duration(text) if not _is_number(text) else float(text)
    if v < 0:
        raise ValueError("must be >= 0")
    return float(v)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        t = text.strip().lower()
        if t not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return t
    return parse


def _service(text: str) -> str:
    return check_service_name(text.strip())


def _address(text: str) -> str:
    t = text.strip()
    try:
        ipaddress.ip_address(t)
    except ValueError:
        if t != "localhost":
            raise ValueError("must be an IP address (127.0.0.1, 0.0.0.0, ::1)") from None
    return t


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"label {part!r} is not KEY=VALUE")
        out.append((k.strip(), v.strip()))
    return tuple(out)


def _upstreams(text: str) -> tuple[UpstreamSpec, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        svc, sep, port = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r} is not SERVICE=PORT")
        out.append(UpstreamSpec(_service(svc), _port(port)))
    return tuple(out)


@dataclass(frozen=True)
class Option:
    flag: str
    parse: Callable[[str], Any]
    help: str
    metavar: str = "VALUE"
    repeat: bool = False  # the flag may be given several times (values are joined with ",")
    attr: str | None = None  # the ShimConfig field, when it differs from the flag

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def field(self) -> str:
        return self.attr or self.dest

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


OPTIONS: Final[tuple[Option, ...]] = (
    # mesh
    Option("--etcd", str, "etcd endpoints, comma separated (else MESHLIB_ETCD_ENDPOINTS, "
           "else 127.0.0.1:2379)", "HOST:PORT,..."),
    Option("--prefix", str, "etcd key prefix (else MESHLIB_PREFIX, else /meshlib/v1)", "PREFIX"),
    Option("--zone", str, "this pod's zone: registered with the app, used for zone-aware "
           "balancing of its calls", "ZONE"),
    Option("--snapshot", str, "file where the shim keeps what it knows of the mesh, so that a "
           "shim restarted while etcd is down routes from it", "PATH"),
    # the app (registration)
    Option("--service", _service, "the app's mesh service name: registered when --app-port is "
           "given, and sent as x-mesh-caller on its calls", "NAME"),
    Option("--app-port", _port, "the port the app serves on (registered in etcd)", "PORT"),
    Option("--app-address", _address, "the address registered for the app (default "
           "127.0.0.1; a pod IP in Kubernetes)", "ADDR"),
    Option("--protocol", _choice("http", "grpc"), "the app's protocol: http (default) or grpc",
           "http|grpc"),
    Option("--labels", _labels, "labels registered with the app (repeatable)", "KEY=VALUE,...",
           repeat=True),
    Option("--instance-id", str, "instance id in etcd (default: address-port-random)", "ID"),
    Option("--ttl", _seconds, "lease TTL of the registration (default 10s)", "SECONDS"),
    Option("--health", _choice("auto", "http", "tcp", "grpc", "none"), "how the app is checked "
           "before and while it is registered: http GET of --health-path (2xx/3xx pass), tcp "
           "connect, grpc (grpc.health.v1), none; auto (default) = grpc for --protocol grpc, "
           "else http", "KIND"),
    Option("--health-path", str, "path of the http health check (default /)", "PATH"),
    Option("--health-interval", _seconds, "seconds between health checks (default 1)", "SECONDS"),
    Option("--health-timeout", _seconds, "timeout of one health check (default 1)", "SECONDS"),
    Option("--health-failures", _positive_int, "consecutive failed checks that deregister the "
           "app (default 3)", "N"),
    Option("--health-passes", _positive_int, "consecutive passed checks that register it again "
           "(default 1)", "N"),
    # listeners
    Option("--bind", _address, "address of every listener (default 127.0.0.1: loopback only; "
           "binding elsewhere exposes the proxy to the network)", "ADDR"),
    Option("--port", _port, "outbound HTTP port: the app calls http://SERVICE/ through it, by "
           "Host or as HTTP_PROXY (default 15001)", "PORT"),
    Option("--admin-port", _port, "admin port: /ready /live /metrics /config, POST /shutdown "
           "(default 15000)", "PORT"),
    Option("--inbound-port", _port_or_off, "optional inbound port in front of the app "
           "(server metrics, traces, access policy, deadline); default off", "PORT"),
    Option("--upstream", _upstreams, "a local gRPC port forwarding to a mesh service "
           "(repeatable)", "SERVICE=PORT", repeat=True, attr="upstreams"),
    Option("--grpc-max-message-bytes", _size, "largest gRPC message forwarded (default 64M)",
           "BYTES"),
    # limits
    Option("--max-head-bytes", _size, "largest request head (request line + fields) before "
           "431 (default 60K, Envoy's limit)", "BYTES"),
    Option("--max-header-fields", _positive_int, "most request header fields before 431 "
           "(default 100)", "N"),
    Option("--max-body-bytes", _size, "largest request body before 413 (default 0 = no limit)",
           "BYTES"),
    Option("--retry-body-bytes", _size, "request bodies up to this size are kept so that the "
           "request can be retried; larger ones stream and are never retried (default 64K, as "
           "Linkerd)", "BYTES"),
    Option("--head-timeout", _seconds, "seconds a client may take to send a request head "
           "(slowloris guard; default 10)", "SECONDS"),
    Option("--client-idle-timeout", _seconds, "idle keep-alive connections from the app are "
           "closed after this (default 60)", "SECONDS"),
    Option("--upstream-idle-timeout", _seconds, "idle upstream connections are closed after "
           "this; keep it below the servers' keep-alive timeout (default 4; Node.js: 5)",
           "SECONDS"),
    Option("--upstream-connect-timeout", _seconds, "connect timeout to an endpoint (default 2)",
           "SECONDS"),
    Option("--max-idle-per-endpoint", _positive_int, "idle upstream connections kept per "
           "endpoint (default 64)", "N"),
    # lifecycle and telemetry
    Option("--drain-seconds", _seconds, "after SIGTERM or POST /shutdown: deregister, then keep "
           "serving (answering Connection: close) this long, then exit (default 5)", "SECONDS"),
    Option("--tracing", _choice("passthrough", "on"), "on: the shim is a hop with its "
           "own spans (needs opentelemetry-sdk; OTLP export when "
           "opentelemetry-exporter-otlp is installed); passthrough (default): forward the "
           "caller's trace context unchanged", "MODE"),
    Option("--log-level", _choice("debug", "info", "warning", "error"), "log level "
           "(default info)", "LEVEL"),
    # identity (docs/security.md)
    Option("--identity", _choice("off", "on"), "on: get and rotate a mesh certificate for "
           "--service from `meshlib signer` through etcd; /ready reports a missing or nearly "
           "expired one (default off)", "on|off"),
    Option("--trust-domain", str, "SPIFFE trust domain of the mesh (else MESHLIB_TRUST_DOMAIN, "
           "else meshlib.local)", "DOMAIN"),
)

_BY_DEST: Final = {**{o.dest: o for o in OPTIONS}, **{o.field: o for o in OPTIONS}}


def build_parser(prog: str = "meshlib shim") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run beside a service in any language and give it the mesh: calls by "
        "name through a local HTTP port (Host routing or HTTP_PROXY) and gRPC upstream ports, "
        "registration with health checks, an admin port. Every flag can also be set as an "
        f"environment variable ({ENV_PREFIX}<FLAG>, e.g. {ENV_PREFIX}ADMIN_PORT) or as a key "
        "of --config FILE; flags win over the environment, which wins over the file.",
        epilog="See docs/shim.md.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options "
                   f"(keys = flag names; env {ENV_PREFIX}CONFIG)")
    p.add_argument("--wait", action="store_true", help="do not run a shim: wait until the shim "
                   "on --admin-port answers /ready, then exit 0 (or 1 after --wait-timeout)")
    p.add_argument("--wait-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long --wait waits (default 60)")
    for opt in OPTIONS:
        kw: dict[str, Any] = {"metavar": opt.metavar, "help": opt.help + f" [{opt.env}]",
                              "dest": opt.dest, "default": None}
        if opt.repeat:
            kw["action"] = "append"
        p.add_argument(opt.flag, **kw)
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- CMD ARGS: with --wait, run CMD once the shim is ready")
    return p


def _apply(values: dict[str, Any], opt: Option, raw: Any, where: str) -> None:
    text = ",".join(str(x) for x in raw) if isinstance(raw, list) else str(raw)
    try:
        values[opt.field] = opt.parse(text)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: bad value {text!r}: {exc}") from None


def _read_file(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"--config {path!r}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path!r}: not valid YAML/JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping of option: value, "
                          f"got {type(doc).__name__}")
    return doc


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                ) -> tuple[ShimConfig, argparse.Namespace]:
    """Parse flags, environment and file into a :class:`ShimConfig` (and the raw namespace,
    for ``--wait`` and the command)."""
    env = os.environ if env is None else env
    ns = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    cfg_file = ns.config or env.get(ENV_PREFIX + "CONFIG")
    if cfg_file:
        for key, raw in _read_file(cfg_file).items():
            opt = _BY_DEST.get(str(key).replace("-", "_"))
            if opt is None:
                raise ConfigError(f"{cfg_file}: unknown key {key!r} (keys are the flag names, "
                                  "see meshlib shim --help)")
            if isinstance(raw, dict) and opt.dest == "labels":
                raw = ",".join(f"{k}={v}" for k, v in raw.items())
            _apply(values, opt, raw, f"{cfg_file}: {key}")
    for opt in OPTIONS:
        if opt.env in env and env[opt.env] != "":
            _apply(values, opt, env[opt.env], opt.env)
    for opt in OPTIONS:
        raw = getattr(ns, opt.dest)
        if raw is not None:
            _apply(values, opt, raw, opt.flag)
    return _validate(ShimConfig(**values)), ns


def _validate(cfg: ShimConfig) -> ShimConfig:
    """Cross-field rules (each message names the flags involved)."""
    if cfg.app_port is not None and not cfg.service:
        raise ConfigError(f"--app-port {cfg.app_port}: needs --service NAME (the name the app "
                          "is registered under)")
    if cfg.identity == "on" and not cfg.service:
        raise ConfigError("--identity on: needs --service NAME (the identity is the service's)")
    if cfg.inbound_port and not cfg.registers():
        raise ConfigError(f"--inbound-port {cfg.inbound_port}: needs --service and --app-port "
                          "(the app the inbound port forwards to)")
    if cfg.upstreams:
        cfg = ShimConfig(**{**cfg.__dict__, "upstreams": tuple(
            UpstreamSpec(u.service, u.port, cfg.bind) for u in cfg.upstreams)})
    seen: dict[int, str] = {}
    named = [("--port", cfg.port), ("--admin-port", cfg.admin_port),
             ("--inbound-port", cfg.inbound_port)]
    named += [(f"--upstream {u.service}={u.port}", u.port) for u in cfg.upstreams]
    for flag, port in named:
        if not port:
            continue
        if port in seen:
            raise ConfigError(f"{flag}: port {port} is already used by {seen[port]}")
        seen[port] = flag
    if cfg.app_port is not None and cfg.app_address in ("127.0.0.1", "localhost", "::1") \
            and cfg.app_port in seen:
        raise ConfigError(f"--app-port {cfg.app_port}: that is the shim's own {seen[cfg.app_port]}")
    if cfg.health_timeout <= 0:
        raise ConfigError(f"--health-timeout: bad value {cfg.health_timeout!r}: must be > 0")
    if cfg.ttl < 1:
        raise ConfigError(f"--ttl: bad value {cfg.ttl!r}: must be >= 1 second")
    if cfg.max_head_bytes < 1024:
        raise ConfigError(f"--max-head-bytes: bad value {cfg.max_head_bytes!r}: must be >= 1K")
    return cfg
