"""The content store's references and collection, and how a run's snapshot is placed (reflink, else copy)."""

import errno
import hashlib
import os

import pytest

from labrun.agent import _snapshot
from labrun.agent._asuser import Credentials
from labrun.agent._snapshot import ContentStore, SnapshotFailed, materialize
from labrun.agent._store import Store
from labrun.protocol import NotFound

ME = Credentials(os.getuid(), os.getgid())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def content(tmp_path):
    store = Store(tmp_path / "state.db")
    yield ContentStore(tmp_path / "cas", store, max_files=100, max_bytes=1 << 20)
    store.close()


def put(content: ContentStore, session: dict, uploaded: list, data: bytes, uid: int = 0) -> str:
    blob = {"hash": sha(data), "size": len(data), "offset": 0, "data": data}
    upload = content.begin(session, blob)
    assert content.receive(upload, blob)
    content.record(uid, [(blob["hash"], content.commit(session, blob["hash"]))])
    uploaded.append(blob["hash"])
    return blob["hash"]


def manifest(*items: bytes) -> list[tuple]:
    return sorted((f"f{i}", len(data), 0o644, sha(data)) for i, data in enumerate(items))


def test_references_keep_contents_until_the_last_run_is_released(content):
    session, uploaded = {}, []
    shared, only_b = put(content, session, uploaded, b"shared"), put(content, session, uploaded, b"only b")
    tree_a = manifest(b"shared")
    tree_b = manifest(b"shared", b"only b")
    content.acquire("run-a", 0, content.check(0, tree_a), tree_a)
    content.acquire("run-a2", 0, content.check(0, tree_a), tree_a)   # the same tree: one more reference
    content.acquire("run-b", 0, content.check(0, tree_b), tree_b)
    content.end_session(session, uploaded)   # the connection closes: its uploads are in use, so they stay
    assert content.blob_path(shared).exists() and content.blob_path(only_b).exists()

    content.release_snapshot("run-b")
    assert not content.blob_path(only_b).exists() and content.blob_path(shared).exists()
    assert content.store.cas_blob_size(only_b) is None
    content.release_snapshot("run-b")   # idempotent
    content.release_snapshot("run-a")
    assert content.blob_path(shared).exists()
    assert content.entries("run-a2") == tree_a
    content.release_snapshot("run-a2")
    assert not content.blob_path(shared).exists()
    assert content.store.cas_unreferenced() == [] and content.entries("run-a2") is None
    with pytest.raises(NotFound, match="not in the agent's store") as info:   # gone: to be uploaded again
        content.check(0, tree_a)
    assert info.value.details["missing"] == [shared]


def test_an_upload_in_use_by_another_connection_survives_a_release(content):
    first, first_uploaded = {}, []
    digest = put(content, first, first_uploaded, b"data")
    tree = manifest(b"data")
    content.acquire("run", 0, content.check(0, tree), tree)
    content.end_session(first, first_uploaded)
    second, second_uploaded = {}, []
    put(content, second, second_uploaded, b"data", uid=1)   # another user proves they hold it too
    content.release_snapshot("run")
    assert content.blob_path(digest).exists()   # pinned by the second connection
    content.end_session(second, second_uploaded)
    assert not content.blob_path(digest).exists()


def test_a_content_being_uploaded_again_is_not_collected_meanwhile(content, tmp_path):
    first, first_uploaded = {}, []
    data = b"x" * 1000
    digest = put(content, first, first_uploaded, data)   # stored, used by no tree
    second = {}
    half = {"hash": digest, "size": len(data), "offset": 0, "data": data[:500]}
    assert not content.receive(content.begin(second, half), half)   # another connection proves it holds it
    content.end_session(first, first_uploaded)
    assert content.blob_path(digest).exists()   # the second upload relies on the stored copy
    rest = {**half, "offset": 500, "data": data[500:]}
    assert content.receive(content.begin(second, rest), rest)
    content.record(1, [(digest, content.commit(second, digest))])
    tree = manifest(data)
    content.acquire("run", 1, content.check(1, tree), tree)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    materialize(content, tree, run_dir, ME)
    assert (run_dir / "snapshot" / "f0").read_bytes() == data


def test_holding_a_hash_is_per_user(content):
    session, uploaded = {}, []
    put(content, session, uploaded, b"secret", uid=0)
    tree = manifest(b"secret")
    assert content.check(0, tree)
    with pytest.raises(NotFound) as info:
        content.check(1000, tree)
    assert info.value.details["missing"] == [sha(b"secret")]


def test_a_long_missing_list_comes_in_parts(content, monkeypatch):
    monkeypatch.setattr(_snapshot, "MAX_MISSING", 2)
    tree = manifest(b"a", b"b", b"c")
    with pytest.raises(NotFound) as info:
        content.check(0, tree)
    assert info.value.details["missing"] == sorted(e[3] for e in tree)[:2]


def test_a_restart_collects_contents_no_tree_uses(tmp_path):
    store = Store(tmp_path / "state.db")
    content = ContentStore(tmp_path / "cas", store, 100, 1 << 20)
    session, uploaded = {}, []
    kept, dropped = put(content, session, uploaded, b"kept"), put(content, session, uploaded, b"dropped")
    tree = manifest(b"kept")
    content.acquire("run", 0, content.check(0, tree), tree)
    (content.tmp / "half-upload").write_bytes(b"x")
    again = ContentStore(tmp_path / "cas", store, 100, 1 << 20)   # as a new agent would
    assert again.blob_path(kept).exists() and not again.blob_path(dropped).exists()
    assert list(again.tmp.iterdir()) == []
    store.close()


def test_materialize_copies_with_modes_and_directories(content, tmp_path):
    session, uploaded = {}, []
    for data in (b"#!/bin/sh\necho hi\n", b"weights", b""):
        put(content, session, uploaded, data)
    entries = sorted([("run.sh", 18, 0o755, sha(b"#!/bin/sh\necho hi\n")), ("a/b/c/w.bin", 7, 0o600, sha(b"weights")),
                      ("a/empty", 0, 0o644, sha(b"")), ("a/b/again.bin", 7, 0o644, sha(b"weights"))])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    method = materialize(content, entries, run_dir, ME)
    assert method in ("reflink", "copy")
    snapshot = run_dir / "snapshot"
    assert (snapshot / "run.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (snapshot / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (snapshot / "a/b/c/w.bin").read_bytes() == b"weights" == (snapshot / "a/b/again.bin").read_bytes()
    assert (snapshot / "a/b/c/w.bin").stat().st_mode & 0o777 == 0o600
    assert (snapshot / "a/empty").read_bytes() == b"" and (snapshot / "outputs").is_dir()
    assert (snapshot / "a/b/c/w.bin").stat().st_ino != content.blob_path(sha(b"weights")).stat().st_ino
    # Made again (an agent stopped half way): starts over.
    (snapshot / "stray").write_text("x")
    materialize(content, entries, run_dir, ME)
    assert not (snapshot / "stray").exists()


def test_materialize_falls_back_to_copy_when_reflink_is_refused(content, tmp_path, monkeypatch):
    session, uploaded = {}, []
    data = os.urandom(300_000)
    put(content, session, uploaded, data)
    tried = []

    def no_reflink(fd, request, arg):
        tried.append(request)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(_snapshot.fcntl, "ioctl", no_reflink)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    entries = [("a.bin", len(data), 0o644, sha(data)), ("b.bin", len(data), 0o644, sha(data))]
    assert materialize(content, entries, run_dir, ME) == "copy"
    assert tried == [_snapshot.FICLONE]   # asked once; the filesystem's answer holds for the rest
    assert (run_dir / "snapshot" / "a.bin").read_bytes() == data == (run_dir / "snapshot" / "b.bin").read_bytes()


def test_materialize_uses_reflink_where_the_filesystem_clones(content, tmp_path, monkeypatch):
    session, uploaded = {}, []
    data = b"cloned"
    put(content, session, uploaded, data)
    cloned = []

    def clone(fd, request, arg):   # what FICLONE does: the target shares the source's blocks
        os.write(fd, os.pread(arg, 1 << 20, 0))
        cloned.append(request)

    monkeypatch.setattr(_snapshot.fcntl, "ioctl", clone)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert materialize(content, [("x", len(data), 0o644, sha(data))], run_dir, ME) == "reflink"
    assert cloned == [_snapshot.FICLONE] and (run_dir / "snapshot" / "x").read_bytes() == data


def test_materialize_reports_a_missing_or_short_content(content, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(SnapshotFailed, match="missing from the agent's store"):
        materialize(content, [("x", 3, 0o644, sha(b"abc"))], run_dir, ME)
    session, uploaded = {}, []
    put(content, session, uploaded, b"abc")
    monkeypatch.setattr(_snapshot.fcntl, "ioctl", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "x")))
    (run_dir / "snapshot").mkdir(exist_ok=True)
    with pytest.raises(SnapshotFailed, match="shorter than its 5 bytes"):
        materialize(content, [("x", 5, 0o644, sha(b"abc"))], run_dir, ME)
