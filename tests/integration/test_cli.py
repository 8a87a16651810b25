"""meshctl against a real etcd: in process through ``main(argv)`` and as a subprocess."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshlib.cli import main
from meshlib.discovery.keys import KeyLayout
from meshlib.testing import free_port

PREFIX = "/meshlib/v1"
LAYOUT = KeyLayout(PREFIX)
VENV_BIN = Path(sys.executable).parent

GOOD_POLICY = """\
# callers of orders: short timeout, a few retries
timeout: 2s
retries:
  attempts: 3
"""

# Three independent problems: a bad duration, an out-of-range number, an unknown field.
BAD_POLICY = """\
timeout: soon
retries:
  attempts: 99
retires: 3
"""


def run(etcd: Any, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run meshctl in process; return (exit code, stdout, stderr)."""
    rc = main(["--etcd", etcd.endpoint, "--timeout", "5", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def etcd_get(etcd: Any, key: str) -> str | None:
    proc = etcd.etcdctl("get", key, "--print-value-only")
    return proc.stdout[:-1] if proc.stdout else None


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def put_record(etcd: Any, service: str, iid: str, record: dict[str, Any] | str) -> None:
    value = record if isinstance(record, str) else json.dumps(record)
    etcd.etcdctl("put", LAYOUT.instance_key(service, iid), value)


# --------------------------------------------------------------------------- policies


def test_policy_set_get_validate_delete_round_trip_table(
    etcd: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(tmp_path, "orders.yaml", GOOD_POLICY)
    key = LAYOUT.policy_key("orders")

    rc, out, err = run(etcd, capsys, "policy", "validate", "orders", path)
    assert (rc, err) == (0, "")
    assert "valid" in out and "nothing written" in out
    assert etcd_get(etcd, key) is None  # validate never writes

    rc, out, _ = run(etcd, capsys, "policy", "set", "orders", path)
    assert rc == 0 and key in out
    assert etcd_get(etcd, key) == GOOD_POLICY

    rc, out, _ = run(etcd, capsys, "policy", "get", "orders")
    assert (rc, out) == (0, GOOD_POLICY)  # the stored document, comments and all

    rc, out, _ = run(etcd, capsys, "policy", "get", "orders", "--effective")
    assert rc == 0
    assert out.startswith("# effective policy for orders")
    assert "attempts: 3" in out and "timeout: 2s" in out
    assert "load_balancer:" in out  # defaults filled in

    rc, out, _ = run(etcd, capsys, "policy", "delete", "orders")
    assert rc == 0 and "deleted" in out
    assert etcd_get(etcd, key) is None

    rc, out, err = run(etcd, capsys, "policy", "get", "orders")
    assert rc == 1 and out == ""
    assert err == f"meshctl: error: no policy stored at {key}\n"
    rc, _, err = run(etcd, capsys, "policy", "delete", "orders")
    assert rc == 1 and "no policy stored" in err


def test_policy_set_get_validate_delete_round_trip_json(
    etcd: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = {"timeout": "3s", "retries": {"attempts": 2}}
    key = LAYOUT.policy_key("orders")

    rc, out, _ = run(etcd, capsys, "policy", "validate", "orders",
                     write(tmp_path, "p.json", json.dumps(doc)), "-o", "json")
    assert rc == 0 and json.loads(out) == {"valid": True, "written": False,
                                           "service": "orders", "key": key}

    monkeypatch.setattr("sys.stdin", _Stdin(json.dumps(doc).encode()))
    rc, out, _ = run(etcd, capsys, "policy", "set", "orders", "-", "-o", "json")
    assert rc == 0
    result = json.loads(out)
    assert result["written"] is True and result["key"] == key and result["revision"] > 1

    rc, out, _ = run(etcd, capsys, "policy", "get", "orders", "-o", "json")
    got = json.loads(out)
    assert rc == 0
    assert got["document"] == doc and got["valid"] is True and got["errors"] == []
    assert json.loads(got["raw"]) == doc and got["mod_revision"] == result["revision"]

    rc, out, _ = run(etcd, capsys, "policy", "get", "orders", "--effective", "-o", "json")
    eff = json.loads(out)
    assert rc == 0 and eff["sources"] == [key]
    assert eff["policy"]["timeout"] == "3s" and eff["policy"]["retries"]["attempts"] == 2

    rc, out, _ = run(etcd, capsys, "policy", "delete", "orders", "-o", "json")
    assert rc == 0 and json.loads(out) == {"deleted": True, "service": "orders", "key": key}
    assert etcd_get(etcd, key) is None


class _Stdin:
    """Stands in for sys.stdin with a ``buffer`` holding ``data``."""

    def __init__(self, data: bytes) -> None:
        import io

        self.buffer = io.BytesIO(data)


def test_invalid_policy_set_writes_nothing_and_prints_every_reason(
    etcd: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = LAYOUT.policy_key("orders")
    etcd.etcdctl("put", key, GOOD_POLICY)
    bad = write(tmp_path, "bad.yaml", BAD_POLICY)

    rc, out, err = run(etcd, capsys, "policy", "set", "orders", bad)
    assert rc == 2 and out == ""
    lines = err.splitlines()
    reasons = [line for line in lines if line.startswith(f"{key}: ")]
    fields = sorted(line.split(": ", 2)[1].split("=", 1)[0] for line in reasons)
    assert fields == ["retires", "retries.attempts", "timeout"]
    assert any("timeout='soon'" in line for line in reasons)
    assert any("retries.attempts=99" in line for line in reasons)
    assert lines[-1].startswith("meshctl: error: policy invalid (3 problem(s))")
    assert "nothing written" in lines[-1]
    assert etcd_get(etcd, key) == GOOD_POLICY  # the old document is untouched

    rc, out, err = run(etcd, capsys, "policy", "validate", "orders", bad, "-o", "json")
    assert rc == 2
    result = json.loads(out)
    assert result["valid"] is False and result["written"] is False
    assert sorted(e["field"] for e in result["errors"]) == ["retires", "retries.attempts",
                                                            "timeout"]
    assert all(e["key"] == key for e in result["errors"])


def test_policy_set_refuses_a_document_invalid_once_merged_with_the_default(
    etcd: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc, _, _ = run(etcd, capsys, "policy", "set", "--default",
                   write(tmp_path, "d.yaml", "timeout: 1s\n"))
    assert rc == 0 and etcd_get(etcd, LAYOUT.default_policy_key) == "timeout: 1s\n"

    # Valid alone (per-try 5s <= default timeout 15s), invalid over the stored default (1s).
    svc = write(tmp_path, "s.yaml", "retries:\n  per_try_timeout: 5s\n")
    rc, _, err = run(etcd, capsys, "policy", "set", "orders", svc)
    assert rc == 2
    assert f"{LAYOUT.policy_key('orders')}: retries.per_try_timeout=" in err
    assert "must be <= timeout (1s)" in err
    assert etcd_get(etcd, LAYOUT.policy_key("orders")) is None

    # The effective view merges the default key; `_default` names it too.
    rc, out, _ = run(etcd, capsys, "policy", "get", "_default")
    assert (rc, out) == (0, "timeout: 1s\n")
    rc, out, _ = run(etcd, capsys, "policy", "get", "orders", "--effective", "-o", "json")
    eff = json.loads(out)
    assert eff["sources"] == [LAYOUT.default_policy_key] and eff["policy"]["timeout"] == "1s"
    rc, _, _ = run(etcd, capsys, "policy", "delete", "--default")
    assert rc == 0 and etcd_get(etcd, LAYOUT.default_policy_key) is None


# --------------------------------------------------------------------------- listings


def test_endpoints_lists_malformed_records_as_invalid_with_the_reason(
    etcd: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    put_record(etcd, "orders", "a-1", {"address": "10.0.0.1", "port": 8080, "protocol": "grpc",
                                       "zone": "z1", "weight": 50, "labels": {"version": "v2"}})
    put_record(etcd, "orders", "b-broken", '{"address": "10.0.0.2", "port": ')
    put_record(etcd, "orders", "c-badport", {"address": "10.0.0.3", "port": 70000})

    rc, out, err = run(etcd, capsys, "endpoints", "orders")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["INSTANCE", "ADDRESS", "PROTOCOL", "ZONE", "WEIGHT", "LABELS",
                                "STATUS"]
    assert lines[1].split() == ["a-1", "10.0.0.1:8080", "grpc", "z1", "50", "version=v2", "ok"]
    assert lines[2].startswith("b-broken") and "invalid: <document>=" in lines[2]
    assert "malformed JSON" in lines[2]
    assert lines[3].startswith("c-badport") and "invalid: port=70000" in lines[3]

    rc, out, _ = run(etcd, capsys, "endpoints", "orders", "-o", "json")
    data = json.loads(out)
    by_id = {e["instance_id"]: e for e in data["endpoints"]}
    assert rc == 0 and data["service"] == "orders" and sorted(by_id) == ["a-1", "b-broken",
                                                                         "c-badport"]
    assert by_id["a-1"]["valid"] is True and by_id["a-1"]["labels"] == {"version": "v2"}
    assert by_id["a-1"]["authority"] == "10.0.0.1:8080" and by_id["a-1"]["weight"] == 50
    broken = by_id["b-broken"]
    assert broken["valid"] is False and "malformed JSON" in broken["errors"][0]
    assert broken["raw"] == '{"address": "10.0.0.2", "port": '
    assert by_id["c-badport"]["errors"][0].startswith(LAYOUT.instance_key("orders", "c-badport"))


def test_services_lists_instance_counts_and_policies(
    etcd: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(etcd, capsys, "services")
    assert rc == 0 and "no services" in out

    put_record(etcd, "orders", "a", {"address": "10.0.0.1", "port": 1})
    put_record(etcd, "orders", "b", {"address": "10.0.0.2", "port": 1})
    put_record(etcd, "users", "a", {"address": "10.0.0.3", "port": 1})
    etcd.etcdctl("put", LAYOUT.policy_key("users"), "timeout: 1s")
    etcd.etcdctl("put", LAYOUT.policy_key("billing"), "timeout: 1s")  # policy, no instance

    rc, out, _ = run(etcd, capsys, "services")
    rows = [line.split() for line in out.splitlines()]
    assert rc == 0
    assert rows[:4] == [["SERVICE", "INSTANCES", "POLICY"], ["billing", "0", "yes"],
                        ["orders", "2", "no"], ["users", "1", "yes"]]
    assert out.splitlines()[-1].startswith("default policy: not set")

    rc, out, _ = run(etcd, capsys, "services", "-o", "json")
    data = json.loads(out)
    assert rc == 0 and data["default_policy"] is False
    assert data["services"] == [
        {"service": "billing", "instances": 0, "policy": True},
        {"service": "orders", "instances": 2, "policy": False},
        {"service": "users", "instances": 1, "policy": True},
    ]


def test_deregister_deletes_the_record_and_reports_a_missing_one(
    etcd: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    put_record(etcd, "orders", "stale-1", {"address": "10.0.0.1", "port": 1})
    rc, out, _ = run(etcd, capsys, "deregister", "orders", "stale-1")
    assert rc == 0 and "deregistered orders/stale-1" in out
    assert etcd_get(etcd, LAYOUT.instance_key("orders", "stale-1")) is None
    rc, _, err = run(etcd, capsys, "deregister", "orders", "stale-1")
    assert rc == 1 and err.startswith("meshctl: error: no instance record at ")


def test_usage_errors_exit_2_with_one_line(etcd: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(etcd, capsys, "policy", "get", "Not_A_Service")
    assert rc == 2 and err.startswith("meshctl: error: invalid service name 'Not_A_Service'")
    assert len(err.splitlines()) == 1
    rc, _, err = run(etcd, capsys, "policy", "set", "orders", "/nonexistent/p.yaml")
    assert rc == 2 and "cannot read policy file '/nonexistent/p.yaml'" in err
    with pytest.raises(SystemExit) as exc:
        main(["endpoints"])  # argparse: missing SERVICE
    assert exc.value.code == 2


# --------------------------------------------------------------------------- subprocesses


class Proc:
    """A meshctl subprocess whose stdout/stderr lines are read by threads."""

    def __init__(self, argv: list[str], cmd: list[str] | None = None) -> None:
        env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.p = subprocess.Popen(
            (cmd or [sys.executable, "-m", "meshlib.cli"]) + argv,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        self.err_lines: list[str] = []
        self.out_lines: list[str] = []  # every stdout line line() has read, matching or not
        for stream, q in ((self.p.stdout, self.out), (self.p.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, q), daemon=True).start()

    @staticmethod
    def _pump(stream: Any, q: queue.Queue[str]) -> None:
        for line in stream:
            q.put(line)

    def line(self, q: queue.Queue[str], contains: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = q.get(timeout=0.1)
            except queue.Empty:
                if self.p.poll() is not None and q.empty():
                    break
                continue
            seen.append(line)
            if q is self.err:
                self.err_lines.append(line)
            else:
                self.out_lines.append(line)
            if contains in line:
                return line
        raise AssertionError(f"no line containing {contains!r}; saw {seen!r}; "
                             f"exit {self.p.poll()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        return self.p.wait(timeout)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def wait_until(predicate: Any, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_register_subprocess_shows_in_endpoints_and_sigterm_deregisters(
    etcd: Any, capsys: pytest.CaptureFixture[str], procs: list[Proc]
) -> None:
    reg = Proc(["--etcd", etcd.endpoint, "register", "orders", "--port", "8081",
                "--instance-id", "cli-1", "--zone", "z1", "--label", "version=v1",
                "--weight", "30", "--ttl", "30"])
    procs.append(reg)
    reg.line(reg.out, "registered orders/cli-1")

    rc, out, _ = run(etcd, capsys, "endpoints", "orders", "-o", "json")
    (ep,) = json.loads(out)["endpoints"]
    assert rc == 0
    assert (ep["instance_id"], ep["authority"], ep["zone"], ep["weight"], ep["labels"]) == (
        "cli-1", "127.0.0.1:8081", "z1", 30, {"version": "v1"})
    assert ep["lease"] is not None  # kept alive by a lease

    # SIGTERM revokes the lease at once (the TTL is 30 s, far longer than this wait).
    assert reg.stop(signal.SIGTERM) == 0
    rc, out, _ = run(etcd, capsys, "endpoints", "orders", "-o", "json")
    assert json.loads(out)["endpoints"] == []
    reg.line(reg.out, "deregistered orders/cli-1")


def test_watch_subprocess_prints_a_line_per_change(etcd: Any, procs: list[Proc]) -> None:
    watch = Proc(["--etcd", etcd.endpoint, "watch", "-o", "json"])
    procs.append(watch)
    watch.line(watch.err, f"watching {LAYOUT.services_prefix}")
    watch.line(watch.err, f"watching {LAYOUT.default_policy_key}")

    put_record(etcd, "orders", "w-1", {"address": "10.0.0.9", "port": 9000, "zone": "z2"})
    added = json.loads(watch.line(watch.out, '"w-1"'))
    assert (added["service"], added["kind"], added["event"]) == ("orders", "instance", "added")
    assert added["endpoint"]["address"] == "10.0.0.9" and added["endpoint"]["zone"] == "z2"

    etcd.etcdctl("put", LAYOUT.policy_key("orders"), "retries: {attempts: 42}")
    refused = json.loads(watch.line(watch.out, '"policy"'))
    assert refused["event"] == "refused"
    assert any("retries.attempts=42" in e for e in refused["errors"])

    etcd.etcdctl("del", LAYOUT.instance_key("orders", "w-1"))
    removed = json.loads(watch.line(watch.out, '"removed"'))
    assert removed["instance_id"] == "w-1"
    assert watch.stop(signal.SIGINT) == 0


def test_watch_table_output_for_one_service(etcd: Any, procs: list[Proc]) -> None:
    watch = Proc(["--etcd", etcd.endpoint, "watch", "orders"], cmd=[str(VENV_BIN / "meshctl")])
    procs.append(watch)
    watch.line(watch.err, f"watching {LAYOUT.service_prefix('orders')}")
    watch.line(watch.err, f"watching {LAYOUT.default_policy_key}")
    put_record(etcd, "users", "u-1", {"address": "10.0.0.1", "port": 1})  # not watched
    # o-1 is written after u-1, and changes are printed in revision order: once o-1's line
    # is read, a line for u-1 would have been read before it (out_lines keeps both).
    put_record(etcd, "orders", "o-1", {"address": "10.0.0.2", "port": 2, "labels": {"a": "b"}})
    line = watch.line(watch.out, "o-1")
    assert "  orders  instance added  o-1  10.0.0.2:2 http zone=- weight=100 labels=a=b" in line
    etcd.etcdctl("put", LAYOUT.policy_key("orders"), "timeout: 3s")
    assert "orders  policy changed" in watch.line(watch.out, "policy")
    assert watch.stop(signal.SIGTERM) == 0
    printed = watch.out_lines + list(watch.out.queue)
    assert not [ln for ln in printed if "u-1" in ln or "users" in ln], printed


def test_unreachable_etcd_exits_1_with_one_line_within_the_timeout(procs: list[Proc]) -> None:
    port = free_port()
    start = time.monotonic()
    proc = subprocess.run(
        [str(VENV_BIN / "meshctl"), "--etcd", f"127.0.0.1:{port}", "--timeout", "1", "services"],
        capture_output=True, text=True, timeout=30,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"meshctl: error: etcd unreachable at 127.0.0.1:{port} (")
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert elapsed < 1 + 10  # the 1 s budget plus interpreter start-up, with a wide margin


def test_meshlib_demo_passes_its_arguments_to_the_demo() -> None:
    proc = subprocess.run([str(VENV_BIN / "meshlib"), "demo", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "--help" in proc.stdout
