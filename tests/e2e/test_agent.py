"""End to end against the agent itself: cancel, bad input on the wire, restarts, users."""

import os
import pwd
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
from labrun.exceptions import BadRequest, Conflict, TooLarge
from labrun.protocol import PROTOCOL_VERSION, pack_frame

GRACE_CONFIG = "[agent]\nstop_grace_seconds = 1\n"


def processes_of(run_id: str) -> list[int]:
    """Live processes whose environment says they belong to ``run_id``."""
    found = []
    marker = f"LABRUN_RUN_ID={run_id}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if stat[stat.rindex(")") + 2] != "Z":
                    found.append(int(entry))
        except OSError:
            pass
    return found


def wait_until(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def submit(agent, source, command, **kwargs):
    return Experiment(agent.workspace(), "exp").submit(ScriptRunConfig(str(source), command=command, **kwargs))


TREE = ("trap '' TERM; "                       # the leader ignores SIGTERM: only SIGKILL ends it
        "(sleep 300 & sleep 300 & wait) & "    # grandchildren in the process group
        "setsid sleep 300 & "                  # a grandchild in a session of its own
        "echo started; wait")


def test_cancel_kills_the_whole_process_tree(make_agent, source):
    agent = make_agent(GRACE_CONFIG)
    run = submit(agent, source, TREE)
    wait_until(lambda: run.get_status() == "Running" and len(processes_of(run.id)) >= 5, what="the tree")
    run.cancel()
    assert run.status in ("CancelRequested", "Canceled")
    details = run.wait_for_completion()
    assert details["status"] == "Canceled"
    assert processes_of(run.id) == []


def test_cancel_queued_run_and_cancel_twice(make_agent, source):
    agent = make_agent("[resources]\nmax_concurrent_runs = 1\n")
    first = submit(agent, source, ["sleep", "60"])
    queued = submit(agent, source, ["true"])
    assert queued.get_detailed_status() == {"status": "Queued", "details": "waiting for max_concurrent (position 1)"}
    queued.cancel()
    assert queued.get_status() == "Canceled"
    queued.cancel()   # canceling twice is harmless
    first.cancel()
    first.cancel()
    assert first.wait_for_completion()["status"] == "Canceled"
    done = submit(agent, source, ["true"])
    done.wait_for_completion()
    with pytest.raises(Conflict, match=f"run {done.id} has already ended \\(Completed\\)"):
        done.cancel()


def test_duration_limit_kills_the_tree(make_agent, source):
    agent = make_agent(GRACE_CONFIG)
    run = submit(agent, source, TREE, max_run_duration_seconds=2)
    assert run.wait_for_completion()["status"] == "Canceled"
    assert run._details["reason"] == "max_run_duration_exceeded"
    assert processes_of(run.id) == []


# -- the wire --------------------------------------------------------------------------

@pytest.fixture
def raw_connect():
    """Plain sockets to the agent, for bytes the real client would never send."""
    opened = []

    def connect(agent) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(agent.socket))
        opened.append(sock)
        return sock

    yield connect
    for sock in opened:
        sock.close()


def read_frame(sock) -> dict | None:
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        if not chunk:
            return None
        header += chunk
    (length,) = struct.unpack(">I", header)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return msgpack.unpackb(body)


def hello(sock):
    sock.sendall(pack_frame({"id": 0, "op": "hello", "args": {"protocol": PROTOCOL_VERSION}}))
    assert read_frame(sock)["ok"] is True


def test_garbage_closes_only_that_connection(raw_connect, agent, source):
    bystander = AgentConnection(agent.socket)
    sock = raw_connect(agent)
    bystander_sock = raw_connect(agent)
    hello(bystander_sock)
    hello(sock)
    body = b"\xc1\xc1\xc1"
    sock.sendall(struct.pack(">I", len(body)) + body)
    assert read_frame(sock) is None   # closed
    assert bystander.call("status")["pid"] == agent.process.pid
    bystander.close()
    bystander_sock.sendall(pack_frame({"id": 1, "op": "status", "args": {}}))
    assert read_frame(bystander_sock)["ok"] is True
    assert submit(agent, source, ["true"]).wait_for_completion()["status"] == "Completed"


def test_oversize_frame_gets_too_large(raw_connect, agent):
    sock = raw_connect(agent)
    sock.sendall(struct.pack(">I", 64 * 1024 * 1024))
    reply = read_frame(sock)
    assert reply["ok"] is False and reply["error"]["code"] == "too_large"
    assert read_frame(sock) is None


def test_bad_requests_get_clear_errors_and_the_connection_survives(raw_connect, agent):
    sock = raw_connect(agent)
    sock.sendall(pack_frame({"id": 1, "op": "list", "args": {}}))
    assert "send 'hello' before" in read_frame(sock)["error"]["message"]
    hello(sock)
    cases = [
        ({"id": 2, "op": "teleport", "args": {}}, "unknown op 'teleport'"),
        ({"id": 3, "op": "get", "args": {}}, "args.run_id: missing required field"),
        ({"id": 4, "op": "get", "args": {"run_id": 12}}, "args.run_id: expected a string, got int"),
        ({"id": 5, "op": "submit", "args": {"spec": {"experiment": "e"}}}, "args.spec.snapshot: missing"),
        ({"id": 6, "op": "get", "args": {"run_id": "nope"}}, "no run with id 'nope'"),
        ({"op": "status"}, "'id' must be an integer"),
    ]
    for message, text in cases:
        sock.sendall(pack_frame(message))
        reply = read_frame(sock)
        assert reply["ok"] is False and text in reply["error"]["message"], reply
        assert reply["id"] == message.get("id")
    sock.sendall(pack_frame({"id": 9, "op": "status", "args": {}}))
    assert read_frame(sock)["ok"] is True


def test_protocol_version_mismatch(raw_connect, agent):
    sock = raw_connect(agent)
    sock.sendall(pack_frame({"id": 0, "op": "hello", "args": {"protocol": PROTOCOL_VERSION + 1}}))
    assert "is not supported" in read_frame(sock)["error"]["message"]


# -- restarts and single instance --------------------------------------------------------

def test_restart_keeps_history_and_queue(make_agent, source):
    agent = make_agent("[resources]\nmax_concurrent_runs = 1\n")
    done = submit(agent, source, ["true"])
    done.wait_for_completion()
    running = submit(agent, source, ["sleep", "300"])
    queued = [submit(agent, source, ["echo", str(i)]) for i in range(2)]
    wait_until(lambda: running.get_status() == "Running", what="running")
    pids = processes_of(running.id)
    agent.restart()
    listed = {r["run_id"]: r for r in agent.workspace()._call("list", all=True)}
    assert listed[done.id]["status"] == "Completed"
    # The earlier agent's active run was reattached: still running, the same processes, holding its slot.
    assert listed[running.id]["status"] == "Running" and processes_of(running.id) == pids
    assert [listed[r.id]["status"] for r in queued] == ["Queued", "Queued"]
    running.cancel()
    assert running.wait_for_completion(raise_on_error=False)["status"] == "Canceled"
    assert processes_of(running.id) == []
    for i, run in enumerate(queued):
        details = run.wait_for_completion()
        assert details["status"] == "Completed" and run.get_log() == f"{i}\n"
    assert [r.number for r in queued] == [3, 4]
    assert Experiment(agent.workspace(), "exp").submit(ScriptRunConfig(str(source), command=["true"])).number == 5


def test_stopping_the_agent_leaves_runs_running(make_agent, source):
    agent = make_agent()
    run = submit(agent, source, ["sleep", "300"])
    wait_until(lambda: run.get_status() == "Running", what="running")
    pids = processes_of(run.id)
    assert agent.stop() == 0
    assert processes_of(run.id) == pids
    agent.start()
    assert run.get_status() == "Running" and processes_of(run.id) == pids   # reattached, not restarted
    run.cancel()
    assert run.wait_for_completion(raise_on_error=False)["status"] == "Canceled"
    assert processes_of(run.id) == []


def test_second_agent_on_a_live_socket_refuses(agent, tmp_path):
    second = subprocess.run([sys.executable, "-m", "labrun.agent", "--socket", str(agent.socket),
                             "--state-dir", str(tmp_path / "other")], capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert f"another labrund is already listening on {agent.socket}" in second.stderr
    with AgentConnection(agent.socket) as connection:
        assert connection.call("status")["pid"] == agent.process.pid


def test_second_agent_on_the_same_state_dir_refuses(agent, tmp_path):
    second = subprocess.run([sys.executable, "-m", "labrun.agent", "--socket", str(tmp_path / "s.sock"),
                             "--state-dir", str(agent.state_dir)], capture_output=True, text=True, timeout=30)
    assert second.returncode == 1 and "another labrund is using the state directory" in second.stderr


def test_stale_socket_of_a_dead_agent_is_replaced(agent, source):
    agent.process.kill()
    agent.process.wait()
    assert agent.socket.exists()
    agent.start()
    assert submit(agent, source, ["true"]).wait_for_completion()["status"] == "Completed"


# -- users -------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="running runs as another user needs a root agent")


def _drop_to_nobody():
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)


@pytest.fixture(scope="session")
def nobody_client(tmp_path_factory):
    """An interpreter ``nobody`` may run, and a world-readable copy of the thin client (labrun, msgpack, pathspec)."""
    import shutil

    import msgpack
    import pathspec

    import labrun
    import labrun.protocol

    site = tmp_path_factory.mktemp("thin-client")
    shutil.copytree(Path(labrun.__file__).parent, site / "labrun", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Path(labrun.protocol.__file__).parent, site / "labrun" / "protocol",
                    ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    for module in (msgpack, pathspec):
        shutil.copytree(Path(module.__file__).parent, site / module.__name__, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [site, *site.parents]:
        if str(path).startswith("/tmp/"):
            path.chmod(path.stat().st_mode | 0o755)
    subprocess.run(["chmod", "-R", "a+rX", str(site)], check=True)
    for python in ("/usr/bin/python3", sys.executable):
        probe = subprocess.run([python, "-c", "import labrun, msgpack"], env={"PYTHONPATH": str(site)},
                               preexec_fn=_drop_to_nobody, capture_output=True, cwd="/")
        if probe.returncode == 0:
            return python, site
    pytest.skip("no Python interpreter that the user nobody may run")


def as_nobody(agent, client, code: str, cwd: Path) -> subprocess.CompletedProcess:
    python, site = client
    env = dict(agent.env, HOME="/nonexistent", PYTHONPATH=str(site))
    return subprocess.run([python, "-c", code], cwd=cwd, env=env, preexec_fn=_drop_to_nobody,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def shared_source(tmp_path_factory):
    """A source directory another user can read."""
    root = tmp_path_factory.mktemp("shared")
    for path in [root, *root.parents]:
        if str(path).startswith("/tmp/"):
            path.chmod(path.stat().st_mode | 0o755)
    (root / "whoami.py").write_text("import os; print(os.getuid(), os.getgid(), os.getcwd())\n")
    root.chmod(0o755)
    (root / "whoami.py").chmod(0o644)
    return root


@needs_root
def test_runs_execute_as_the_submitting_user(agent, shared_source, nobody_client):
    agent.root.chmod(0o755)
    code = ("from labrun import Workspace, Experiment, ScriptRunConfig\n"
            "run = Experiment(Workspace(), 'users').submit(ScriptRunConfig('.', script='whoami.py'))\n"
            "run.wait_for_completion()\nprint(run.id)\nprint(run.get_log(), end='')\n")
    result = as_nobody(agent, nobody_client, code, shared_source)
    assert result.returncode == 0, result.stderr
    run_id, log = result.stdout.split("\n", 1)
    nobody = pwd.getpwnam("nobody")
    uid, gid, cwd = log.split()
    assert (int(uid), int(gid)) == (nobody.pw_uid, nobody.pw_gid)
    run_dir = agent.state_dir / "runs" / run_id
    assert cwd == str(run_dir / "snapshot")
    assert run_dir.stat().st_uid == nobody.pw_uid and (run_dir / "logs" / "std_log.txt").stat().st_uid == nobody.pw_uid
    # Root's runs are visible to nobody, but not cancellable and their logs and environment are not readable.
    mine = Experiment(agent.workspace(), "root").submit(ScriptRunConfig(str(shared_source), command=["sleep", "60"]))
    probe = as_nobody(agent, nobody_client, (
        "from labrun import Workspace\nfrom labrun.exceptions import Forbidden\nws = Workspace()\n"
        f"run = ws._call('get', run_id='{mine.id}')\nassert 'environment_variables' not in run\n"
        "for op in ('cancel', 'logs'):\n"
        "    try:\n"
        f"        list(ws._stream(op, run_id='{mine.id}')) if op == 'logs' else ws._call(op, run_id='{mine.id}')\n"
        "    except Forbidden as exc:\n        print('forbidden', op)\n"), shared_source)
    assert probe.stdout.split("\n")[:2] == ["forbidden cancel", "forbidden logs"], probe.stderr
    mine.cancel()
    assert "environment_variables" in agent.workspace()._call("get", run_id=mine.id)
