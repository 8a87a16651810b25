"""The public ``Mesh`` API as httpx and grpcio users expect it (issue 9, section 4).

* ``await mesh.aclose()`` / ``async with Mesh(...)``: the blocking part of closing runs in a
  worker thread while the event loop keeps running, and the mesh deregisters.
* SIGTERM: by default the mesh installs no handler (the host's stays in charge); with
  ``Mesh(handle_sigterm=True)`` SIGTERM deregisters at once, then defers to the host's
  previous handler or exits 143. Checked on real subprocesses receiving a real SIGTERM, and on
  the record in a real etcd.
* Deprecated names still work for one release and say what replaces them.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest

from meshlib import Mesh


@pytest.fixture
def prefix() -> str:
    return f"/meshlib-test/{uuid.uuid4().hex[:10]}/v1"


# --- closing from asyncio ------------------------------------------------------------------
async def test_async_with_deregisters_on_exit(etcd, prefix):
    with Mesh(etcd.endpoint, prefix=prefix) as observer:
        async with Mesh(etcd.endpoint, prefix=prefix) as mesh:
            reg = mesh.register("tidy", 7100, ttl=30)
            assert observer.client.get(reg.key) is not None
        assert mesh.closed and repr(mesh).endswith("service=None closed>")
        # TTL 30 s: the record is gone now only because aclose revoked the lease.
        assert observer.client.get(reg.key) is None


async def test_aclose_keeps_the_event_loop_running(etcd, prefix):
    """With etcd down, revoking the lease waits for ``etcd_timeout``: ``close()`` would hold
    the loop that long; ``aclose()`` runs it in a thread while the loop goes on."""
    before = set(threading.enumerate())
    mesh = Mesh(etcd.endpoint, prefix=prefix, etcd_timeout=1.0)
    mesh.register("slow-bye", 7101, ttl=30)
    etcd.stop()
    closing = asyncio.ensure_future(mesh.aclose())
    await asyncio.sleep(0)  # aclose starts and hands close() to a worker thread
    async with asyncio.timeout(5):
        while not mesh.closed:  # the worker thread has entered close()
            await asyncio.sleep(0.005)
    assert not closing.done()  # ...and this loop runs while close() is still revoking
    await asyncio.wait_for(closing, 30)
    assert closing.exception() is None
    await mesh.aclose()  # idempotent: returns at once
    async with asyncio.timeout(5):  # the mesh's threads end (the loop's executor stays)
        while {t for t in set(threading.enumerate()) - before
               if not t.name.startswith("asyncio_")}:
            await asyncio.sleep(0.01)


def test_close_is_idempotent_and_thread_safe(etcd, prefix):
    mesh = Mesh(etcd.endpoint, prefix=prefix)
    reg = mesh.register("twice", 7102, ttl=30)
    closers = [threading.Thread(target=mesh.close) for _ in range(4)]
    for t in closers:
        t.start()
    for t in closers:
        t.join(30)
    assert mesh.closed and not any(t.is_alive() for t in closers)
    with Mesh(etcd.endpoint, prefix=prefix) as observer:
        assert observer.client.get(reg.key) is None


# --- SIGTERM -------------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import faulthandler, signal, sys, time
    from meshlib import Mesh

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks on a hang

    if {host_handler!r}:
        def on_term(signum, frame):
            print("host handler ran", flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, on_term)
    before = signal.getsignal(signal.SIGTERM)
    mesh = Mesh({endpoint!r}, prefix={prefix!r}, {kwargs})
    reg = mesh.register("polite", 7002, ttl=30, instance_id="child")
    same = signal.getsignal(signal.SIGTERM) is before
    print("registered", "handler-kept" if same else "handler-installed", flush=True)
    # A main loop that wakes, as a server's does: Python runs signal handlers in the main
    # thread only, and when the kernel hands SIGTERM to another thread (grpc's, etcd
    # client's) nothing interrupts the main thread's sleep: one long sleep would delay the
    # handler until it ends.
    while True:
        time.sleep(0.05)
    """
)


@pytest.mark.parametrize(
    ("kwargs", "host_handler", "handler", "rc", "deregistered"),
    [
        # default: a library leaves SIGTERM alone; the process dies as any would, and its
        # record stays until the lease TTL
        ("", False, "handler-kept", -signal.SIGTERM, False),
        # default with the host's own handler: it runs; sys.exit runs atexit, which closes
        ("", True, "handler-kept", 7, True),
        # opt in: deregister at once, then exit 143
        ("handle_sigterm=True", False, "handler-installed", 128 + signal.SIGTERM, True),
        # opt in over a host handler: deregister, then the host's handler runs (chained)
        ("handle_sigterm=True", True, "handler-installed", 7, True),
    ],
    ids=["default", "default-host-handler", "opt-in", "opt-in-host-handler"],
)
def test_sigterm(etcd, prefix, kwargs, host_handler, handler, rc, deregistered):
    code = CHILD.format(endpoint=etcd.endpoint, prefix=prefix, kwargs=kwargs,
                        host_handler=host_handler)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        assert first == ["registered", handler], (first, proc.stderr and proc.stderr.read())
        with Mesh(etcd.endpoint, prefix=prefix) as observer:
            key = observer.layout.instance_key("polite", "child")
            assert observer.client.get(key) is not None
            proc.send_signal(signal.SIGTERM)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack to stderr
                try:
                    out, err = proc.communicate(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                pytest.fail(f"the child did not exit within 30 s of SIGTERM; its threads:\n{err}"
                            f"\nstdout: {out}")
            assert proc.returncode == rc, (out, err)
            assert ("host handler ran" in out) == host_handler, (out, err)
            # The lease TTL is 30 s: gone now only if the process revoked it before it died.
            assert (observer.client.get(key) is None) == deregistered, (out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- deprecated names ----------------------------------------------------------------------
def test_deprecated_names_warn_and_still_work(mesh):
    with pytest.warns(DeprecationWarning, match=r"Mesh\.endpoints .* Mesh\.etcd_endpoints"):
        assert mesh.endpoints == mesh.etcd_endpoints


async def test_aio_grpc_channel_is_a_deprecated_alias(mesh):
    from meshlib.grpc import AioMeshChannel

    with pytest.warns(DeprecationWarning, match="async_grpc_channel"):
        old = mesh.aio_grpc_channel("orders")
    new = mesh.async_grpc_channel("orders")
    try:
        assert type(old) is type(new) is AioMeshChannel
    finally:
        await old.close()
        await new.close()
