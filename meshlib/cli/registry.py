"""Registry commands: ``services``, ``endpoints``, ``register`` and ``deregister``.

Malformed instance records are shown as ``invalid`` with the reason instead of being hidden:
clients skip them, and an operator needs to see why an instance receives no traffic (silently
ignored config is a top complaint about meshes, istio#7674). ``register`` keeps a lease-backed
record alive until Ctrl-C/SIGTERM (``Mesh.register``); ``deregister`` deletes a (stale) record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from meshlib.cli.base import (
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    Context,
    Stopper,
    output_option,
    service_arg,
)
from meshlib.cli.output import decode, error_lines, labels_text, one_line, table, to_json
from meshlib.discovery.keys import InvalidName

if TYPE_CHECKING:
    from meshlib.core.endpoints import Endpoint


def endpoint_dict(ep: Endpoint) -> dict[str, Any]:
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


def instance_entry(ctx: Context, service: str, key: str, value: bytes) -> dict[str, Any]:
    """Parse one instance record; invalid ones come back with ``valid: False`` and errors."""
    from meshlib.config import RecordError, parse_instance_record

    iid = key.rsplit("/", 1)[-1]
    parsed = ctx.layout.parse(key)
    if parsed is None or parsed[0] != "instance":
        return {"instance_id": iid, "key": key, "valid": False,
                "errors": [f"{key}: key is not an instance key of the layout"],
                "raw": decode(value)}
    try:
        ep = parse_instance_record(key, value, service=service, instance_id=parsed[2] or iid)
    except RecordError as exc:
        return {"instance_id": iid, "key": key, "valid": False, "errors": error_lines(exc),
                "raw": decode(value)}
    except (ValueError, TypeError) as exc:  # defensive: any other refusal is still "invalid"
        return {"instance_id": iid, "key": key, "valid": False,
                "errors": [f"{key}: {one_line(str(exc))}"], "raw": decode(value)}
    return endpoint_dict(ep)


def _short_reason(entry: dict[str, Any]) -> str:
    """Errors of an invalid entry without the repeated key prefix, joined on one line."""
    key = entry["key"]
    parts = []
    for line in entry.get("errors", []):
        parts.append(line[len(key) + 2:] if line.startswith(key + ": ") else line)
    return "; ".join(one_line(p) for p in parts)


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
        ctx.print(to_json({"services": rows, "default_policy": default is not None,
                         "revision": revision}))
        return EXIT_OK
    if rows:
        ctx.print(table(
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
    entries = [instance_entry(ctx, service, kv.key, kv.value) for kv in kvs]
    for entry, kv in zip(entries, kvs, strict=True):
        entry["lease"] = f"{kv.lease:x}" if kv.lease else None
        entry["mod_revision"] = kv.mod_revision
    if ctx.output == "json":
        ctx.print(to_json({"service": service, "revision": revision, "endpoints": entries}))
        return EXIT_OK
    if not entries:
        ctx.print(f"no instances of {service!r} under {ctx.layout.instances_prefix(service)}")
        return EXIT_OK
    rows = []
    for e in entries:
        if e["valid"]:
            rows.append((e["instance_id"], e["authority"], e["protocol"], e["zone"] or "-",
                         e["weight"], labels_text(e["labels"]), "ok"))
        else:
            rows.append((e["instance_id"], "-", "-", "-", "-", "-",
                         f"invalid: {_short_reason(e)}"))
    ctx.print(table(rows, ["INSTANCE", "ADDRESS", "PROTOCOL", "ZONE", "WEIGHT", "LABELS",
                            "STATUS"]))
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
        ctx.print(to_json({"deleted": True, "service": service, "instance_id": iid, "key": key}))
    else:
        ctx.print(f"deregistered {service}/{iid} ({key})")
    return EXIT_OK


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
        with Stopper() as stopper:
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
                ctx.print(to_json({"registered": True, "ttl": a.ttl, **endpoint_dict(ep)}))
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


def add_listing_commands(sub: Any) -> None:
    p = sub.add_parser("services", help="list services with instance counts and policies")
    output_option(p)
    p.set_defaults(func=cmd_services, needs_etcd=True)

    p = sub.add_parser("endpoints", help="list the instances of a service (invalid ones too)")
    p.add_argument("service", metavar="SERVICE", type=service_arg)
    output_option(p)
    p.set_defaults(func=cmd_endpoints, needs_etcd=True)


def add_registration_commands(sub: Any) -> None:
    p = sub.add_parser("register", help="register an instance until Ctrl-C/SIGTERM")
    p.add_argument("service", metavar="SERVICE", type=service_arg)
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
    output_option(p)
    p.set_defaults(func=cmd_register, needs_etcd=True)

    p = sub.add_parser("deregister", help="delete an instance record (e.g. a stale one)")
    p.add_argument("service", metavar="SERVICE", type=service_arg)
    p.add_argument("instance_id", metavar="INSTANCE_ID")
    output_option(p)
    p.set_defaults(func=cmd_deregister, needs_etcd=True)

