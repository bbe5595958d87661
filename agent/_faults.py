"""Faults the agent lives through instead of crashing: a full disk, I/O errors, a read-only state filesystem.

A write that meets one of these is retried with a capped backoff (``Faults.retry``)
where losing it is not an option (a run's status), or refused with ``unavailable``
where a client can try again (a submit); ``watch`` probes the disk until it takes
writes again. Each fault is recorded under the name of
the place it hit (``store``, ``events.retention``...): logged when it starts and when it
clears, and shown by ``labrun status`` while it lasts. The supervisor starts no new
run while the state disk is failing, and catches up when writes succeed again. A
reserve file in the state directory is given up at the first fault, so the agent's
own small writes (its database opening, a run's end) find room even on a full disk.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable

import structlog
import trio

log = structlog.get_logger("labrun.faults")

DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
# SQLite's primary result codes for "disk full", "disk I/O error", "read-only" and "cannot open".
_SQLITE_DISK_CODES = frozenset({13, 10, 8, 14})
# Kept free for the agent's own writes: released at the first fault, so the database can still open
# and record what runs do; made again once the disk takes writes.
RESERVE_BYTES = 4 * 1024 * 1024
LOW_WATER_BYTES = 2 * 1024 * 1024
RETRY_INITIAL_SECONDS = 0.5
RETRY_MAX_SECONDS = 10.0


def is_disk_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the state filesystem cannot take writes now (not a bug, not the client's fault)."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_ERRNOS
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _SQLITE_DISK_CODES
        return any(text in str(exc) for text in ("disk is full", "disk I/O error", "readonly database"))
    return False


class Faults:
    """The faults present now, by where they hit."""

    def __init__(self, reserve: Path | None = None):
        self.reserve = reserve
        self.current: dict[str, dict] = {}
        self._reported = trio.Event()
        self.on_clear: Callable[[], None] = lambda: None

    @property
    def disk_failing(self) -> bool:
        return bool(self.current)

    def report(self, where: str, exc: BaseException) -> None:
        now = time.time()
        fault = self.current.get(where)
        self._reported.set()
        if fault is None:
            self.current[where] = {"where": where, "error": _describe(exc), "since": now, "last": now, "count": 1}
            log.error("fault.started", where=where, error=_describe(exc),
                      detail="the agent keeps running and retries; free space on the state filesystem")
            if self.reserve is not None and self.reserve.exists():
                self.reserve.unlink(missing_ok=True)
                log.warning("fault.reserve.released", path=str(self.reserve), bytes=RESERVE_BYTES)
        else:
            fault.update(error=_describe(exc), last=now, count=fault["count"] + 1)

    def clear(self, where: str) -> None:
        fault = self.current.pop(where, None)
        if fault is not None:
            log.warning("fault.cleared", where=where, lasted_seconds=round(time.time() - fault["since"], 1),
                        failures=fault["count"])
            if not self.current:
                self.on_clear()

    async def retry(self, where: str, write: Callable, *args, **kwargs):
        """Call ``write`` until it gets past disk errors, with a capped backoff; other errors propagate.

        Cancellation: the wait between attempts is a checkpoint, so agent shutdown is never held up.
        """
        delay = RETRY_INITIAL_SECONDS
        while True:
            try:
                result = write(*args, **kwargs)
            except (OSError, sqlite3.OperationalError) as exc:
                if not is_disk_error(exc):
                    raise
                self.report(where, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            self.clear(where)
            return result

    async def watch(self, probe: Callable[[], None], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """While any fault lasts, try ``probe`` (a small write where the agent keeps its state) with a capped
        backoff; once it succeeds every fault is cleared, including those a refused request reported, which
        nothing else retries."""
        task_status.started()
        while True:
            await self._reported.wait()
            self._reported = trio.Event()
            delay = RETRY_INITIAL_SECONDS
            while self.current:
                await trio.sleep(delay)
                try:
                    probe()
                except (OSError, sqlite3.OperationalError) as exc:
                    if not is_disk_error(exc):
                        raise
                    delay = min(delay * 2, RETRY_MAX_SECONDS)
                    continue
                for where in list(self.current):
                    self.clear(where)
                self.keep_reserve()

    def make_room(self) -> None:
        """Before a database commit: with less than ``LOW_WATER_BYTES`` free, give up the reserve first, so the
        commit finds room (SQLite may roll back a commit that meets a full disk, and its writes are lost)."""
        if self.reserve is None or not self.reserve.exists():
            return
        if self._free_bytes() < LOW_WATER_BYTES:
            self.report("store", OSError(errno.ENOSPC, "the state filesystem is almost full",
                                         str(self.reserve.parent)))

    def _free_bytes(self) -> int:
        try:
            stats = os.statvfs(self.reserve.parent)
        except OSError:
            return 0
        return stats.f_bavail * stats.f_frsize

    def keep_reserve(self) -> None:
        """Write the reserve file if it is missing and there is room for it."""
        if self.reserve is None or self.reserve.exists() or self._free_bytes() < RESERVE_BYTES + 2 * LOW_WATER_BYTES:
            return   # (with less room, making it would only hand the disk back to whoever filled it)
        partial = self.reserve.with_name(self.reserve.name + ".new")
        try:
            with open(partial, "wb") as f:
                f.write(bytes(RESERVE_BYTES))
                f.flush()
                os.fsync(f.fileno())
            partial.rename(self.reserve)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            log.info("fault.reserve.not_made", error=str(exc))

    def status(self) -> list[dict]:
        return [dict(fault) for fault in self.current.values()]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return str(exc)
