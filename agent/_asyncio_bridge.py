"""The one seam where asyncio code runs: an asyncio event loop in a dedicated worker thread.

aiodocker is asyncio-only and the agent is trio. ``AsyncioBridge.call`` runs one coroutine on
the bridge's loop and awaits it from trio without holding a thread per call. If the trio side
is cancelled, the asyncio task is cancelled too, and the trio side waits (shielded) until it has
really finished, so nothing runs on after its caller is gone. Nothing else in the agent touches
asyncio or threads (besides ``trio.to_thread`` for tarfile).
"""

from __future__ import annotations

import threading
from typing import Any, Awaitable, Callable

import trio


class AsyncioBridge:
    """Started on first use, so an agent that never runs a container never starts the thread."""

    def __init__(self):
        self.loop = None
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        import asyncio   # only once a container is run: asyncio and ssl cost several MiB

        ready = threading.Event()

        def main():
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            ready.set()
            self.loop.run_forever()
            self.loop.close()

        self._thread = threading.Thread(target=main, name="labrun-asyncio", daemon=True)
        self._thread.start()
        ready.wait()

    def close(self) -> None:
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self._thread = None

    async def call(self, function: Callable[..., Awaitable[Any]], *args, **kwargs) -> Any:
        """Run ``function(*args, **kwargs)`` on the asyncio loop; return or raise its outcome."""
        if self._thread is None:
            self._start()
        import asyncio

        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future = asyncio.run_coroutine_threadsafe(function(*args, **kwargs), self.loop)
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
        try:
            await done.wait()
        except trio.Cancelled:
            future.cancel()
            with trio.CancelScope(shield=True):
                await done.wait()
            raise
        return future.result()
