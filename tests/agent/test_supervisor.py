"""The supervisor's lifecycle logic with an in-memory executor, on trio's MockClock: no waiting, no processes."""


import pytest
import trio

from labrun.agent._config import load_config
from labrun.agent._executor import ExitResult
from labrun.agent._scheduler import Capacity
from labrun.agent._store import Store
from labrun.agent._supervisor import Owner, Supervisor



class FakeExecutor:
    """Processes are trio Events: ``finish`` ends one; ``stop`` takes ``grace`` seconds of the mock clock."""

    name = "local"

    def __init__(self):
        self.done: dict[int, trio.Event] = {}
        self.results: dict[int, ExitResult] = {}
        self.stops: list[tuple[int, float, float]] = []
        self.launches = []

    async def start(self, launch):
        pid = len(self.launches) + 1000
        self.launches.append(launch)
        self.done[pid] = trio.Event()
        return {"pid": pid, "start_time": 1}

    def finish(self, pid, result=ExitResult(exit_code=0)):
        self.results[pid] = result
        self.done[pid].set()

    async def wait(self, handle):
        await self.done[handle["pid"]].wait()
        return self.results[handle["pid"]]

    async def stop(self, handle, grace):
        self.stops.append((handle["pid"], grace, trio.current_time()))
        await trio.sleep(grace)   # as if the process ignored SIGTERM
        self.finish(handle["pid"], ExitResult(signal=9))

    async def abandon(self, handle, grace):
        pass


@pytest.fixture
async def supervisor(tmp_path, nursery, monkeypatch):
    config = load_config(None, socket=tmp_path / "s.sock", state_dir=tmp_path)
    config.stop_grace_seconds = 7
    store = Store(tmp_path / "state.db")
    executor = FakeExecutor()
    supervisor = Supervisor(config, store, Capacity(cpus=1), {"local": executor})
    await nursery.start(supervisor.run)
    supervisor.fake = executor
    yield supervisor
    store.close()


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
