"""pytest plugin: real etcd fixtures for meshlib's tests and for tests of meshlib users.

Registered through the ``pytest11`` entry point, so installing meshlib is enough. Importing this
module stays cheap (no grpc import) because every pytest run in the environment loads it; the
etcd machinery is imported by the fixtures when first used.

Fixtures
    ``etcd_server``  session scope: one :class:`~meshlib.testing.server.EtcdServer` for the run.
                     Combine it with ``etcd_prefix`` so tests do not see each other's keys.
    ``etcd``         function scope: a fresh, empty EtcdServer per test (starts in ~0.4 s).
    ``etcd_cluster`` function scope: a 3-member :class:`~meshlib.testing.cluster.EtcdCluster`,
                     SIGKILLed and removed at teardown.
    ``etcd_prefix``  a unique key prefix per test, ``/meshlib-test/<uuid hex>/v1``.
    ``mesh``         function scope: a :class:`~meshlib.mesh.Mesh` on ``etcd_server`` under
                     ``etcd_prefix``, closed (registrations revoked) at teardown.

At session end the plugin checks that no etcd child is still running; any that is, is killed,
reported, and turns a passing run into a failing one (a leaked server is a test bug).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from meshlib.mesh import Mesh
    from meshlib.testing.cluster import EtcdCluster
    from meshlib.testing.server import EtcdServer

_ETCD_MODULE = "meshlib.testing.process"  # holds the registry of child processes


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd server shared by the whole test session (use with ``etcd_prefix``)."""
    from meshlib.testing.server import EtcdServer

    server = EtcdServer(name="session").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A fresh, empty etcd server for this test only, stopped and removed at teardown."""
    from meshlib.testing.server import EtcdServer

    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster for this test only, SIGKILLed and removed at teardown."""
    from meshlib.testing.cluster import EtcdCluster

    cluster = EtcdCluster(3).start()
    try:
        yield cluster
    finally:
        cluster.kill_all()


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses: ``/meshlib-test/<uuid hex>/v1``."""
    return f"/meshlib-test/{uuid.uuid4().hex}/v1"


@pytest.fixture
def mesh(etcd_server: EtcdServer, etcd_prefix: str) -> Iterator[Mesh]:
    """A ready :class:`~meshlib.mesh.Mesh` on the session etcd, under a prefix of its own.

    Register your service with ``mesh.register(...)`` and call it through the mesh; the
    mesh (and every registration made through it) is closed at teardown.
    """
    from meshlib.mesh import Mesh

    with Mesh(etcd_server.endpoint, prefix=etcd_prefix, handle_sigterm=False) as m:
        yield m


_preexisting = pytest.StashKey[frozenset[int]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    # Children alive before this session (an outer session running pytester in process)
    # are not this session's leaks.
    module = sys.modules.get(_ETCD_MODULE)
    alive = module.live_children() if module is not None else []
    session.stash[_preexisting] = frozenset(alive)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Report and kill etcd processes still running after all fixtures were torn down.

    Runs after pytest's own sessionfinish, which tears down session-scoped fixtures.
    """
    module = sys.modules.get(_ETCD_MODULE)
    if module is None:  # no test used etcd
        return
    before = session.stash.get(_preexisting, frozenset())
    leaked = [pid for pid in module.live_children() if pid not in before]
    if not leaked:
        return
    module.kill_all_children(leaked)
    message = (
        f"meshlib: {len(leaked)} etcd process(es) left running after the tests (pids "
        f"{', '.join(map(str, leaked))}); killed them. Stop servers you start "
        "(use `with EtcdServer() as etcd:` or the etcd fixtures)."
    )
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, red=True, bold=True)
    else:
        sys.stderr.write(message + "\n")
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
