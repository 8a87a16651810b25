"""The shim's garbage-collector settings: collections that do not stall the event loop.

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
"""

from __future__ import annotations

import gc
from typing import Final

#: Net allocations of tracked containers between two young-generation collections.
GEN0_THRESHOLD: Final = 20_000


def tune_gc() -> None:
    """Collect once, freeze what start-up made, space the young collections."""
    gc.collect()
    gc.freeze()
    _g0, g1, g2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, g1, g2)
