"""Delivery of the event log to an upstream hub: CloudEvents 1.0 batches over HTTP(S), via httpx.

Delivery reads the store from a persisted cursor (the last seq the hub accepted), so
an outage of any length, or an agent restart mid-delivery, loses nothing; the hub
receives every event once in order under normal operation, and at least once with
stable ids otherwise (a batch whose answer was lost is sent again).

Answers: 2xx advances the cursor. 408, 429, 5xx and network errors retry with
exponential backoff and jitter. Any other 4xx (a wrong URL or token) drops nothing:
delivery pauses for ``pause_seconds`` and tries again, and the error stays in the log
and in ``labrun status`` until the hub accepts. The agent serves clients and runs
jobs meanwhile: this is one task among others.
"""

from __future__ import annotations

import datetime
import json
import random
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from ._events import EventLog
from ._faults import is_disk_error
from ._store import Store

log = structlog.get_logger("labrun.hub")

CONTENT_TYPE = "application/cloudevents-batch+json"
RETRYABLE_STATUS = {408, 429}


@dataclass
class HubConfig:
    url: str
    token_file: Path | None = None
    batch_max: int = 500
    timeout_seconds: float = 10.0
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    pause_seconds: float = 300.0
    source: str | None = None


def _rfc3339(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def to_cloudevent(event: dict, source: str) -> dict:
    return {
        "specversion": "1.0",
        "id": event["id"],
        "source": source,
        "type": f"org.labrun.{event['type']}",
        "time": _rfc3339(event["time"]),
        "subject": event["run_id"],
        "datacontenttype": "application/json",
        "sequence": str(event["seq"]),
        "data": {"seq": event["seq"], "run_id": event["run_id"], "experiment": event["experiment"],
                 "user": event["user"], **event["data"]},
    }


class HubSender:
    def __init__(self, config: HubConfig, store: Store, events: EventLog, *, transport=None):
        self.config = config
        self._transport = transport   # tests: an httpx.MockTransport
        self.store = store
        self.events = events
        self.source = config.source or f"labrun://{socket.gethostname()}"
        self._cursor_key = f"hub_cursor:{config.url}"
        self.delivered = store.get_meta(self._cursor_key, 0)
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.state = "idle"

    def status(self) -> dict:
        return {"url": self.config.url, "state": self.state, "delivered_seq": self.delivered,
                "backlog": max(0, self.store.last_seq() - self.delivered), "last_error": self.last_error,
                "last_error_at": self.last_error_at}

    def _headers(self) -> dict:
        headers = {"Content-Type": CONTENT_TYPE}
        if self.config.token_file is not None:
            token = Path(self.config.token_file).read_text().strip()   # read each time: tokens rotate
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _failed(self, message: str, state: str) -> None:
        if message != self.last_error:
            log.warning("hub.delivery.failed", error=message, url=self.config.url, state=state)
        self.last_error, self.last_error_at, self.state = message, time.time(), state

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        import httpx   # only agents with a hub pay for importing it

        delay = self.config.retry_initial_seconds
        async with httpx.AsyncClient(timeout=self.config.timeout_seconds, transport=self._transport) as client:
            task_status.started()
            while True:
                wakeup = self.events.appended.current()
                batch = self.store.events_since(self.delivered, self.config.batch_max)
                if not batch:
                    self.state = "idle" if self.last_error is None else self.state
                    await wakeup.wait()
                    continue
                self.state = "sending"
                wait = None
                try:
                    body = json.dumps([to_cloudevent(e, self.source) for e in batch], default=str)
                    await self.store.durable()   # only committed events leave the machine
                    response = await client.post(self.config.url, content=body, headers=self._headers())
                except (httpx.HTTPError, OSError) as exc:
                    self._failed(f"{type(exc).__name__}: {exc}", "retrying")
                    wait = delay
                else:
                    if response.is_success:
                        self.delivered = batch[-1]["seq"]
                        try:
                            self.store.set_meta(self._cursor_key, self.delivered)
                        except (OSError, sqlite3.OperationalError) as exc:
                            if not is_disk_error(exc):
                                raise
                            # Saved with the next batch; meanwhile a restart may send this one again.
                            log.warning("hub.cursor.not_saved", error=str(exc))
                        if self.last_error is not None:
                            log.info("hub.delivery.resumed", delivered_seq=self.delivered)
                        self.last_error = self.last_error_at = None
                        delay = self.config.retry_initial_seconds
                        continue
                    message = f"HTTP {response.status_code}: {response.text[:200]}"
                    if response.status_code in RETRYABLE_STATUS or response.status_code >= 500:
                        self._failed(message, "retrying")
                        wait = delay
                    else:
                        self._failed(message, "paused")
                        wait = self.config.pause_seconds
                delay = min(delay * 2, self.config.retry_max_seconds)
                await trio.sleep(wait * random.uniform(0.5, 1.5))
