"""Small contents of the content store, kept as rows of its own SQLite database (``cas/small.db``), not as files.

Creating a file is most of the cost of storing a small content: on ext4 here, creating 2,000 files of 2 KiB
took 70-200 ms, about what ``cp -a`` of the same tree takes, while one transaction inserting the same 2,000
contents took 8-45 ms. Past about 8 KiB the database's two writes of each byte (its log, then its pages)
cost more than a file's creation saves, so only contents up to ``INLINE_MAX`` bytes are kept here; larger
ones stay files (``cas/objects/``), which a run's snapshot can reflink.

A database of its own, not the agent's state database: its writes (megabytes for one big first submit) and
their checkpoints run in worker threads, never in the event loop that group-commits the agent's state, and a
full disk fails the submit that brought the contents, not the agent's state transitions.

Order of writes: a content is committed here before the state database records it (``cas_blobs``), so a
run never refers to a content that is not durable as far as its own record is. Removals go the other way
round: the state database forgets a content first (``ContentStore._delete``), then it is deleted here by
``collect``, under the same lock as the writes; a content pinned again meanwhile (a new upload of the same
bytes) is taken off the list of deletions first, so a deletion never removes a content just written. Rows
the state database does not know (an agent killed between the two commits) are deleted at start
(``sweep``).

Reads (``read``) use connections of their own, from any thread: they see committed contents only, and
never wait for a write.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Callable, Iterable

import structlog
import trio

from ._faults import is_disk_error

log = structlog.get_logger("labrun.snapshots")

# Contents up to this size are kept in the database.
INLINE_MAX = 8 << 10
# Pages of log written since the last checkpoint past which SQLite checkpoints on its own (``collect`` does it
# first, in a worker thread, once writes pause): a bound for an agent whose ``run`` task is not running.
AUTOCHECKPOINT_PAGES = 16384
PAGE_SIZE = 65536
# Page cache of each connection, in KiB.
CACHE_KIB = 512
# ``collect`` waits for writes to pause this long (but no longer than the second): a submit's contents come in
# bursts, and a checkpoint among them (two syncs, the pages copied) takes the CPU and the disk from them.
COLLECT_QUIET_SECONDS = 1.0
COLLECT_LATEST_SECONDS = 10.0
# ... nor once this much has been written since the last checkpoint; and the log is cut back to this size after one.
COLLECT_AFTER_BYTES = 32 << 20
# Idle read connections kept for the next reader.
READERS_KEPT = 2
# Host parameters per statement: well under SQLite's smallest limit (999).
_CHUNK = 500

SCHEMA = "CREATE TABLE IF NOT EXISTS contents (hash TEXT PRIMARY KEY, data BLOB NOT NULL)"


class SmallContents:
    def __init__(self, path: Path, keep: Callable[[str], bool]):
        """``keep(hash)``: whether a content is pinned (being uploaded again), so not to be deleted now."""
        self.path = path
        self._keep = keep
        self._db: sqlite3.Connection | None = None
        try:
            self._open()
        except (sqlite3.OperationalError, OSError) as exc:
            if not is_disk_error(exc):
                raise
            # A full state disk: the agent starts all the same, and the first write tries again.
            log.warning("small_contents.open.deferred", error=str(exc))
        self._readers: list[sqlite3.Connection] = []
        self._lock = trio.Lock()           # one user of ``_db`` at a time: writes and deletions in order
        self._doomed: set[str] = set()     # forgotten by the state database, still here
        self._deleting: set[str] = set()   # of those, the ones a write or ``collect`` in progress deletes
        self._unchecked = False            # written since the last checkpoint
        self._written_at = 0.0             # when the last write committed (trio's clock)
        self._unchecked_bytes = 0          # written since the last checkpoint began
        self._wake = trio.Event()

    def _open(self) -> sqlite3.Connection:
        """The writing connection, made (with the database) where it is not yet. Blocking."""
        if self._db is None:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            db = self._connect()
            try:
                db.execute(SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _connect(self, *, reader: bool = False) -> sqlite3.Connection:
        # A reader never makes the file (SQLite would, with the process's umask).
        target = f"file:{urllib.parse.quote(str(self.path))}?mode=rw" if reader else self.path
        db = sqlite3.connect(target, isolation_level=None, check_same_thread=False, uri=reader)
        # Each content is read or written about once: a page cache the size of SQLite's default (2 MiB) for each
        # connection would only add to the agent's memory.
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        if reader:
            return db   # (the journal mode is the database's; a reader writes nothing)
        # Set when the database is made (a no-op later): with 4 KiB pages a 2 KiB content takes a page of its own,
        # and 2,000 of them took 14 ms to commit and 21 ms to checkpoint, against 6 and 7 ms with 64 KiB pages.
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        # Pages freed by deletions go back to the filesystem (``_collect``): removing runs frees the disk.
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        # As the state database: a commit survives an agent crash; a power cut may lose the last ones (of both).
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        # A burst's log does not stay on the disk at its largest after its checkpoint.
        db.execute(f"PRAGMA journal_size_limit={COLLECT_AFTER_BYTES}")
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{self.path}{suffix}", 0o600)
        return db

    # -- writes and deletions (event loop; the work in worker threads) ----------------------

    async def write(self, contents: list[tuple[str, bytes]]) -> None:
        """Commit hashed, pinned contents ``(hash, data)`` (each at most ``INLINE_MAX`` bytes)."""
        if not contents:
            return
        async with self._lock:
            doomed = self._take_doomed()
            try:
                await trio.to_thread.run_sync(self._commit, doomed, contents)
            except BaseException:
                self._put_back()
                raise
            self._deleting = set()
            self._unchecked = True
            self._written_at = trio.current_time()
            self._unchecked_bytes += sum(len(data) for _, data in contents)
            self._wake.set()

    def forget(self, digests: Iterable[str]) -> None:
        """The state database has forgotten these contents (unpinned): delete them here (soon, by ``collect``)."""
        self._doomed.update(digests)
        if self._doomed:
            self._wake.set()

    def pinned(self, digests: Iterable[str]) -> None:
        """These contents are being stored again: they must not be deleted by an earlier ``forget``."""
        digests = set(digests)
        self._doomed -= digests
        self._deleting -= digests

    async def collect(self) -> None:
        """Delete what was forgotten, and checkpoint what was written (in a worker thread)."""
        async with self._lock:
            doomed = self._take_doomed()
            checkpoint, self._unchecked = self._unchecked, False
            self._unchecked_bytes = 0
            try:
                await trio.to_thread.run_sync(self._collect, doomed, checkpoint)
            except BaseException:
                self._unchecked = self._unchecked or checkpoint
                self._put_back()
                raise
            self._deleting = set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """``collect`` whenever there is something to collect (once writes pause), until cancelled."""
        task_status.started()
        delay = 1.0
        while True:
            await self._wake.wait()
            await self._writes_paused()
            self._wake = trio.Event()
            try:
                await self.collect()
                delay = 1.0
            except sqlite3.Error as exc:
                # A full or failing disk: tried again later (or with the next write, which deletes them too).
                log.warning("small_contents.collect.failed", error=str(exc), retry_in=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 60.0)
                self._wake.set()

    async def _writes_paused(self) -> None:
        latest = trio.current_time() + COLLECT_LATEST_SECONDS
        while (due := min(self._written_at + COLLECT_QUIET_SECONDS, latest)) > trio.current_time() \
                and self._unchecked_bytes < COLLECT_AFTER_BYTES:
            # (woken by each write: a burst past the bytes is not waited out)
            with trio.move_on_at(due):
                await self._wake.wait()
                self._wake = trio.Event()

    def _take_doomed(self) -> list[str]:
        # Taken under the lock: a content pinned after this is written after these deletions.
        self._deleting = {d for d in self._doomed if not self._keep(d)}
        self._doomed.clear()
        return sorted(self._deleting)

    def _put_back(self) -> None:
        # What a failed transaction did not delete, unless pinned again meanwhile (``pinned`` took it off).
        self._doomed |= self._deleting
        self._deleting = set()

    # -- blocking ---------------------------------------------------------------------------

    def _commit(self, doomed: list[str], contents: list[tuple[str, bytes]]) -> None:
        db = self._open()
        with _transaction(db):
            _delete(db, doomed)
            # A content here already is the same bytes (its hash was taken of them).
            db.executemany("INSERT OR IGNORE INTO contents (hash, data) VALUES (?, ?)", contents)

    def _collect(self, doomed: list[str], checkpoint: bool) -> None:
        if self._db is None and not doomed:
            return   # (nothing was ever written)
        db = self._open()
        if doomed:
            with _transaction(db):
                _delete(db, doomed)
                # Python's sqlite3 runs this pragma one step, which frees one page: once for each.
                for _ in range(db.execute("PRAGMA freelist_count").fetchone()[0]):
                    db.execute("PRAGMA incremental_vacuum")
        if checkpoint or doomed:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def sweep(self, state_db: Path) -> int:
        """Delete contents the state database does not know (at start, before anything writes); how many.

        On a full disk nothing is deleted (the next start tries again).
        """
        if self._db is None:
            return 0
        self._db.execute("ATTACH DATABASE ? AS state", (str(state_db),))
        try:
            # One statement, so atomic; no write transaction on the state database, which it only reads.
            return self._db.execute("DELETE FROM contents WHERE hash NOT IN "
                                    "(SELECT hash FROM state.cas_blobs)").rowcount
        except sqlite3.OperationalError as exc:
            if not is_disk_error(exc):
                raise
            log.warning("small_contents.sweep.skipped", error=str(exc))
            return 0
        finally:
            self._db.execute("DETACH DATABASE state")
            self._db.execute("PRAGMA shrink_memory")   # (the pages read for it: an idle agent's memory)

    def read(self, digests: list[str]) -> dict[str, bytes]:
        """The contents kept here among ``digests`` (committed ones), by hash; from any thread. Blocking."""
        if not digests:
            return {}
        try:
            db = self._readers.pop()
        except IndexError:
            db = self._connect(reader=True)
        found: dict[str, bytes] = {}
        try:
            for start in range(0, len(digests), _CHUNK):
                chunk = digests[start:start + _CHUNK]
                found.update(db.execute(f"SELECT hash, data FROM contents WHERE hash IN "
                                        f"({', '.join('?' * len(chunk))})", chunk))
        except sqlite3.OperationalError as exc:
            db.close()
            if "no such table" in str(exc) or "unable to open" in str(exc):
                return {}   # never made (a full disk at start): it holds nothing
            raise
        except BaseException:
            db.close()
            raise
        if len(self._readers) < READERS_KEPT:
            self._readers.append(db)
        else:
            db.close()
        return found


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection):
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _delete(db: sqlite3.Connection, digests: list[str]) -> None:
    for start in range(0, len(digests), _CHUNK):
        chunk = digests[start:start + _CHUNK]
        db.execute(f"DELETE FROM contents WHERE hash IN ({', '.join('?' * len(chunk))})", chunk)
