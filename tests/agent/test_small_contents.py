"""Small contents kept as rows of the content store's database: stored, read back beside contents kept as files
(an older store's), materialized in bounded batches as the run's user, collected after the state database forgets
them (never when stored again meanwhile), and kept whole when a commit fails."""

import os
import sqlite3
import stat

import pytest
import trio

from labrun.agent import _small, _snapshot
from labrun.agent._asuser import Credentials
from labrun.agent._snapshot import ContentStore, batches, materialize
from labrun.agent._store import Store
from tests.agent.test_ready_copies import OTHER, needs_root, run_dir
from tests.agent.test_snapshot_store import ME, content, put, sha  # noqa: F401 (a fixture)


def rows(content: ContentStore) -> set[str]:
    return set(content.small.read([digest for digest, in sqlite3.connect(content.small.path).execute(
        "SELECT hash FROM contents")]))


async def stored_inline(content: ContentStore, *items: bytes, uid: int = 0) -> list[str]:
    """Contents stored as ``blob_fds`` stores small ones: pinned, written, then recorded."""
    digests = [sha(data) for data in items]
    content.pin(digests)
    await content.small.write([(sha(data), data) for data in items])
    content.record(uid, [(sha(data), len(data)) for data in items])
    return digests


def entry(path: str, data: bytes, mode: int = 0o644) -> tuple:
    return (path, len(data), mode, sha(data))


# -- pure ------------------------------------------------------------------------------------

def test_batches_bound_the_small_contents_held_at_once():
    small, big = b"s" * 3000, b"b" * (_small.INLINE_MAX + 1)
    entries = [entry(f"f{i}", small) for i in range(5)] + [entry("big", big), entry("empty", b"")]
    parts = batches(entries, limit=7000)
    assert [len(part) for part in parts] == [2, 2, 3]   # large and empty contents are read from files, not held
    assert [e for part in parts for e in part] == entries
    assert batches([], limit=10) == [[]]   # the snapshot directory is made all the same
    assert batches([entry("one", small)], limit=10) == [[entry("one", small)]]   # one content over the limit: alone


# -- with the store --------------------------------------------------------------------------

async def test_small_contents_are_rows_and_runs_get_them_beside_files_of_an_older_store(content, tmp_path):
    script, notes = b"#!/bin/sh\necho hi\n", b"notes\n"
    await stored_inline(content, script, notes)
    older = put(content, {}, [], b"kept as a file by an older agent")   # (blob_put still stores files)
    assert content.blob_path(older).exists() and not content.blob_path(sha(script)).exists()
    assert rows(content) == {sha(script), sha(notes)}
    assert stat.S_IMODE(content.small.path.stat().st_mode) == 0o600
    entries = sorted([entry("run.sh", script, 0o755), entry("a/notes.txt", notes, 0o600),
                      entry("a/b/old.txt", b"kept as a file by an older agent"), entry("a/again.sh", script)])
    target = tmp_path / "run"
    target.mkdir()
    materialize(content, entries, target, ME)
    snapshot = target / "snapshot"
    for path, size, mode, digest in entries:
        assert (snapshot / path).read_bytes() == {sha(script): script, sha(notes): notes}.get(
            digest, b"kept as a file by an older agent")
        assert stat.S_IMODE((snapshot / path).stat().st_mode) == mode
    assert (snapshot / "outputs").is_dir()
    # The download of a snapshot's file reads the same places.
    fd = content.open_content(sha(notes), len(notes))
    try:
        assert os.pread(fd, 100, 0) == notes
    finally:
        os.close(fd)


@needs_root
async def test_a_snapshot_in_many_batches_is_made_as_its_user(content, tmp_path, monkeypatch):
    monkeypatch.setattr(_snapshot, "MATERIALIZE_BATCH", 1000)   # one batch for each two files
    files = {f"d{i % 3}/f{i}": os.urandom(400 + i) for i in range(9)}
    await stored_inline(content, *files.values())
    big = os.urandom(_small.INLINE_MAX + 10)
    put(content, {}, [], big)
    entries = sorted([entry(path, data) for path, data in files.items()] + [entry("big.bin", big)])
    assert len(batches(entries, _snapshot.MATERIALIZE_BATCH)) > 3
    target = run_dir(tmp_path, "run", OTHER)
    materialize(content, entries, target, OTHER)
    for path, data in [*files.items(), ("big.bin", big)]:
        assert (target / "snapshot" / path).read_bytes() == data
        assert (target / "snapshot" / path).stat().st_uid == OTHER.uid


async def test_contents_go_with_the_last_run_but_not_when_stored_again_meanwhile(content):
    kept, dropped = await stored_inline(content, b"stored again", b"dropped")
    tree = sorted([entry("a", b"stored again"), entry("b", b"dropped")])
    content.acquire("run", 0, content.check(0, tree), tree)
    content.end_session({}, [sha(b"stored again"), sha(b"dropped")])   # the connection closed: the run holds them
    content.release_snapshot("run")
    assert content.store.cas_blob_size(kept) is None   # forgotten by the state database at once
    content.pin([kept])   # another connection stores the same bytes before the rows are deleted
    await content.small.collect()
    assert rows(content) == {kept}   # the one stored again stays, for the record that follows
    await content.small.write([(kept, b"stored again")])
    content.record(0, [(kept, 12)])
    content.end_session({}, [kept])   # used by no tree: collected now
    await content.small.collect()
    assert rows(content) == set() and content.store.cas_unreferenced() == []


async def test_collecting_frees_the_disk(content):
    digests = await stored_inline(content, *(os.urandom(_small.INLINE_MAX) for _ in range(64)))
    await content.small.collect()   # (checkpointed: the database file holds them)
    grown = content.small.path.stat().st_size
    assert grown > 64 * _small.INLINE_MAX
    content.end_session({}, digests)
    await content.small.collect()
    assert rows(content) == set() and content.small.path.stat().st_size <= 4 * _small.PAGE_SIZE < grown / 3


async def test_a_failed_commit_stores_nothing_and_loses_no_deletion(content, monkeypatch):
    (old,) = await stored_inline(content, b"old")
    content.end_session({}, [old])   # unused: forgotten, to be deleted with the next write
    assert content.store.cas_blob_size(old) is None

    def full(*args):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(content.small, "_commit", full)
    content.pin([sha(b"new")])
    with pytest.raises(sqlite3.OperationalError):
        await content.small.write([(sha(b"new"), b"new")])
    assert rows(content) == {old}
    monkeypatch.undo()
    await content.small.write([(sha(b"new"), b"new")])   # the retry deletes what the failed one did not
    assert rows(content) == {sha(b"new")}


async def test_the_background_task_collects_what_runs_released(content):
    (digest,) = await stored_inline(content, b"collected in the background")
    tree = [entry("x", b"collected in the background")]
    content.acquire("run", 0, content.check(0, tree), tree)
    content.end_session({}, [digest])
    async with trio.open_nursery() as nursery:
        await nursery.start(content.small.run)
        content.release_snapshot("run")
        with trio.fail_after(10):
            while rows(content):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_a_restart_deletes_rows_the_state_database_never_recorded(tmp_path):
    store = Store(tmp_path / "state.db")
    content = ContentStore(tmp_path / "cas", store, 100, 1 << 20)
    (used,) = await stored_inline(content, b"used")
    tree = [entry("x", b"used")]
    content.acquire("run", 0, content.check(0, tree), tree)
    content.pin([sha(b"unrecorded")])
    await content.small.write([(sha(b"unrecorded"), b"unrecorded")])   # the agent was killed before the record
    again = ContentStore(tmp_path / "cas", store, 100, 1 << 20)   # as a new agent would
    assert rows(again) == {used}
    store.close()


async def test_a_full_disk_at_start_defers_the_database_to_the_first_write(tmp_path, monkeypatch):
    connect = _small.SmallContents._connect
    full = [True]

    def connect_unless_full(self, *, reader=False):
        if full[0] and not reader:
            raise sqlite3.OperationalError("database or disk is full")
        return connect(self, reader=reader)

    monkeypatch.setattr(_small.SmallContents, "_connect", connect_unless_full)
    store = Store(tmp_path / "state.db")
    content = ContentStore(tmp_path / "cas", store, 100, 1 << 20)   # starts all the same
    assert content.small.read([sha(b"x")]) == {}
    await content.small.collect()
    full[0] = False   # space again
    await stored_inline(content, b"x")
    assert content.small.read([sha(b"x")]) == {sha(b"x"): b"x"}
    assert stat.S_IMODE(content.small.path.stat().st_mode) == 0o600
    store.close()
