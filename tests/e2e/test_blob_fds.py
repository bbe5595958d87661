"""Open files passed to a real agent (``blob_fds``, SCM_RIGHTS): what it takes, what it refuses, and that it never
keeps a descriptor a client passed, whatever the client does."""

import array
import contextlib
import hashlib
import os
import resource
import socket
import stat
import struct
import time
from pathlib import Path

import pytest

from labrun._connection import AgentConnection
from labrun._snapshot import upload
from labrun.exceptions import BadRequest, TooLarge, Unavailable
from labrun.protocol import PROTOCOL_VERSION, FrameDecoder, pack_frame
from tests.e2e.test_agent import wait_until
from tests.hostile_fuse import CLOSING, FLUSH, HostileFuse

SMALL_LIMIT = 1 << 20   # the agent reads up to this size into memory, and copies larger files in the kernel


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def objects(agent) -> set[str]:
    return {p.name for p in (agent.state_dir / "cas" / "objects").glob("*/*")}


def holds(agent, fd: int) -> bool:
    """Whether the agent process has a descriptor on the same file as our ``fd``."""
    mine = os.fstat(fd)
    fds = Path(f"/proc/{agent.process.pid}/fd")
    for link in fds.iterdir():
        try:
            theirs = os.stat(link)
        except OSError:
            continue
        if (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino):
            return True
    return False


def wait_held(agent, fd: int, timeout: float = 15) -> None:
    """Wait, without pausing between looks (a copy may be short), until the agent holds ``fd``."""
    deadline = time.monotonic() + timeout
    while not holds(agent, fd):
        assert time.monotonic() < deadline, "the agent never received the descriptor"


def released(agent, *fds: int) -> None:
    wait_until(lambda: not any(holds(agent, fd) for fd in fds), what="the agent to close the passed descriptors")


def frames_until_closed(sock: socket.socket) -> list[dict]:
    """Every frame the agent sends until it closes the connection."""
    decoder, frames = FrameDecoder(), []
    sock.settimeout(15)
    while data := sock.recv(65536):
        frames.extend(decoder.feed(data))
    return frames


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    sock.sendall(data[sent:])


@pytest.fixture
def connection(agent):
    with AgentConnection(agent.socket) as connection:
        yield connection


def test_the_agent_stores_and_hashes_passed_files_and_a_submit_can_use_them(agent, connection, tmp_path):
    contents = [b"", b"small\n", os.urandom(SMALL_LIMIT + 12345), os.urandom(40 << 20)]
    paths = []
    for i, data in enumerate(contents):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(data)
    fds = [os.open(path, os.O_RDONLY) for path in paths]
    try:
        assert connection.agent["blob_fds"] >= 253
        result = connection.call_passing("blob_fds", fds, count=len(fds))
        assert result["files"] == [{"hash": sha(data), "size": len(data)} for data in contents]
        released(agent, *fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert objects(agent) == {sha(data) for data in contents}
    for data in contents:
        stored = agent.state_dir / "cas" / "objects" / sha(data)[:2] / sha(data)
        assert stored.read_bytes() == data
        assert stat.S_IMODE(stored.stat().st_mode) == 0o400 and stored.stat().st_uid == os.geteuid()
    assert list((agent.state_dir / "cas" / "tmp").iterdir()) == []
    files = [[f"f{i}", len(data), 0o644, sha(data)] for i, data in enumerate(contents)]
    run = connection.call("submit", spec={"experiment": "fds", "command": ["sh", "-c", "sha256sum f3"],
                                          "snapshot": {"files": files}})   # no not_found: the contents are held
    done = connection.call("wait", run_id=run["run_id"])
    assert done["status"] == "Completed", done


def test_more_files_than_one_message_carries_go_in_one_request(agent, connection, tmp_path):
    contents = [f"file {i}\n".encode() for i in range(600)]   # three messages of at most 253
    fds = []
    try:
        for i, data in enumerate(contents):
            (tmp_path / f"f{i}").write_bytes(data)
            fds.append(os.open(tmp_path / f"f{i}", os.O_RDONLY))
        result = connection.call_passing("blob_fds", fds, count=len(fds))
        assert [f["hash"] for f in result["files"]] == [sha(data) for data in contents]
        released(agent, fds[0], fds[300], fds[-1])
    finally:
        for fd in fds:
            os.close(fd)


def special_files(tmp_path):
    """Descriptors on things that are not regular files, or not open for reading, and the refusal of each."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "file").write_bytes(b"data")
    left, right = socket.socketpair()
    right.close()
    return [
        (os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), "file 0 is a directory"),
        (os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), "file 0 is a FIFO"),
        (os.open("/dev/zero", os.O_RDONLY), "file 0 is a character device"),
        (left.detach(), "file 0 is a socket"),
        (os.open(tmp_path / "file", os.O_WRONLY), "file 0 is not open for reading"),
        (os.open(tmp_path / "file", os.O_PATH), "file 0 is not open for reading"),
    ]


def test_descriptors_that_are_not_readable_regular_files_are_refused_and_closed(agent, connection, tmp_path):
    for fd, message in special_files(tmp_path):
        try:
            with pytest.raises(BadRequest, match=message):
                connection.call_passing("blob_fds", [fd], count=1)
            released(agent, fd)
        finally:
            os.close(fd)
    # One refused file refuses its request; the connection goes on.
    good = os.open(tmp_path / "file", os.O_RDONLY)
    bad = os.open("/dev/zero", os.O_RDONLY)
    try:
        with pytest.raises(BadRequest, match="file 1 is a character device"):
            connection.call_passing("blob_fds", [good, bad], count=2)
        assert connection.call_passing("blob_fds", [good], count=1)["files"][0]["hash"] == sha(b"data")
        released(agent, good, bad)
    finally:
        os.close(good)
        os.close(bad)


def test_a_file_over_the_snapshot_limit_is_refused_by_its_real_size(make_agent, tmp_path):
    agent = make_agent("[snapshot]\nmax_bytes = 1000\n")
    (tmp_path / "big").write_bytes(b"x" * 1001)
    (tmp_path / "half").write_bytes(b"y" * 600)
    fds = [os.open(tmp_path / name, os.O_RDONLY) for name in ("big", "half", "half")]
    try:
        with AgentConnection(agent.socket) as connection:
            with pytest.raises(TooLarge, match="file 0 has 1001 bytes"):
                connection.call_passing("blob_fds", fds[:1], count=1)
            connection.call_passing("blob_fds", fds[1:2], count=1)
            with pytest.raises(TooLarge, match="without a submit using them"):
                connection.call_passing("blob_fds", fds[2:], count=1)
        released(agent, *fds)
    finally:
        for fd in fds:
            os.close(fd)
    wait_until(lambda: objects(agent) == set(), what="the unused content to be collected")


def test_too_many_descriptors_close_the_connection_and_every_one_of_them(make_agent, tmp_path):
    agent = make_agent("[limits]\npassed_fds_per_connection = 4\n")
    (tmp_path / "file").write_bytes(b"data")
    fds = [os.open(tmp_path / "file", os.O_RDONLY) for _ in range(5)]
    try:
        with AgentConnection(agent.socket) as connection:
            assert connection.agent["blob_fds"] == 4   # what a client may pass in one request
            assert len(connection.call_passing("blob_fds", fds[:4], count=4)["files"]) == 4
            with pytest.raises(Unavailable, match="passed_fds_per_connection"):
                connection.call_passing("blob_fds", fds, count=5)
        released(agent, *fds)
    finally:
        for fd in fds:
            os.close(fd)


def test_fewer_descriptors_than_count_is_refused_and_closes_the_connection(agent, tmp_path):
    (tmp_path / "file").write_bytes(b"data")
    fd = os.open(tmp_path / "file", os.O_RDONLY)
    try:
        with AgentConnection(agent.socket) as connection:
            with pytest.raises(BadRequest, match="count is 2, but 1 open files came with the frame"):
                connection.call_passing("blob_fds", [fd], count=2)
        released(agent, fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("frame", [
    pytest.param(pack_frame({"id": 2, "op": "status", "args": {}}), id="a request that takes none"),
    pytest.param(pack_frame({"id": 2, "op": "blob_fds", "args": {"count": 0}}), id="an invalid blob_fds"),
    pytest.param(pack_frame({"id": 2, "op": "blob_fds", "args": {"count": 1, "extra": 1}}), id="unknown argument"),
    pytest.param(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1", id="a corrupt frame"),
])
def test_descriptors_sent_with_a_malformed_or_foreign_frame_are_closed(agent, tmp_path, frame):
    (tmp_path / "file").write_bytes(b"data")
    fd = os.open(tmp_path / "file", os.O_RDONLY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(agent.socket))
        sock.sendall(pack_frame({"id": 1, "op": "hello", "args": {"protocol": PROTOCOL_VERSION}}))
        send_with_fds(sock, frame, [fd])
        frames_until_closed(sock)   # the agent closes the connection: the stream is not to be trusted
        released(agent, fd)
    finally:
        sock.close()
        os.close(fd)


def test_a_client_that_disconnects_mid_frame_or_mid_copy_leaves_nothing_behind(agent, tmp_path):
    (tmp_path / "big").write_bytes(os.urandom(128 << 20))
    fd = os.open(tmp_path / "big", os.O_RDONLY)
    try:
        for cut in (1, None):   # after the frame's first byte, or after the whole frame (the agent is copying)
            frame = pack_frame({"id": 2, "op": "blob_fds", "args": {"count": 1}})
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(agent.socket))
            sock.sendall(pack_frame({"id": 1, "op": "hello", "args": {"protocol": PROTOCOL_VERSION}}))
            send_with_fds(sock, frame[:cut], [fd])
            wait_held(agent, fd)
            sock.close()
            released(agent, fd)
        wait_until(lambda: objects(agent) == set() and not list((agent.state_dir / "cas" / "tmp").iterdir()),
                   what="the content no submit used to be collected")
        with AgentConnection(agent.socket) as connection:   # the agent is well
            assert connection.call("status")
    finally:
        os.close(fd)


def test_blob_fds_is_refused_before_hello_and_its_files_closed(agent, tmp_path):
    (tmp_path / "file").write_bytes(b"data")
    fd = os.open(tmp_path / "file", os.O_RDONLY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(agent.socket))
        send_with_fds(sock, pack_frame({"id": 1, "op": "blob_fds", "args": {"count": 1}}), [fd])
        sock.settimeout(15)
        reply = FrameDecoder().feed(sock.recv(65536))[0]
        assert reply["ok"] is False and "hello" in reply["error"]["message"]
        released(agent, fd)
    finally:
        sock.close()
        os.close(fd)


def test_contents_stored_before_a_later_file_failed_are_collected_with_the_connection(agent, tmp_path):
    # 32 files of 1 MiB fill the first group the agent reads into memory and stores; the second group's one file
    # reads shorter than its size (a /sys attribute), as a file that shrank, and fails the request.
    fds = []
    try:
        for i in range(32):
            (tmp_path / f"f{i}").write_bytes(os.urandom(SMALL_LIMIT))
            fds.append(os.open(tmp_path / f"f{i}", os.O_RDONLY))
        fds.append(os.open("/sys/devices/system/cpu/online", os.O_RDONLY))
        with AgentConnection(agent.socket) as connection:
            with pytest.raises(BadRequest, match="file 32 changed while it was being copied"):
                connection.call_passing("blob_fds", fds, count=len(fds))
            assert len(objects(agent)) == 32   # stored, and pinned while the connection lasts
        wait_until(lambda: objects(agent) == set(), what="the contents no submit used to be collected")
        released(agent, *fds)
    finally:
        for fd in fds:
            os.close(fd)


@pytest.fixture
def hostile_fuse(tmp_path):
    """A FUSE mount whose daemon stops answering on demand (any user can have one: fusermount, user namespaces)."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a FUSE filesystem: run it as root")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    fs = HostileFuse(mountpoint, os.urandom(SMALL_LIMIT + 4321))
    yield fs
    fs.close()


def answers_hello(agent, timeout: float) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(agent.socket))
        sock.sendall(pack_frame({"id": 1, "op": "hello", "args": {"protocol": PROTOCOL_VERSION}}))
        return bool(FrameDecoder().feed(sock.recv(65536)))
    except TimeoutError:
        return False
    finally:
        sock.close()


def test_a_passed_file_on_fuse_is_refused_without_a_request_to_its_daemon(agent, hostile_fuse):
    """Each stat or read of a FUSE file is a request to its daemon, which a user's own can leave unanswered for
    ever (and a process with a request waiting cannot even exit): the agent asks it nothing, and says why."""
    fd = os.open(hostile_fuse.file, os.O_RDONLY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        hostile_fuse.requests.clear()
        hostile_fuse.stop_answering("getattr", "read")
        sock.connect(str(agent.socket))
        sock.sendall(pack_frame({"id": 1, "op": "hello", "args": {"protocol": PROTOCOL_VERSION}}))
        send_with_fds(sock, pack_frame({"id": 2, "op": "blob_fds", "args": {"count": 1}}), [fd])
        sock.settimeout(10)
        decoder, frames = FrameDecoder(), []
        while len(frames) < 2:
            frames += decoder.feed(sock.recv(65536))   # (a timeout here: the agent asked the daemon)
        error = frames[1]["error"]
        assert "file 0 is on a filesystem the agent does not read for users" in error["message"]
        assert error["details"]["reason"] == "filesystem"
        wait_until(lambda: FLUSH in hostile_fuse.requests, what="the agent to close the file")
        assert set(hostile_fuse.requests) <= CLOSING and not hostile_fuse.unanswered
    finally:
        sock.close()
        hostile_fuse.close()
        with contextlib.suppress(OSError):
            os.close(fd)


def test_a_passed_file_whose_close_never_returns_holds_up_no_one_else(agent, connection, hostile_fuse):
    """The agent's close of a passed file flushes it to its filesystem: closes are made in its user's worker
    threads, never in the event loop, so a daemon that never answers holds up no one else."""
    fd = os.open(hostile_fuse.file, os.O_RDONLY)
    try:
        hostile_fuse.stop_answering("flush")
        with pytest.raises(BadRequest, match="filesystem"):
            connection.call_passing("blob_fds", [fd], count=1)
        wait_until(lambda: FLUSH in hostile_fuse.unanswered, what="the agent to close the file")
        assert answers_hello(agent, timeout=10), "one user's file stopped the agent for everyone"
        assert connection.call("status")
    finally:
        hostile_fuse.close()   # every request still waiting fails: the agent's thread comes back
        with contextlib.suppress(OSError):
            os.close(fd)   # (closed, with the error of a filesystem gone)


def test_a_client_sends_the_bytes_of_files_the_agent_does_not_read(agent, connection, hostile_fuse):
    digest = sha(hostile_fuse.content)
    upload(connection, [(digest, str(hostile_fuse.file), len(hostile_fuse.content))])
    assert connection.agent["blob_fds"] == 0   # bytes from now on, on this connection
    assert (agent.state_dir / "cas" / "objects" / digest[:2] / digest).read_bytes() == hostile_fuse.content


def test_passed_files_never_take_the_descriptors_the_agent_keeps_for_itself(agent, tmp_path):
    """However many connections a user opens, the files it passes and keeps queued (a frame never finished) leave
    the agent ``reserved_fds`` descriptors and more: the agent is not at its open-file limit for everyone else."""
    limit, reserved = 1024, 128   # (the agent raises its soft limit to the hard one at start: both are set)
    resource.prlimit(agent.process.pid, resource.RLIMIT_NOFILE, (limit, limit))
    (tmp_path / "file").write_bytes(b"data")
    fd = os.open(tmp_path / "file", os.O_RDONLY)
    socks = []
    try:
        for _ in range(16):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(agent.socket))
            socks.append(sock)
            sock.sendall(pack_frame({"id": 1, "op": "hello", "args": {"protocol": PROTOCOL_VERSION}}))
            sock.sendall(struct.pack(">I", 1 << 20))   # a frame that never ends: the files stay queued
            try:
                for _ in range(64):   # one at a time, 64 per connection (far below passed_fds_per_connection)
                    sock.sendmsg([b"\x00"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            except OSError:
                continue   # refused: the agent closed this connection
        time.sleep(0.5)
        held = len(os.listdir(f"/proc/{agent.process.pid}/fd"))
        assert held <= limit - reserved, f"the agent holds {held} descriptors of its {limit}"
        assert answers_hello(agent, timeout=10)
    finally:
        for sock in socks:
            sock.close()
        os.close(fd)


def test_an_agent_at_its_open_file_limit_says_so_and_keeps_answering(agent, tmp_path):
    """The kernel gives an agent at its open-file limit none of the files passed with a message (MSG_CTRUNC, with no
    descriptors at all): the client hears why, not that its count was wrong."""
    (tmp_path / "file").write_bytes(b"data")
    fd = os.open(tmp_path / "file", os.O_RDONLY)
    pid = agent.process.pid
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        with AgentConnection(agent.socket) as connection:
            held = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
            lowest_free = min(set(range(len(held) + 1)) - held)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, before[1]))   # no descriptor more
            try:
                with pytest.raises(Unavailable, match="open-file limit"):
                    connection.call_passing("blob_fds", [fd], count=1)
            finally:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, before)
        assert answers_hello(agent, timeout=10)
    finally:
        os.close(fd)
