"""Process-level settings of the shim: a lean import graph, and garbage collections that
do not stall the event loop.

``skip_unused_imports()`` runs before anything imports httpx. httpx's package ``__init__``
imports its command-line client (``httpx._main``: click, pygments) inside ``try: ...
except ImportError`` and falls back to a stub ``main``. The shim never runs that client; a
``None`` entry in ``sys.modules`` makes importing the module raise ``ImportError`` (Python
reference, "The module cache"), which saves ~1.5 MB of RSS.

``tune_gc()`` runs once the shim has started:

* ``gc.freeze()`` moves every object start-up made (modules, classes, functions, the
  policy's pydantic validators: ~53 000 tracked containers) to the permanent generation,
  which later collections ignore (Python docs, ``gc.freeze``). Without it a full
  collection walks them all: 20-25 ms on this project's 2-core test machine, a pause of
  the one event loop that every request in flight waits out (a p99 spike).
* The young generation is collected every ``GEN0_THRESHOLD`` net container allocations
  instead of every 700. A proxied request allocates a few dozen containers, nearly all
  freed by reference counting before a collection sees them, so young collections stay
  short and run ~30 times less often (less CPU per request). Reference cycles made while
  serving are still collected, only later.
* ``malloc_trim(0)`` (glibc; skipped where the C library has none, e.g. musl) returns the
  heap pages start-up freed (import-time temporaries, the collection above) to the
  kernel: ~1 MB of RSS.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from typing import Final

#: Net allocations of tracked containers between two young-generation collections.
GEN0_THRESHOLD: Final = 20_000
#: Modules a dependency imports optionally and the shim never uses.
UNUSED_MODULES: Final = ("httpx._main",)


def skip_unused_imports() -> None:
    """Make the optional imports of :data:`UNUSED_MODULES` fail (see the module doc)."""
    for name in UNUSED_MODULES:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def tune_gc() -> None:
    """Collect once, freeze what start-up made, space the young collections."""
    gc.collect()
    gc.freeze()
    _g0, g1, g2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, g1, g2)
    _malloc_trim()


def _malloc_trim() -> None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return
    trim(0)
