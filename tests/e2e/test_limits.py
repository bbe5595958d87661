"""Limits through real connections to a real agent: each refusal names its limit, and others are still served."""

import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from labrun import Experiment, ScriptRunConfig
from labrun._connection import AgentConnection
from labrun.exceptions import AgentError, BadRequest, TooLarge
from labrun.protocol import PROTOCOL_VERSION, pack_frame
from tests.e2e.test_agent import as_nobody, needs_root, nobody_client, read_frame, shared_source  # noqa: F401

HELLO = pack_frame({"id": 0, "op": "hello", "args": {"protocol": PROTOCOL_VERSION}})
NOBODY_STATUS = "from labrun import Workspace\nprint(Workspace().status()['pid'])\n"


OPENED: list[socket.socket] = []


@pytest.fixture(autouse=True)
def close_sockets():
    yield
    while OPENED:
        OPENED.pop().close()


def connect(agent, *, greet=True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    OPENED.append(sock)
    sock.settimeout(20)
    sock.connect(str(agent.socket))
    if greet:
        sock.sendall(HELLO)
        assert read_frame(sock)["ok"] is True
    return sock


def nobody_is_served(agent, client, cwd):
    agent.root.chmod(0o755)
    result = as_nobody(agent, client, NOBODY_STATUS, cwd)
    assert result.returncode == 0 and result.stdout.strip() == str(agent.process.pid), result.stderr


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


@needs_root
def test_unfinished_frames_beyond_the_budgets_are_refused(make_agent, nobody_client, shared_source):
    agent = make_agent("[limits]\nbuffer_bytes_per_connection = 2097152\nbuffer_bytes_per_user = 4194304\n"
                       "buffer_bytes_total = 6291456\n")
    before = rss_kib(agent.process.pid)
    held = []
    # Two connections of root each hold an unfinished 2 MiB frame: that is root's whole budget.
    for _ in range(2):
        sock = connect(agent)
        sock.sendall(struct.pack(">I", 2 * 1024 * 1024 - 16) + b"x" * (2 * 1024 * 1024 - 32))
        held.append(sock)
    time.sleep(0.5)
    third = connect(agent)
    # Less than one read of the agent's: it refuses with nothing of ours left unread, so it closes cleanly
    # (unread bytes would make the close a reset, which can lose the reply).
    third.sendall(struct.pack(">I", 1024 * 1024) + b"x" * (64 * 1024))
    reply = read_frame(third)
    assert reply["error"]["code"] == "unavailable"
    assert "limits.buffer_bytes_per_user" in reply["error"]["message"]
    assert read_frame(third) is None   # and closed
    # Root's small, whole requests still pass: only unfinished frames count.
    assert AgentConnection(agent.socket).call("status")["limits"]["buffered_bytes"] >= 4 * 1024 * 1024 - 64
    # Another user is served, and the agent holds no more than its budgets.
    nobody_is_served(agent, nobody_client, shared_source)
    assert rss_kib(agent.process.pid) - before < 40 * 1024
    for sock in held:
        sock.close()
    time.sleep(0.3)
    assert AgentConnection(agent.socket).call("status")["limits"]["buffered_bytes"] == 0


def test_an_unfinished_frame_times_out(make_agent):
    agent = make_agent("[limits]\nframe_timeout_seconds = 1\n")
    sock = connect(agent)
    sock.sendall(struct.pack(">I", 1000) + b"x" * 10)
    reply = read_frame(sock)
    assert reply["error"]["details"]["reason"] == "frame_timeout"
    assert "limits.frame_timeout_seconds" in reply["error"]["message"]
    assert read_frame(sock) is None


def test_requests_in_flight_per_connection(agent, source):
    run = Experiment(agent.workspace(), "exp").submit(ScriptRunConfig(str(source), command=["sleep", "60"]))
    sock = connect(agent)
    # 200 waits that will not end on their own, pipelined on one connection: 128 are taken, the rest refused.
    sock.sendall(b"".join(pack_frame({"id": i, "op": "wait", "args": {"run_id": run.id}}) for i in range(1, 201)))
    refusals = [read_frame(sock) for _ in range(72)]
    assert {r["error"]["details"]["limit"] for r in refusals} == {"requests_per_connection"}
    assert sorted(r["id"] for r in refusals) == list(range(129, 201))
    # The connection itself still answers, and the waits all end when the run does.
    sock.sendall(pack_frame({"id": 500, "op": "status", "args": {}}))
    assert read_frame(sock)["id"] == 500
    started = time.monotonic()
    assert subprocess.run([sys.executable, "-m", "labrun.cli", "run", "--", "true"], env=agent.env,
                          capture_output=True, timeout=60).returncode == 0
    assert time.monotonic() - started < 30
    run.cancel()
    ended = {read_frame(sock)["id"] for _ in range(128)}
    assert ended == set(range(1, 129))


@needs_root
def test_connections_per_user(make_agent, nobody_client, shared_source):
    agent = make_agent("[limits]\nconnections_per_user = 20\n")
    held = [connect(agent) for _ in range(20)]
    refused = connect(agent, greet=False)
    reply = read_frame(refused)
    assert reply["error"]["code"] == "unavailable" and "limits.connections_per_user" in reply["error"]["message"]
    assert read_frame(refused) is None
    nobody_is_served(agent, nobody_client, shared_source)
    held.pop().close()
    time.sleep(0.3)
    assert AgentConnection(agent.socket).call("status")["limits"]["connections"] >= 20


def test_idle_connections_are_closed_and_the_client_reconnects(make_agent, source):
    agent = make_agent("[limits]\nidle_timeout_seconds = 1\n")
    sock = connect(agent)
    started = time.monotonic()
    reply = read_frame(sock)
    assert reply["error"]["details"]["reason"] == "idle_timeout"
    assert "limits.idle_timeout_seconds" in reply["error"]["message"]
    assert read_frame(sock) is None and time.monotonic() - started < 10
    # A client left idle past the timeout reconnects on its next call without an error.
    client = AgentConnection(agent.socket)
    time.sleep(2)
    assert client.call("status")["pid"] == agent.process.pid
    # A request in flight longer than the timeout is not idleness.
    run = Experiment(agent.workspace(), "exp").submit(ScriptRunConfig(str(source), command=["sleep", "3"]))
    assert client.call("wait", run_id=run.id)["status"] == "Completed"


def test_fd_reserve(make_agent, source):
    agent = make_agent("[limits]\nreserved_fds = 40\nconnections_per_user = 100000\n", start=False)
    agent.command = lambda: ["prlimit", "--nofile=200:200", "--", *type(agent).command(agent)]
    agent.start()
    status = AgentConnection(agent.socket).call("status")["limits"]
    assert status["fd_limit"] == 200
    held, refusal = [], None
    for _ in range(200):
        sock = connect(agent, greet=False)
        held.append(sock)
        sock.sendall(HELLO)
        reply = read_frame(sock)
        if reply is None or not reply["ok"]:
            refusal = reply
            break
    assert refusal is not None and "limits.reserved_fds" in refusal["error"]["message"]
    assert len(held) < 200 - 40 + 5
    # The agent itself still has descriptors: runs start, write logs and finish.
    for sock in held[:10]:
        sock.close()
    time.sleep(0.3)
    run = Experiment(agent.workspace(), "exp").submit(ScriptRunConfig(str(source), script="train.py"))
    assert run.wait_for_completion()["status"] == "Completed"
    for sock in held:
        sock.close()


def test_fd_limit_is_raised_to_the_hard_limit(make_agent):
    agent = make_agent(start=False)
    agent.command = lambda: ["prlimit", "--nofile=256:4096", "--", *type(agent).command(agent)]
    agent.start()
    assert AgentConnection(agent.socket).call("status")["limits"]["fd_limit"] == 4096


def test_huge_tags_never_break_ls(agent, source):
    """The issue's case: five runs with 1,000 tags of 4 KiB each (20 MB, more than a frame)."""
    agent.stop()
    agent.config_path = agent.root / "agent.toml"
    agent.config_path.write_text("[limits]\nlabels_bytes_per_run = 8388608\n")
    agent.start()
    workspace = agent.workspace()
    experiment = Experiment(workspace, "tags")
    for _ in range(5):
        run = experiment.submit(ScriptRunConfig(str(source), command=["true"]))
        for start in range(0, 1000, 250):
            workspace._call("set_labels", run_id=run.id, kind="tags",
                            values={f"tag{i}": "v" * 4096 for i in range(start, start + 250)})
    assert len(list(workspace.list_runs(all=True))) == 5
    listed = subprocess.run([sys.executable, "-m", "labrun.cli", "ls", "--all"], env=agent.env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("tags_") == 5


def test_label_limits_name_their_key(make_agent, source):
    agent = make_agent("[limits]\nlabel_value_chars = 100\nlabels_bytes_per_run = 1000\n")
    experiment = Experiment(agent.workspace(), "exp")
    with pytest.raises(BadRequest, match="limits.label_value_chars"):
        experiment.submit(ScriptRunConfig(str(source), command=["true"]), tags={"k": "v" * 101})
    run = experiment.submit(ScriptRunConfig(str(source), command=["true"]))
    with pytest.raises(BadRequest, match="limits.label_value_chars"):
        run.set_tags({"k": "v" * 101})
    run.set_tags({f"k{i}": "v" * 90 for i in range(10)})
    with pytest.raises(TooLarge, match="limits.labels_bytes_per_run"):
        run.add_properties({"p": "v" * 90})
    run.set_tags({"k0": "short"})   # replacing a value frees its bytes
    assert run.get_tags()["k0"] == "short"


def test_raw_oversized_numbers_and_env_keys_are_bad_requests(agent):
    sock = connect(agent)
    spec = {"experiment": "e", "command": ["true"], "snapshot": {"files": []}}
    cases = [
        ({"spec": {**spec, "max_run_duration_seconds": 2**63}}, "args.spec.max_run_duration_seconds"),
        ({"spec": {**spec, "environment_variables": {"A=B": "1"}}}, "args.spec.environment_variables key 'A=B'"),
        ({"spec": {**spec, "environ": {"A": "x\0y"}}}, "args.spec.environ.A"),
    ]
    for i, (args, field) in enumerate(cases, 1):
        sock.sendall(pack_frame({"id": i, "op": "submit", "args": args}))
        reply = read_frame(sock)
        assert reply["error"]["code"] == "bad_request" and reply["error"]["details"]["field"] == field
    body = msgpack.packb({"id": 9, "op": "wait", "args": {"run_id": "x", "timeout": float("nan")}})
    sock.sendall(struct.pack(">I", len(body)) + body)
    assert read_frame(sock)["error"]["details"]["field"] == "args.timeout"


def test_a_file_where_a_directory_is_needed_is_a_conflict(agent, source):
    """Found by the fuzzer: put_file of "a/b" after "a" was an internal error."""
    run = Experiment(agent.workspace(), "exp").submit(ScriptRunConfig(str(source), command=["sleep", "30"]))
    with AgentConnection(agent.socket) as connection:
        connection.call("put_file", run_id=run.id, name="a", data=b"x")
        with pytest.raises(AgentError) as refused:
            connection.call("put_file", run_id=run.id, name="a/b", data=b"y")
        assert refused.value.code in ("conflict", "bad_request")   # a client's mistake, never "internal"
    run.cancel()


def test_environments_are_listed_a_page_at_a_time(make_agent):
    """``env_list`` answers one bounded page (by count and by bytes); ``Environment.list`` follows the pages."""
    from labrun import Environment

    agent = make_agent("[limits]\nlist_page_bytes = 1\n")   # every page then holds one environment
    workspace = agent.workspace()
    names = [f"pages-{i}" for i in (3, 1, 4, 0, 2)]
    for name in names:
        Environment(name).register(workspace)
    Environment("pages-1").register(workspace)   # a second version: listed once, as its newest
    first = workspace._call("env_list")
    assert [e["name"] for e in first] == ["pages-0"]
    assert [e["name"] for e in workspace._call("env_list", after="pages-2")] == ["pages-3"]
    assert workspace._call("env_list", after="pages-4") == []
    listed = Environment.list(workspace)
    assert sorted(listed) == sorted(names) and listed["pages-1"].version == "2"


def test_experiments_are_listed_a_page_at_a_time(make_agent, source):
    """``experiments`` answers one bounded page, or the one experiment asked for; ``Experiment.list`` follows."""
    agent = make_agent("[limits]\nlist_page_bytes = 1\n")
    workspace = agent.workspace()
    Experiment(workspace, "pages-b").submit(ScriptRunConfig(str(source), command=["true"])).wait_for_completion()
    for name in ("pages-c", "pages-a"):
        Experiment(workspace, name).set_tags({"t": name})
    assert [e["name"] for e in workspace._call("experiments")] == ["pages-a"]
    assert workspace._call("experiments", after="pages-a") == [
        {"name": "pages-b", "runs": 1, "user": None, "tags": {}, "archived_at": None}]
    assert [e["name"] for e in workspace._call("experiments", name="pages-c")] == ["pages-c"]
    assert sorted(e.name for e in Experiment.list(workspace)) == ["pages-a", "pages-b", "pages-c"]
    assert Experiment(workspace, "pages-c").tags == {"t": "pages-c"}
