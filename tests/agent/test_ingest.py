"""Ingest of passed files: the pure parts (grouping, chunking, ancillary data, descriptor budgets) without I/O,
and the copying functions on real files that change between the agent's check and its copy."""

import array
import hashlib
import os
import resource
import socket
import threading
import time

import pytest
import trio

from labrun.agent import _ingest
from labrun.agent._limits import Limits, LimitsConfig
from labrun.agent._server import passed_fds
from labrun.protocol import BadRequest, TooLarge, Unavailable
from labrun.protocol import _content_hash
from labrun.protocol._content_hash import CHUNKED, SHA256, content_hash


class Stat:
    def __init__(self, size):
        self.st_size = size


def test_small_files_are_grouped_by_the_memory_they_take():
    files = [(i, 100 + i, Stat(1 << 20)) for i in range(40)] + [(40, 140, Stat(0))]
    groups = _ingest.groups(files)
    assert [len(group) for group in groups] == [32, 9]
    assert [index for group in groups for index, _, _ in group] == list(range(41))
    assert _ingest.groups([]) == []


def test_descriptors_are_read_from_scm_rights_only():
    rights = array.array("i", [7, 8, 9]).tobytes()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights),
                 (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, array.array("i", [1, 2, 3]).tobytes()),
                 (socket.SOL_SOCKET, socket.SCM_RIGHTS, rights[:6])]   # a cut-off last entry: its whole ints
    assert passed_fds(ancillary) == [7, 8, 9, 7]


def test_descriptors_held_are_bounded_per_connection_and_per_user():
    limits = Limits(LimitsConfig(passed_fds_per_connection=10, passed_fds_per_user=15))
    limits.hold_fds(1000, 0, 10)
    with pytest.raises(Unavailable, match="passed_fds_per_connection"):
        limits.hold_fds(1000, 10, 1)
    with pytest.raises(Unavailable, match="passed_fds_per_user"):
        limits.hold_fds(1000, 0, 6)   # another connection of the same user
    limits.hold_fds(1001, 0, 10)      # another user has a budget of their own
    limits.release_fds(1000, 10)
    limits.hold_fds(1000, 0, 10)
    limits.release_fds(1000, 10)
    limits.release_fds(1001, 10)
    assert not limits.fds_by_user


def test_descriptors_held_over_all_users_leave_the_agent_its_own(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1128, 1128))
    limits = Limits(LimitsConfig(passed_fds_per_connection=10_000, passed_fds_per_user=10_000, reserved_fds=128))
    # Half of the 1000 the agent does not keep for itself, a quarter of them for one user.
    limits.hold_fds(1000, 0, 250)
    with pytest.raises(Unavailable, match="passed_fds_per_user"):
        limits.hold_fds(1000, 0, 1)
    limits.hold_fds(1001, 0, 250)
    with pytest.raises(Unavailable, match="open files passed by clients") as refused:
        limits.hold_fds(1002, 0, 1)
    assert refused.value.details["limit"] == "passed_fds_total"
    limits.release_fds(1001, 250)
    limits.hold_fds(1002, 0, 1)


def test_the_request_size_follows_a_low_open_file_limit():
    limits = Limits(LimitsConfig(passed_fds_per_connection=1_000_000, reserved_fds=128))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert limits.passed_fds_per_request() == max(1, (soft - 128) // 4)


@pytest.fixture
def opened(tmp_path):
    fds = []

    def open_(data: bytes, name="f"):
        path = tmp_path / name
        path.write_bytes(data)
        fds.append(os.open(path, os.O_RDONLY))
        return path, fds[-1]

    yield open_
    for fd in fds:
        os.close(fd)


def test_a_small_file_is_hashed_as_read(opened):
    _, fd = opened(b"content")
    st = _ingest.check(fd, 0, 1000)
    assert _ingest.read_small([(0, fd, st)]) == [(hashlib.sha256(b"content").hexdigest(), b"content")]


@pytest.mark.parametrize("change", ["grow", "shrink", "rewrite"])
def test_a_small_file_changed_after_the_check_is_refused(opened, change):
    path, fd = opened(b"content")
    st = _ingest.check(fd, 3, 1000)
    if change == "grow":
        path.write_bytes(b"content and more")
    elif change == "shrink":
        path.write_bytes(b"con")
    else:
        path.write_bytes(b"CONTENT")   # same size, a new mtime
        os.utime(path, ns=(st.st_mtime_ns + 10**9, st.st_mtime_ns + 10**9))
    with pytest.raises(BadRequest, match="file 3 changed while it was being copied") as info:
        _ingest.read_small([(3, fd, st)])
    assert info.value.details == {"index": 3, "reason": "changed"}


@pytest.fixture
def chunk(monkeypatch) -> int:
    """A chunk size of 64 KiB for these tests (the form's is 8 MiB): the same copies and hashes, in less disk."""
    size = 64 << 10
    monkeypatch.setattr(_content_hash, "CHUNK", size)
    monkeypatch.setattr(_ingest, "CHUNK", size)
    return size


@pytest.mark.parametrize("form", [SHA256, CHUNKED])
@pytest.mark.parametrize("change", ["grow", "shrink", None])
async def test_a_large_file_is_hashed_from_the_copy_and_a_change_is_refused(opened, tmp_path, change, form, chunk):
    data = os.urandom(2 * chunk + 1000)
    path, fd = opened(data)
    st = _ingest.check(fd, 0, 1 << 30)
    if change == "grow":
        with open(path, "ab") as f:
            f.write(b"more")
    elif change == "shrink":
        os.truncate(path, 1000)
    copy = os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if change is None:
            assert await _ingest.copy_large(fd, st, copy, form=form) == content_hash(data, form)
            assert (tmp_path / "copy").read_bytes() == data
        else:
            with pytest.raises(_ingest.Changed):
                await _ingest.copy_large(fd, st, copy, form=form)
    finally:
        os.close(copy)


@pytest.mark.parametrize("form, copier", [(SHA256, "copy_range"), (CHUNKED, "copy_chunk")])
async def test_a_large_file_rewritten_during_its_copy_is_refused(opened, tmp_path, monkeypatch, form, copier, chunk):
    data = os.urandom(3 * chunk)
    path, fd = opened(data)
    st = _ingest.check(fd, 0, 1 << 30)
    copy, copied = getattr(_ingest, copier), []
    rewritten = threading.Lock()

    def copy_then_rewrite(src, dst, offset, *args):
        result = copy(src, dst, offset, *args)
        if rewritten.acquire(blocking=False):   # the first chunk is copied: the user rewrites the file, same size
            with open(path, "r+b") as f:
                f.write(b"x" * 4096)
            os.utime(path, ns=(st.st_mtime_ns + 10**9, st.st_mtime_ns + 10**9))
        copied.append(offset)
        return result

    monkeypatch.setattr(_ingest, copier, copy_then_rewrite)
    target = os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(_ingest.Changed):
            await _ingest.copy_large(fd, st, target, trio.CapacityLimiter(2), form)
    finally:
        os.close(target)
    assert sorted(copied) == [0, chunk, 2 * chunk]   # every chunk was copied; the change was seen at the end


def watch(monkeypatch, *names: str) -> dict[str, list[int]]:
    """Slow each of these functions of ``_ingest`` down, counting the threads in any of them each time one enters
    one (by name)."""
    inside, counts = [], {name: [] for name in names}
    for name in names:
        def watched(*args, _function=getattr(_ingest, name), _name=name):
            inside.append(_name)
            counts[_name].append(len(inside))
            counts[_name + " alike"] = counts.get(_name + " alike", []) + [inside.count(_name)]
            try:
                time.sleep(0.05)   # long enough for the other thread to start its chunk meanwhile
                return _function(*args)
            finally:
                inside.remove(_name)
        monkeypatch.setattr(_ingest, name, watched)
    return counts


async def test_a_large_file_is_hashed_by_chunks_on_both_threads_of_its_user(opened, tmp_path, monkeypatch, chunk):
    data = os.urandom(4 * chunk + 1)
    _, fd = opened(data)
    st = _ingest.check(fd, 0, 1 << 30)
    counts = watch(monkeypatch, "copy_chunk")
    copy = os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert await _ingest.copy_large(fd, st, copy, trio.CapacityLimiter(2), CHUNKED) == content_hash(data, CHUNKED)
    finally:
        os.close(copy)
    assert (tmp_path / "copy").read_bytes() == data
    # Five chunks, each copied and hashed once, by two threads at once (never more: the user's).
    assert len(counts["copy_chunk"]) == 5
    assert max(counts["copy_chunk"]) == 2


async def test_a_cancelled_copy_by_chunks_stops_before_its_next_chunk(opened, tmp_path, monkeypatch, chunk):
    data = os.urandom(6 * chunk)
    _, fd = opened(data)
    st = _ingest.check(fd, 0, 1 << 30)
    counts = watch(monkeypatch, "copy_chunk")
    copy = os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with trio.move_on_after(0.08) as scope:   # during each thread's second chunk (0.05 s each)
            await _ingest.copy_large(fd, st, copy, trio.CapacityLimiter(2), CHUNKED)
    finally:
        os.close(copy)
    assert scope.cancelled_caught
    assert len(counts["copy_chunk"]) <= 4   # of six: the chunks the two threads had begun, and no other


def test_the_check_takes_the_size_of_the_file_not_of_a_claim(opened):
    _, fd = opened(b"x" * 2000)
    with pytest.raises(TooLarge, match="file 5 has 2000 bytes"):
        _ingest.check(fd, 5, 1999)
    assert _ingest.check(fd, 5, 2000).st_size == 2000
