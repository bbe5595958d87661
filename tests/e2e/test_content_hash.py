"""Large contents hashed by chunks, with a real agent: the same name whichever way the bytes come, the run's exact
bytes, and every pairing of older and newer clients and agents, the client's hash cache included."""

import hashlib
import os

import pytest

from labrun import Experiment, ScriptRunConfig
from labrun._connection import AgentConnection
from labrun.exceptions import BadRequest
from labrun.protocol._content_hash import CHUNK, CHUNKED, SHA256, content_hash
from tests.e2e.test_snapshots import make_tree, objects

SIZE = 2 * CHUNK + 12345   # three chunks, the last one short
PIECE = 4 << 20            # what one blob_put carries (frames are at most 16 MiB)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(connection, data: bytes, digest: str, **args) -> list[dict]:
    """Upload ``data`` as ``digest`` in pieces; the last reply's results."""
    for offset in range(0, len(data), PIECE):
        result = connection.call("blob_put", blobs=[{"hash": digest, "size": len(data), "offset": offset,
                                                     "data": data[offset:offset + PIECE]}], **args)
    return result["blobs"]


def pass_open(connection, path, **args) -> dict:
    fd = os.open(path, os.O_RDONLY)
    try:
        return connection.call_passing("blob_fds", [fd], count=1, **args)["files"][0]
    finally:
        os.close(fd)


def run_sees(agent, connection, name: str, data: bytes, digest: str) -> None:
    """A run of a snapshot naming ``digest`` finds exactly ``data`` in ``name``."""
    files = [[name, len(data), 0o644, digest]]
    run = connection.call("submit", spec={"experiment": "chunks", "command": ["sha256sum", name],
                                          "snapshot": {"files": files}})
    done = connection.call("wait", run_id=run["run_id"])
    assert done["status"] == "Completed", done
    log = (agent.state_dir / "runs" / run["run_id"] / "logs" / "std_log.txt").read_text()
    assert log == f"{sha(data)}  {name}\n"


class ArgSpy:
    """Each request's op and the names of its arguments."""

    def __init__(self, workspace):
        self.requests: list[tuple[str, list[str]]] = []
        connection = workspace.connection
        original, passing = connection.call, connection.call_passing

        def call(op, **args):
            self.requests.append((op, sorted(args)))
            return original(op, **args)

        def call_passing(op, fds, **args):
            self.requests.append((op, sorted(args)))
            return passing(op, fds, **args)

        connection.call, connection.call_passing = call, call_passing

    @property
    def ops(self) -> list[str]:
        return [op for op, _ in self.requests]


@pytest.fixture
def big(tmp_path):
    data = os.urandom(SIZE)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    return path, data


def test_the_agent_says_which_hashes_it_takes(agent):
    with AgentConnection(agent.socket) as connection:
        assert connection.agent["content_hashes"] == [SHA256, CHUNKED]


def test_passed_open_or_sent_as_bytes_a_large_content_has_one_name_and_the_run_its_bytes(agent, big):
    path, data = big
    expected = content_hash(data, CHUNKED)
    assert expected != sha(data)
    with AgentConnection(agent.socket) as connection:
        assert pass_open(connection, path, content_hash=CHUNKED) == {"hash": expected, "size": SIZE}
        assert objects(agent) == {expected}
        assert (agent.state_dir / "cas" / "objects" / expected[:2] / expected).read_bytes() == data
        run_sees(agent, connection, "big.bin", data, expected)
    with AgentConnection(agent.socket) as connection:   # a new connection holds nothing: it uploads again
        assert put(connection, data, expected, content_hash=CHUNKED)[-1]["complete"]
        run_sees(agent, connection, "big.bin", data, expected)


def test_bytes_sent_first_are_the_same_content_a_passed_file_names(make_agent, big):
    path, data = big
    agent = make_agent()
    with AgentConnection(agent.socket) as connection:
        assert put(connection, data, content_hash(data, CHUNKED), content_hash=CHUNKED)[-1]["complete"]
        assert pass_open(connection, path, content_hash=CHUNKED)["hash"] == content_hash(data, CHUNKED)
        run_sees(agent, connection, "data", data, content_hash(data, CHUNKED))
    assert objects(agent) == {content_hash(data, CHUNKED)}


def test_uploads_are_checked_against_the_form_they_declare(agent, big):
    _, data = big
    with AgentConnection(agent.socket) as connection:
        # A plain SHA-256 declared as the chunked form, and the other way round: neither is the content's name.
        with pytest.raises(BadRequest, match="does not match its hash"):
            put(connection, data, sha(data), content_hash=CHUNKED)
        with pytest.raises(BadRequest, match="does not match its hash"):
            put(connection, data, content_hash(data, CHUNKED))
        # One upload, one form: a piece declaring the other is refused.
        digest = content_hash(data, CHUNKED)
        connection.call("blob_put", blobs=[{"hash": digest, "size": SIZE, "offset": 0, "data": data[:PIECE]}],
                        content_hash=CHUNKED)
        with pytest.raises(BadRequest, match="was started with content_hash 'chunked-v1', not 'sha256'"):
            connection.call("blob_put", blobs=[{"hash": digest, "size": SIZE, "offset": PIECE,
                                                "data": data[PIECE:2 * PIECE]}])
        with pytest.raises(BadRequest, match="must be one of sha256, chunked-v1"):
            connection.call("blob_put", blobs=[{"hash": digest, "size": SIZE, "offset": 0, "data": b""}],
                            content_hash="md5")
    assert objects(agent) == set()


def test_an_older_client_naming_every_content_by_its_sha256_is_served_as_before(agent, big):
    path, data = big
    with AgentConnection(agent.socket) as connection:   # sends no content_hash, as clients before it did
        assert pass_open(connection, path) == {"hash": sha(data), "size": SIZE}
        run_sees(agent, connection, "big.bin", data, sha(data))
    other = data[::-1]
    with AgentConnection(agent.socket) as connection:
        assert put(connection, other, sha(other))[-1]["complete"]
        run_sees(agent, connection, "other.bin", other, sha(other))
        # Small contents have one name in both forms: either kind of client's upload serves the other.
        small = b"small content\n"
        put(connection, small, sha(small))
        run_sees(agent, connection, "small.txt", small, content_hash(small, CHUNKED))


def as_older_agent(workspace, blob_fds: bool = True):
    """What a client learns from the hello of an agent that knows plain SHA-256 only (and, without ``blob_fds``,
    takes no open files)."""
    del workspace.connection.agent["content_hashes"]
    if not blob_fds:
        del workspace.connection.agent["blob_fds"]
    return workspace


@pytest.mark.parametrize("blob_fds", [True, False])
def test_the_client_uses_plain_sha256_with_an_older_agent(agent, tmp_path, blob_fds):
    data = os.urandom(SIZE)
    tree = make_tree(tmp_path / "src", {"big.bin": data, "a.txt": b"alpha"})
    workspace = as_older_agent(agent.workspace(), blob_fds)
    spy = ArgSpy(workspace)
    run = Experiment(workspace, "chunks").submit(ScriptRunConfig(str(tree), command="sha256sum big.bin"))
    # An older agent refuses arguments it does not know: none says a form.
    if blob_fds:
        assert spy.ops == ["blob_fds", "submit"]
    else:   # hashed by the client, then sent in frames of 8 MiB
        assert spy.ops[0] == spy.ops[-1] == "submit" and set(spy.ops[1:-1]) == {"blob_put"}
    assert not any("content_hash" in names for _, names in spy.requests)
    run.wait_for_completion()
    assert run.get_status() == "Completed" and sha(data) in run.get_log()
    assert objects(agent) == {sha(data), sha(b"alpha")}


def test_the_hash_cache_never_gives_one_form_for_the_other(make_agent, tmp_path):
    data = os.urandom(SIZE)
    tree = make_tree(tmp_path / "src", {"big.bin": data})
    newer, older = make_agent(), make_agent()

    def submit(workspace) -> list[str]:
        spy = ArgSpy(workspace)
        run = Experiment(workspace, "chunks").submit(ScriptRunConfig(str(tree), command="sha256sum big.bin"))
        ops = spy.ops[:]
        run.wait_for_completion()
        assert run.get_status() == "Completed" and sha(data) in run.get_log()
        return ops

    assert submit(newer.workspace()) == ["blob_fds", "submit"]
    # The cache knows the file by chunks only: for an older agent it is read and hashed again, whole.
    ops = submit(as_older_agent(older.workspace(), blob_fds=False))
    assert ops[0] == ops[-1] == "submit" and set(ops[1:-1]) == {"blob_put"}
    # Now it knows both: neither agent gets the file again.
    assert submit(newer.workspace()) == ["submit"]
    assert submit(as_older_agent(older.workspace(), blob_fds=False)) == ["submit"]
    assert objects(newer) == {content_hash(data, CHUNKED)} and objects(older) == {sha(data)}
