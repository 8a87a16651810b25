"""The shim's process settings (``meshlib/shim/process.py``), each checked in a fresh
interpreter: what the shim imports decides most of its RSS (docs/shim.md, "Measured cost")."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

#: Imported by nothing the shim runs unless asked for (cryptography: ``--identity on``).
HEAVY_UNUSED = ("cryptography", "click", "pygments", "rich")


def _run(code: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_shim_imports_no_module_it_does_not_use() -> None:
    got = _run(f"""
        import json, sys
        from meshlib.shim.process import skip_unused_imports
        skip_unused_imports()
        import meshlib.shim.app, meshlib.mesh, httpx
        print(json.dumps({{"loaded": [m for m in {HEAVY_UNUSED!r} if m in sys.modules],
                           "httpx_main": callable(httpx.main)}}))
        """)
    assert got == {"loaded": [], "httpx_main": True}, (
        f"the shim's import graph pulls in {got['loaded']}: import them where they are used "
        "(each costs MBs of RSS in every sidecar)")


def test_tune_gc_freezes_start_up_objects_and_spaces_young_collections() -> None:
    got = _run("""
        import gc, json
        import meshlib.shim.app
        from meshlib.shim.process import GEN0_THRESHOLD, tune_gc
        tune_gc()
        print(json.dumps({"frozen": gc.get_freeze_count(), "gen0": gc.get_threshold()[0],
                          "expected_gen0": GEN0_THRESHOLD}))
        """)
    assert got["frozen"] > 10_000  # modules, classes, functions of start-up
    assert got["gen0"] == got["expected_gen0"]
