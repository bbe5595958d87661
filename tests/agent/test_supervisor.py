"""The supervisor's lifecycle logic with the in-memory executor, on trio's MockClock: no waiting, no processes.

``Harness`` can stop a supervisor (as a stopped or killed agent would: its tasks return and
the fake processes keep running) and start another on the same store and fake machine, so
recovery is tested here too.
"""

import sqlite3

import pytest
import trio

from labrun.agent._config import load_config
from labrun.agent.executors import ExitResult, FakeExecutor, FakeMachine
from labrun.agent._scheduler import Capacity
from labrun.agent._store import Store
from labrun.agent._supervisor import Owner, Supervisor


class Harness:
    def __init__(self, tmp_path, nursery):
        self.config = load_config(None, socket=tmp_path / "s.sock", state_dir=tmp_path)
        self.config.stop_grace_seconds = 7
        self.store = Store(tmp_path / "state.db")
        self.machine = FakeMachine()
        self.nursery = nursery
        self.cpus = 1

    async def start(self) -> Supervisor:
        executor = FakeExecutor(self.machine)
        supervisor = Supervisor(self.config, self.store, Capacity(cpus=self.cpus), {"local": executor})
        supervisor.fake = executor
        supervisor.scope = trio.CancelScope()
        supervisor.stopped = trio.Event()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            try:
                with supervisor.scope:
                    await supervisor.run(task_status=task_status)
            finally:
                supervisor.stopped.set()

        await self.nursery.start(run)
        return supervisor

    async def stop(self, supervisor: Supervisor) -> None:
        """As an agent stopping (or killed): the supervisor's tasks end, the runs' processes do not."""
        supervisor.scope.cancel()
        await supervisor.stopped.wait()


@pytest.fixture
async def harness(tmp_path, nursery):
    harness = Harness(tmp_path, nursery)
    yield harness
    harness.store.close()


@pytest.fixture
async def supervisor(harness):
    return await harness.start()


def spec(**changes):
    return {"experiment": "e", "display_name": None, "script": None, "arguments": [], "command": ["x"],
            "interpreter": None, "snapshot": {"files": [], "in_place": None}, "environ": {"A": "1"},
            "environment_variables": {"B": "2"}, "max_run_duration_seconds": 3600, "tags": {}, "properties": {},
            "resources": {"cpus": 1, "memory": None, "gpus": 0}, "priority": 0, "compute_target": "local",
            "environment": None, "distributed": None, "resume_from": None, "docker": None, **changes}


OWNER = Owner(uid=0, gid=0, user="root", groups=[0])


async def settle(supervisor, run_id, status):
    while supervisor.store.get_run(run_id).status != status:
        await supervisor.changed.wait()
    return supervisor.store.get_run(run_id)


async def test_duration_limit_fires_on_time(supervisor, autojump_clock):
    record = await supervisor.submit(spec(max_run_duration_seconds=3600), OWNER)
    started = trio.current_time()
    final = await settle(supervisor, record.run_id, "Canceled")
    pid, grace, stop_time = supervisor.fake.stops[0]
    assert stop_time - started == pytest.approx(3600, abs=0.01) and grace == 7
    assert trio.current_time() - started == pytest.approx(3607, abs=0.01)
    assert final.reason == "max_run_duration_exceeded" and final.signal == 9


async def test_cancel_goes_through_cancel_requested(supervisor, autojump_clock):
    record = await supervisor.submit(spec(), OWNER)
    await settle(supervisor, record.run_id, "Running")
    supervisor.cancel(record)
    assert supervisor.store.get_run(record.run_id).status == "CancelRequested"
    final = await settle(supervisor, record.run_id, "Canceled")
    assert final.reason == "canceled"
    events = [e["type"] for e in supervisor.store.events_since(0)]
    assert events == ["run.queued", "run.preparing", "run.starting", "run.started", "run.cancel_requested",
                      "run.canceled"]


async def test_exit_codes_and_environment(supervisor, autojump_clock):
    ok = await supervisor.submit(spec(), OWNER)
    await settle(supervisor, ok.run_id, "Running")
    launch = supervisor.fake.launches[0]
    assert launch.env["A"] == "1" and launch.env["B"] == "2" and launch.env["LABRUN_RUN_ID"] == ok.run_id
    supervisor.fake.finish(1000)
    assert (await settle(supervisor, ok.run_id, "Completed")).exit_code == 0
    bad = await supervisor.submit(spec(), OWNER)
    await settle(supervisor, bad.run_id, "Running")
    supervisor.fake.finish(1001, ExitResult(exit_code=2))
    final = await settle(supervisor, bad.run_id, "Failed")
    assert (final.reason, final.error) == ("exit_code", "exited with code 2")


async def test_one_cpu_runs_one_at_a_time(supervisor, autojump_clock):
    first = await supervisor.submit(spec(), OWNER)
    second = await supervisor.submit(spec(), OWNER)
    await settle(supervisor, first.run_id, "Running")
    await trio.sleep(100)
    assert supervisor.store.get_run(second.run_id).status == "Queued"
    assert supervisor.live_record(second.run_id).waiting == {"reason": "resources", "position": 1}
    supervisor.fake.finish(1000)
    await settle(supervisor, second.run_id, "Running")


async def test_a_failed_start_fails_the_run_and_says_why_in_its_log(supervisor, autojump_clock):
    supervisor.fake.machine.fail_next = "cannot start 'x': No such file or directory"
    record = await supervisor.submit(spec(), OWNER)
    final = await settle(supervisor, record.run_id, "Failed")
    assert final.reason == "start_failed" and "No such file" in final.error
    log = supervisor.config.state_dir / "runs" / record.run_id / "logs" / "std_log.txt"
    assert "labrun: cannot start 'x'" in log.read_text()


async def test_cancel_while_preparing_never_starts_the_run(harness, autojump_clock, monkeypatch):
    supervisor = await harness.start()
    preparing = trio.Event()

    async def slow_prepare(preparation):
        preparing.set()
        await trio.sleep(1000)

    monkeypatch.setattr(supervisor.fake, "prepare", slow_prepare)
    record = await supervisor.submit(spec(), OWNER)
    await preparing.wait()
    supervisor.cancel(record)
    final = await settle(supervisor, record.run_id, "Canceled")
    assert final.reason == "canceled" and harness.machine.launches == [] and final.exit_code is None


async def test_cancel_while_starting_stops_what_was_started(harness, autojump_clock, monkeypatch):
    # The executor has spawned the run's processes and is still waiting for them to report in.
    supervisor = await harness.start()
    spawned = trio.Event()
    start = supervisor.fake.start

    async def slow_start(launch):
        handle = await start(launch)
        spawned.set()
        await trio.sleep(5)
        return handle

    monkeypatch.setattr(supervisor.fake, "start", slow_start)
    record = await supervisor.submit(spec(), OWNER)
    await spawned.wait()
    supervisor.cancel(record)
    final = await settle(supervisor, record.run_id, "Canceled")
    assert final.reason == "canceled"
    assert harness.machine.running() == [] and [pid for pid, _, _ in harness.machine.stops] == [1000]


# -- recovery: a supervisor stops, another starts on the same store and machine ----------

async def test_a_live_run_is_reattached_and_ends_with_its_real_exit_code(harness, autojump_clock):
    first = await harness.start()
    record = await first.submit(spec(), OWNER)
    await settle(first, record.run_id, "Running")
    await harness.stop(first)
    assert harness.machine.running() == [1000]   # stopping the agent left the run running
    second = await harness.start()
    assert second.store.get_run(record.run_id).status == "Running"
    harness.machine.finish(1000, ExitResult(exit_code=3))
    final = await settle(second, record.run_id, "Failed")
    assert (final.exit_code, final.reason) == (3, "exit_code")
    assert len(harness.machine.launches) == 1   # never started twice


async def test_a_run_that_ended_while_the_agent_was_away_gets_its_exit_status(harness, autojump_clock):
    first = await harness.start()
    record = await first.submit(spec(), OWNER)
    await settle(first, record.run_id, "Running")
    await harness.stop(first)
    harness.machine.finish(1000, ExitResult(exit_code=0))
    second = await harness.start()   # started: recovery is done
    final = second.store.get_run(record.run_id)
    assert final.status == "Completed" and final.exit_code == 0 and final.reason is None


async def test_a_run_whose_process_is_gone_is_lost(harness, autojump_clock):
    first = await harness.start()
    record = await first.submit(spec(), OWNER)
    await settle(first, record.run_id, "Running")
    await harness.stop(first)
    harness.machine.vanish(1000)
    second = await harness.start()
    final = second.store.get_run(record.run_id)
    assert final.status == "Failed" and final.reason == "agent_lost"


async def test_the_time_limit_holds_across_a_restart(harness, autojump_clock):
    first = await harness.start()
    record = await first.submit(spec(max_run_duration_seconds=3600), OWNER)
    started = await settle(first, record.run_id, "Running")
    await harness.stop(first)
    # As if the agent had been away for 3000 of the run's 3600 seconds.
    harness.store.update_run(started, None, started_at=started.started_at - 3000)
    second = await harness.start()
    restarted = trio.current_time()
    final = await settle(second, record.run_id, "Canceled")
    pid, grace, stop_time = harness.machine.stops[0]
    assert stop_time - restarted == pytest.approx(600, abs=5)
    assert final.reason == "max_run_duration_exceeded" and final.signal == 9


async def test_a_cancel_asked_before_the_restart_is_carried_out_after(harness, autojump_clock):
    first = await harness.start()
    record = await first.submit(spec(), OWNER)
    running = await settle(first, record.run_id, "Running")
    await harness.stop(first)
    # As if the agent was killed right after recording the cancel, before stopping the run.
    harness.store.update_run(running, "run.cancel_requested", {"status": "CancelRequested"},
                             status="CancelRequested", reason="canceled")
    second = await harness.start()
    final = await settle(second, record.run_id, "Canceled")
    assert final.reason == "canceled" and harness.machine.running() == []


async def test_the_run_token_stays_valid_across_a_restart(harness, autojump_clock):
    first = await harness.start()
    record = await first.submit(spec(), OWNER)
    await settle(first, record.run_id, "Running")
    token = harness.machine.launches[0].env["LABRUN_RUN_TOKEN"]
    assert first.token_valid(record.run_id, token)
    await harness.stop(first)
    second = await harness.start()
    assert second.token_valid(record.run_id, token) and not second.token_valid(record.run_id, token + "x")
    harness.machine.finish(1000)
    await settle(second, record.run_id, "Completed")
    assert not second.token_valid(record.run_id, token)


async def test_recovered_runs_hold_their_resources_before_anything_is_scheduled(harness, autojump_clock):
    first = await harness.start()
    running = await first.submit(spec(), OWNER)
    await settle(first, running.run_id, "Running")
    queued = [await first.submit(spec(), OWNER) for _ in range(3)]
    await harness.stop(first)
    second = await harness.start()
    await trio.sleep(10)
    assert [second.store.get_run(r.run_id).status for r in queued] == ["Queued"] * 3   # one CPU, still taken
    for pid in (1000, 1001, 1002):
        harness.machine.finish(pid)
        await trio.sleep(1)
    # The queue kept its order: each starts when the one before it has finished.
    assert [launch.run_id for launch in harness.machine.launches] == [running.run_id] + [r.run_id for r in queued]


async def test_events_have_no_gap_across_a_restart(harness, autojump_clock):
    first = await harness.start()
    record = await first.submit(spec(), OWNER)
    await settle(first, record.run_id, "Running")
    await harness.stop(first)
    second = await harness.start()
    harness.machine.finish(1000)
    await settle(second, record.run_id, "Completed")
    events = harness.store.events_since(0)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events] == ["run.queued", "run.preparing", "run.starting", "run.started",
                                           "run.finalizing", "run.completed"]


async def test_runs_of_an_executor_the_local_scheduler_does_not_count_need_no_local_cpu(harness, autojump_clock):
    from labrun.agent._config import TargetConfig
    from labrun.agent.executors import Capabilities

    harness.config.targets["cluster"] = TargetConfig(name="cluster", kind="remote")
    supervisor = await harness.start()
    supervisor.executors["remote"] = FakeExecutor(harness.machine, kind="remote",
                                                  capabilities=Capabilities(counted_locally=False))
    local = await supervisor.submit(spec(), OWNER)
    await settle(supervisor, local.run_id, "Running")   # the only local CPU is taken
    remote = [await supervisor.submit(spec(compute_target="cluster", resources={"cpus": 64, "memory": None, "gpus": 0}),
                                      OWNER) for _ in range(2)]
    for record in remote:
        assert (await settle(supervisor, record.run_id, "Running")).allocation["cpus"] == 0


async def test_a_hundred_running_runs_are_recovered_with_their_allocations(harness, autojump_clock):
    harness.cpus = 100
    first = await harness.start()
    records = [await first.submit(spec(), OWNER) for _ in range(100)]
    for record in records:
        await settle(first, record.run_id, "Running")
    before = {r.run_id: harness.store.get_run(r.run_id).allocation for r in records}
    await harness.stop(first)
    second = await harness.start()
    assert len(second.active) == 100 and len(harness.machine.launches) == 100
    assert {run_id: active.allocation.to_wire() for run_id, active in second.active.items()} == before
    extra = await second.submit(spec(), OWNER)
    await trio.sleep(10)
    assert second.store.get_run(extra.run_id).status == "Queued"   # all 100 CPUs are still taken


async def test_an_executor_that_cannot_tell_keeps_its_run_and_new_runs_wait_for_recovery(harness, autojump_clock,
                                                                                          monkeypatch):
    harness.cpus = 2
    first = await harness.start()
    record = await first.submit(spec(), OWNER)
    await settle(first, record.run_id, "Running")
    await harness.stop(first)
    queued = await first.submit(spec(), OWNER)   # stored; the next supervisor finds it queued

    async def no_answer(self, handle):
        await trio.sleep_forever()

    monkeypatch.setattr(FakeExecutor, "recover", no_answer)
    began = trio.current_time()
    second = await harness.start()   # started once recovery gave up waiting
    assert trio.current_time() - began == pytest.approx(60, abs=1)
    await settle(second, queued.run_id, "Running")
    harness.machine.finish(1000, ExitResult(exit_code=4))
    assert (await settle(second, record.run_id, "Failed")).exit_code == 4   # watched as live all along


async def test_an_array_whose_submit_fails_leaves_no_run_directory(supervisor, autojump_clock, monkeypatch):
    def disk_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(supervisor.store, "add_array", disk_full)
    with pytest.raises(sqlite3.OperationalError):
        await supervisor.submit_array(spec(), OWNER, {"indices": [1, 2, 3], "throttle": 0})
    state_dir = supervisor.config.state_dir
    assert list((state_dir / "runs").iterdir()) == []
    assert supervisor.store.list_runs() == []
