"""Policy commands: ``policy get|set|validate|delete``, and the validation they share with
``watch``.

``set`` validates the document on its own *and* merged with the default policy (what clients
will actually apply) before writing, and refuses to write anything when either fails, listing
every problem as ``key: field=value: reason``. This mirrors Envoy's xDS NACK, moved to before
the write: clients refuse an invalid policy anyway, so writing one would only leave etcd
disagreeing with what is in force. A new default document is checked under every stored
service policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from meshlib.cli.base import (
    DEFAULT_SERVICE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    Context,
    output_option,
    service_arg,
)
from meshlib.cli.output import decode, error_dicts, error_lines, to_json


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
        return service_arg(str(service))
    except argparse.ArgumentTypeError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


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


def validate_document(data: bytes | str, key: str) -> dict[str, Any]:
    """Validate a policy document on its own; return its raw mapping. Raises PolicyError."""
    from meshlib.config import parse_policy

    parse_policy(data, key)
    return _raw_document(data)


def effective_policy(default_raw: dict[str, Any], service_raw: dict[str, Any], key: str) -> Any:
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
        raw = validate_document(data, key)
    except PolicyError as exc:
        return [exc]
    problems: list[Exception] = []
    if service != DEFAULT_SERVICE:
        stored = ctx.client.get(ctx.layout.default_policy_key)
        if stored is None:
            return []
        try:
            default_raw = validate_document(stored[0], ctx.layout.default_policy_key)
        except PolicyError:
            return []  # the stored default is refused by clients too; they ignore it
        try:
            effective_policy(default_raw, raw, key)
        except PolicyError as exc:
            problems.append(exc)
        return problems
    kvs, _rev = ctx.client.get_prefix(ctx.layout.services_prefix)
    for kv in kvs:
        kind = ctx.layout.parse(kv.key)
        if kind is None or kind[0] != "policy":
            continue
        try:
            svc_raw = validate_document(kv.value, kv.key)
        except PolicyError:
            continue  # already refused by clients on its own
        try:
            effective_policy(raw, svc_raw, kv.key)
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
        errors = [d for p in problems for d in error_dicts(p)]
        ctx.print(to_json({"valid": False, "written": False, "errors": errors}))
    for p in problems:
        for line in error_lines(p):
            ctx.err.write(line + "\n")
    n = sum(len(getattr(p, "errors", [p])) for p in problems)
    ctx.err.write(f"{ctx.prog}: error: policy invalid ({n} problem(s)); {action}\n")
    ctx.err.flush()


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
            document: Any = validate_document(value, key)
            valid, errors = True, []
        except PolicyError as exc:
            document, valid, errors = None, False, error_dicts(exc)
        ctx.print(to_json({"service": service, "key": key, "mod_revision": rev,
                         "valid": valid, "errors": errors, "document": document,
                         "raw": decode(value)}))
        return EXIT_OK
    text = decode(value)
    ctx.out.write(text if text.endswith("\n") or not text else text + "\n")
    ctx.out.flush()
    return EXIT_OK


def _policy_get_effective(ctx: Context, service: str, key: str) -> int:
    from meshlib.config import PolicyError

    sources: list[str] = []
    problems: list[Exception] = []

    def stored_raw(doc_key: str) -> dict[str, Any]:
        """The validated stored document at ``doc_key`` ({} when absent or refused)."""
        stored = ctx.client.get(doc_key)
        if stored is None:
            return {}
        try:
            raw = validate_document(stored[0], doc_key)
        except PolicyError as exc:
            problems.append(exc)
            return {}
        sources.append(doc_key)
        return raw

    default_raw = stored_raw(ctx.layout.default_policy_key)
    service_raw = stored_raw(key) if service != DEFAULT_SERVICE else {}
    if not problems:
        try:
            policy = effective_policy(default_raw, service_raw, key)
        except PolicyError as exc:
            problems.append(exc)
    if problems:
        for p in problems:
            for line in error_lines(p):
                ctx.err.write(line + "\n")
        raise CliError("the stored policy is invalid and refused by clients (they keep their "
                       "last good policy); the effective policy cannot be computed from etcd")
    data = policy.to_dict()
    if ctx.output == "json":
        ctx.print(to_json({"service": service, "sources": sources, "policy": data}))
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
        ctx.print(to_json({"valid": True, "written": False, "service": service, "key": key}))
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
        ctx.print(to_json({"valid": True, "written": True, "service": service, "key": key,
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
        ctx.print(to_json({"deleted": True, "service": service, "key": key}))
    else:
        ctx.print(f"policy for {service} deleted ({key})")
    return EXIT_OK


def _add_policy_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("service", metavar="SERVICE", nargs="?",
                   help=f"service name, or {DEFAULT_SERVICE} for the default policy")
    p.add_argument("--default", action="store_true",
                   help=f"the default policy key (same as SERVICE={DEFAULT_SERVICE})")


def add_policy_commands(sub: Any) -> None:
    policy = sub.add_parser("policy", help="get, set, validate or delete policy documents")
    psub = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    p = psub.add_parser("get", help="print the stored document (or --effective policy)")
    _add_policy_target(p)
    p.add_argument("--effective", action="store_true",
                   help="print the validated effective policy (defaults and default key merged)")
    output_option(p, ("table", "yaml", "json"))
    p.set_defaults(func=cmd_policy_get, needs_etcd=True)

    for name, func, text in (
        ("set", cmd_policy_set, "validate FILE and store it (nothing is written if invalid)"),
        ("validate", cmd_policy_validate, "validate FILE without writing"),
    ):
        p = psub.add_parser(name, help=text)
        _add_policy_target(p)
        p.add_argument("file", metavar="FILE", nargs="?",
                       help="YAML or JSON policy document, '-' for stdin")
        output_option(p)
        p.set_defaults(func=func, needs_etcd=True)

    p = psub.add_parser("delete", help="delete a policy document")
    _add_policy_target(p)
    output_option(p)
    p.set_defaults(func=cmd_policy_delete, needs_etcd=True)

