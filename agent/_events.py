"""The event log's live side: subscribers with bounded buffers, the ``watch`` stream, and retention.

Events are rows of the store's ``events`` table, committed with the state change they
describe; ``seq`` is monotonic across restarts (SQLite AUTOINCREMENT). After each
commit the store hands the new events to ``EventLog.publish``, which offers them to
every subscription without ever waiting: a subscription whose buffer is full stops
taking events, and its stream ends with an explicit ``gap`` item naming the first
seq it missed. A subscriber that reconnects with ``since=<last seq it saw>`` gets
exactly what it missed, replayed from the store.

A replay reads the store a page at a time (filtered in SQL) and sends each event before
reading on, so a client that does not read holds up only its own stream, never makes the
agent buffer the history. One request replays at most ``replay_max`` events
(``[events] replay_max``): then its stream ends with a ``gap`` whose ``reason`` is
``replay_limit``, and the client resumes from ``last_delivered`` (the Python iterator
does so by itself), so a history of any length is served in bounded requests.
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import structlog
import trio

from ._faults import is_disk_error
from ._notify import Notifier
from ._store import Store

log = structlog.get_logger("labrun.events")

DEFAULT_BUFFER = 1000
DEFAULT_REPLAY_MAX = 10_000
REPLAY_PAGE = 500
RETENTION_CHECK_SECONDS = 3600.0


@dataclass
class EventFilter:
    run_id: str | None = None
    experiment: str | None = None
    user: str | None = None
    types: frozenset[str] | None = None

    def matches(self, event: dict) -> bool:
        return ((self.run_id is None or event["run_id"] == self.run_id)
                and (self.experiment is None or event["experiment"] == self.experiment)
                and (self.user is None or event["user"] == self.user)
                and (self.types is None or event["type"] in self.types))


@dataclass(eq=False)   # compared and hashed by identity: each is one subscriber
class Subscription:
    filter: EventFilter
    capacity: int
    buffer: deque = field(default_factory=deque)
    first_missed: int | None = None
    wakeup: trio.Event = field(default_factory=trio.Event)

    def offer(self, event: dict) -> None:
        if self.first_missed is not None or not self.filter.matches(event):
            return
        if len(self.buffer) >= self.capacity:
            self.first_missed = event["seq"]
        else:
            self.buffer.append(event)
        self.wakeup.set()


class EventLog:
    def __init__(self, store: Store, *, buffer: int = DEFAULT_BUFFER, replay_max: int = DEFAULT_REPLAY_MAX):
        self.store = store
        self.buffer = buffer
        self.replay_max = replay_max
        self.subscriptions: set[Subscription] = set()
        self.appended = Notifier()   # wakes the hub sender
        store.on_events = self.publish

    def publish(self, events: list[dict]) -> None:
        for event in events:
            for subscription in self.subscriptions:
                subscription.offer(event)
        self.appended.notify()

    async def watch(self, since: int | None, filter: EventFilter, follow: bool,
                    send_item: Callable[[object], Awaitable[None]]) -> None:
        """Stream events after ``since`` (None: only new ones) matching ``filter``; follow live if asked."""
        subscription = Subscription(filter, self.buffer)
        # Subscribe before replaying, so nothing committed in between is lost; duplicates are skipped by seq.
        self.subscriptions.add(subscription)
        try:
            last = self.store.last_seq() if since is None else since
            replayed = 0
            while True:
                await trio.lowlevel.checkpoint()   # a long replay never holds up the agent's other work
                page = self.store.events_since(last, REPLAY_PAGE, run_id=filter.run_id,
                                               experiment=filter.experiment, user=filter.user, types=filter.types)
                for event in page:
                    if replayed == self.replay_max:
                        await send_item({"gap": {"first_missed": event["seq"], "last_delivered": last,
                                                 "reason": "replay_limit"}})
                        return
                    await send_item({"event": event})
                    last = event["seq"]
                    replayed += 1
                if len(page) < REPLAY_PAGE:
                    break
            if not follow:
                return
            while True:
                while subscription.buffer:
                    event = subscription.buffer.popleft()
                    if event["seq"] > last:
                        await send_item({"event": event})
                        last = event["seq"]
                if subscription.first_missed is not None:
                    await send_item({"gap": {"first_missed": subscription.first_missed, "last_delivered": last,
                                             "reason": "buffer_full"}})
                    return
                subscription.wakeup = trio.Event()
                await subscription.wakeup.wait()
        finally:
            self.subscriptions.discard(subscription)

    async def retain(self, retention_days: float, delivered_seq: Callable[[], int | None], *,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Delete events older than the retention, never one the hub has not yet received."""
        task_status.started()
        while True:
            horizon = delivered_seq()
            limit = self.store.last_seq() if horizon is None else horizon
            try:
                removed = self.store.delete_events(before_time=time.time() - retention_days * 86400, up_to_seq=limit)
            except (OSError, sqlite3.OperationalError) as exc:
                if not is_disk_error(exc):
                    raise
                log.warning("events.retention.failed", error=str(exc), detail="tried again at the next check")
                removed = 0
            if removed:
                log.info("events.retention.deleted", count=removed)
            await trio.sleep(RETENTION_CHECK_SECONDS)
