"""The store's schema version: forward migrations at open, and a clear refusal of a newer database."""

import sqlite3

import pytest

from labrun.agent import _store
from labrun.agent._store import MIGRATIONS, SCHEMA, SchemaTooNew, Store, add_column


def version(path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


def test_a_new_database_gets_every_step(tmp_path):
    Store(tmp_path / "state.db").close()
    assert version(tmp_path / "state.db") == len(MIGRATIONS)


def test_a_database_from_before_schema_versions_is_upgraded_and_keeps_its_rows(tmp_path):
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO meta (key, value) VALUES ('old', x'01')")
    store = Store(path)
    assert store.get_meta("old") == 1 and store.token_hash("nope") is None
    store.close()
    assert version(path) == len(MIGRATIONS)


def test_a_newer_database_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "state.db"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(SchemaTooNew, match=rf"schema version {len(MIGRATIONS) + 1}, newer than this agent"):
        Store(path)
    assert version(path) == len(MIGRATIONS) + 1


def test_a_new_step_is_one_line_and_runs_once(tmp_path, monkeypatch):
    path = tmp_path / "state.db"
    Store(path).close()
    monkeypatch.setattr(_store, "MIGRATIONS", [*MIGRATIONS, add_column("runs", "note", "TEXT")])
    Store(path).close()
    Store(path).close()   # nothing left to do
    with sqlite3.connect(path) as db:
        assert "note" in {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    assert version(path) == len(MIGRATIONS) + 1


def test_a_failing_step_leaves_the_previous_version(tmp_path, monkeypatch):
    path = tmp_path / "state.db"
    Store(path).close()
    broken = "CREATE TABLE fine (x);\nINSERT INTO no_such_table VALUES (1);"
    monkeypatch.setattr(_store, "MIGRATIONS", [*MIGRATIONS, broken])
    with pytest.raises(sqlite3.OperationalError):
        Store(path)
    assert version(path) == len(MIGRATIONS)
    with sqlite3.connect(path) as db:   # the step's first statement was rolled back with it
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'fine'").fetchone() is None


def test_a_first_release_database_next_to_its_runs_passes_the_start_check_and_is_upgraded(tmp_path):
    # The state check must not mistake an older (smaller) schema for a damaged database: migrations add the rest.
    from labrun.agent._statecheck import check_state

    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
    (tmp_path / "runs" / "old_1_00000000").mkdir(parents=True)
    check_state(tmp_path)
    store = Store(path)
    assert store.run_for_key(0, "no-such-key") is None   # a table the first release did not have
    store.close()
