"""``meshctl``: the operator command line for the data meshlib keeps in etcd.

Everything meshlib knows lives in etcd under one prefix (see :mod:`meshlib.discovery.keys`),
so the CLI is a thin, honest view of those keys:

* ``services`` / ``endpoints SERVICE`` list what is registered. Malformed instance records
  are shown as ``invalid`` with the reason instead of being hidden: clients skip them, and an
  operator needs to see why an instance receives no traffic (silently ignored config is a
  top complaint about meshes, istio#7674).
* ``policy get|set|validate|delete`` manage policy documents. ``set`` validates the document
  on its own *and* merged with the default policy (what clients will actually apply) before
  writing, and refuses to write anything when either fails, listing every problem as
  ``key: field=value: reason``. This mirrors Envoy's xDS NACK, moved to before the write:
  clients refuse an invalid policy anyway, so writing one would only leave etcd disagreeing
  with what is in force.
* ``register`` keeps a lease-backed record alive until Ctrl-C/SIGTERM (``Mesh.register``);
  ``deregister`` deletes a (stale) record.
* ``watch`` follows etcd watch events (etcd API: ordered, never skipped, resumed after a
  disconnect by :class:`~meshlib.discovery.watch.WatchManager`) and prints one line, or one
  JSON object, per change. A re-listing after a reconnect or a compaction is diffed against
  what was already printed, so no change is reported twice and none is lost.

Exit codes follow the BSD ``sysexits`` spirit in two buckets: 0 success, 1 runtime failure
(etcd unreachable, key absent), 2 usage or validation error (argparse also uses 2).
Expected failures print one ``meshctl: error: ...`` line on stderr, never a traceback.

``main()`` is built from argparse subcommands, each added by a ``_add_*`` function, so new
subcommands (``meshlib shim``) plug in next to the existing ones.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

import yaml

from meshlib.discovery.keys import DEFAULT_PREFIX, InvalidName, KeyLayout, check_service_name

if TYPE_CHECKING:
    from meshlib.core.endpoints import Endpoint
    from meshlib.discovery.etcd_client import EtcdClient

ENV_ENDPOINTS = "MESHLIB_ETCD_ENDPOINTS"
ENV_PREFIX = "MESHLIB_PREFIX"
DEFAULT_ENDPOINTS = "127.0.0.1:2379"
DEFAULT_SERVICE = "_default"  # the pseudo service name of the default policy key

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class CliError(Exception):
    """An expected failure: printed as one ``prog: error: message`` line, exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """What every command needs: parsed options, key layout, output streams, a lazy client."""

    args: argparse.Namespace
    layout: KeyLayout
    endpoints: list[str]
    timeout: float
    prog: str
    out: IO[str]
    err: IO[str]
    _client: EtcdClient | None = None

    @property
    def client(self) -> EtcdClient:
        if self._client is None:
            from meshlib.discovery.etcd_client import EtcdClient

            try:
                self._client = EtcdClient(self.endpoints, timeout=self.timeout)
            except ValueError as exc:  # malformed endpoint list
                raise CliError(str(exc), EXIT_USAGE) from None
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def output(self) -> str:
        return getattr(self.args, "output", None) or "table"

    def print(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def warn(self, text: str) -> None:
        self.err.write(f"{self.prog}: {text}\n")
        self.err.flush()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def _etcd_errors(ctx: Context) -> Iterator[None]:
    """Turn etcd client errors into one-line CLI errors."""
    from meshlib.discovery.etcd_client import EtcdError, EtcdUnavailable

    try:
        yield
    except EtcdUnavailable as exc:
        raise CliError(
            f"etcd unreachable at {','.join(ctx.endpoints)} ({_one_line(str(exc))})"
        ) from None
    except EtcdError as exc:
        raise CliError(f"etcd request failed: {_one_line(str(exc))}") from None


def _service_arg(name: str) -> str:
    """argparse type for service names; ``_default`` is accepted where the default key fits."""
    if name == DEFAULT_SERVICE:
        return name
    try:
        return check_service_name(name)
    except InvalidName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _policy_key(ctx: Context, service: str) -> str:
    if service == DEFAULT_SERVICE:
        return ctx.layout.default_policy_key
    return ctx.layout.policy_key(service)


def _policy_target(ctx: Context) -> str:
    """The service named by ``SERVICE`` / ``--default`` (``_default`` for the default key).

    With ``--default`` the optional SERVICE positional is absent, so argparse puts a FILE
    argument into ``service``; it is moved back to ``file`` here.
    """
    a = ctx.args
    service = getattr(a, "service", None)
    if getattr(a, "default", False):
        if service not in (None, DEFAULT_SERVICE):
            if hasattr(a, "file") and a.file is None:
                a.file = service
            else:
                raise CliError("give either SERVICE or --default, not both", EXIT_USAGE)
        return DEFAULT_SERVICE
    if service is None:
        raise CliError("a SERVICE (or --default) is required", EXIT_USAGE)
    try:
        return _service_arg(str(service))
    except argparse.ArgumentTypeError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


# --------------------------------------------------------------------------- output helpers


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
        lines.append(line.rstrip())
    return "\n".join(lines)


def _json(data: Any) -> str:
    return json.dumps(data, sort_keys=False, default=str)


def _labels_text(labels: dict[str, str] | Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(dict(labels or {}).items())) or "-"


def _decode(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def _error_dicts(exc: Any) -> list[dict[str, Any]]:
    """FieldErrors of a ConfigError as JSON-friendly dicts."""
    out = []
    for e in getattr(exc, "errors", []):
        value = e.value
        if repr(value) == "<missing>":
            value = None
        elif not isinstance(value, str | int | float | bool | type(None) | list | dict):
            value = repr(value)
        out.append({"key": exc.key, "field": e.field, "value": value, "reason": e.reason,
                    "message": e.describe(exc.key)})
    return out


def _error_lines(exc: Exception) -> list[str]:
    errors = getattr(exc, "errors", None)
    key = getattr(exc, "key", "")
    if errors:
        return [e.describe(key) for e in errors]
    return [line for line in str(exc).splitlines() if line.strip()] or [str(exc)]


# --------------------------------------------------------------------------- instances


def _endpoint_dict(ep: Endpoint) -> dict[str, Any]:
    return {
        "instance_id": ep.instance_id,
        "key": ep.key,
        "valid": True,
        "address": ep.address,
        "port": ep.port,
        "authority": ep.authority,
        "protocol": ep.protocol,
        "zone": ep.zone,
        "weight": ep.weight,
        "labels": dict(ep.labels),
        "metadata": dict(ep.metadata),
    }


def _instance_entry(ctx: Context, service: str, key: str, value: bytes) -> dict[str, Any]:
    """Parse one instance record; invalid ones come back with ``valid: False`` and errors."""
    from meshlib.config import RecordError, parse_instance_record

    iid = key.rsplit("/", 1)[-1]
    parsed = ctx.layout.parse(key)
    if parsed is None or parsed[0] != "instance":
        return {"instance_id": iid, "key": key, "valid": False,
                "errors": [f"{key}: key is not an instance key of the layout"],
                "raw": _decode(value)}
    try:
        ep = parse_instance_record(key, value, service=service, instance_id=parsed[2] or iid)
    except RecordError as exc:
        return {"instance_id": iid, "key": key, "valid": False, "errors": _error_lines(exc),
                "raw": _decode(value)}
    except (ValueError, TypeError) as exc:  # defensive: any other refusal is still "invalid"
        return {"instance_id": iid, "key": key, "valid": False,
                "errors": [f"{key}: {_one_line(str(exc))}"], "raw": _decode(value)}
    return _endpoint_dict(ep)


def _short_reason(entry: dict[str, Any]) -> str:
    """Errors of an invalid entry without the repeated key prefix, joined on one line."""
    key = entry["key"]
    parts = []
    for line in entry.get("errors", []):
        parts.append(line[len(key) + 2:] if line.startswith(key + ": ") else line)
    return "; ".join(_one_line(p) for p in parts)


# --------------------------------------------------------------------------- policies


def _raw_document(data: bytes | str) -> dict[str, Any]:
    """The raw mapping of an already validated policy document ({} for an empty one)."""
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    text = text.lstrip("\ufeff")
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except ValueError:
        raw = yaml.safe_load(text)
    return dict(raw or {})


def _validate_document(data: bytes | str, key: str) -> dict[str, Any]:
    """Validate a policy document on its own; return its raw mapping. Raises PolicyError."""
    from meshlib.config import parse_policy

    parse_policy(data, key)
    return _raw_document(data)


def _effective(default_raw: dict[str, Any], service_raw: dict[str, Any], key: str) -> Any:
    """The policy clients apply: the service document deep-merged over the default one."""
    from meshlib.config import DEFAULT_POLICY, merge_policy_dicts, parse_policy_dict

    merged = merge_policy_dicts(default_raw, service_raw)
    return parse_policy_dict(merged, key) if merged else DEFAULT_POLICY


def _check_policy(ctx: Context, service: str, data: bytes) -> list[Exception]:
    """Every reason the document would be refused by clients (empty list: acceptable).

    A service document is checked alone and merged over the stored default policy; a new
    default document is checked alone and merged under every stored service policy.
    """
    from meshlib.config import PolicyError

    key = _policy_key(ctx, service)
    try:
        raw = _validate_document(data, key)
    except PolicyError as exc:
        return [exc]
    problems: list[Exception] = []
    if service != DEFAULT_SERVICE:
        stored = ctx.client.get(ctx.layout.default_policy_key)
        if stored is None:
            return []
        try:
            default_raw = _validate_document(stored[0], ctx.layout.default_policy_key)
        except PolicyError:
            return []  # the stored default is refused by clients too; they ignore it
        try:
            _effective(default_raw, raw, key)
        except PolicyError as exc:
            problems.append(exc)
        return problems
    kvs, _rev = ctx.client.get_prefix(ctx.layout.services_prefix)
    for kv in kvs:
        kind = ctx.layout.parse(kv.key)
        if kind is None or kind[0] != "policy":
            continue
        try:
            svc_raw = _validate_document(kv.value, kv.key)
        except PolicyError:
            continue  # already refused by clients on its own
        try:
            _effective(raw, svc_raw, kv.key)
        except PolicyError as exc:
            problems.append(exc)
    return problems


def _read_policy_file(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CliError(f"cannot read policy file {path!r}: {exc.strerror}", EXIT_USAGE) from None


def _report_invalid(ctx: Context, problems: list[Exception], action: str) -> None:
    if ctx.output == "json":
        errors = [d for p in problems for d in _error_dicts(p)]
        ctx.print(_json({"valid": False, "written": False, "errors": errors}))
    for p in problems:
        for line in _error_lines(p):
            ctx.err.write(line + "\n")
    n = sum(len(getattr(p, "errors", [p])) for p in problems)
    ctx.err.write(f"{ctx.prog}: error: policy invalid ({n} problem(s)); {action}\n")
    ctx.err.flush()


# --------------------------------------------------------------------------- commands


def cmd_services(ctx: Context) -> int:
    layout = ctx.layout
    kvs, revision = ctx.client.get_prefix(layout.services_prefix, keys_only=True)
    default = ctx.client.get(layout.default_policy_key)
    services: dict[str, dict[str, Any]] = {}
    for kv in kvs:
        rest = kv.key[len(layout.services_prefix):]
        name = rest.split("/", 1)[0]
        if not name:
            continue
        entry = services.setdefault(name, {"service": name, "instances": 0, "policy": False})
        kind = layout.parse(kv.key)
        if kind is not None and kind[0] == "instance":
            entry["instances"] += 1
        elif kind is not None and kind[0] == "policy":
            entry["policy"] = True
    rows = [services[k] for k in sorted(services)]
    if ctx.output == "json":
        ctx.print(_json({"services": rows, "default_policy": default is not None,
                         "revision": revision}))
        return EXIT_OK
    if rows:
        ctx.print(_table(
            [(r["service"], r["instances"], "yes" if r["policy"] else "no") for r in rows],
            ["SERVICE", "INSTANCES", "POLICY"],
        ))
    else:
        ctx.print(f"no services under {layout.services_prefix}")
    ctx.print(f"default policy: {'set' if default is not None else 'not set'} "
              f"({layout.default_policy_key})")
    return EXIT_OK


def cmd_endpoints(ctx: Context) -> int:
    service = ctx.args.service
    kvs, revision = ctx.client.get_prefix(ctx.layout.instances_prefix(service))
    entries = [_instance_entry(ctx, service, kv.key, kv.value) for kv in kvs]
    for entry, kv in zip(entries, kvs, strict=True):
        entry["lease"] = f"{kv.lease:x}" if kv.lease else None
        entry["mod_revision"] = kv.mod_revision
    if ctx.output == "json":
        ctx.print(_json({"service": service, "revision": revision, "endpoints": entries}))
        return EXIT_OK
    if not entries:
        ctx.print(f"no instances of {service!r} under {ctx.layout.instances_prefix(service)}")
        return EXIT_OK
    rows = []
    for e in entries:
        if e["valid"]:
            rows.append((e["instance_id"], e["authority"], e["protocol"], e["zone"] or "-",
                         e["weight"], _labels_text(e["labels"]), "ok"))
        else:
            rows.append((e["instance_id"], "-", "-", "-", "-", "-",
                         f"invalid: {_short_reason(e)}"))
    ctx.print(_table(rows, ["INSTANCE", "ADDRESS", "PROTOCOL", "ZONE", "WEIGHT", "LABELS",
                            "STATUS"]))
    return EXIT_OK


def cmd_policy_get(ctx: Context) -> int:
    from meshlib.config import PolicyError

    service = _policy_target(ctx)
    key = _policy_key(ctx, service)
    if ctx.args.effective:
        return _policy_get_effective(ctx, service, key)
    stored = ctx.client.get(key)
    if stored is None:
        raise CliError(f"no policy stored at {key}")
    value, rev = stored
    if ctx.output == "json":
        try:
            document: Any = _validate_document(value, key)
            valid, errors = True, []
        except PolicyError as exc:
            document, valid, errors = None, False, _error_dicts(exc)
        ctx.print(_json({"service": service, "key": key, "mod_revision": rev,
                         "valid": valid, "errors": errors, "document": document,
                         "raw": _decode(value)}))
        return EXIT_OK
    text = _decode(value)
    ctx.out.write(text if text.endswith("\n") or not text else text + "\n")
    ctx.out.flush()
    return EXIT_OK


def _policy_get_effective(ctx: Context, service: str, key: str) -> int:
    from meshlib.config import PolicyError

    default_key = ctx.layout.default_policy_key
    sources: list[str] = []
    problems: list[Exception] = []
    default_raw: dict[str, Any] = {}
    service_raw: dict[str, Any] = {}
    stored_default = ctx.client.get(default_key)
    if stored_default is not None:
        try:
            default_raw = _validate_document(stored_default[0], default_key)
            sources.append(default_key)
        except PolicyError as exc:
            problems.append(exc)
    if service != DEFAULT_SERVICE:
        stored = ctx.client.get(key)
        if stored is not None:
            try:
                service_raw = _validate_document(stored[0], key)
                sources.append(key)
            except PolicyError as exc:
                problems.append(exc)
    if not problems:
        try:
            policy = _effective(default_raw, service_raw, key)
        except PolicyError as exc:
            problems.append(exc)
    if problems:
        for p in problems:
            for line in _error_lines(p):
                ctx.err.write(line + "\n")
        raise CliError("the stored policy is invalid and refused by clients (they keep their "
                       "last good policy); the effective policy cannot be computed from etcd")
    data = policy.to_dict()
    if ctx.output == "json":
        ctx.print(_json({"service": service, "sources": sources, "policy": data}))
    else:
        ctx.print(f"# effective policy for {service} (sources: "
                  f"{', '.join(sources) or 'built-in defaults only'})")
        ctx.out.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
        ctx.out.flush()
    return EXIT_OK


def _validate_for(ctx: Context) -> tuple[str, str, bytes, list[Exception]]:
    service = _policy_target(ctx)
    key = _policy_key(ctx, service)
    if not ctx.args.file:
        raise CliError(f"policy {ctx.args.policy_command}: FILE is required ('-' for stdin)",
                       EXIT_USAGE)
    data = _read_policy_file(ctx.args.file)
    return service, key, data, _check_policy(ctx, service, data)


def cmd_policy_validate(ctx: Context) -> int:
    service, key, _data, problems = _validate_for(ctx)
    if problems:
        _report_invalid(ctx, problems, "not written (validate only)")
        return EXIT_USAGE
    if ctx.output == "json":
        ctx.print(_json({"valid": True, "written": False, "service": service, "key": key}))
    else:
        ctx.print(f"policy for {service} is valid ({key}); nothing written")
    return EXIT_OK


def cmd_policy_set(ctx: Context) -> int:
    service, key, data, problems = _validate_for(ctx)
    if problems:
        _report_invalid(ctx, problems, f"nothing written to {key}")
        return EXIT_USAGE
    revision = ctx.client.put(key, data)
    if ctx.output == "json":
        ctx.print(_json({"valid": True, "written": True, "service": service, "key": key,
                         "revision": revision}))
    else:
        ctx.print(f"policy for {service} written to {key} (revision {revision})")
    return EXIT_OK


def cmd_policy_delete(ctx: Context) -> int:
    service = _policy_target(ctx)
    key = _policy_key(ctx, service)
    deleted = ctx.client.delete(key)
    if not deleted:
        raise CliError(f"no policy stored at {key}")
    if ctx.output == "json":
        ctx.print(_json({"deleted": True, "service": service, "key": key}))
    else:
        ctx.print(f"policy for {service} deleted ({key})")
    return EXIT_OK


def cmd_deregister(ctx: Context) -> int:
    service, iid = ctx.args.service, ctx.args.instance_id
    try:
        key = ctx.layout.instance_key(service, iid)
    except InvalidName as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if not ctx.client.delete(key):
        raise CliError(f"no instance record at {key}")
    if ctx.output == "json":
        ctx.print(_json({"deleted": True, "service": service, "instance_id": iid, "key": key}))
    else:
        ctx.print(f"deregistered {service}/{iid} ({key})")
    return EXIT_OK


# --------------------------------------------------------------------------- long-running


class _Stopper:
    """Waits until Ctrl-C or SIGTERM; restores the previous SIGTERM handler on exit."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: Any = None

    def __enter__(self) -> _Stopper:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def wait(self) -> None:
        try:
            while not self.event.wait(0.2):
                pass
        except KeyboardInterrupt:
            self.event.set()


def _parse_labels(items: Sequence[str], what: str = "--label") -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise CliError(f"{what} {item!r}: expected key=value", EXIT_USAGE)
        out[k] = v
    return out


def cmd_register(ctx: Context) -> int:
    from meshlib.mesh import Mesh

    a = ctx.args
    labels = _parse_labels(a.label)
    metadata = _parse_labels(a.metadata, "--metadata")
    if not 1 <= a.port <= 65535:
        raise CliError(f"--port {a.port}: must be 1-65535", EXIT_USAGE)
    if a.instance_id is not None:
        try:
            ctx.layout.instance_key(a.service, a.instance_id)
        except InvalidName as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    ctx.client.get(ctx.layout.default_policy_key)  # fail fast (exit 1) when etcd is down
    mesh = Mesh(ctx.endpoints, prefix=ctx.layout.prefix, etcd_timeout=ctx.timeout,
                handle_sigterm=False)
    try:
        with _Stopper() as stopper:
            reg = mesh.register(
                a.service, a.port, address=a.address, protocol=a.protocol, zone=a.zone,
                labels=labels, weight=a.weight, metadata=metadata, ttl=a.ttl,
                instance_id=a.instance_id, wait=False,
            )
            if not reg.wait_registered(timeout=max(ctx.timeout, 1.0) * 2):
                reg.close()
                raise CliError(f"could not register {reg.key}: etcd at "
                               f"{','.join(ctx.endpoints)} did not accept the lease in time")
            ep = reg.endpoint
            if ctx.output == "json":
                ctx.print(_json({"registered": True, "ttl": a.ttl, **_endpoint_dict(ep)}))
            else:
                ctx.print(f"registered {a.service}/{ep.instance_id} at {ep.authority} "
                          f"({reg.key}, ttl {a.ttl:g}s); Ctrl-C or SIGTERM deregisters")
            stopper.wait()
            reg.close()
            if ctx.output != "json":
                ctx.print(f"deregistered {a.service}/{ep.instance_id}")
    finally:
        mesh.close()
    return EXIT_OK


class _WatchPrinter:
    """Turns watch listings and events into change lines; remembers what it has seen."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.lock = threading.Lock()
        self.seen: dict[str, dict[str, bytes]] = {}  # watched prefix -> key -> value
        self.default_raw: dict[str, Any] = {}

    # -- watch callbacks (watch thread) ---------------------------------------------
    def on_reset(self, prefix: str, kvs: list[Any], revision: int) -> None:
        with self.lock:
            first = prefix not in self.seen
            old = self.seen.get(prefix, {})
            new = {kv.key: kv.value for kv in kvs}
            self.seen[prefix] = new
            if prefix == self.ctx.layout.default_policy_key and new.get(prefix) is not None:
                self._remember_default(new[prefix])
            if first:
                self.ctx.warn(f"watching {prefix} from revision {revision + 1} "
                              f"({len(new)} key(s) now)")
                return
            for key in sorted(set(old) | set(new)):
                if key not in new:
                    self._emit_change("delete", key, b"", revision, old.get(key))
                elif old.get(key) != new[key]:
                    self._emit_change("put", key, new[key], revision, old.get(key))

    def on_events(self, prefix: str, events: list[Any], revision: int) -> None:
        with self.lock:
            seen = self.seen.setdefault(prefix, {})
            for etype, kv in events:
                previous = seen.get(kv.key)
                if etype == "delete":
                    seen.pop(kv.key, None)
                else:
                    seen[kv.key] = kv.value
                rev = kv.mod_revision or revision
                self._emit_change(etype, kv.key, kv.value, rev, previous)

    # -- formatting -------------------------------------------------------------------
    def _remember_default(self, value: bytes) -> None:
        from meshlib.config import PolicyError

        with contextlib.suppress(PolicyError):
            self.default_raw = _validate_document(value, self.ctx.layout.default_policy_key)

    def _emit_change(
        self, etype: str, key: str, value: bytes, revision: int, previous: bytes | None
    ) -> None:
        from meshlib.config import PolicyError

        layout = self.ctx.layout
        kind = layout.parse(key)
        if kind is None:
            return
        what, service, iid = kind
        rec: dict[str, Any] = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                               "revision": revision}
        if what == "instance":
            rec.update(service=service, kind="instance", instance_id=iid, key=key)
            if etype == "delete":
                rec["event"] = "removed"
            else:
                entry = _instance_entry(self.ctx, service, key, value)
                if not entry["valid"]:
                    rec.update(event="invalid", errors=entry["errors"])
                else:
                    rec["event"] = "added" if previous is None else "changed"
                    rec["endpoint"] = {k: entry[k] for k in (
                        "address", "port", "protocol", "zone", "weight", "labels", "metadata")}
        else:
            name = DEFAULT_SERVICE if what == "default-policy" else service
            rec.update(service=name, kind="policy", key=key)
            if etype == "delete":
                rec["event"] = "deleted"
                if what == "default-policy":
                    self.default_raw = {}
            else:
                try:
                    raw = _validate_document(value, key)
                    if what == "default-policy":
                        self.default_raw = raw
                    else:
                        _effective(self.default_raw, raw, key)
                    rec["event"] = "changed"
                except PolicyError as exc:
                    rec.update(event="refused", errors=_error_lines(exc))
        self._write(rec)

    def _write(self, rec: dict[str, Any]) -> None:
        if self.ctx.output == "json":
            line = _json(rec)
        else:
            parts = [rec["time"], rec["service"], f"{rec['kind']} {rec['event']}"]
            if rec["kind"] == "instance":
                parts.append(str(rec["instance_id"]))
                ep = rec.get("endpoint")
                if ep:
                    host = f"[{ep['address']}]" if ":" in ep["address"] else ep["address"]
                    parts.append(f"{host}:{ep['port']} {ep['protocol']} zone={ep['zone'] or '-'}"
                                 f" weight={ep['weight']} labels={_labels_text(ep['labels'])}")
            else:
                parts.append(rec["key"])
            if rec.get("errors"):
                key = rec["key"]
                reasons = [e[len(key) + 2:] if e.startswith(key + ": ") else e
                           for e in rec["errors"]]
                parts.append("; ".join(_one_line(r) for r in reasons))
            parts.append(f"rev={rec['revision']}")
            line = "  ".join(parts)
        with contextlib.suppress(BrokenPipeError):
            self.ctx.print(line)


def cmd_watch(ctx: Context) -> int:
    from meshlib.discovery.watch import WatchManager

    layout = ctx.layout
    services: list[str] = ctx.args.services or []
    prefixes = [layout.service_prefix(s) for s in services] or [layout.services_prefix]
    prefixes.append(layout.default_policy_key)
    ctx.client.get(layout.default_policy_key)  # fail fast (exit 1) when etcd is down
    printer = _WatchPrinter(ctx)
    state = {"connected": True, "stopping": False}

    def on_state(connected: bool) -> None:
        if connected != state["connected"] and not state["stopping"]:
            state["connected"] = connected
            ctx.warn("etcd connection restored; resuming watch" if connected
                     else "etcd connection lost; retrying (changes will be replayed)")

    watcher = WatchManager(ctx.client, progress_interval=1.0, on_state=on_state)
    try:
        with _Stopper() as stopper:
            for p in prefixes:
                watcher.watch_prefix(
                    p,
                    functools.partial(printer.on_reset, p),
                    functools.partial(printer.on_events, p),
                )
            stopper.wait()
    finally:
        state["stopping"] = True
        watcher.close()
    return EXIT_OK


def cmd_demo(ctx: Context) -> int:
    import importlib

    demo_main: Callable[..., Any] = importlib.import_module("meshlib.demo").main
    argv = list(ctx.args.extra_args or [])
    if inspect.signature(demo_main).parameters:
        rc = demo_main(argv)
    elif argv:
        raise CliError(f"demo takes no arguments (got {' '.join(argv)})", EXIT_USAGE)
    else:
        rc = demo_main()
    return rc if isinstance(rc, int) else EXIT_OK


# --------------------------------------------------------------------------- parser


def _output_option(p: argparse.ArgumentParser, choices: Sequence[str] = ("table", "json")) -> None:
    p.add_argument("-o", "--output", choices=list(choices), default="table",
                   help="output format (default: table)")


def _add_policy_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("service", metavar="SERVICE", nargs="?",
                   help=f"service name, or {DEFAULT_SERVICE} for the default policy")
    p.add_argument("--default", action="store_true",
                   help=f"the default policy key (same as SERVICE={DEFAULT_SERVICE})")


def _add_listing_commands(sub: Any) -> None:
    p = sub.add_parser("services", help="list services with instance counts and policies")
    _output_option(p)
    p.set_defaults(func=cmd_services, needs_etcd=True)

    p = sub.add_parser("endpoints", help="list the instances of a service (invalid ones too)")
    p.add_argument("service", metavar="SERVICE", type=_service_arg)
    _output_option(p)
    p.set_defaults(func=cmd_endpoints, needs_etcd=True)


def _add_policy_commands(sub: Any) -> None:
    policy = sub.add_parser("policy", help="get, set, validate or delete policy documents")
    psub = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    p = psub.add_parser("get", help="print the stored document (or --effective policy)")
    _add_policy_target(p)
    p.add_argument("--effective", action="store_true",
                   help="print the validated effective policy (defaults and default key merged)")
    _output_option(p, ("table", "yaml", "json"))
    p.set_defaults(func=cmd_policy_get, needs_etcd=True)

    for name, func, text in (
        ("set", cmd_policy_set, "validate FILE and store it (nothing is written if invalid)"),
        ("validate", cmd_policy_validate, "validate FILE without writing"),
    ):
        p = psub.add_parser(name, help=text)
        _add_policy_target(p)
        p.add_argument("file", metavar="FILE", nargs="?",
                       help="YAML or JSON policy document, '-' for stdin")
        _output_option(p)
        p.set_defaults(func=func, needs_etcd=True)

    p = psub.add_parser("delete", help="delete a policy document")
    _add_policy_target(p)
    _output_option(p)
    p.set_defaults(func=cmd_policy_delete, needs_etcd=True)


def _add_registration_commands(sub: Any) -> None:
    p = sub.add_parser("register", help="register an instance until Ctrl-C/SIGTERM")
    p.add_argument("service", metavar="SERVICE", type=_service_arg)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--zone", default=None)
    p.add_argument("--label", action="append", default=[], metavar="K=V",
                   help="instance label (repeatable)")
    p.add_argument("--metadata", action="append", default=[], metavar="K=V",
                   help="free-form metadata (repeatable)")
    p.add_argument("--weight", type=int, default=100)
    p.add_argument("--ttl", type=float, default=10.0, help="lease TTL in seconds (default 10)")
    p.add_argument("--instance-id", default=None, help="default: ADDRESS-PORT-RANDOM")
    _output_option(p)
    p.set_defaults(func=cmd_register, needs_etcd=True)

    p = sub.add_parser("deregister", help="delete an instance record (e.g. a stale one)")
    p.add_argument("service", metavar="SERVICE", type=_service_arg)
    p.add_argument("instance_id", metavar="INSTANCE_ID")
    _output_option(p)
    p.set_defaults(func=cmd_deregister, needs_etcd=True)


def _add_watch_command(sub: Any) -> None:
    p = sub.add_parser("watch", help="stream changes (instances, policies) until Ctrl-C")
    p.add_argument("services", metavar="SERVICE", nargs="*", type=_service_arg,
                   help="services to watch (default: every service)")
    _output_option(p)
    p.set_defaults(func=cmd_watch, needs_etcd=True)


def _add_demo_command(sub: Any) -> None:
    # No options of its own (not even -h): everything after ``demo`` goes to meshlib.demo.
    p = sub.add_parser("demo", help="run the meshlib demo (options: meshlib demo --help)",
                       add_help=False)
    p.set_defaults(func=cmd_demo, needs_etcd=False, passthrough=True)


# Subcommand builders, in help order. A new subcommand (e.g. ``shim``) appends its own.
SUBCOMMANDS: list[Callable[[Any], None]] = [
    _add_listing_commands,
    _add_policy_commands,
    _add_registration_commands,
    _add_watch_command,
    _add_demo_command,
]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def build_parser(prog: str = "meshctl") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Operate meshlib's service registry and policies in etcd.",
        epilog="Exit codes: 0 ok, 1 runtime or etcd error, 2 usage or validation error.",
    )
    parser.add_argument("--etcd", metavar="ENDPOINTS",
                        default=os.environ.get(ENV_ENDPOINTS) or DEFAULT_ENDPOINTS,
                        help=f"comma-separated host:port list (env {ENV_ENDPOINTS}, "
                             f"default {DEFAULT_ENDPOINTS})")
    parser.add_argument("--prefix", default=os.environ.get(ENV_PREFIX) or DEFAULT_PREFIX,
                        help=f"key prefix (env {ENV_PREFIX}, default {DEFAULT_PREFIX})")
    parser.add_argument("--timeout", type=_positive_float, default=5.0, metavar="SECONDS",
                        help="etcd request timeout (default 5)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    _accept_globals_everywhere(parser)
    return parser


def _accept_globals_everywhere(parser: argparse.ArgumentParser) -> None:
    """Let ``--etcd/--prefix/--timeout`` also follow the subcommand (``meshctl services
    --etcd X``). Subparser copies default to SUPPRESS so they never mask the global value."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in set(action.choices.values()):
            if child.get_default("func") is cmd_demo:
                continue
            have = {s for a in child._actions for s in a.option_strings}
            if "--etcd" not in have:
                child.add_argument("--etcd", metavar="ENDPOINTS", default=argparse.SUPPRESS,
                                   help=argparse.SUPPRESS)
                child.add_argument("--prefix", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                child.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            _accept_globals_everywhere(child)


def _prog_name() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "meshlib" if name == "meshlib" else "meshctl"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``meshctl`` and ``meshlib`` scripts; returns the exit code."""
    prog = _prog_name()
    parser = build_parser(prog)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    if not logging.getLogger().handlers:  # library warnings (etcd lost, ...) as one-liners
        logging.basicConfig(level=os.environ.get("MESHLIB_LOG", "WARNING").upper(),
                            format=f"{prog}: %(levelname)s: %(message)s")
    endpoints = [e.strip() for e in str(args.etcd).split(",") if e.strip()]
    if args.needs_etcd and not endpoints:
        parser.error("--etcd: no endpoints given")
    ctx = Context(args=args, layout=KeyLayout(args.prefix), endpoints=endpoints,
                  timeout=args.timeout, prog=prog, out=sys.stdout, err=sys.stderr)
    try:
        with _etcd_errors(ctx):
            return int(args.func(ctx))
    except CliError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return exc.code
    except InvalidName as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USAGE
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
