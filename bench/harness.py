"""What the benchmark scripts share: a throwaway etcd with a registered upstream, interleaved
measurement rounds, percentiles, and the printed lines.

Why interleaved rounds: this is a noisy machine shared by other work, and its speed drifts by
several percent within seconds (CPU frequency, neighbours). Variants measured one after the
other see different machines; variants measured in short batches that take turns, with the
order rotated every round, see the same drift spread evenly. So every comparison is a ratio of
two variants measured side by side in one run, never an absolute number compared across runs.
Besides the ratio of the pooled p50s, :meth:`Samples.paired` gives the ratio per round (the two
batches ran back to back), which is robust to drift between rounds; its spread shows the noise.

Percentiles are nearest-rank on the sorted samples (``round(q * (n - 1))``), the same for
every script, so p99s of different benchmarks mean the same thing.

Usage (scripts run as ``python bench/<name>.py``, so this directory is on ``sys.path``)::

    from harness import etcd_with_service, interleave, print_ratio_line, report

    with etcd_with_service("bench", port) as (etcd, mesh):
        s = interleave({"plain": run_plain, "mesh": run_mesh}, rounds=20, batch=200)
    report("plain", s["plain"])
    print_ratio_line("x_overhead_ratio", {"sync": s.ratio("mesh", "plain")})

Importing this module puts the repository root first on ``sys.path``, so a benchmark measures
the ``meshlib`` of the checkout it belongs to, not another installed copy.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from meshlib import Mesh
    from meshlib.testing import EtcdServer

BENCH_PREFIX = "/meshlib-bench/v1"


# --------------------------------------------------------------------------- statistics


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..1) of ``values``."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def rotations(names: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """The order of the variants in each round: rotated by one every round, so each variant
    runs first (and right after each other one) equally often. Two variants alternate."""
    names = list(names)
    for r in range(rounds):
        k = r % len(names)
        yield names[k:] + names[:k]


class Samples(dict[str, list[float]]):
    """Per-variant samples (seconds), plus each round's median per variant."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__((n, []) for n in names)
        self.rounds: list[dict[str, float]] = []

    def add_round(self, batches: Mapping[str, list[float]]) -> None:
        for name, batch in batches.items():
            self[name].extend(batch)
        self.rounds.append({name: statistics.median(b) for name, b in batches.items() if b})

    def p50(self, name: str) -> float:
        return statistics.median(self[name])

    def ratio(self, name: str, base: str) -> float:
        """p50 of ``name`` over p50 of ``base`` (all rounds pooled)."""
        return self.p50(name) / self.p50(base)

    def paired(self, name: str, base: str) -> list[float]:
        """The per-round ratio of the two variants' medians."""
        return [r[name] / r[base] for r in self.rounds if name in r and base in r]


def interleave(
    runners: Mapping[str, Callable[[int], list[float]]], rounds: int, batch: int
) -> Samples:
    """Run ``runner(batch)`` for every variant, ``rounds`` times, in rotating order.

    A runner makes ``batch`` calls and returns their durations in seconds.
    """
    samples = Samples(list(runners))
    for order in rotations(list(runners), rounds):
        samples.add_round({name: runners[name](batch) for name in order})
    return samples


async def ainterleave(
    runners: Mapping[str, Callable[[int], Awaitable[list[float]]]], rounds: int, batch: int
) -> Samples:
    """:func:`interleave` for coroutine runners, inside the caller's event loop."""
    samples = Samples(list(runners))
    for order in rotations(list(runners), rounds):
        samples.add_round({name: await runners[name](batch) for name in order})
    return samples


# --------------------------------------------------------------------------- output


def report(name: str, samples: Sequence[float], unit: str = "us") -> float:
    """Print ``name n= p50= p99=`` in ``unit`` (``us`` or ``ms``; samples are seconds);
    return the p50 in seconds."""
    scale = {"us": 1e6, "ms": 1e3}[unit]
    p50 = statistics.median(samples)
    print(f"{name:14s} n={len(samples):6d} p50={p50 * scale:8.2f} {unit} "
          f"p99={pct(samples, 0.99) * scale:8.2f} {unit} max={max(samples) * scale:8.2f} {unit}")
    return p50


def print_paired(samples: Samples, pairs: Mapping[str, tuple[str, str]]) -> None:
    """Print the per-round ratios as ``label=median [min, max]`` for each ``(name, base)``."""
    parts = []
    for label, (name, base) in pairs.items():
        v = samples.paired(name, base)
        if v:
            parts.append(f"{label}={statistics.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]")
    print("paired per-round p50 ratio (median [min, max]): " + "  ".join(parts))


def print_ratio_line(metric: str, values: Mapping[str, float | str]) -> str:
    """Print (and return) the last line a benchmark is read by: ``metric k=v ...``.

    Floats are printed with three decimals; strings as given (for another precision)."""
    line = metric + " " + " ".join(
        f"{k}={v}" if isinstance(v, str) else f"{k}={v:.3f}" for k, v in values.items())
    print(line)
    return line


# --------------------------------------------------------------------------- setup


@contextlib.contextmanager
def etcd_server() -> Iterator[EtcdServer]:
    """A throwaway etcd on loopback (``meshlib.testing.EtcdServer``), removed at exit."""
    from meshlib.testing import EtcdServer

    with EtcdServer() as etcd:
        yield etcd


@contextlib.contextmanager
def etcd_with_service(
    service: str, port: int, *, protocol: str = "http", prefix: str = BENCH_PREFIX,
    timeout: float = 10.0,
) -> Iterator[tuple[EtcdServer, Mesh]]:
    """A throwaway etcd and a ``Mesh`` on it with ``127.0.0.1:port`` registered as
    ``service`` (default policy); returns once the mesh sees the endpoint."""
    from meshlib import Mesh

    with etcd_server() as etcd, Mesh(etcd.endpoint, prefix=prefix,
                                     handle_sigterm=False) as mesh:
        mesh.register(service, port, protocol=protocol)
        mesh.wait_for(service, timeout=timeout)
        yield etcd, mesh


@contextlib.contextmanager
def grpc_test_service(root: pathlib.Path = ROOT) -> Iterator[tuple[Mesh, int]]:
    """The tests' gRPC server (``tests/integration/grpc_servers.py``, service
    ``meshtest.TestService``) in its own process, and a ``Mesh`` on a throwaway etcd with it
    registered as ``bench`` (protocol grpc): ``(mesh, port)``. ``root`` is the source tree
    whose server runs (``bench/grpc_cold.py --trees`` measures other trees)."""
    env = dict(os.environ, PYTHONPATH=f"{root}:{root / 'tests'}")
    server = subprocess.Popen(
        [sys.executable, str(root / "tests" / "integration" / "grpc_servers.py")],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with etcd_with_service("bench", port, protocol="grpc") as (_etcd, mesh):
            yield mesh, port
    finally:
        server.terminate()
        server.wait(5)


def timed(call: Callable[[], object], n: int) -> list[float]:
    """Durations (seconds) of ``n`` sequential ``call()``s."""
    pc = time.perf_counter
    out = []
    for _ in range(n):
        t0 = pc()
        call()
        out.append(pc() - t0)
    return out


async def atimed(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    """Durations (seconds) of ``n`` sequential ``await call()``s."""
    pc = time.perf_counter
    out = []
    for _ in range(n):
        t0 = pc()
        await call()
        out.append(pc() - t0)
    return out
