"""The README's first command, `python -m meshlib.demo`, run as users run it.

The whole scripted scenario runs (about 25 s): instances appear and disappear, an instance is
killed mid-traffic at no failed call, a 90/10 canary shifts traffic, a misbehaving instance is
ejected and re-admitted, a bad policy is refused. Ctrl-C (SIGINT) mid-run stops everything and
leaves no process behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def _processes_mentioning(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _run_demo(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # etcd's data dir lands under tmp_path
    return subprocess.Popen(
        [sys.executable, "-m", "meshlib.demo", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def _leftovers(tmp_path: Path) -> list[int]:
    deadline = time.monotonic() + 5
    while True:
        left = _processes_mentioning(str(tmp_path)) + _processes_mentioning("meshlib.demo --instance")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_demo_runs_its_scenario_with_zero_failed_calls(tmp_path):
    proc = _run_demo(tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    results = {m.group(1): m.group(2) for m in re.finditer(r"RESULT (\w+): (.*)", out)}
    assert set(results) >= {"kill", "split", "eject", "readmit"}, out
    assert results["kill"].startswith("0 failed calls"), results["kill"]
    share = float(re.search(r"\(([\d.]+)% to v2\)", results["split"]).group(1))
    assert 4.0 <= share <= 16.0, results["split"]  # 90/10 over a few hundred calls
    assert "ejected" in results["eject"] and "is back" in results["readmit"]
    total = re.search(r"demo done: (\d+) calls, (\d+) failed", out)
    assert total and int(total.group(1)) > 500 and total.group(2) == "0", out[-2000:]
    assert "refused" in out.lower(), "the bad policy step should say it was refused"
    assert "all processes stopped" in out
    assert _leftovers(tmp_path) == []


def test_ctrl_c_stops_everything_and_leaves_no_process(tmp_path):
    proc = _run_demo(tmp_path)
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:  # wait until traffic flows through discovered instances
        seen.append(line)
        if "traffic:" in line or time.monotonic() > deadline:
            break
    assert _leftovers(tmp_path), "the demo should have started etcd and instances by now"
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    out = "".join(seen) + rest
    assert "interrupted" in out and "all processes stopped" in out, out[-2000:]
    assert _leftovers(tmp_path) == []
