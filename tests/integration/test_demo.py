"""The README's first command, `python -m meshlib.demo`, run as users run it.

The whole scripted scenario runs (about 25 s): instances appear and disappear, an instance is
killed mid-traffic at no failed call, a 90/10 canary shifts traffic, a misbehaving instance is
ejected and re-admitted, a bad policy is refused. Ctrl-C (SIGINT) or SIGTERM mid-run stops
everything; SIGKILL of the demo ends its instances too (each holds a pipe from the demo).

"No process left" is checked by pid: the demo prints the pid of etcd and of every instance it
starts, and the test watches each through a pidfd opened while the process was alive (so a
reused pid cannot pass for a survivor).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PID_LINE = re.compile(r"(etcd started at \S+|started instance [\w-]+ \(\w+\)), pid (\d+)")


def _run_demo(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # etcd's data dir lands under tmp_path
    return subprocess.Popen(
        [sys.executable, "-m", "meshlib.demo", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


class Children:
    """The demo's children, by pid, each watched through a pidfd (Linux >= 5.3)."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}  # pid -> pidfd
        self.gone_early: set[int] = set()  # ended (and reaped) before we could open a pidfd

    def see(self, line: str) -> None:
        m = PID_LINE.search(line)
        if m is None:
            return
        pid = int(m.group(2))
        try:
            self.fds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            self.gone_early.add(pid)

    def alive(self, wait: float = 0.0) -> list[int]:
        """Pids still running after waiting up to ``wait`` seconds for all of them to end."""
        deadline = time.monotonic() + wait
        pending = dict(self.fds)
        while pending:
            ready, _, _ = select.select(list(pending.values()), [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for pid, fd in list(pending.items()):
                if fd in ready:
                    del pending[pid]
        return sorted(pending)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def __len__(self) -> int:
        return len(self.fds) + len(self.gone_early)


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        for pid in c.alive():  # never leave a process behind, even when the test failed
            with_group = (os.killpg, pid) if pid == os.getpgid(pid) else (os.kill, pid)
            with_group[0](with_group[1], signal.SIGKILL)
        c.close()


def _read_until(proc: subprocess.Popen[str], children: Children, marker: str,
                timeout: float = 60) -> list[str]:
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        children.see(line)
        if marker in line or time.monotonic() > deadline:
            break
    return seen


def test_demo_runs_its_scenario_with_zero_failed_calls(tmp_path, children):
    proc = _run_demo(tmp_path)
    out = "".join(_read_until(proc, children, "all processes stopped", timeout=120))
    rest, _ = proc.communicate(timeout=30)
    out += rest
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
    assert not re.search(r"abnormally|did not stop|Traceback|Fatal Python error", out), out
    assert len(children) == 6, out  # etcd and hello-a..e
    assert children.alive() == []  # the demo waited for every child before it exited


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_everything_and_leaves_no_process(tmp_path, children, sig):
    proc = _run_demo(tmp_path, "--forever")
    seen = _read_until(proc, children, "traffic:")  # traffic flows through discovered instances
    assert len(children) == 3 and children.alive() != [], "".join(seen)  # etcd, hello-a, -b
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=30)
    out = "".join(seen) + rest
    assert f"interrupted ({sig.name})" in out and "all processes stopped" in out, out[-2000:]
    assert proc.returncode == 128 + sig, out[-2000:]
    # every instance stopped cleanly (exit status 0, no crash at interpreter exit)
    assert not re.search(r"abnormally|did not stop|Traceback|Fatal Python error", out), out
    assert children.alive() == [], out[-2000:]  # at once: the demo reaped them before exiting


def test_instances_end_when_the_demo_is_killed(tmp_path, children):
    proc = _run_demo(tmp_path, "--forever")
    seen = _read_until(proc, children, "traffic:")
    assert len(children) == 3 and children.alive() != [], "".join(seen)
    proc.kill()  # SIGKILL: no cleanup in the demo at all
    proc.communicate(timeout=30)
    # etcd dies with its parent (PR_SET_PDEATHSIG); each instance sees its stdin pipe close,
    # deregisters (etcd is gone: that times out) and exits.
    assert children.alive(wait=40) == [], "".join(seen)
