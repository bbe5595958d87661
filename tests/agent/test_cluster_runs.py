"""A run on a target with a queue of its own (a Slurm cluster), through the supervisor, with a fake cluster."""

import trio

from labrun.agent._config import TargetConfig
from labrun.agent.executors import Capabilities, ExitResult, FakeExecutor
from tests.agent.test_supervisor import OWNER, harness, settle, spec  # noqa: F401

CLUSTER = Capabilities(gpus=True, distributed=True, counted_locally=False, outlives_agent=True, own_queue=True)


class FakeCluster(FakeExecutor):
    """A fake process that first waits in the cluster's queue until the test lets it run."""

    def __init__(self, machine):
        super().__init__(machine, kind="cluster", capabilities=CLUSTER)
        self.admitted: dict[int, trio.Event] = {}

    def let_run(self, pid: int) -> None:
        self.admitted.setdefault(pid, trio.Event()).set()

    async def wait(self, handle, progress=None) -> ExitResult:
        if progress is None:   # waiting for a stopped run's end
            return await super().wait(handle)
        admitted = self.admitted.setdefault(handle.fake_pid, trio.Event())
        if not admitted.is_set():
            await progress("Queued", {"reason": "cluster: Resources", "job_id": str(handle.fake_pid)})
            await admitted.wait()
        await progress("Running", None)
        return await super().wait(handle)


async def start(harness):
    harness.config.targets["cluster"] = TargetConfig(name="cluster", kind="cluster")
    supervisor = await harness.start()
    supervisor.executors["cluster"] = cluster = FakeCluster(harness.machine)
    return supervisor, cluster


def cluster_spec(**changes):
    return spec(compute_target="cluster", resources={"cpus": 64, "memory": None, "gpus": 4}, **changes)


async def test_a_cluster_run_waits_in_the_clusters_queue_then_runs_with_a_local_runs_events(harness, autojump_clock):
    supervisor, cluster = await start(harness)
    record = await supervisor.submit(cluster_spec(), OWNER)   # bigger than this machine: the cluster's
    await settle(supervisor, record.run_id, "Queued")
    while (supervisor.live_record(record.run_id).waiting or {}).get("reason") != "cluster: Resources":
        await supervisor.changed.wait()
    assert supervisor.live_record(record.run_id).waiting["position"] is None
    await trio.sleep(7200)   # waiting in the cluster's queue does not count against the time limit (3600 s)
    cluster.let_run(1000)
    await settle(supervisor, record.run_id, "Running")
    assert supervisor.live_record(record.run_id).waiting is None
    cluster.finish(1000)
    await settle(supervisor, record.run_id, "Completed")
    types = [e["type"] for e in harness.store.events_since(0) if e["run_id"] == record.run_id]
    assert types == ["run.queued", "run.preparing", "run.queued", "run.starting", "run.started", "run.finalizing",
                     "run.completed"]


async def test_a_cluster_runs_time_limit_counts_from_running(harness, autojump_clock):
    supervisor, cluster = await start(harness)
    record = await supervisor.submit(cluster_spec(max_run_duration_seconds=600), OWNER)
    await settle(supervisor, record.run_id, "Queued")
    await trio.sleep(1000)
    cluster.let_run(1000)
    await settle(supervisor, record.run_id, "Running")
    began = trio.current_time()
    final = await settle(supervisor, record.run_id, "Canceled")
    assert final.reason == "max_run_duration_exceeded"
    assert cluster.stops[0][2] - began == 600


async def test_an_end_reported_by_the_cluster_takes_the_same_steps(harness, autojump_clock):
    """Canceled by the cluster itself (Slurm's TIMEOUT) goes through CancelRequested, as a cancel here does."""
    supervisor, cluster = await start(harness)
    record = await supervisor.submit(cluster_spec(), OWNER)
    cluster.let_run(1000)
    await settle(supervisor, record.run_id, "Running")
    cluster.finish(1000, ExitResult(signal=15, status="Canceled", reason="max_run_duration_exceeded",
                                    error="canceled: the run exceeded its time limit (Slurm: TIMEOUT)"))
    final = await settle(supervisor, record.run_id, "Canceled")
    assert (final.reason, final.signal) == ("max_run_duration_exceeded", 15)
    types = [e["type"] for e in harness.store.events_since(0) if e["run_id"] == record.run_id]
    assert types[-2:] == ["run.cancel_requested", "run.canceled"]


async def test_local_runs_do_not_wait_for_cluster_runs(harness, autojump_clock):
    harness.config.resources.max_concurrent_runs = 1
    supervisor, cluster = await start(harness)
    supervisor.capacity = supervisor.capacity.__class__(cpus=1, max_runs=1)
    remote = [await supervisor.submit(cluster_spec(), OWNER) for _ in range(3)]
    local = await supervisor.submit(spec(), OWNER)
    await settle(supervisor, local.run_id, "Running")
    for record in remote:
        await settle(supervisor, record.run_id, "Queued")
    assert all(supervisor.store.get_run(r.run_id).handle for r in remote)   # all three are in the cluster's queue


class FakeArrayCluster(FakeCluster):
    """A cluster that runs an array as one job of its own (Slurm's job arrays), and stops one as a whole."""

    capabilities = Capabilities(**{**CLUSTER.__dict__, "arrays": True})

    def __init__(self, machine):
        super().__init__(machine)
        self.capabilities = FakeArrayCluster.capabilities
        self.arrays: list[tuple[list[str], int]] = []
        self.together: list[list[int]] = []

    async def start_array(self, launches, throttle):
        self.arrays.append(([launch.run_id for launch in launches], throttle))
        return [await self.start(launch) for launch in launches]

    def stopping_together(self, handles):
        self.together.append(sorted(handle.fake_pid for handle in handles))


async def test_an_array_starts_as_one_job_of_the_cluster_with_its_limit_and_is_canceled_together(harness,
                                                                                                 autojump_clock):
    harness.config.targets["cluster"] = TargetConfig(name="cluster", kind="cluster")
    supervisor = await harness.start()
    supervisor.executors["cluster"] = cluster = FakeArrayCluster(harness.machine)
    records = await supervisor.submit_array(cluster_spec(), OWNER, {"indices": [1, 2, 3, 4], "throttle": 2})
    while not all(r.run_id in supervisor.active and supervisor.active[r.run_id].handle for r in records):
        await trio.sleep(0.1)
    # All four at once, in one job, with the limit left to the cluster (here: nothing local holds them back).
    assert cluster.arrays == [([r.run_id for r in records], 2)]
    cluster.let_run(1000)
    cluster.let_run(1003)
    await settle(supervisor, records[0].run_id, "Running")
    cluster.finish(1003)   # the last one ends by itself first
    await settle(supervisor, records[3].run_id, "Completed")

    canceled = supervisor.cancel_array([harness.store.get_run(r.run_id) for r in records])
    assert [r.run_id for r in canceled] == [r.run_id for r in records[:3]]   # not the one that ended
    assert cluster.together == [[1000, 1001, 1002]]
    for record in records[:3]:
        assert (await settle(supervisor, record.run_id, "Canceled")).reason == "canceled"


async def test_an_array_member_canceled_while_its_array_is_prepared_is_not_started(harness, autojump_clock):
    harness.config.targets["cluster"] = TargetConfig(name="cluster", kind="cluster")
    supervisor = await harness.start()
    supervisor.executors["cluster"] = cluster = FakeArrayCluster(harness.machine)
    prepare = cluster.prepare

    async def slow_prepare(preparation):
        await trio.sleep(10)
        return await prepare(preparation)

    cluster.prepare = slow_prepare
    records = await supervisor.submit_array(cluster_spec(), OWNER, {"indices": [0, 1], "throttle": 0})
    await settle(supervisor, records[1].run_id, "Preparing")
    supervisor.cancel(supervisor.live_record(records[1].run_id))
    assert (await settle(supervisor, records[1].run_id, "Canceled")).started_at is None
    while harness.store.get_run(records[0].run_id).handle is None:
        await trio.sleep(0.1)
    assert cluster.arrays == [([records[0].run_id], 0)]
