"""Checks of the state directory before the agent opens it, and the cleaning of what a killed agent left.

- The database must be whole: ``PRAGMA quick_check`` passes and every table and column
  the store expects is there (more is fine: a newer agent may have added some). An
  empty (0-byte), missing, corrupt or foreign database next to existing run
  directories is ``StateDamaged``: the agent refuses to start, with a message naming
  the file and what to do, rather than start afresh and bury the history and queue.
- So must the content store's database of small contents (``cas/small.db``).
- A run directory with no row in the database, holding nothing but what a submit makes
  (``logs/``, empty, and the ``outputs`` link), is what an agent killed between making it
  and committing the run's row leaves: it is removed. Any other run directory with no row
  is never removed (it may be all that is left of a lost database); it is only reported.
  Agents before this one marked each submit in ``<state>/submitting/`` instead (a file
  created and removed per submit); their marks are still honoured.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import structlog

from ._faults import is_disk_error
from ._retention import remove_run_dir
from ._rundir import RunDir
from ._store import SCHEMA

log = structlog.get_logger("labrun.state")

# sysexits' EX_DATAERR: the systemd unit lists it in RestartPreventExitStatus, so a damaged state
# directory stops the service with one clear message instead of a restart loop.
EXIT_STATE_DAMAGED = 65
SUBMITTING = "submitting"


class StateDamaged(Exception):
    """The state directory cannot be used as it is; the message says what the admin should do."""


def _expected_tables() -> dict[str, set[str]]:
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA)
        return _tables(db)
    finally:
        db.close()


def _tables(db: sqlite3.Connection) -> dict[str, set[str]]:
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {name: {r[1] for r in db.execute(f"PRAGMA table_info('{name}')")} for name in names}


def _advice(db: Path, runs: Path) -> str:
    return (f"Stop here and keep the files. Restore {db.name} from a backup (into {db.parent}), or, to start "
            f"afresh with the old runs kept for reference, move both {db} and {runs} aside, then start the agent.")


def check_state(state_dir: Path) -> None:
    """Refuse a state directory whose database is missing, empty or damaged while run directories exist.

    Raises:
        StateDamaged: naming the file, what is wrong and what to do.
    """
    db, runs = state_dir / "state.db", state_dir / "runs"
    run_dirs = sum(1 for d in runs.iterdir() if d.is_dir()) if runs.is_dir() else 0
    if not db.exists() or db.stat().st_size == 0:
        if run_dirs:
            what = "is missing" if not db.exists() else "is empty (0 bytes)"
            raise StateDamaged(f"the state database {db} {what}, but {runs} holds {run_dirs} run directories: "
                               f"the history and queue of those runs would be lost. {_advice(db, runs)}")
        return
    found = _probe(db, "the state database", _advice(db, runs))
    if found is None:
        return
    if not found and not run_dirs:
        return   # an empty database file and nothing else: a first start
    missing = []
    for table, columns in _expected_tables().items():
        if table not in found:
            missing.append(table)
        else:
            missing += [f"{table}.{column}" for column in sorted(columns - found[table])]
    if missing:
        raise StateDamaged(f"the state database {db} is not a labrun database, or a damaged one (missing: "
                           f"{', '.join(missing[:5])}). {_advice(db, runs)}")
    _check_small_contents(state_dir / "cas" / "small.db")


def _check_small_contents(db: Path) -> None:
    """The content store's database of small contents (``_small``) must be whole too: the snapshots of queued and
    kept runs are partly in it."""
    if not db.exists() or db.stat().st_size == 0:
        return
    _probe(db, "the snapshot store's database", f"Stop here and keep the file. Restore it from a backup, or move "
           f"{db} (with its -wal and -shm files) aside and start the agent: runs whose snapshots had small files in "
           "it then fail to start, naming the missing content, and must be submitted again.")


def _probe(db: Path, what: str, advice: str) -> dict[str, set[str]] | None:
    """The tables of database ``db`` once its integrity check passes; None if the disk cannot be read now.

    Raises:
        StateDamaged: it cannot be read or is corrupt (``what`` names it, ``advice`` says what to do).
    """
    try:
        probe = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            problems = [r[0] for r in probe.execute("PRAGMA quick_check(5)").fetchall()]
            found = _tables(probe)
        finally:
            probe.close()
    except sqlite3.DatabaseError as exc:
        if is_disk_error(exc):
            # A full disk is not damage: start, serve what can be read, and retry writes (see _faults).
            log.warning("state.check.skipped", error=str(exc), detail="the state disk is full or failing")
            return None
        raise StateDamaged(f"{what} {db} cannot be read ({exc}). {advice}") from None
    if problems != ["ok"]:
        raise StateDamaged(f"{what} {db} is corrupt (integrity check: {'; '.join(problems)}). {advice}")
    return found


def clean_orphans(state_dir: Path, has_run) -> list[str]:
    """Remove run directories whose submit never committed; returns their run ids.

    ``has_run(run_id)`` says whether the store has that run's row.
    """
    marks, runs = state_dir / SUBMITTING, state_dir / "runs"
    removed = []
    if marks.is_dir():   # an older agent's
        for mark in marks.iterdir():
            if not has_run(mark.name):
                _remove(state_dir, mark.name)
                removed.append(mark.name)
            mark.unlink(missing_ok=True)
    unknown = []
    if runs.is_dir():
        with os.scandir(runs) as entries:
            listed = list(entries)
        for entry in listed:
            # (a cluster run's directory is a link, which may dangle: its run_root unmounted, say)
            if not (entry.is_symlink() or entry.is_dir(follow_symlinks=False)) or has_run(entry.name):
                continue
            if _as_submitted(Path(entry.path)):
                _remove(state_dir, entry.name)
                removed.append(entry.name)
            else:
                unknown.append(entry.name)
    if removed:
        log.warning("state.orphans.removed", count=len(removed), run_ids=removed[:20],
                    detail="run directories of submits the agent did not finish (it was killed)")
    if unknown:
        log.warning("state.runs.unknown", count=len(unknown), run_ids=unknown[:20],
                    detail="run directories with no row in the database; kept, remove them by hand if unwanted")
    return removed


def _as_submitted(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but (part of) what a submit makes in it: an empty ``logs/`` and the
    ``outputs`` link. Nothing of a run is lost with such a directory: its run never started."""
    layout = RunDir(run_dir)
    try:
        names = set(os.listdir(run_dir))
        if not names <= {layout.logs.name, layout.outputs_link.name}:
            return False
        if layout.logs.name in names and not (stat.S_ISDIR(os.lstat(layout.logs).st_mode)
                                              and not os.listdir(layout.logs)):
            return False
        return layout.outputs_link.name not in names or layout.outputs_link.is_symlink()
    except OSError:
        return False


def _remove(state_dir: Path, run_id: str) -> None:
    try:
        remove_run_dir(RunDir.of(state_dir, run_id))
    except OSError as exc:
        log.warning("state.orphan.remove_failed", run_id=run_id, error=str(exc))
