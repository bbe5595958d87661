"""A broadcast "something changed" signal for waiters (``wait``, log followers).

Each ``notify`` wakes every task currently in ``wait``; a task that was not waiting
at that moment rechecks its condition before waiting again, so nothing is missed.
"""

import trio


class Notifier:
    def __init__(self):
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()

    def current(self) -> trio.Event:
        """The event the next ``notify`` sets: take it *before* checking a condition, then wait on it."""
        return self._event
