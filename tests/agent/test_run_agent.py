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
