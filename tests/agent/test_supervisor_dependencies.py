"""Dependencies and arrays in the supervisor, with the in-memory executor on trio's MockClock."""

from labrun.agent.executors import ExitResult
from tests.agent.test_supervisor import OWNER, harness, settle, spec, supervisor  # noqa: F401


async def test_a_canceled_dependency_cancels_the_afterok_chain_at_once(supervisor, autojump_clock):
    blocker = await supervisor.submit(spec(), OWNER)   # holds the only CPU
    first = await supervisor.submit(spec(), OWNER)
    second = await supervisor.submit(spec(afterok=[first.run_id]), OWNER)
    third = await supervisor.submit(spec(afterok=[second.run_id]), OWNER)
    anyway = await supervisor.submit(spec(after=[second.run_id]), OWNER)
    await settle(supervisor, blocker.run_id, "Running")
    assert supervisor.live_record(third.run_id).waiting == {"reason": "dependency", "position": 3,
                                                            "on": [second.run_id]}
    supervisor.cancel(supervisor.live_record(first.run_id))
    for run in (second, third):
        final = await settle(supervisor, run.run_id, "Canceled")
        assert final.reason == "dependency_failed" and final.started_at is None
    assert supervisor.waiting_on_others == {anyway.run_id}
    supervisor.fake.finish(1000)
    await settle(supervisor, anyway.run_id, "Running")   # --after: whatever the outcome


async def test_after_waits_for_every_run_listed(supervisor, autojump_clock):
    first = await supervisor.submit(spec(), OWNER)
    second = await supervisor.submit(spec(), OWNER)
    last = await supervisor.submit(spec(after=[first.run_id, second.run_id]), OWNER)
    await settle(supervisor, first.run_id, "Running")
    supervisor.fake.finish(1000, ExitResult(exit_code=1))
    await settle(supervisor, second.run_id, "Running")
    assert supervisor.live_record(last.run_id).waiting["on"] == [second.run_id]
    supervisor.fake.finish(1001)
    await settle(supervisor, last.run_id, "Running")


async def test_array_runs_see_their_index(supervisor, autojump_clock):
    runs = await supervisor.submit_array(spec(), OWNER, {"indices": [3, 7], "throttle": 1})
    array_id = runs[0].spec["array"]["id"]
    assert [r.run_id for r in runs] == [f"{array_id}_3", f"{array_id}_7"]
    assert supervisor.store.array_members(array_id) == [r.run_id for r in runs]
    await settle(supervisor, runs[0].run_id, "Running")
    assert supervisor.live_record(runs[1].run_id).waiting["reason"] in ("array_limit", "resources")
    env = supervisor.fake.launches[0].env
    assert (env["LABRUN_ARRAY_ID"], env["LABRUN_ARRAY_INDEX"], env["SLURM_ARRAY_TASK_ID"],
            env["SLURM_ARRAY_TASK_COUNT"]) == (array_id, "3", "3", "2")
