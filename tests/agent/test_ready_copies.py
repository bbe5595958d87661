"""Ready copies of repeated trees: made as the user from the store, taken only by the same user and tree,
bounded, and never left behind."""

import contextlib
import os
import stat

import pytest
import trio

from labrun.agent._asuser import Credentials, acting_as, make_private_dir
from labrun.agent._ready import ReadyCopies
from labrun.agent._snapshot import ContentStore
from labrun.protocol._manifest import tree_hash
from tests.agent.test_snapshot_store import content, sha  # noqa: F401 (a fixture)

ME = Credentials(os.getuid(), os.getgid())
# Another user: root makes copies with that user's rights (no entry in /etc/passwd is needed for that).
OTHER = Credentials(65534, 65534) if os.geteuid() == 0 else ME
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


def stored(content: ContentStore, files: dict[str, bytes]) -> tuple[str, list[tuple]]:
    """The tree of ``files``, with their contents in the store."""
    session = {}
    for data in files.values():
        blob = {"hash": sha(data), "size": len(data), "offset": 0, "data": data}
        if content.store.cas_blob_size(blob["hash"]) is None:
            assert content.receive(content.begin(session, blob), blob)
            content.record(0, [(blob["hash"], content.commit(session, blob["hash"]))])
    entries = sorted((name, len(data), 0o644, sha(data)) for name, data in files.items())
    return tree_hash(entries), entries


def run_dir(tmp_path, name: str, creds: Credentials):
    runs = tmp_path / "runs"
    runs.mkdir(mode=0o711, exist_ok=True)
    make_private_dir(runs, name, creds)
    return runs / name


async def wait_for(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def ready_copies(tmp_path, content, **bounds) -> ReadyCopies:
    return ReadyCopies(tmp_path / "ready", content, **bounds)


@contextlib.asynccontextmanager
async def running(ready: ReadyCopies):
    """``ready``'s background task, from the block's start to its end (when the agent stops)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(ready.run)
        yield
        nursery.cancel_scope.cancel()


async def made(ready: ReadyCopies, creds: Credentials, tree: str, entries: list[tuple]) -> None:
    """Have ``ready`` make a copy: the tree's second materialization wants one."""
    ready.want(creds, tree, entries)
    ready.want(creds, tree, entries)
    ready.go()
    await wait_for(lambda: (creds, tree) in ready)


@needs_root
async def test_a_repeated_tree_gets_a_copy_made_as_its_user_that_the_next_run_takes(tmp_path, content):
    tree, entries = stored(content, {"a.txt": b"alpha", "sub/b.txt": b"beta"})
    ready = ready_copies(tmp_path, content)
    async with running(ready):
        ready.want(OTHER, tree, entries)   # seen once: a tree submitted once is not worth a copy
        ready.go()
        await trio.sleep(0.2)
        assert (OTHER, tree) not in ready and os.listdir(ready.root) == []
        await made(ready, OTHER, tree, entries)
        assert stat.S_IMODE(ready.root.stat().st_mode) == 0o700 and ready.root.stat().st_uid == 0

        target = run_dir(tmp_path, "run-1", OTHER)
        assert await ready.take(OTHER, tree, target)
        assert (target / "snapshot" / "a.txt").read_bytes() == b"alpha"
        assert (target / "snapshot" / "sub" / "b.txt").read_bytes() == b"beta"
        assert (target / "snapshot" / "outputs").is_dir()
        for path in [target / "snapshot", *(target / "snapshot").rglob("*")]:
            info = path.lstat()
            assert (info.st_uid, info.st_gid) == (OTHER.uid, OTHER.gid), path
        assert stat.S_IMODE((target / "snapshot" / "a.txt").stat().st_mode) == 0o644
        assert (OTHER, tree) not in ready
        assert not await ready.take(OTHER, tree, run_dir(tmp_path, "run-2", OTHER))   # taken: one copy, one run
        # Its emptied directory is removed once the run has started, off the way to the start.
        assert [os.listdir(ready.root / name) for name in os.listdir(ready.root)] == [[]]
        ready.go()
        await wait_for(lambda: os.listdir(ready.root) == [])


@needs_root
async def test_a_copy_is_only_for_its_user_and_its_tree(tmp_path, content):
    tree, entries = stored(content, {"a.txt": b"alpha"})
    other_tree, _ = stored(content, {"a.txt": b"other"})
    ready = ready_copies(tmp_path, content)
    async with running(ready):
        await made(ready, OTHER, tree, entries)
        assert not await ready.take(ME, tree, run_dir(tmp_path, "root-run", ME))
        assert not await ready.take(Credentials(OTHER.uid, OTHER.gid + 1), tree, run_dir(tmp_path, "gid-run", OTHER))
        assert not await ready.take(OTHER, other_tree, run_dir(tmp_path, "other-tree", OTHER))
        assert (OTHER, tree) in ready
        assert not (tmp_path / "runs" / "root-run" / "snapshot").exists()


async def test_a_run_that_changes_its_snapshot_does_not_change_the_next_copy(tmp_path, content):
    tree, entries = stored(content, {"a.txt": b"alpha"})
    ready = ready_copies(tmp_path, content)
    async with running(ready):
        await made(ready, ME, tree, entries)
        first = run_dir(tmp_path, "run-1", ME)
        assert await ready.take(ME, tree, first)
        (first / "snapshot" / "a.txt").write_bytes(b"changed by the run")
        (first / "snapshot" / "new.txt").write_bytes(b"new")
        ready.want(ME, tree, entries)
        ready.go()
        await wait_for(lambda: (ME, tree) in ready)
        second = run_dir(tmp_path, "run-2", ME)
        assert await ready.take(ME, tree, second)
        assert sorted(os.listdir(second / "snapshot")) == ["a.txt", "outputs"]
        assert (second / "snapshot" / "a.txt").read_bytes() == b"alpha"
        assert content.blob_path(sha(b"alpha")).read_bytes() == b"alpha"


async def test_copies_expire_and_none_outlives_the_agent(tmp_path, content):
    tree, entries = stored(content, {"a.txt": b"alpha"})
    second_tree, second_entries = stored(content, {"b.txt": b"beta"})
    ready = ready_copies(tmp_path, content, max_age=0.3)
    async with running(ready):   # (its end: the agent stops)
        await made(ready, ME, tree, entries)
        await wait_for(lambda: (ME, tree) not in ready and os.listdir(ready.root) == [])
        await made(ready, ME, second_tree, second_entries)
        assert os.listdir(ready.root) != []
    assert os.listdir(ready.root) == [] and (ME, second_tree) not in ready


@needs_root
def test_what_a_killed_agent_left_is_removed_at_the_next_start(tmp_path, content):
    root = tmp_path / "ready"
    root.mkdir(mode=0o700)
    make_private_dir(root, "7", OTHER)
    copy_fd = os.open(root / "7", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with acting_as(OTHER):   # half a copy, as its user made it; a directory it cannot write any more
            os.makedirs(f"/proc/self/fd/{copy_fd}/snapshot/sub")
            os.close(os.open("snapshot/sub/f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=copy_fd))
            os.chmod("snapshot/sub", 0o500, dir_fd=copy_fd)
    finally:
        os.close(copy_fd)
    assert (root / "7" / "snapshot" / "sub" / "f").stat().st_uid == OTHER.uid
    ReadyCopies(root, content)
    assert os.listdir(root) == []


async def test_copies_are_bounded_in_files_bytes_and_number_and_not_made_on_a_failing_disk(tmp_path, content):
    small, small_entries = stored(content, {"a.txt": b"alpha"})
    other, other_entries = stored(content, {"b.txt": b"beta"})
    many, many_entries = stored(content, {f"f{i}": bytes([i]) for i in range(5)})
    large, large_entries = stored(content, {"big": b"x" * 2000})
    failing = False
    ready = ready_copies(tmp_path, content, max_files=4, max_bytes=1000, max_copies=1, failing=lambda: failing)
    async with running(ready):
        for tree, entries in ((many, many_entries), (large, large_entries)):
            ready.want(ME, tree, entries)
            ready.want(ME, tree, entries)
        await made(ready, ME, small, small_entries)
        assert (ME, many) not in ready and (ME, large) not in ready
        await made(ready, ME, other, other_entries)   # one copy at most: the older one goes
        assert (ME, small) not in ready and len(os.listdir(ready.root)) == 1
        assert await ready.take(ME, other, run_dir(tmp_path, "run", ME))
        failing = True
        ready.want(ME, small, small_entries)
        ready.go()
        await trio.sleep(0.2)
        assert (ME, small) not in ready and os.listdir(ready.root) == []


async def test_a_copy_that_cannot_be_moved_is_dropped_and_the_run_makes_its_own(tmp_path, content):
    tree, entries = stored(content, {"a.txt": b"alpha"})
    ready = ready_copies(tmp_path, content)
    async with running(ready):
        await made(ready, ME, tree, entries)
        target = run_dir(tmp_path, "run", ME)
        (target / "snapshot").mkdir()
        (target / "snapshot" / "left.txt").write_bytes(b"an earlier agent's half-made snapshot")
        assert not await ready.take(ME, tree, target)
        assert os.listdir(ready.root) == [] and (ME, tree) not in ready


async def test_a_tree_wanted_again_while_its_copy_is_made_gets_one_copy(tmp_path, content):
    tree, entries = stored(content, {"a.txt": b"alpha"})
    ready = ready_copies(tmp_path, content)
    await ready._make((ME, tree), entries)
    await ready._make((ME, tree), entries)   # the want of a run that started while the first was made
    assert (ME, tree) in ready and len(os.listdir(ready.root)) == 1


async def test_a_run_whose_copy_is_being_made_waits_for_it_rather_than_making_its_own(tmp_path, content,
                                                                                      monkeypatch):
    tree, entries = stored(content, {"a.txt": b"alpha"})
    ready = ready_copies(tmp_path, content)
    slow = ready._materialize

    def materialize(*args):
        import time
        time.sleep(0.3)   # a copy on a slow disk, still being made when the next run comes
        slow(*args)

    monkeypatch.setattr(ready, "_materialize", materialize)
    async with running(ready):
        ready.want(ME, tree, entries)
        ready.want(ME, tree, entries)
        ready.go()
        await wait_for(lambda: ready._making)
        target = run_dir(tmp_path, "run", ME)
        began = trio.current_time()
        assert await ready.take(ME, tree, target)
        assert trio.current_time() - began < 1.0 and (target / "snapshot" / "a.txt").read_bytes() == b"alpha"
        # Nothing is being made: no wait.
        assert not await ready.take(ME, tree, run_dir(tmp_path, "next", ME))
