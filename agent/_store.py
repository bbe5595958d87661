"""Durable state in SQLite (WAL): runs, per-experiment run numbers, and the event log.

Every state change and the event describing it commit in one transaction, so the
event log can never disagree with the runs table. Calls are synchronous: each is a
handful of indexed statements on a local file, far shorter than a thread hop.

Schema versions: the database's ``user_version`` counts the ``MIGRATIONS`` applied to it.
At open, the missing steps run in order, each in its own transaction with its version
bump, so a crash mid-upgrade leaves a consistent, older version. A database newer than
this agent's ``MIGRATIONS`` is refused (``SchemaTooNew``): an older agent must not write
a schema it does not know. To change the schema, append one step to ``MIGRATIONS``
(never edit a step that has shipped): a SQL script, or ``add_column(...)``.

Group commit: while the agent runs, ``writer`` (the single writer task) is attached. Writes
then join one open transaction (a write that fails undoes only itself: the batch is rolled
back and the others written again), and the writer commits them together once per pass of
the event loop (a task about to start a process commits at once: ``commit_now``). A write is
durable once ``durable()`` returns: the server awaits it before any reply or stream item,
the supervisor before starting or stopping a process, the hub before sending. Events reach
subscribers only after their commit.

A batch whose commit fails (a full or failing state disk) is never dropped: SQLite either
keeps its transaction open, and the commit is tried again, or rolls it back, and then the
batch's writes are written again from ``_Journal``, statement by statement with the values
they had, before anything else (the database is back where the batch began, so the replay
gives the same rows, run numbers and event ``seq``). Until the commit succeeds nobody who
waits on ``durable()`` goes on.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

import msgpack
import structlog
import trio

from labrun.protocol import Forbidden
from labrun.protocol._statuses import TERMINAL

from ._model import RunRecord

# The first schema. IF NOT EXISTS: databases made before schema versions existed (user_version 0)
# already hold these tables, and step 1 brings them to version 1 unchanged.
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    ord INTEGER NOT NULL UNIQUE,
    experiment TEXT NOT NULL,
    number INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    user TEXT NOT NULL,
    status TEXT NOT NULL,
    spec BLOB NOT NULL,
    environ BLOB NOT NULL,
    submitted_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    exit_code INTEGER,
    signal INTEGER,
    reason TEXT,
    error TEXT,
    pid INTEGER,
    allocation BLOB,
    handle BLOB
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE INDEX IF NOT EXISTS runs_experiment ON runs(experiment, ord);
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY,
    last_number INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    run_id TEXT,
    experiment TEXT,
    user TEXT,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events(run_id, seq);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER,
    time REAL NOT NULL,
    value BLOB NOT NULL,
    description TEXT
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run_id, name, id);
CREATE TABLE IF NOT EXISTS labels (
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT,
    PRIMARY KEY (run_id, kind, key)
);
CREATE TABLE IF NOT EXISTS environments (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    definition BLOB NOT NULL,
    user TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB);
"""

# Who owns each environment name: only they (or an admin) may publish its versions.
OWNERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS environment_owners (
    name TEXT PRIMARY KEY,
    uid INTEGER NOT NULL,
    user TEXT NOT NULL
);
"""

# Content-addressed snapshots (agent/_snapshot.py owns the files): each content's size and how many
# trees use it, who has proven they hold it, each distinct manifest and which run uses which.
CAS_SCHEMA = """
CREATE TABLE IF NOT EXISTS cas_blobs (hash TEXT PRIMARY KEY, size INTEGER NOT NULL, refs INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cas_holders (uid INTEGER NOT NULL, hash TEXT NOT NULL, PRIMARY KEY (uid, hash))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cas_holders_hash ON cas_holders(hash);
CREATE TABLE IF NOT EXISTS cas_trees (tree TEXT PRIMARY KEY, refs INTEGER NOT NULL, files BLOB NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cas_tree_holders (uid INTEGER NOT NULL, tree TEXT NOT NULL, PRIMARY KEY (uid, tree))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cas_runs (run_id TEXT PRIMARY KEY, tree TEXT NOT NULL) WITHOUT ROWID;
"""

# Run hierarchies and experiment metadata (Azure ML's child runs, experiment tags and archiving):
# tables of their own, so the runs table keeps its shape.
HIERARCHY_SCHEMA = """
CREATE TABLE IF NOT EXISTS run_parents (
    run_id TEXT PRIMARY KEY,
    parent_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS run_parents_parent ON run_parents(parent_id);
CREATE TABLE IF NOT EXISTS experiment_meta (
    name TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    tags BLOB NOT NULL,
    archived_at REAL
);
"""

# Arrays and removed run directories: tables of their own, so the runs table keeps its shape. (A run's
# dependencies are part of its spec: ``after`` and ``afterok`` lists of run ids.)
# ``run_arrays``: the members of an array, with the array's concurrency limit (``throttle``, 0: none).
# ``removed_run_dirs``: runs whose directory ``labrun rm``, ``clean`` or retention deleted.
RELATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS run_arrays (
    run_id TEXT PRIMARY KEY,
    array_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    throttle INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS run_arrays_array ON run_arrays(array_id, idx);
CREATE TABLE IF NOT EXISTS removed_run_dirs (
    run_id TEXT PRIMARY KEY,
    removed_at REAL NOT NULL,
    bytes INTEGER NOT NULL
);
"""
class SchemaTooNew(Exception):
    """The database was written by a newer agent."""


def add_column(table: str, column: str, definition: str) -> Callable[[sqlite3.Connection], None]:
    """A migration step adding one column, idempotent (a no-op where the column exists)."""
    def step(db: sqlite3.Connection) -> None:
        if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    step.__doc__ = f"add {table}.{column}"
    return step


# Step N brings the database to user_version N. Append only.
MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
    SCHEMA,
    # 2: the hash of each active run's token, so in-run clients keep working across an agent restart.
    "CREATE TABLE IF NOT EXISTS run_tokens (run_id TEXT PRIMARY KEY, token_hash BLOB NOT NULL);",
    # 3: content-addressed snapshots.
    CAS_SCHEMA,
    # 4: who owns each environment name.
    OWNERS_SCHEMA,
    # 5: dependencies between runs, and arrays.
    RELATIONS_SCHEMA,
    # 6: run hierarchies (child runs) and experiment metadata.
    HIERARCHY_SCHEMA,
    # 7: clients' idempotency keys, so a submit retried after a lost reply returns the run already made.
    "CREATE TABLE IF NOT EXISTS submit_keys (uid INTEGER NOT NULL, key TEXT NOT NULL, run_id TEXT NOT NULL, "
    "PRIMARY KEY (uid, key));",
]


def migrate(db: sqlite3.Connection, path: Path) -> int:
    """Apply the missing ``MIGRATIONS`` steps; returns the database's version."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise SchemaTooNew(
            f"the state database {path} has schema version {version}, newer than this agent knows "
            f"({len(MIGRATIONS)}): it was used by a newer labrund. Run that version (or newer), or restore "
            "a backup of the state directory made for this version")
    for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            if callable(step):
                step(db)
            else:
                for statement in _statements(step):
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return len(MIGRATIONS)


def _statements(script: str) -> list[str]:
    """A script's statements, so they run in the step's transaction (executescript would commit first)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {current.strip()[:80]!r}")
    return statements

_COLUMNS = ("run_id", "ord", "experiment", "number", "uid", "gid", "user", "status", "spec", "environ",
            "submitted_at", "started_at", "ended_at", "exit_code", "signal", "reason", "error", "pid",
            "allocation", "handle")
_UPDATABLE = {"status", "started_at", "ended_at", "exit_code", "signal", "reason", "error", "pid", "allocation", "handle"}
_PACKED = {"spec", "environ", "allocation", "handle"}


def _pack(value):
    return None if value is None else msgpack.packb(value, use_bin_type=True)


def _unpack(value):
    return None if value is None else msgpack.unpackb(value, raw=False)


def _record(row: tuple) -> RunRecord:
    values = dict(zip(_COLUMNS, row))
    for key in _PACKED:
        values[key] = _unpack(values[key])
    values["order"] = values.pop("ord")
    return RunRecord(**values)


_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER")


class _Journal:
    """The database connection, keeping the writes of the open batch (while ``recording``) so that a batch
    SQLite rolled back can be written again. Reads and everything else go straight to the connection."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db
        self.recording = False
        self.writes: list[tuple[bool, str, object]] = []   # (many, sql, parameters), in the order made

    def execute(self, sql: str, parameters=()):
        cursor = self._db.execute(sql, parameters)
        # (A write outside a transaction has committed already: nothing to keep.)
        if self.recording and self._db.in_transaction and sql.lstrip()[:7].upper().startswith(_WRITES):
            self.writes.append((False, sql, parameters))
        return cursor

    def executemany(self, sql: str, parameters):
        parameters = list(parameters)
        cursor = self._db.executemany(sql, parameters)
        if self.recording and self._db.in_transaction:
            self.writes.append((True, sql, parameters))
        return cursor

    def replay(self) -> None:
        for many, sql, parameters in self.writes:
            (self._db.executemany if many else self._db.execute)(sql, parameters)

    def __getattr__(self, name):
        return getattr(self._db, name)


class Store:
    def __init__(self, path: Path):
        self.path = path
        # Stored environments hold secrets: the database is its owner's alone (SQLite gives the -wal
        # and -shm files the database's mode; older ones are narrowed too).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._db = _Journal(sqlite3.connect(path, isolation_level=None, check_same_thread=False))
        self._db.execute("PRAGMA journal_mode=WAL")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{path}{suffix}", 0o600)
        # NORMAL in WAL mode: a commit survives an agent crash; only a power cut can
        # lose the last transactions. The fsync per commit of FULL would cap throughput.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        try:
            self.schema_version = migrate(self._db, path)
        except BaseException:
            self._db.close()
            raise
        # Called with each transaction's events once it has committed (the event log's live feed).
        self.on_events: Callable[[list[dict]], None] = lambda events: None
        self._uncommitted: list[dict] = []
        self._grouping = False              # a writer task is attached
        self._batch_open = False            # writes wait in an open transaction for the writer
        self._batch_opened = trio.Event()   # wakes the writer
        self._committed = trio.Event()      # set when the open batch has committed
        # Fault hooks (see _faults): make room before a commit; hear of a commit that failed.
        self.before_commit: Callable[[], None] = lambda: None
        self.on_commit_failed: Callable[[Exception], None] = lambda exc: None
        self.commit_error: Exception | None = None   # why the pending batch has not committed yet

    def reserve_space(self, nbytes: int) -> None:
        """Keep ``nbytes`` of free pages in the database and of written WAL: later commits then overwrite
        space the files already own instead of asking the filesystem for more, so a full disk does not
        make SQLite roll a commit back (which loses its writes). Called at start, before the writer runs."""
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0] * self._db.execute("PRAGMA page_size").fetchone()[0]
        if free >= nbytes:
            return
        self._db.execute("CREATE TABLE IF NOT EXISTS space_reserve (data BLOB)")
        self._db.execute("INSERT INTO space_reserve VALUES (zeroblob(?))", (nbytes - free,))
        self._db.execute("DELETE FROM space_reserve")
        # Those pages went through SQLite's page cache (up to 2 MiB), where nothing will read them again.
        self._db.execute("PRAGMA shrink_memory")

    def close(self) -> None:
        try:
            self._commit_batch()
        except sqlite3.Error as exc:   # a full disk at shutdown: say what could not be kept
            structlog.get_logger("labrun.store").error("store.commit.lost", error=str(exc),
                                                       writes=len(self._db.writes), events=len(self._uncommitted))
        self._db.close()

    # -- transactions ------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction; its events are published only once it has committed."""
        if self._grouping:
            with self._grouped():
                yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._uncommitted = []
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            # On a full disk SQLite may have rolled back already; a failed COMMIT leaves the transaction open.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._uncommitted = []
            raise
        events, self._uncommitted = self._uncommitted, []
        if events:
            self.on_events(events)

    @contextlib.contextmanager
    def _grouped(self):
        """One write in the open batch; its failure undoes only itself. Without a savepoint per write (two
        statements more for each): the batch is rolled back, and the other writes in it are written again
        from ``_Journal`` before anything else (``_begin_batch``), as after a commit SQLite rolled back."""
        if not self._batch_open:
            self._begin_batch()
        mark, written = len(self._uncommitted), len(self._db.writes)
        try:
            yield
        except BaseException:
            del self._uncommitted[mark:]
            del self._db.writes[written:]
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._batch_open = False
            if self._db.writes:
                with contextlib.suppress(sqlite3.Error):   # else the writer's commit writes them again
                    self._begin_batch()   # the others' writes, visible again at once
            raise

    def _begin_batch(self) -> None:
        """Open the batch's transaction, first writing again what a rolled-back commit of it had written."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.replay()
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._batch_open = True
        self._batch_opened.set()

    def _commit_batch(self) -> None:
        """Commit the open batch and publish its events (SQLite keeps a transaction whose COMMIT failed)."""
        if not self._batch_open and self._db.writes:
            self._begin_batch()   # a batch SQLite rolled back
        if self._batch_open:
            self._db.execute("COMMIT")
        self._batch_open = False
        self._db.writes = []
        self._batch_opened = trio.Event()
        committed, self._committed = self._committed, trio.Event()
        events, self._uncommitted = self._uncommitted, []
        committed.set()
        if events:
            self.on_events(events)

    async def writer(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The single writer: group-commits what the agent's tasks wrote in one pass of the event loop.

        A commit that fails (a full disk) is retried with a capped backoff, with the batch kept (or,
        if SQLite rolled it back, written again): until it succeeds, nothing in it is replied to or
        acted on, and nothing is lost.
        """
        self._grouping = True
        self._db.recording = True
        task_status.started()
        delay = 0.05
        try:
            while True:
                await self._batch_opened.wait()
                # Tasks that are ready now add their writes to this batch first. (Only one pass: a reply waits
                # for this commit, and more passes let other work in before it. A run about to start commits
                # its own batch: ``commit_now``.)
                await trio.sleep(0)
                try:
                    self.before_commit()
                    self._commit_batch()
                    self.commit_error = None
                    delay = 0.05
                except sqlite3.OperationalError as exc:
                    self.commit_error = exc
                    self.on_commit_failed(exc)
                    rolled_back = not self._db.in_transaction
                    if rolled_back:
                        # SQLite rolled the batch back (it may, on a full disk): the next try writes it again.
                        self._batch_open = False
                    structlog.get_logger("labrun.store").error(
                        "store.commit.failed", error=str(exc), rolled_back=rolled_back, writes=len(self._db.writes),
                        events=len(self._uncommitted), retry_in=delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            self._db.recording = False
            try:
                self._commit_batch()
            except sqlite3.Error as exc:
                structlog.get_logger("labrun.store").error("store.commit.lost", error=str(exc),
                                                           writes=len(self._db.writes), events=len(self._uncommitted))
                self._db.writes = []
            self._grouping = False

    def commit_now(self) -> None:
        """Commit the open batch at once, not at the writer's next pass: for a task about to start a process,
        which must not start before its run's state is saved, and need not wait for the batch to gather.
        A failed commit is left to the writer, which retries it; ``durable`` then waits for that."""
        if not self._grouping or not self.pending():
            return
        try:
            self.before_commit()
            self._commit_batch()
        except sqlite3.OperationalError:
            if not self._db.in_transaction:
                self._batch_open = False   # SQLite rolled it back: the writer writes it again

    def pending(self) -> bool:
        """Whether writes wait for a commit (an open batch, or one SQLite rolled back)."""
        return self._batch_open or bool(self._db.writes)

    async def durable(self) -> None:
        """Return once every write made so far has committed."""
        if self.pending():
            await self._committed.wait()

    def _event(self, type: str, *, run_id=None, experiment=None, user=None, data=None, now=None) -> int:
        event = {"id": str(uuid.uuid4()), "time": now or time.time(), "type": type, "run_id": run_id,
                 "experiment": experiment, "user": user, "data": data or {}}
        cursor = self._db.execute(
            "INSERT INTO events (id, time, type, run_id, experiment, user, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event["id"], event["time"], type, run_id, experiment, user, _pack(event["data"])),
        )
        event["seq"] = cursor.lastrowid
        self._uncommitted.append(event)
        return event["seq"]

    def add_run(self, record: RunRecord, event_type: str, submit_key: str | None = None,
                parent_id: str | None = None) -> RunRecord:
        """Insert a new run (assigning its order and per-experiment number) with its event.

        ``submit_key``: the client's idempotency key; ``run_for_key`` finds the run by it later.
        ``parent_id``: the run's parent (a child run's, Azure ML's ``child_run``/``submit_child``).
        """
        with self._transaction():
            if parent_id is not None:
                self._db.execute("INSERT INTO run_parents (run_id, parent_id) VALUES (?, ?)", (record.run_id, parent_id))
            self._insert_run(record, event_type, submit_key)
        return record

    def add_array(self, records: list[RunRecord], event_type: str, submit_key: str | None = None) -> list[RunRecord]:
        """Insert the members of an array (each spec's ``array`` says which) in one transaction.

        ``submit_key`` is kept with the first member; a retried submit finds the array through it.
        """
        with self._transaction():
            for record in records:
                self._insert_run(record, event_type, submit_key if record is records[0] else None)
                array = record.spec["array"]
                self._db.execute("INSERT INTO run_arrays (run_id, array_id, idx, throttle) VALUES (?, ?, ?, ?)",
                                 (record.run_id, array["id"], array["index"], array["throttle"]))
        return records

    def _insert_run(self, record: RunRecord, event_type: str, submit_key: str | None = None) -> None:
        if submit_key is not None:
            self._db.execute("INSERT OR REPLACE INTO submit_keys (uid, key, run_id) VALUES (?, ?, ?)",
                             (record.uid, submit_key, record.run_id))
        record.number = self._db.execute(
            "INSERT INTO experiments (name, last_number) VALUES (?, 1) "
            "ON CONFLICT(name) DO UPDATE SET last_number = last_number + 1 RETURNING last_number",
            (record.experiment,),
        ).fetchall()[0][0]
        record.order = self._db.execute("SELECT COALESCE(MAX(ord), 0) + 1 FROM runs").fetchone()[0]
        values = dict(record.__dict__, ord=record.order)
        self._db.execute(
            f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            [_pack(values[c]) if c in _PACKED else values[c] for c in _COLUMNS],
        )
        self._event(event_type, run_id=record.run_id, experiment=record.experiment, user=record.user,
                    data={"status": record.status}, now=record.submitted_at)

    def update_run(self, record: RunRecord, event_type: str | None, event_data: dict | None = None,
                   **changes) -> RunRecord:
        """Apply ``changes`` to the run and append its event, atomically; updates ``record`` too."""
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        with self._transaction():
            if changes:
                assignments = ", ".join(f"{k} = ?" for k in changes)
                values = [_pack(v) if k in _PACKED else v for k, v in changes.items()]
                self._db.execute(f"UPDATE runs SET {assignments} WHERE run_id = ?", (*values, record.run_id))
            if event_type is not None:
                self._event(event_type, run_id=record.run_id, experiment=record.experiment, user=record.user,
                            data=event_data or {})
        for key, value in changes.items():
            setattr(record, key, value)
        return record

    def add_event(self, type: str, data: dict | None = None) -> int:
        """An event that belongs to no run (agent.started, agent.stopping)."""
        with self._transaction():
            seq = self._event(type, data=data)
        return seq

    # -- queries -----------------------------------------------------------------------

    def run_for_key(self, uid: int, submit_key: str) -> RunRecord | None:
        """The run ``uid`` submitted with this idempotency key, if it still exists."""
        row = self._db.execute("SELECT run_id FROM submit_keys WHERE uid = ? AND key = ?", (uid, submit_key)).fetchone()
        return self.get_run(row[0]) if row else None

    def get_run(self, run_id: str) -> RunRecord | None:
        row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _record(row) if row else None

    def runs_with_status(self, statuses: Iterable[str]) -> list[RunRecord]:
        statuses = list(statuses)
        rows = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE status IN ({', '.join('?' * len(statuses))}) ORDER BY ord",
            statuses,
        ).fetchall()
        return [_record(r) for r in rows]

    def list_runs(self, *, experiment: str | None = None, statuses: Iterable[str] | None = None,
                  limit: int | None = None, before: int | None = None) -> list[RunRecord]:
        """Runs, newest first; ``before``: only runs submitted before the one with that order."""
        where, params = [], []
        if before is not None:
            where.append("ord < ?")
            params.append(before)
        if experiment is not None:
            where.append("experiment = ?")
            params.append(experiment)
        if statuses is not None:
            statuses = list(statuses)
            # Finished runs are most of a long history: walking the order index beats sorting them all,
            # so the status index ("+status" turns it off) is used only for the few queued and active runs.
            column = "+status" if set(statuses) & TERMINAL else "status"
            where.append(f"{column} IN ({', '.join('?' * len(statuses))})")
            params.extend(statuses)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ord DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_record(r) for r in self._db.execute(sql, params).fetchall()]

    def environ(self, run_id: str) -> dict:
        """The client environment captured at submit (kept out of memory while a run waits)."""
        row = self._db.execute("SELECT environ FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _unpack(row[0]) if row else {}

    def counts_by_status(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())

    def events_since(self, seq: int, limit: int = 1000, run_id: str | None = None, *, experiment: str | None = None,
                     user: str | None = None, types: Iterable[str] | None = None) -> list[dict]:
        """Events after ``seq``, oldest first (only those of ``run_id``, ``experiment``, ``user`` and ``types``
        when given: filtered here, so that a replay reads only the rows it sends)."""
        sql = "SELECT seq, id, time, type, run_id, experiment, user, data FROM events WHERE seq > ?"
        params: list = [seq]
        for column, value in (("run_id", run_id), ("experiment", experiment), ("user", user)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        if types is not None:
            types = sorted(types)
            sql += f" AND type IN ({', '.join('?' * len(types))})"
            params.extend(types)
        rows = self._db.execute(sql + " ORDER BY seq LIMIT ?", (*params, limit)).fetchall()
        return [
            {"seq": r[0], "id": r[1], "time": r[2], "type": r[3], "run_id": r[4], "experiment": r[5],
             "user": r[6], "data": _unpack(r[7])}
            for r in rows
        ]

    def last_seq(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return row[0] if row else 0

    def delete_events(self, *, before_time: float, up_to_seq: int) -> int:
        """Retention: drop events older than ``before_time`` whose seq is at most ``up_to_seq``."""
        with self._transaction():
            cursor = self._db.execute("DELETE FROM events WHERE time < ? AND seq <= ?", (before_time, up_to_seq))
        return cursor.rowcount

    # -- arrays, dependencies and removed run directories --------------------------------

    def array_members(self, array_id: str) -> list[str]:
        """The run ids of an array, by index; empty when there is no such array."""
        rows = self._db.execute("SELECT run_id FROM run_arrays WHERE array_id = ? ORDER BY idx", (array_id,))
        return [r[0] for r in rows.fetchall()]

    def _by_run(self, select: str, run_ids: Iterable[str]) -> dict:
        """``{run_id: value}`` from ``select`` (``SELECT run_id, value FROM ... WHERE run_id IN``), in chunks."""
        run_ids, found = list(run_ids), {}
        for start in range(0, len(run_ids), 500):
            chunk = run_ids[start:start + 500]
            found.update(self._db.execute(f"{select} ({', '.join('?' * len(chunk))})", chunk).fetchall())
        return found

    def statuses_of(self, run_ids: Iterable[str]) -> dict[str, str]:
        return self._by_run("SELECT run_id, status FROM runs WHERE run_id IN", run_ids)

    def removed_of(self, run_ids: Iterable[str]) -> dict[str, float]:
        """{run_id: when its directory was removed} for those of ``run_ids`` whose directory is gone."""
        return self._by_run("SELECT run_id, removed_at FROM removed_run_dirs WHERE run_id IN", run_ids)

    def finished_runs_to_remove(self, *, ended_before: float, statuses: Iterable[str] = TERMINAL,
                                uid: int | None = None, limit: int = 1000,
                                include_removed: bool = False) -> list[RunRecord]:
        """Finished runs that ended before ``ended_before`` and still have their directory, oldest first."""
        statuses = [s for s in statuses if s in TERMINAL]
        sql = (f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE +status IN ({', '.join('?' * len(statuses))}) "
               "AND ended_at < ?")
        if not include_removed:
            sql += " AND run_id NOT IN (SELECT run_id FROM removed_run_dirs)"
        params: list = [*statuses, ended_before]
        if uid is not None:
            sql += " AND uid = ?"
            params.append(uid)
        rows = self._db.execute(sql + " ORDER BY ord LIMIT ?", (*params, limit)).fetchall()
        return [_record(r) for r in rows]

    def mark_removed(self, record: RunRecord, freed: int, *, purge: bool) -> None:
        """Record that a run's directory is gone (``run.removed`` event); ``purge``: forget the run as well."""
        with self._transaction():
            if purge:
                for table in ("runs", "metrics", "labels", "run_arrays", "removed_run_dirs"):
                    self._db.execute(f"DELETE FROM {table} WHERE run_id = ?", (record.run_id,))
            else:
                self._db.execute("INSERT OR REPLACE INTO removed_run_dirs (run_id, removed_at, bytes) VALUES (?, ?, ?)",
                                 (record.run_id, time.time(), freed))
            self._event("run.removed", run_id=record.run_id, experiment=record.experiment, user=record.user,
                        data={"bytes": freed, "purged": purge})

    # -- metrics, tags and properties ---------------------------------------------------

    def add_metrics(self, record: RunRecord, metrics: list[dict]) -> None:
        """A batch of metrics and its ``run.metrics_logged`` event, atomically."""
        with self._transaction():
            self._db.executemany(
                "INSERT INTO metrics (run_id, name, kind, step, time, value, description) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(record.run_id, m["name"], m["kind"], m.get("step"), m["time"], _pack(m["value"]),
                  m.get("description") or "") for m in metrics],
            )
            self._event("run.metrics_logged", run_id=record.run_id, experiment=record.experiment, user=record.user,
                        data={"count": len(metrics), "names": sorted({m["name"] for m in metrics})[:50]})

    def metrics(self, run_id: str, name: str | None = None) -> list[dict]:
        sql = "SELECT name, kind, step, time, value, description FROM metrics WHERE run_id = ?"
        params = [run_id]
        if name is not None:
            sql += " AND name = ?"
            params.append(name)
        return [{"name": r[0], "kind": r[1], "step": r[2], "time": r[3], "value": _unpack(r[4]), "description": r[5]}
                for r in self._db.execute(sql + " ORDER BY id", params).fetchall()]

    def metrics_after(self, run_id: str, after_id: int, limit: int) -> list[dict]:
        """The run's metric rows after row ``after_id``, oldest first, with their row ``id`` (a delivery cursor)."""
        rows = self._db.execute("SELECT id, name, kind, step, time, value FROM metrics WHERE run_id = ? AND id > ? "
                                "ORDER BY id LIMIT ?", (run_id, after_id, limit)).fetchall()
        return [{"id": r[0], "name": r[1], "kind": r[2], "step": r[3], "time": r[4], "value": _unpack(r[5])}
                for r in rows]

    def labels_of(self, run_ids: list[str]) -> dict[str, dict[str, dict[str, str]]]:
        """{run_id: {kind: {key: value}}} for many runs in one query (listing)."""
        found: dict[str, dict[str, dict[str, str]]] = {}
        for start in range(0, len(run_ids), 500):
            chunk = run_ids[start:start + 500]
            rows = self._db.execute(f"SELECT run_id, kind, key, value FROM labels WHERE run_id IN "
                                    f"({', '.join('?' * len(chunk))})", chunk)
            for run_id, kind, key, value in rows:
                found.setdefault(run_id, {}).setdefault(kind, {})[key] = value
        return found

    def labels(self, run_id: str, kind: str) -> dict[str, str]:
        rows = self._db.execute("SELECT key, value FROM labels WHERE run_id = ? AND kind = ?", (run_id, kind))
        return dict(rows.fetchall())

    def set_labels(self, run_id: str, kind: str, values: dict[str, str]) -> None:
        with self._transaction():
            self._db.executemany(
                "INSERT INTO labels (run_id, kind, key, value) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(run_id, kind, key) DO UPDATE SET value = excluded.value",
                [(run_id, kind, k, v) for k, v in values.items()])

    # -- environments ------------------------------------------------------------------

    def register_environment(self, name: str, definition: dict, user: str, uid: int | None = None,
                             *, admin: bool = False) -> int:
        """Store the next version of ``name``. The first registrant owns the name.

        Raises:
            Forbidden: the name belongs to another user, and the caller is not an admin.
        """
        with self._transaction():
            owner = self.environment_owner(name)
            if owner is None and uid is not None:
                self._db.execute("INSERT INTO environment_owners (name, uid, user) VALUES (?, ?, ?)", (name, uid, user))
            elif owner is not None and uid is not None and owner != uid and not admin:
                raise Forbidden(f"environment name {name!r} belongs to {self._user_name(owner)}; only its owner or "
                                "an admin may register new versions of it (choose another name)")
            row = self._db.execute("SELECT MAX(version) FROM environments WHERE name = ?", (name,)).fetchone()
            version = (row[0] or 0) + 1
            self._db.execute("INSERT INTO environments (name, version, definition, user, created_at) VALUES (?, ?, ?, ?, ?)",
                             (name, version, _pack(definition), user, time.time()))
        return version

    @staticmethod
    def _user_name(uid: int) -> str:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return f"uid {uid}"

    def environment_owner(self, name: str) -> int | None:
        """The uid that owns an environment name (a name registered before names had owners: its first user's)."""
        row = self._db.execute("SELECT uid FROM environment_owners WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return row[0]
        first = self._db.execute("SELECT user FROM environments WHERE name = ? ORDER BY version LIMIT 1",
                                 (name,)).fetchone()
        if first is None:
            return None
        try:
            return pwd.getpwnam(first[0]).pw_uid
        except KeyError:
            return 0   # a user that no longer exists: only admins may publish it

    def get_environment(self, name: str, version: int | None = None) -> dict | None:
        sql = "SELECT name, version, definition, user, created_at FROM environments WHERE name = ?"
        params: list = [name]
        if version is not None:
            sql += " AND version = ?"
            params.append(version)
        row = self._db.execute(sql + " ORDER BY version DESC LIMIT 1", params).fetchone()
        return None if row is None else {"name": row[0], "version": row[1], "definition": _unpack(row[2]),
                                         "user": row[3], "created_at": row[4]}

    def list_environments(self, *, after: str | None = None, limit: int = 1000) -> list[dict]:
        """The newest version of each environment named after ``after``, by name: one page of ``limit``."""
        rows = self._db.execute(
            "SELECT e.name, e.version, e.definition, e.user, e.created_at FROM environments e JOIN "
            "(SELECT name, MAX(version) AS version FROM environments WHERE name > ? GROUP BY name ORDER BY name "
            "LIMIT ?) newest ON e.name = newest.name AND e.version = newest.version ORDER BY e.name",
            ("" if after is None else after, limit)).fetchall()
        return [{"name": r[0], "version": r[1], "definition": _unpack(r[2]), "user": r[3], "created_at": r[4]}
                for r in rows]

    # -- run hierarchies and experiments -------------------------------------------------

    def parents_of(self, run_ids: list[str]) -> dict[str, str]:
        """{run_id: parent_id} for those of ``run_ids`` that have a parent."""
        found = {}
        for start in range(0, len(run_ids), 500):
            chunk = run_ids[start:start + 500]
            found.update(self._db.execute(f"SELECT run_id, parent_id FROM run_parents WHERE run_id IN "
                                          f"({', '.join('?' * len(chunk))})", chunk).fetchall())
        return found

    def children_of(self, run_id: str, recursive: bool = False) -> list[str]:
        """The ids of ``run_id``'s children (all descendants with ``recursive``), oldest first."""
        children, frontier = [], [run_id]
        while frontier:
            rows = self._db.execute(
                f"SELECT p.run_id FROM run_parents p JOIN runs r ON r.run_id = p.run_id WHERE p.parent_id IN "
                f"({', '.join('?' * len(frontier))}) ORDER BY r.ord", frontier).fetchall()
            frontier = [r[0] for r in rows]
            children.extend(frontier)
            if not recursive:
                break
        return children

    def experiments(self, *, after: str | None = None, limit: int = -1, name: str | None = None) -> list[dict]:
        """Experiments with runs or metadata, by name: ``{"name", "runs", "user", "tags", "archived_at"}``; one
        page of ``limit`` after ``after`` (-1: all), or only the one named ``name``."""
        where, params = ("name = ?", (name,)) if name is not None else ("name > ?", ("" if after is None else after,))
        rows = self._db.execute(
            f"SELECT n.name, COALESCE(e.last_number, 0), m.user, m.tags, m.archived_at FROM "
            f"(SELECT name FROM experiments WHERE {where} UNION SELECT name FROM experiment_meta WHERE {where}) n "
            "LEFT JOIN experiments e ON e.name = n.name LEFT JOIN experiment_meta m ON m.name = n.name "
            "ORDER BY n.name LIMIT ?", (*params, *params, limit)).fetchall()
        return [{"name": r[0], "runs": r[1], "user": r[2], "tags": _unpack(r[3]) or {}, "archived_at": r[4]}
                for r in rows]

    def update_experiment(self, name: str, user: str, *, tags: dict | None = None, remove_tags=(),
                          archived_at=..., ) -> None:
        with self._transaction():
            row = self._db.execute("SELECT tags, archived_at FROM experiment_meta WHERE name = ?", (name,)).fetchone()
            current, archived = (_unpack(row[0]), row[1]) if row else ({}, None)
            current.update(tags or {})
            for key in remove_tags:
                current.pop(key, None)
            if archived_at is not ...:
                archived = archived_at
            self._db.execute("INSERT INTO experiment_meta (name, user, tags, archived_at) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT(name) DO UPDATE SET tags = excluded.tags, archived_at = excluded.archived_at",
                             (name, user, _pack(current), archived))

    def token_hash(self, run_id: str) -> bytes | None:
        row = self._db.execute("SELECT token_hash FROM run_tokens WHERE run_id = ?", (run_id,)).fetchone()
        return row[0] if row else None

    def set_token_hash(self, run_id: str, token_hash: bytes | None) -> None:
        """Remember (or, with None, forget) the hash of an active run's token."""
        with self._transaction():
            if token_hash is None:
                self._db.execute("DELETE FROM run_tokens WHERE run_id = ?", (run_id,))
            else:
                self._db.execute("INSERT INTO run_tokens (run_id, token_hash) VALUES (?, ?) ON CONFLICT(run_id) "
                                 "DO UPDATE SET token_hash = excluded.token_hash", (run_id, token_hash))

    def get_meta(self, key: str, default=None):
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return _unpack(row[0]) if row else default

    def set_meta(self, key: str, value) -> None:
        self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (key, _pack(value)))

    # -- content-addressed snapshots (agent/_snapshot.py) --------------------------------

    def _chunks(self, sql: str, params: tuple, values: list):
        """Rows of ``sql`` (with one ``{}`` for an IN list) over ``values`` in chunks SQLite accepts."""
        for start in range(0, len(values), 500):
            chunk = values[start:start + 500]
            yield from self._db.execute(sql.format(", ".join("?" * len(chunk))), (*params, *chunk))

    def cas_blob_size(self, digest: str) -> int | None:
        row = self._db.execute("SELECT size FROM cas_blobs WHERE hash = ?", (digest,)).fetchone()
        return row[0] if row else None

    def cas_blobs_held(self, uid: int, digests: list[str]) -> dict[str, int]:
        """{hash: size} of the contents ``uid`` has uploaded (and the store still has)."""
        return dict(self._chunks("SELECT b.hash, b.size FROM cas_holders h JOIN cas_blobs b ON b.hash = h.hash "
                                 "WHERE h.uid = ? AND h.hash IN ({})", (uid,), digests))

    def cas_tree_held(self, uid: int, tree: str) -> bool:
        return self._db.execute("SELECT 1 FROM cas_tree_holders WHERE uid = ? AND tree = ?",
                                (uid, tree)).fetchone() is not None

    def cas_add_blobs(self, blobs: list[tuple[str, int]], uid: int) -> None:
        """Contents now in the store (``(hash, size)``), uploaded by ``uid``."""
        with self._transaction():
            self._db.executemany("INSERT OR IGNORE INTO cas_blobs (hash, size, refs) VALUES (?, ?, 0)", blobs)
            self._db.executemany("INSERT OR IGNORE INTO cas_holders (uid, hash) VALUES (?, ?)",
                                 [(uid, digest) for digest, _ in blobs])

    def cas_acquire(self, run_id: str, uid: int, tree: str, entries: list[tuple]) -> None:
        """``run_id`` uses ``tree``: one more reference to it (a new tree references each of its contents)."""
        with self._transaction():
            if self._db.execute("SELECT 1 FROM cas_runs WHERE run_id = ?", (run_id,)).fetchone():
                return
            if self._db.execute("UPDATE cas_trees SET refs = refs + 1 WHERE tree = ?", (tree,)).rowcount == 0:
                self._db.execute("INSERT INTO cas_trees (tree, refs, files) VALUES (?, 1, ?)",
                                 (tree, _pack(entries)))
                self._db.executemany("UPDATE cas_blobs SET refs = refs + 1 WHERE hash = ?",
                                     [(d,) for d in {e[3] for e in entries}])
            self._db.execute("INSERT INTO cas_runs (run_id, tree) VALUES (?, ?)", (run_id, tree))
            self._db.execute("INSERT OR IGNORE INTO cas_tree_holders (uid, tree) VALUES (?, ?)", (uid, tree))

    def cas_release(self, run_id: str) -> list[str]:
        """Drop ``run_id``'s reference; returns the contents no tree uses any more."""
        with self._transaction():
            row = self._db.execute("SELECT tree FROM cas_runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                return []
            tree = row[0]
            self._db.execute("DELETE FROM cas_runs WHERE run_id = ?", (run_id,))
            self._db.execute("UPDATE cas_trees SET refs = refs - 1 WHERE tree = ?", (tree,))
            refs, files = self._db.execute("SELECT refs, files FROM cas_trees WHERE tree = ?", (tree,)).fetchone()
            if refs > 0:
                return []
            self._db.execute("DELETE FROM cas_trees WHERE tree = ?", (tree,))
            self._db.execute("DELETE FROM cas_tree_holders WHERE tree = ?", (tree,))
            digests = sorted({e[3] for e in _unpack(files)})
            self._db.executemany("UPDATE cas_blobs SET refs = refs - 1 WHERE hash = ?", [(d,) for d in digests])
            return [r[0] for r in self._chunks("SELECT hash FROM cas_blobs WHERE refs <= 0 AND hash IN ({})",
                                               (), digests)]

    def cas_unreferenced(self, digests: list[str] | None = None) -> list[str]:
        """Contents no tree uses (among ``digests``, or all)."""
        if digests is None:
            return [r[0] for r in self._db.execute("SELECT hash FROM cas_blobs WHERE refs <= 0")]
        return [r[0] for r in self._chunks("SELECT hash FROM cas_blobs WHERE refs <= 0 AND hash IN ({})",
                                           (), sorted(set(digests)))]

    def cas_forget(self, digests: list[str]) -> None:
        if not digests:
            return
        with self._transaction():
            for start in range(0, len(digests), 500):
                chunk = digests[start:start + 500]
                marks = ", ".join("?" * len(chunk))
                self._db.execute(f"DELETE FROM cas_holders WHERE hash IN ({marks})", chunk)
                self._db.execute(f"DELETE FROM cas_blobs WHERE refs <= 0 AND hash IN ({marks})", chunk)

    def cas_tree_of(self, run_id: str) -> list[tuple] | None:
        row = self._db.execute("SELECT t.files FROM cas_runs r JOIN cas_trees t ON t.tree = r.tree "
                               "WHERE r.run_id = ?", (run_id,)).fetchone()
        return None if row is None else [tuple(e) for e in _unpack(row[0])]
