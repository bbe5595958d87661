"""The store's single writer: writes of one pass of the event loop commit together, each durable before it counts."""

import sqlite3

import pytest
import trio

from labrun.agent._model import RunRecord
from labrun.agent._store import Store


@pytest.fixture
async def store(tmp_path, nursery):
    store = Store(tmp_path / "state.db")
    commits = []
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    store.commits = commits
    published = []
    store.on_events = published.extend
    store.published = published
    await nursery.start(store.writer)
    yield store
    store.close()


def events_seen_by_another_connection(store) -> int:
    with sqlite3.connect(store.path) as other:
        return other.execute("SELECT COUNT(*) FROM events").fetchone()[0]


def record(run_id: str) -> RunRecord:
    return RunRecord(run_id=run_id, order=0, experiment="e", number=0, uid=0, gid=0, user="root", status="Queued",
                     spec={}, environ={}, submitted_at=1.0)


async def test_writes_of_one_pass_commit_together_and_are_durable_after_durable(store):
    async def write(i):
        store.add_event("test.event", {"i": i})
        await store.durable()
        assert events_seen_by_another_connection(store) >= i + 1   # committed before this task goes on

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(write, i)
    assert len(store.commits) == 1
    assert sorted(e["data"]["i"] for e in store.published) == list(range(20))
    assert events_seen_by_another_connection(store) == 20


async def test_nothing_is_published_or_visible_before_the_commit(store):
    store.add_event("test.event")
    assert store.published == [] and events_seen_by_another_connection(store) == 0
    await store.durable()
    assert len(store.published) == 1 and events_seen_by_another_connection(store) == 1


async def test_a_failing_write_undoes_only_itself(store):
    store.add_run(record("r1"), "run.queued")
    with pytest.raises(sqlite3.IntegrityError):
        store.add_run(record("r1"), "run.queued")   # the same run id again: refused inside the batch
    store.add_event("after")
    await store.durable()
    assert [e["type"] for e in store.published] == ["run.queued", "after"]
    assert store.get_run("r1") is not None and len(store.commits) == 1


async def test_a_failed_commit_is_retried_and_nothing_counts_until_it_succeeds(store, monkeypatch):
    original = Store._commit_batch
    failures = []

    def flaky(self):
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("database or disk is full")   # the transaction stays open
        original(self)

    monkeypatch.setattr(Store, "_commit_batch", flaky)
    store.add_event("kept")
    with trio.move_on_after(0.01):
        await store.durable()
    assert failures and store.published == []   # still waiting for the retry
    await store.durable()
    assert [e["type"] for e in store.published] == ["kept"] and events_seen_by_another_connection(store) == 1


async def test_a_failing_write_leaves_the_others_of_its_batch_visible_and_kept(store):
    store.add_run(record("r1"), "run.queued")
    await store.durable()
    store.add_run(record("r2"), "run.queued")
    # The failed write's batch is undone and the others' writes written again at once: still readable.
    with pytest.raises(sqlite3.IntegrityError):
        store.add_run(record("r1"), "run.queued")
    assert store.get_run("r2").number == 2 and store.pending()
    with pytest.raises(sqlite3.IntegrityError):
        store.add_run(record("r2"), "run.queued")
    store.add_run(record("r3"), "run.queued")
    await store.durable()
    assert [e["type"] for e in store.published] == ["run.queued"] * 3
    assert [store.get_run(r).number for r in ("r1", "r2", "r3")] == [1, 2, 3]   # the failed ones took none
    assert events_seen_by_another_connection(store) == 3 and not store.pending()
