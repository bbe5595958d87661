"""Deleting run directories: ``labrun rm``, ``labrun clean`` and ``[runs] retention_days``; and the disk they use.

A run directory holds what its (possibly hostile) owner wrote: any name, links
pointing anywhere, directories without write permission, and the owner may still be
changing it while it is deleted. Deletion therefore never follows a link and never
resolves a path: it walks from directory file descriptors (``openat`` with
``O_NOFOLLOW``, ``unlinkat``), checks that each directory it opened is the one it
looked at, and deletes links as links. And everything under the run directory is
deleted with the rights of that directory's owner (``acting_as``): the run's user, to
whom the agent gave it and who cannot give it away. So even a walk the owner raced
into another place could delete nothing they could not delete themselves; only the
emptied run directory itself, in the agent's own directory, is removed as the agent.
Paths come from ``RunDir``, which owns the layout. ``remove_run_dir`` is the one way a
run's directory is deleted: here, after a failed submit, and for an orphan at start.

Only the directory goes; the run's row, metrics and events stay (``ls``, ``show``
and ``metrics`` keep working) unless ``purge`` is asked for. The run's reference to
the content-addressed snapshot store is released with it, so content goes with the
last run using it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import time
from pathlib import Path

import structlog
import trio

from labrun.protocol import AgentError, Conflict, NotFound
from labrun.protocol._statuses import TERMINAL

from ._asuser import Credentials, acting_as
from ._faults import is_disk_error
from ._rundir import RunDir, runs_root

log = structlog.get_logger("labrun.retention")

DISK_USAGE_TTL_SECONDS = 60.0
# Runs removed per store query; retention works through a long history in batches.
BATCH = 500
# Directory levels the disk-usage walk enters (one open descriptor each); deeper ones count, unlisted.
MAX_DEPTH = 128

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: int, expected: os.stat_result) -> int:
    """Open the directory ``name`` in ``dir_fd``, the one ``expected`` describes, to list and delete in.

    It is opened by path first (which needs no right on it), checked, given its owner's full rights where it
    lacks them (a directory its owner made read-only or unreadable cannot be emptied otherwise), and only
    then opened for reading through that handle: the same directory throughout, never a link.
    """
    handle = os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
    try:
        info = os.fstat(handle)
        if not os.path.samestat(info, expected):
            raise OSError(f"{name!r} changed while it was being removed")
        if info.st_mode & stat.S_IRWXU != stat.S_IRWXU:
            # fchmod refuses a path handle; its /proc name reaches exactly the directory it holds.
            os.chmod(f"/proc/self/fd/{handle}", stat.S_IRWXU)
        return os.open(".", _DIR_FLAGS, dir_fd=handle)
    finally:
        os.close(handle)


def remove_run_dir(layout: RunDir) -> int:
    """Delete a run's directory (and the cluster run directory its link names); returns the bytes freed. Blocking.

    A cluster's run directory (in a Slurm target's run_root) is linked from ``runs/`` by the agent at submit.
    The link is read, not resolved: what the agent wrote names the directory, never a link in it.
    """
    freed = 0
    if layout.root.is_symlink():
        real = Path(os.readlink(layout.root))
        freed = remove_tree(real.parent, real.name)
    return freed + remove_tree(layout.root.parent, layout.run_id)


def remove_tree(parent: Path, name: str) -> int:
    """Delete ``parent/name`` and everything under it without following any link; returns the bytes freed.

    ``parent`` is the agent's; what is under ``parent/name`` is deleted with the rights of its owner.
    Iterative, so a deep tree cannot exhaust the stack; a missing tree frees nothing.
    """
    try:
        parent_fd = os.open(parent, _DIR_FLAGS)
    except FileNotFoundError:
        return 0
    try:
        try:
            top = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return 0
        if not stat.S_ISDIR(top.st_mode):
            os.unlink(name, dir_fd=parent_fd)
            return top.st_blocks * 512
        top_fd = _open_dir(name, parent_fd, top)
        try:
            with acting_as(Credentials.of(top.st_uid, top.st_gid)):
                freed = _empty(top_fd)
        finally:
            os.close(top_fd)
        os.rmdir(name, dir_fd=parent_fd)
        return freed + top.st_blocks * 512
    finally:
        os.close(parent_fd)


def _empty(top_fd: int) -> int:
    """Delete everything in the directory open at ``top_fd``, depth first; returns the bytes freed."""
    freed = 0
    # The stack holds (the directory's fd, its name in its parent, its entries left to visit); top_fd stays open.
    stack: list[tuple[int, str, list[str] | None]] = [(top_fd, "", None)]
    try:
        while stack:
            fd, dir_name, entries = stack[-1]
            if entries is None:
                entries = [e.name for e in os.scandir(fd)]
                stack[-1] = (fd, dir_name, entries)
            if not entries:
                stack.pop()
                if stack:
                    try:
                        freed += os.fstat(fd).st_blocks * 512
                    finally:
                        os.close(fd)
                    with contextlib.suppress(FileNotFoundError):
                        os.rmdir(dir_name, dir_fd=stack[-1][0])
                continue
            entry = entries.pop()
            try:
                info = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    stack.append((_open_dir(entry, fd, info), entry, None))
                else:
                    os.unlink(entry, dir_fd=fd)
                    if info.st_nlink <= 1:
                        freed += info.st_blocks * 512
            except FileNotFoundError:
                pass   # gone meanwhile (its owner deleting too), as wanted
    finally:
        for fd, _, _ in stack[1:]:
            os.close(fd)
    return freed


def disk_usage(root: Path) -> int:
    """Bytes allocated under ``root`` and only there: links not followed, hard links counted once. Blocking.

    Run directories are their owners' to change while they are measured, so the walk is made as deletion's
    is: from directory file descriptors, each directory opened in its parent with ``O_NOFOLLOW`` and checked
    to be the one listed. A directory swapped for a link meanwhile is not entered, so nothing outside
    ``root`` is ever read or counted. Directories deeper than ``MAX_DEPTH`` are counted but not entered
    (a walk holds one descriptor per level); what cannot be read counts as nothing.
    """
    try:
        # ``root`` itself is the agent's (its runs directory or snapshot store), which an admin may have linked.
        top_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return 0
    total, seen = 0, set()
    # The directories open from ``root`` down to the one being listed, each with its entries left to visit.
    stack: list[tuple[int, list[os.DirEntry] | None]] = [(top_fd, None)]
    try:
        while stack:
            fd, entries = stack[-1]
            if entries is None:
                entries = _entries(fd)
                stack[-1] = (fd, entries)
            if not entries:
                stack.pop()
                os.close(fd)
                continue
            entry = entries.pop()
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                child = _open_listed(entry.name, fd, info) if len(stack) < MAX_DEPTH else None
                if child is not None:
                    stack.append((child, None))
            elif info.st_nlink > 1:
                if (info.st_dev, info.st_ino) in seen:
                    continue
                seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    finally:
        for fd, _ in stack:
            os.close(fd)
    return total


def _entries(fd: int) -> list[os.DirEntry]:
    try:
        with os.scandir(fd) as listing:
            return list(listing)
    except OSError:
        return []


def _open_listed(name: str, dir_fd: int, listed: os.stat_result) -> int | None:
    """The directory ``name`` in ``dir_fd`` opened for listing, if it is still the one ``listed`` describes."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None   # gone, or a link swapped in (O_NOFOLLOW), or unreadable
    if os.path.samestat(os.fstat(fd), listed):
        return fd
    os.close(fd)
    return None


class RunFiles:
    """Removes finished runs' directories, on request and by age, and measures the disk runs use."""

    def __init__(self, config, store, supervisor):
        self.config = config
        self.store = store
        self.supervisor = supervisor
        self.runs_dir = runs_root(config.state_dir)
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
            freed = await trio.to_thread.run_sync(remove_run_dir, RunDir.of(self.config.state_dir, record.run_id))
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
        removed, seen = [], set()
        while True:
            batch = self.store.finished_runs_to_remove(ended_before=ended_before, statuses=statuses or TERMINAL,
                                                       uid=uid, limit=BATCH, include_removed=purge)
            batch = [r for r in batch if r.run_id not in seen]
            seen.update(r.run_id for r in batch)
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
        """Bytes under the runs directory and in the snapshot store (with its ready copies), measured at most once
        a minute."""
        async with self._usage_lock:
            now = time.monotonic()
            if self._usage is None or now - self._usage[0] > DISK_USAGE_TTL_SECONDS:
                runs = await trio.to_thread.run_sync(disk_usage, self.runs_dir)
                snapshots = sum([await trio.to_thread.run_sync(disk_usage, root)
                                 for root in (self.supervisor.snapshots.root, self.supervisor.ready.root)])
                self._usage = (now, (runs, snapshots))
            return self._usage[1]

    async def retain(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Remove run directories older than ``[runs] retention_days`` (by end time): at start, then every
        ``retention_interval``. Without ``retention_days`` every run directory is kept."""
        task_status.started()
        runs = self.config.runs
        if not runs.retention_days:
            return
        while True:
            try:
                removed = await self.clean(older_than=runs.retention_days * 86400, statuses=None, uid=None,
                                           purge=runs.purge)
            except (OSError, sqlite3.OperationalError) as exc:
                if not is_disk_error(exc):
                    raise
                log.warning("runs.retention.failed", error=str(exc), detail="tried again at the next check")
                removed = []
            if removed:
                log.info("runs.retention.removed", runs=len(removed), bytes=sum(r["freed_bytes"] for r in removed))
            await trio.sleep(runs.retention_interval)
