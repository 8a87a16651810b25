"""The event loop thread of the shim's gRPC upstream listeners.

``grpc.aio`` objects (servers, channels) belong to the event loop that created them, and the
shim's main thread runs its own (uv)loop for the HTTP side. The gRPC listeners therefore run
on one private loop in a daemon thread, started on first use and shared by every listener of
the process; blocking callers (the shim's main thread) hand it coroutines with :func:`run`.
uvloop is used when it is installed (grpc.aio works on it; the shim depends on it anyway).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["GrpcLoop", "shared_loop"]

T = TypeVar("T")


class GrpcLoop:
    """An event loop running in its own daemon thread (``name``)."""

    def __init__(self, name: str = "meshlib-shim-grpc") -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a shim dependency
            self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (not from the loop's own thread)."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("GrpcLoop.run() called from the loop's own thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.loop.is_closed()


_shared: GrpcLoop | None = None
_lock = threading.Lock()


def shared_loop() -> GrpcLoop:
    """The process's gRPC listener loop (started on first use)."""
    global _shared
    with _lock:
        if _shared is None or not _shared.alive():
            _shared = GrpcLoop()
        return _shared
