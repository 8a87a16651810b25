"""pybreaker listeners hear every breaker transition of an endpoint (real etcd, real HTTP)."""

from __future__ import annotations

import time

import httpx
import pybreaker
import pytest
from http_servers import Upstream, register, set_policy, wait_endpoints

from meshlib.mesh import Mesh


class Recorder(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.changes: list[tuple[str, str, str]] = []

    def state_change(self, cb, old_state, new_state) -> None:  # pybreaker's listener API
        self.changes.append((cb.name, old_state.name, new_state.name))


def test_breaker_transitions_reach_pybreaker_listeners(etcd_server, etcd_prefix):
    listener = Recorder()
    up = Upstream("flaky", mode="503")
    try:
        with Mesh(etcd_server.endpoint, prefix=etcd_prefix, breaker_listeners=[listener],
                  handle_sigterm=False) as mesh:
            register(mesh, "flaky", up)
            wait_endpoints(mesh, "flaky", 1)
            set_policy(mesh, "flaky", {
                "retries": {"attempts": 1},
                "circuit_breaker": {"failure_threshold": 3, "reset_timeout": "300ms"},
                "outlier_detection": {"enabled": False},
            })
            with mesh.http_client() as client:
                for _ in range(3):
                    assert client.get("http://flaky/").status_code == 503
                # open: the only endpoint is refused without a request reaching it
                sent = up.count
                with pytest.raises(httpx.ConnectError, match="circuit breaker"):
                    client.get("http://flaky/")
                assert up.count == sent
                time.sleep(0.35)
                up.mode = "ok"
                assert client.get("http://flaky/").status_code == 200  # the trial call
            states = [new for _name, _old, new in listener.changes]
            assert states == ["open", "half-open", "closed"], listener.changes
            (pb,) = mesh.breakers("flaky").values()
            assert pb.current_state == "closed" and pb.name.startswith("flaky ")
    finally:
        up.stop()
