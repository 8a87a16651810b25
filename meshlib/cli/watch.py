"""``watch``: follow etcd watch events and print one line, or one JSON object, per change.

etcd watch events are ordered and never skipped, and :class:`~meshlib.discovery.watch.
WatchManager` resumes them after a disconnect. A re-listing after a reconnect or a compaction
is diffed against what was already printed, so no change is reported twice and none is lost.
Instance records are parsed as clients parse them (``invalid`` with the reason), policy
documents validated as clients validate them (``refused`` with the reasons).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from datetime import UTC, datetime
from typing import Any

from meshlib.cli.base import (
    DEFAULT_SERVICE,
    EXIT_OK,
    Context,
    Stopper,
    output_option,
    service_arg,
)
from meshlib.cli.output import error_lines, labels_text, one_line, to_json
from meshlib.cli.policy import effective_policy, validate_document
from meshlib.cli.registry import instance_entry


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
            self.default_raw = validate_document(value, self.ctx.layout.default_policy_key)

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
                entry = instance_entry(self.ctx, service, key, value)
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
                    raw = validate_document(value, key)
                    if what == "default-policy":
                        self.default_raw = raw
                    else:
                        effective_policy(self.default_raw, raw, key)
                    rec["event"] = "changed"
                except PolicyError as exc:
                    rec.update(event="refused", errors=error_lines(exc))
        self._write(rec)

    def _write(self, rec: dict[str, Any]) -> None:
        if self.ctx.output == "json":
            line = to_json(rec)
        else:
            parts = [rec["time"], rec["service"], f"{rec['kind']} {rec['event']}"]
            if rec["kind"] == "instance":
                parts.append(str(rec["instance_id"]))
                ep = rec.get("endpoint")
                if ep:
                    host = f"[{ep['address']}]" if ":" in ep["address"] else ep["address"]
                    parts.append(f"{host}:{ep['port']} {ep['protocol']} zone={ep['zone'] or '-'}"
                                 f" weight={ep['weight']} labels={labels_text(ep['labels'])}")
            else:
                parts.append(rec["key"])
            if rec.get("errors"):
                key = rec["key"]
                reasons = [e[len(key) + 2:] if e.startswith(key + ": ") else e
                           for e in rec["errors"]]
                parts.append("; ".join(one_line(r) for r in reasons))
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
        with Stopper() as stopper:
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


def add_watch_command(sub: Any) -> None:
    p = sub.add_parser("watch", help="stream changes (instances, policies) until Ctrl-C")
    p.add_argument("services", metavar="SERVICE", nargs="*", type=service_arg,
                   help="services to watch (default: every service)")
    output_option(p)
    p.set_defaults(func=cmd_watch, needs_etcd=True)

