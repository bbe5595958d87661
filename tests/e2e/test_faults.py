"""Faults through a real agent process (and the store's writer itself): a full state disk (a small tmpfs), damaged
databases, orphans, lost replies."""

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import structlog
import trio

from labrun import Experiment, ScriptRunConfig
from labrun._connection import AgentConnection
from labrun.agent._model import RunRecord
from labrun.agent._store import Store
from labrun.exceptions import AgentError
from labrun.protocol import pack_frame
from tests.e2e.test_agent import read_frame, wait_until

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path_factory):
    """A 48 MiB tmpfs, mounted for the test and unmounted after it; ``fill()`` fills it, ``free()`` frees it."""
    mount = Path(tmp_path_factory.mktemp("disk"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0755", "tmpfs", str(mount)], check=True)

    class Disk:
        path = mount
        filler = mount / "filler"

        def fill(self):
            try:
                with open(self.filler, "ab") as f:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
            except OSError:
                pass
            # The last, smaller gaps as well, so the next write of any size fails.
            for i in range(64):
                try:
                    with open(mount / f"filler{i}", "wb") as f:
                        f.write(b"\0" * 4096)
                except OSError:
                    break

        def free(self):
            for path in mount.glob("filler*"):
                path.unlink()

    yield Disk()
    subprocess.run(["umount", "-l", str(mount)], check=False)


def start_on(make_agent, disk, config: str | None = None):
    agent = make_agent(config, start=False)
    agent.state_dir = disk.path / "state"
    return agent.start()


def status(agent) -> dict:
    with AgentConnection(agent.socket) as connection:
        return connection.call("status")


@needs_root
def test_a_run_that_ends_on_a_full_disk_is_recorded_when_space_returns(make_agent, small_disk, source, tmp_path):
    agent = start_on(make_agent, small_disk)
    pid = agent.process.pid
    experiment = Experiment(agent.workspace(), "exp")
    go = tmp_path / "go"
    run = experiment.submit(ScriptRunConfig(str(source), command=f"while [ ! -e {go} ]; do sleep 0.05; done"))
    wait_until(lambda: run.get_status() == "Running", what="the run to start")
    reserve = small_disk.path / "state" / "reserve"
    assert reserve.exists()
    small_disk.fill()
    # At its next write the agent sees the disk (nearly) full and gives up its reserve for its own writes...
    try:
        experiment.submit(ScriptRunConfig(str(source), command=["true"]))
    except AgentError:
        pass
    wait_until(lambda: not reserve.exists(), what="the reserve to be given up")
    small_disk.fill()   # ...which the disk's other writers may take (here: the filler)
    # A write of file data is refused, clearly, and the fault shows in status and in the log.
    with pytest.raises(AgentError) as refused:
        agent.workspace()._call("put_file", run_id=run.id, name="big.bin", data=b"x" * (1 << 20))
    assert refused.value.code == "unavailable" and "state directory" in refused.value.message
    assert any("No space" in f["error"] for f in status(agent)["faults"])
    shown = agent.cli("status")
    assert shown.returncode == 0 and "FAULT" in shown.stdout
    # The run ends while the disk is full: the database keeps room of its own, so its end is recorded.
    go.touch()
    assert run.wait_for_completion()["status"] == "Completed"
    assert agent.process.poll() is None
    # Space comes back: the faults clear, the reserve is made again.
    small_disk.free()
    wait_until(lambda: not status(agent)["faults"], timeout=30, what="the faults to clear")
    assert (small_disk.path / "state" / "reserve").exists()
    assert agent.process.pid == pid and agent.process.poll() is None
    assert experiment.submit(ScriptRunConfig(str(source), command=["true"])).wait_for_completion()["status"] == "Completed"
    log = agent.log_path.read_text()
    assert "fault.started" in log and "fault.cleared" in log and "fault.reserve.released" in log


@needs_root
async def test_a_batch_sqlite_rolled_back_on_a_full_disk_is_written_again_when_space_returns(small_disk, nursery):
    # No reserve here: on a full disk SQLite rolls a WAL commit back (the batch's writes are undone), and the
    # writer must write the batch again, transitions and events, with the seq numbers already handed out.
    store = Store(small_disk.path / "state.db")
    published = []
    store.on_events = published.extend
    await nursery.start(store.writer)

    def record(run_id):
        return RunRecord(run_id=run_id, order=0, experiment="e", number=0, uid=0, gid=0, user="root",
                         status="Queued", spec={}, environ={}, submitted_at=1.0)

    first = store.add_run(record("r1"), "run.queued")
    await store.durable()
    small_disk.fill()
    with structlog.testing.capture_logs() as logs:
        second = store.add_run(record("r2"), "run.queued")
        store.update_run(first, "run.started", status="Running", started_at=2.0)
        padded = [store.add_event("test.padded", {"i": i, "pad": "x" * 4000}) for i in range(40)]
        with trio.move_on_after(2):
            await store.durable()
        failures = [entry for entry in logs if entry["event"] == "store.commit.failed"]
        assert failures and any(entry["rolled_back"] for entry in failures), failures
        assert [e["type"] for e in published] == ["run.queued"]   # nothing of the failed batch counts yet
        store.update_run(second, "run.canceled", status="Canceled", ended_at=3.0)   # joins the pending batch
        small_disk.free()
        with trio.fail_after(30):
            await store.durable()
    with sqlite3.connect(store.path) as other:
        statuses = dict(other.execute("SELECT run_id, status FROM runs"))
        events = other.execute("SELECT seq, type FROM events ORDER BY seq").fetchall()
    assert statuses == {"r1": "Running", "r2": "Canceled"}
    assert [t for _, t in events] == ["run.queued", "run.queued", "run.started", *["test.padded"] * 40, "run.canceled"]
    assert [(e["seq"], e["type"]) for e in published] == events   # the same seq as handed out before the rollback
    assert [seq for seq, _ in events[3:43]] == padded
    store.close()


METRICS_SCRIPT = """
import os, sys, time
from labrun import Run
run = Run.get_context()
flags = sys.argv[1]
def wait(name):
    while not os.path.exists(os.path.join(flags, name)):
        time.sleep(0.05)
wait("full")
run.log("during", 2.0)
run.flush()
open(os.path.join(flags, "logged"), "w").close()
wait("freed")
run.flush()
"""


@needs_root
def test_metrics_logged_on_a_full_disk_are_held_and_arrive(make_agent, small_disk, tmp_path):
    agent = start_on(make_agent, small_disk)
    source = tmp_path / "metrics-src"
    source.mkdir()
    (source / "metrics.py").write_text(METRICS_SCRIPT)
    flags = tmp_path / "flags"
    flags.mkdir()
    experiment = Experiment(agent.workspace(), "exp")
    run = experiment.submit(ScriptRunConfig(str(source), command=[sys.executable, "metrics.py", str(flags)]))
    wait_until(lambda: run.get_status() == "Running", what="the run to start")
    small_disk.fill()
    try:   # the agent gives up its reserve at its next write...
        experiment.submit(ScriptRunConfig(str(source), command=["true"]))
    except AgentError:
        pass
    wait_until(lambda: not (small_disk.path / "state" / "reserve").exists(), what="the reserve to be given up")
    small_disk.fill()   # ...which the disk's other writers take
    (flags / "full").touch()
    # The script goes on (its metrics are taken at once while the database has room of its own, or held).
    wait_until(lambda: (flags / "logged").exists(), timeout=30, what="the script to log on a full disk")
    small_disk.free()
    (flags / "freed").touch()
    assert run.wait_for_completion()["status"] == "Completed"
    assert run.get_metrics() == {"during": 2.0}


@needs_root
def test_the_agent_starts_and_serves_on_a_full_disk(make_agent, small_disk, source):
    agent = start_on(make_agent, small_disk)
    done = Experiment(agent.workspace(), "exp").submit(ScriptRunConfig(str(source), command=["true"]))
    assert done.wait_for_completion()["status"] == "Completed"
    assert agent.stop() == 0
    small_disk.fill()
    agent.start()
    small_disk.fill()   # whatever the agent freed to open its database is taken again
    assert agent.cli("ls", "--all").stdout.count(done.id) == 1
    with pytest.raises(AgentError) as refused:
        agent.workspace()._call("put_file", run_id=done.id, name="big.bin", data=b"x" * (1 << 20))
    assert refused.value.code == "unavailable"
    assert agent.process.poll() is None
    small_disk.free()
    run = Experiment(agent.workspace(), "exp").submit(ScriptRunConfig(str(source), command=["true"]))
    assert run.wait_for_completion()["status"] == "Completed"


def run_agent_once(agent, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run(agent.command(), env=agent.env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def agent_with_history(make_agent, source):
    agent = make_agent()
    run = Experiment(agent.workspace(), "exp").submit(ScriptRunConfig(str(source), command=["true"]))
    run.wait_for_completion()
    assert agent.stop() == 0
    return agent


def test_an_empty_database_next_to_runs_refuses_to_start(agent_with_history):
    agent = agent_with_history
    db = agent.state_dir / "state.db"
    db.write_bytes(b"")
    result = run_agent_once(agent)
    assert result.returncode == 65
    assert str(db) in result.stderr and "is empty (0 bytes)" in result.stderr and "Restore" in result.stderr
    assert "Traceback" not in result.stderr
    assert db.stat().st_size == 0   # nothing was written over it


@pytest.mark.parametrize("damage", ["header", "pages"])
def test_a_corrupt_database_refuses_to_start(agent_with_history, damage):
    agent = agent_with_history
    db = agent.state_dir / "state.db"
    data = bytearray(db.read_bytes())
    if damage == "header":
        data[:100] = b"\xff" * 100
    else:
        for page in range(1, len(data) // 4096):
            data[page * 4096 + 8:page * 4096 + 200] = os.urandom(192)
    db.write_bytes(bytes(data))
    result = run_agent_once(agent)
    assert result.returncode == 65, result.stderr
    assert str(db) in result.stderr and "Traceback" not in result.stderr
    assert "cannot be read" in result.stderr or "corrupt" in result.stderr


def test_a_corrupt_database_of_small_contents_refuses_to_start(agent_with_history):
    agent = agent_with_history
    db = agent.state_dir / "cas" / "small.db"
    assert db.exists()   # the snapshot's small files were stored there
    size = max(db.stat().st_size, 65536)
    db.write_bytes(b"\xff" * size)
    result = run_agent_once(agent)
    assert result.returncode == 65, result.stderr
    assert str(db) in result.stderr and "Traceback" not in result.stderr
    assert "cannot be read" in result.stderr or "corrupt" in result.stderr


def test_a_missing_database_next_to_runs_refuses_and_a_fresh_state_dir_starts(agent_with_history, make_agent):
    agent = agent_with_history
    (agent.state_dir / "state.db").unlink()
    result = run_agent_once(agent)
    assert result.returncode == 65 and "is missing" in result.stderr
    fresh = make_agent(start=False)
    fresh.state_dir.mkdir()
    (fresh.state_dir / "state.db").write_bytes(b"")   # an empty file and no runs: a first start
    fresh.start()
    assert status(fresh)["runs"] == {}


def test_orphan_run_directories_are_removed_at_start(agent_with_history):
    agent = agent_with_history
    runs = agent.state_dir / "runs"
    # What a kill -9 between a submit's making of the run directory and its row's commit leaves: the directory
    # as the submit makes it (an empty logs/ and the outputs link), with no row.
    orphan = runs / "exp_1700000000_0badf00d"
    (orphan / "logs").mkdir(parents=True)
    (orphan / "outputs").symlink_to("snapshot/outputs")
    # An older agent's: a run directory marked as being submitted, with no row.
    marked = runs / "exp_1700000000_0badcafe"
    (marked / "snapshot" / "deep").mkdir(parents=True)
    (marked / "snapshot" / "deep" / "half.py").write_text("x = 1\n")
    (agent.state_dir / "submitting").mkdir(exist_ok=True)
    (agent.state_dir / "submitting" / marked.name).touch()
    # A directory with no row, no mark, and something in it may be all that is left of something: it is kept
    # and reported. So is one whose logs/ holds a log, or whose outputs is not the link a submit makes.
    unknown = runs / "exp_1700000000_0000beef"
    (unknown / "logs").mkdir(parents=True)
    (unknown / "logs" / "std_log.txt").write_text("the run's output\n")
    not_a_link = runs / "exp_1700000000_0000f00d"
    (not_a_link / "outputs").mkdir(parents=True)
    agent.start()
    assert not orphan.exists() and not marked.exists()
    assert unknown.exists() and not_a_link.exists()
    assert not list((agent.state_dir / "submitting").iterdir())
    log = agent.log_path.read_text()
    assert "state.orphans.removed" in log and "state.runs.unknown" in log


def test_a_submit_key_returns_the_run_it_made(agent, source):
    spec = {"experiment": "idem", "command": ["true"], "snapshot": {"files": []}}
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.connect(str(agent.socket))
    first.sendall(pack_frame({"id": 0, "op": "hello", "args": {"protocol": 1}}))
    read_frame(first)
    # The reply is never read: the connection goes away as after a crash.
    first.sendall(pack_frame({"id": 1, "op": "submit", "args": {"spec": spec, "idempotency_key": "k1"}}))
    def idem_runs():
        return [r["run_id"] for r in agent.workspace().list_runs(all=True) if r["experiment"] == "idem"]

    wait_until(lambda: len(idem_runs()) == 1, what="the run")
    first.close()
    with AgentConnection(agent.socket) as again:
        run = again.call("submit", spec=spec, idempotency_key="k1")
        assert again.call("submit", spec=spec, idempotency_key="k1")["run_id"] == run["run_id"]
        other = again.call("submit", spec=spec, idempotency_key="k2")
    assert other["run_id"] != run["run_id"]
    assert sorted(idem_runs()) == sorted([run["run_id"], other["run_id"]])


class ReplyDropper:
    """A Unix-socket proxy in front of the agent that, once, forwards a submit and closes before its reply."""

    def __init__(self, target: Path, path: Path):
        self.target, self.path = target, path
        self.dropped = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client):
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(str(self.target))
        drop = [False]

        def up():
            while data := client.recv(1 << 20):
                if b"idempotency_key" in data and not self.dropped:
                    self.dropped += 1
                    drop[0] = True
                upstream.sendall(data)

        threading.Thread(target=up, daemon=True).start()
        try:
            while data := upstream.recv(1 << 20):
                if drop[0]:
                    time.sleep(0.5)   # the agent has committed the run by now
                    break
                client.sendall(data)
        except OSError:
            pass
        # shutdown, not just close: the other thread's recv on these sockets must end too.
        for sock in (client, upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self):
        self.listener.close()


def test_the_client_retries_a_submit_whose_reply_was_lost(agent, source, tmp_path):
    proxy = ReplyDropper(agent.socket, tmp_path / "proxy.sock")
    try:
        from labrun import Workspace

        workspace = Workspace(socket=tmp_path / "proxy.sock")
        run = Experiment(workspace, "lost").submit(ScriptRunConfig(str(source), command=["true"]))
        assert proxy.dropped == 1
        assert run.wait_for_completion()["status"] == "Completed"
        assert [r["run_id"] for r in agent.workspace().list_runs(all=True) if r["experiment"] == "lost"] == [run.id]
    finally:
        proxy.close()


def test_a_snapshot_file_named_outputs_is_a_bad_request(agent):
    spec = {"experiment": "e", "command": ["true"], "snapshot": {"files": [["outputs", 1, 0o644, "0" * 64]]}}
    with AgentConnection(agent.socket) as connection:
        with pytest.raises(AgentError) as refused:
            connection.call("submit", spec=spec)
        assert refused.value.code == "bad_request" and "'outputs' is a file" in refused.value.message
        assert connection.call("status")["runs"] == {}
    runs = agent.state_dir / "runs"
    assert not runs.exists() or not list(runs.iterdir())
