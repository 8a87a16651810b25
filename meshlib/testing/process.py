"""Child-process control for the test helpers: free ports, spawning, reaping, cleanup.

No process outlives the test run. Every child is recorded in a module-level registry; an
``atexit`` handler and SIGTERM/SIGINT handlers (chained to the previous ones) kill them all.
Children run in their own session (``start_new_session``) so a terminal Ctrl-C reaches only
Python, and on Linux they get ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` so the kernel kills them
even when the test process itself is SIGKILLed. PDEATHSIG fires when the *thread* that forked
the child exits, so it is only set for children spawned from the main thread.

Nothing here is specific to etcd: any helper that starts a child process for a test (etcd,
its gRPC proxy, a Prometheus server) can use :func:`spawn` / :func:`reap` and
:func:`pdeathsig_prefix`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any

from meshlib.testing.errors import EtcdError

_given_ports: set[int] = set()

_ports_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now and was not handed out before by this process."""
    with _ports_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _given_ports:
                _given_ports.add(port)
                return port
    raise EtcdError(f"no free TCP port on {host} after 100 attempts")


# --------------------------------------------------------------------------- child registry

_registry_lock = threading.RLock()  # re-entrant: the signal handler runs on the main thread
_children: dict[int, subprocess.Popen[bytes]] = {}
_temp_dirs: set[str] = set()
_previous_handlers: dict[int, Any] = {}


def live_children() -> list[int]:
    """PIDs of etcd processes started by this module that are still running."""
    with _registry_lock:
        return [pid for pid, proc in _children.items() if proc.poll() is None]


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def kill_all_children(pids: Iterable[int] | None = None) -> list[int]:
    """SIGKILL registered children (all, or those in ``pids``) and reap them.

    With ``pids`` None it also removes every registered temp dir. Returns the PIDs that were
    still running. Used by the atexit and signal handlers and by the pytest plugin.
    """
    wanted = None if pids is None else set(pids)
    with _registry_lock:
        procs = [p for pid, p in _children.items() if wanted is None or pid in wanted]
        for proc in procs:
            _children.pop(proc.pid, None)
        dirs = list(_temp_dirs) if wanted is None else []
        _temp_dirs.difference_update(dirs)
    alive = [p for p in procs if p.poll() is None]
    for proc in alive:
        _signal_group(proc, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    return [p.pid for p in alive]


def _on_signal(signum: int, frame: FrameType | None) -> None:
    kill_all_children()
    previous = _previous_handlers.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:  # SIG_DFL, or a handler installed outside Python: die the way we would have
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal.signal() only works there; atexit and PDEATHSIG still apply
    for sig in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(sig)
        if current is _on_signal or current == signal.SIG_IGN:
            continue  # already ours, or the process ignores it (e.g. a background shell job)
        _previous_handlers[sig] = current
        signal.signal(sig, _on_signal)


def pdeathsig_prefix() -> list[str]:
    """An argv prefix that makes the kernel SIGKILL the child when this thread dies (Linux).

    ``setpriv --pdeathsig KILL`` (util-linux) sets PR_SET_PDEATHSIG and execs the command in
    the same process. It replaces a ``preexec_fn``: a Python callback between fork and exec
    forces a plain fork(), and grpcio's fork handlers in a process with live gRPC threads then
    abort the child ("epoll_wait error: Bad file descriptor", exit -6) before etcd starts.
    """
    if not sys.platform.startswith("linux"):
        return []
    if threading.current_thread() is not threading.main_thread():
        return []  # PDEATHSIG follows the forking thread: a worker thread's exit would kill etcd
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    _install_handlers()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            pdeathsig_prefix() + argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    with _registry_lock:
        _children[proc.pid] = proc
    return proc


def reap(proc: subprocess.Popen[bytes], term_timeout: float | None) -> None:
    """SIGTERM (if ``term_timeout`` is set) and wait, then SIGKILL and wait; unregister."""
    if proc.poll() is None:
        if term_timeout is not None and term_timeout > 0:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=term_timeout)
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
    proc.wait()
    with _registry_lock:
        _children.pop(proc.pid, None)


def make_temp_dir(prefix: str) -> Path:
    path = tempfile.mkdtemp(prefix=prefix)
    with _registry_lock:
        _temp_dirs.add(path)
    return Path(path)


def remove_temp_dir(path: Path | None) -> None:
    if path is None:
        return
    shutil.rmtree(path, ignore_errors=True)
    with _registry_lock:
        _temp_dirs.discard(str(path))


def log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:]) or "(log empty)"


atexit.register(kill_all_children)

