"""The whole agent in-process with an injected executor: ``run_agent(config, executors=...)``."""

import sqlite3
import subprocess
import sys

import trio

from labrun._connection import AgentConnection
from labrun.agent import load_config, run_agent
from labrun.agent._store import MIGRATIONS, Store
from labrun.agent.executors import ExitResult, FakeExecutor, FakeMachine



async def test_an_injected_executor_runs_what_clients_submit(tmp_path, nursery):
    config = load_config(None, socket=tmp_path / "a.sock", state_dir=tmp_path / "state")
    machine = FakeMachine()
    await nursery.start(lambda task_status: run_agent(config, executors={"local": FakeExecutor(machine)},
                                                      task_status=task_status))

    def submit():
        with AgentConnection(config.socket) as connection:
            spec = {"experiment": "fake", "command": ["train"], "snapshot": {"files": []}}
            return connection.call("submit", spec=spec)["run_id"]

    def status(run_id):
        with AgentConnection(config.socket) as connection:
            return connection.call("get", run_id=run_id)

    run_id = await trio.to_thread.run_sync(submit)
    with trio.fail_after(10):
        while not machine.running():
            await trio.sleep(0.01)
    assert machine.launches[0].run_id == run_id and machine.launches[0].argv == ["train"]
    machine.finish(machine.running()[0], ExitResult(exit_code=5))
    with trio.fail_after(10):
        while (shown := await trio.to_thread.run_sync(status, run_id))["status"] != "Failed":
            await trio.sleep(0.01)
    assert shown["exit_code"] == 5
    nursery.cancel_scope.cancel()


def test_an_agent_refuses_a_database_from_a_newer_agent(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    Store(state / "state.db").close()
    with sqlite3.connect(state / "state.db") as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
    result = subprocess.run([sys.executable, "-m", "labrun.agent", "--socket", str(tmp_path / "a.sock"),
                             "--state-dir", str(state)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "newer than this agent" in result.stderr and "labrund:" in result.stderr


async def test_while_a_batch_cannot_commit_status_answers_and_the_batch_lands_later(tmp_path, nursery, monkeypatch):
    """A commit that meets a full disk (SQLite rolls the batch back): the writer retries, nothing waiting on
    the batch is told anything, ``status`` still answers and names the fault, and once the disk takes
    writes again the batch (written again) commits: the submitted run exists, with its events."""
    config = load_config(None, socket=tmp_path / "a.sock", state_dir=tmp_path / "state")
    await nursery.start(lambda task_status: run_agent(config, executors={"local": FakeExecutor(FakeMachine())},
                                                      task_status=task_status))
    original = Store._commit_batch
    disk = {"full": True}

    def commit(self):
        if not disk["full"]:
            return original(self)
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")   # what SQLite does to a WAL commit that meets a full disk
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Store, "_commit_batch", commit)

    def call(op, **args):
        with AgentConnection(config.socket) as connection:
            return connection.call(op, **args)

    submitted = {}

    async def submit():
        spec = {"experiment": "full", "command": ["train"], "snapshot": {"files": []}}
        submitted.update(await trio.to_thread.run_sync(lambda: call("submit", spec=spec)))

    nursery.start_soon(submit)
    with trio.fail_after(20):
        while not (await trio.to_thread.run_sync(call, "status"))["faults"]:
            await trio.sleep(0.05)
    status = await trio.to_thread.run_sync(call, "status")
    assert [f["where"] for f in status["faults"]] == ["store"] and "disk is full" in status["faults"][0]["error"]
    await trio.sleep(1)   # retries go on; the submit is not answered: its run is not committed
    assert submitted == {}
    with sqlite3.connect(config.state_dir / "state.db") as other:
        assert other.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    disk["full"] = False   # space is back
    with trio.fail_after(20):
        while not submitted:
            await trio.sleep(0.05)
    with sqlite3.connect(config.state_dir / "state.db") as other:
        assert other.execute("SELECT run_id FROM runs").fetchall() == [(submitted["run_id"],)]
        types = [t for (t,) in other.execute("SELECT type FROM events WHERE run_id = ? ORDER BY seq",
                                            (submitted["run_id"],))]
    assert types[0] == "run.queued"
    with trio.fail_after(30):
        while (await trio.to_thread.run_sync(call, "status"))["faults"]:
            await trio.sleep(0.1)
