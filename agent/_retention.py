"""Deleting run directories: ``labrun rm``, ``labrun clean`` and ``[runs] retention_days``; and the disk they use.

A run directory holds what its (possibly hostile) owner wrote: any name, links
pointing anywhere, directories without write permission. Deletion therefore never
follows a link and never resolves a path: it walks from directory file descriptors
(``openat`` with ``O_NOFOLLOW``, ``unlinkat``), checks that each directory it opened
is the one it looked at, and deletes links as links. That is safe with root's
rights, so the agent needs no per-user helper for it.

Only the directory goes; the run's row, metrics and events stay (``ls``, ``show``
and ``metrics`` keep working) unless ``purge`` is asked for. The run's reference to
the content-addressed snapshot store is released with it, so content goes with the
last run using it.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import structlog
import trio

from labrun.protocol import AgentError, Conflict, NotFound
from labrun.protocol._statuses import TERMINAL

from ._artifacts import owner_of
from ._asuser import run_as

log = structlog.get_logger("labrun.retention")

RETENTION_INTERVAL_SECONDS = 3600.0
DISK_USAGE_TTL_SECONDS = 60.0
# Runs removed per store query; retention works through a long history in batches.
BATCH = 500

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: int | None, expected: os.stat_result) -> int:
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    if not os.path.samestat(os.fstat(fd), expected):
        os.close(fd)
        raise OSError(f"{name!r} changed while it was being removed")
    return fd


def remove_tree(parent: Path, name: str) -> int:
    """Delete ``parent/name`` and everything under it without following any link; returns the bytes freed.

    Iterative, so a deep tree cannot exhaust the stack; a missing tree frees nothing.
    """
    parent_fd = os.open(parent, _DIR_FLAGS)
    freed = 0
    try:
        try:
            top = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return 0
        if not stat.S_ISDIR(top.st_mode):
            os.unlink(name, dir_fd=parent_fd)
            return top.st_blocks * 512
        # The stack holds (fd of the directory's parent, its name, its fd, the entries left to visit).
        stack = [(parent_fd, name, _open_dir(name, parent_fd, top), None)]
        try:
            while stack:
                up_fd, dir_name, fd, entries = stack[-1]
                if entries is None:
                    # A directory its owner made read-only cannot be emptied otherwise.
                    os.fchmod(fd, stat.S_IRWXU)
                    entries = [e.name for e in os.scandir(fd)]
                    stack[-1] = (up_fd, dir_name, fd, entries)
                if not entries:
                    stack.pop()
                    freed += os.fstat(fd).st_blocks * 512
                    os.close(fd)
                    os.rmdir(dir_name, dir_fd=up_fd)
                    continue
                entry = entries.pop()
                info = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    stack.append((fd, entry, _open_dir(entry, fd, info), None))
                else:
                    os.unlink(entry, dir_fd=fd)
                    if info.st_nlink <= 1:
                        freed += info.st_blocks * 512
        finally:
            for _, _, fd, _ in stack:
                os.close(fd)
    finally:
        os.close(parent_fd)
    return freed


def disk_usage(root: Path) -> int:
    """Bytes allocated under ``root``, links not followed, hard links counted once."""
    total, seen = 0, set()
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            try:
                info = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
                if (info.st_dev, info.st_ino) in seen:
                    continue
                seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total


class RunFiles:
    """Removes finished runs' directories, on request and by age, and measures the disk runs use."""

    def __init__(self, config, store, supervisor):
        self.config = config
        self.store = store
        self.supervisor = supervisor
        self.runs_dir = config.state_dir / "runs"
        self._usage: tuple[float, tuple[int, int]] | None = None
        self._usage_lock = trio.Lock()

    async def remove(self, record, *, purge: bool = False) -> int:
        """Delete a finished run's directory (and with ``purge`` its row and metrics); returns bytes freed.

        Raises:
            Conflict: the run has not ended, or queued runs still wait for it and ``purge`` would forget it.
        """
        if record.status not in TERMINAL:
            raise Conflict(f"run {record.run_id} is {record.status}; only finished runs can be removed "
                           "(cancel it first)")
        if purge:
            waiting = sorted(r for r in self.supervisor.waiting_on_others
                             if record.run_id in (*self.supervisor.queued[r].spec["after"],
                                                  *self.supervisor.queued[r].spec["afterok"]))
            if waiting:
                raise Conflict(f"run {waiting[0]} waits for run {record.run_id}; it cannot be purged yet")
        try:
            link = self.runs_dir / record.run_id
            freed = 0
            if link.is_symlink():
                # A cluster's run directory (a Slurm target's run_root), which the agent linked here at submit:
                # the link's own target, never resolved further (its owner may have swapped it for a link to
                # elsewhere where run_root is theirs to write), removed as its owner, as a share that squashes
                # root requires, so nothing its owner could not delete goes.
                real = Path(os.readlink(link))
                freed = await run_as(owner_of(record), remove_tree, real.parent, real.name)
            freed += await trio.to_thread.run_sync(remove_tree, self.runs_dir, record.run_id)
        except FileNotFoundError:
            freed = 0   # a removal of the same run at the same time deleted it first: it is gone, as asked
        except OSError as exc:
            # What was deleted stays deleted; the run keeps its directory's record, so it can be tried again.
            raise AgentError(f"could not remove the directory of run {record.run_id}: {exc.strerror or exc}") from None
        self.store.mark_removed(record, freed, purge=purge)
        self.supervisor.snapshots.release_snapshot(record.run_id)
        self._usage = None
        log.info("run.files.removed", run_id=record.run_id, bytes=freed, purged=purge)
        return freed

    async def clean(self, *, older_than: float | None, statuses, uid: int | None, purge: bool) -> list[dict]:
        """Remove every matching finished run (``uid``: only that user's); returns ``{run_id, freed_bytes}``s."""
        ended_before = time.time() - (older_than or 0)
        removed = []
        while True:
            batch = self.store.finished_runs_to_remove(ended_before=ended_before, statuses=statuses or TERMINAL,
                                                       uid=uid, limit=BATCH, include_removed=purge)
            batch = [r for r in batch if r.run_id not in {x["run_id"] for x in removed}]
            if not batch:
                return removed
            for record in batch:
                try:
                    freed = await self.remove(record, purge=purge)
                except AgentError as exc:
                    log.warning("run.files.remove_failed", run_id=record.run_id, error=exc.message)
                    removed.append({"run_id": record.run_id, "freed_bytes": 0, "error": exc.message})
                    continue
                removed.append({"run_id": record.run_id, "freed_bytes": freed})

    def check_present(self, record) -> None:
        """Refuse to serve the files of a run whose directory was removed, saying so."""
        if self.store.removed_of([record.run_id]):
            raise NotFound(f"the files of run {record.run_id} were removed (labrun rm, clean or retention); "
                           "its metrics and details are kept")

    async def disk_used(self) -> tuple[int, int]:
        """Bytes under the runs directory and in the snapshot store, measured at most once a minute."""
        async with self._usage_lock:
            now = time.monotonic()
            if self._usage is None or now - self._usage[0] > DISK_USAGE_TTL_SECONDS:
                runs = await trio.to_thread.run_sync(disk_usage, self.runs_dir)
                snapshots = await trio.to_thread.run_sync(disk_usage, self.supervisor.snapshots.root)
                self._usage = (now, (runs, snapshots))
            return self._usage[1]

    async def retain(self, retention_days: float | None, purge: bool, *,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Remove run directories older than ``retention_days`` (by end time), hourly; None: keep all."""
        task_status.started()
        if not retention_days:
            return
        while True:
            removed = await self.clean(older_than=retention_days * 86400, statuses=None, uid=None, purge=purge)
            if removed:
                log.info("runs.retention.removed", runs=len(removed), bytes=sum(r["freed_bytes"] for r in removed))
            await trio.sleep(RETENTION_INTERVAL_SECONDS)
