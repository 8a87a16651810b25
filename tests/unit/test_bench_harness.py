"""bench/harness.py: the pure parts every benchmark relies on (percentiles, rotation, ratios)."""

from __future__ import annotations

import asyncio
import pathlib
import sys
from collections.abc import Callable

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
import harness  # noqa: E402


def test_pct_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100, shuffled order must not matter
    assert harness.pct(values[::-1], 0.5) == 51.0  # round(0.5 * 99) = 50 -> 51
    assert harness.pct(values, 0.99) == 99.0
    assert harness.pct(values, 1.0) == 100.0
    assert harness.pct([7.0], 0.99) == 7.0
    with pytest.raises(ValueError, match="no samples"):
        harness.pct([], 0.5)


def test_rotations_give_every_variant_every_position() -> None:
    orders = list(harness.rotations(["a", "b", "c"], 6))
    assert orders[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert orders[3:] == orders[:3]
    assert list(harness.rotations(["x", "y"], 3)) == [["x", "y"], ["y", "x"], ["x", "y"]]


def test_interleave_runs_batches_in_rotating_order_and_pairs_rounds() -> None:
    calls: list[tuple[str, int]] = []

    def runner(name: str, value: float) -> Callable[[int], list[float]]:
        def run(n: int) -> list[float]:
            calls.append((name, n))
            return [value] * n
        return run

    s = harness.interleave({"plain": runner("plain", 1.0), "mesh": runner("mesh", 1.5)}, 4, 3)
    assert calls == [("plain", 3), ("mesh", 3), ("mesh", 3), ("plain", 3)] * 2
    assert len(s["plain"]) == len(s["mesh"]) == 12
    assert s.ratio("mesh", "plain") == 1.5
    assert s.paired("mesh", "plain") == [1.5] * 4


def test_ainterleave_matches_interleave() -> None:
    async def run(n: int) -> list[float]:
        await asyncio.sleep(0)
        return [2.0] * n

    async def base(n: int) -> list[float]:
        return [1.0] * n

    s = asyncio.run(harness.ainterleave({"base": base, "x": run}, 2, 5))
    assert s.ratio("x", "base") == 2.0
    assert len(s.rounds) == 2


def test_ratio_line_format(capsys: pytest.CaptureFixture[str]) -> None:
    line = harness.print_ratio_line("m_ratio", {"sync": 1.0234, "speedup": "6.19"})
    assert line == "m_ratio sync=1.023 speedup=6.19"
    assert capsys.readouterr().out == line + "\n"
