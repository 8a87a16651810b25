"""A policy change through etcd is in force, whole, for the next call (real etcd, real HTTP).

Issue 9 section 5: turning the breaker off (``circuit_breaker: {enabled: false}``) used to
leave an endpoint whose breaker was already open out of traffic for its ``reset_timeout``.
And a user's pybreaker listener that raises must not fail the call that caused the
transition.
"""

from __future__ import annotations

import httpx
import pybreaker
import pytest
from http_servers import Upstream, register, set_policy, wait_endpoints

from meshlib.mesh import Mesh


def test_turning_the_breaker_off_puts_an_open_endpoint_back_at_once(etcd_server, etcd_prefix):
    up = Upstream("only", mode="503")
    try:
        with Mesh(etcd_server.endpoint, prefix=etcd_prefix, handle_sigterm=False) as mesh:
            register(mesh, "only", up)
            wait_endpoints(mesh, "only", 1)
            set_policy(mesh, "only", {
                "retries": {"attempts": 1},
                "circuit_breaker": {"failure_threshold": 2, "reset_timeout": "60s"},
                "outlier_detection": {"enabled": False},
            })
            with mesh.http_client() as client:
                for _ in range(2):
                    assert client.get("http://only/").status_code == 503
                with pytest.raises(httpx.ConnectError, match="circuit breaker"):
                    client.get("http://only/")  # open for 60 s
                up.mode = "ok"
                set_policy(mesh, "only", {
                    "retries": {"attempts": 1},
                    "circuit_breaker": {"enabled": False},
                    "outlier_detection": {"enabled": False},
                })
                sent = up.count
                # the very next call reaches the endpoint (no wait for the 60 s)
                assert client.get("http://only/").status_code == 200
                assert up.count == sent + 1
    finally:
        up.stop()


class Raising(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.calls = 0

    def state_change(self, cb, old_state, new_state) -> None:
        self.calls += 1
        raise RuntimeError("a bug in the user's listener")


def test_a_raising_breaker_listener_does_not_fail_the_call(etcd_server, etcd_prefix, caplog):
    listener = Raising()
    up = Upstream("flaky", mode="503")
    try:
        with Mesh(etcd_server.endpoint, prefix=etcd_prefix, breaker_listeners=[listener],
                  handle_sigterm=False) as mesh:
            register(mesh, "flaky", up)
            wait_endpoints(mesh, "flaky", 1)
            set_policy(mesh, "flaky", {
                "retries": {"attempts": 1},
                "circuit_breaker": {"failure_threshold": 1, "reset_timeout": "60s"},
                "outlier_detection": {"enabled": False},
            })
            with caplog.at_level("ERROR", logger="meshlib.core.destination"):
                with mesh.http_client() as client:
                    # this call opens the breaker: the listener raises, the caller still
                    # gets the upstream's answer
                    assert client.get("http://flaky/").status_code == 503
            assert listener.calls == 1
            assert any("breaker listener" in r.getMessage() for r in caplog.records)
    finally:
        up.stop()


def test_with_etcd_unreachable_and_no_snapshot_the_error_says_so():
    """Issue 9: the error used to say "service 'stock' has no endpoints in etcd" when etcd
    had never been reached; it now says etcd could not be reached and since when."""
    import socket

    from meshlib.http.errors import NoEndpointsError

    with socket.socket() as s:  # a port nobody listens on: etcd is unreachable
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Mesh(f"127.0.0.1:{port}", handle_sigterm=False) as mesh:
        with mesh.http_client() as client:
            with pytest.raises(NoEndpointsError) as err:
                client.get("http://stock/")
    msg = str(err.value)
    assert "etcd has not answered since the mesh started" in msg or (
        "etcd unreachable for" in msg), msg
    assert "no snapshot of the service is cached" in msg
