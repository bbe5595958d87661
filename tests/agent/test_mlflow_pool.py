"""The mirror's pool of ready MLflow runs, in-process, on a real store and a real MLflow server: how deep it grows
when runs start faster than it is refilled, its bound, and how it shrinks and goes when they stop."""

import contextlib

import httpx
import trio

from labrun.agent._events import EventLog
from labrun.agent._mlflow import MlflowConfig, MlflowMirror
from labrun.agent._mlflow_pool import POOL_NAME
from labrun.agent._store import Store
from tests.agent.test_mlflow_mirror import add_run


@contextlib.asynccontextmanager
async def running(tmp_path, server_url: str, **config):
    """A mirror (and its pool) running against the server while the block runs; yields the mirror."""
    store = Store(tmp_path / "state.db")
    (tmp_path / "runs").mkdir()
    mirror = MlflowMirror(MlflowConfig(tracking_uri=server_url, **config), server_url, store, EventLog(store),
                          tmp_path / "runs")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(mirror.run)
            yield mirror
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def until(condition, what: str, timeout: float = 120) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.05)
    assert condition(), what


async def pool_runs_in_mlflow(server_url: str, experiment: str) -> int:
    """MLflow runs the pool made in ``experiment`` and that no run has taken over (still named as the pool's)."""
    base = f"{server_url}/api/2.0/mlflow/"
    async with httpx.AsyncClient(timeout=30) as client:
        found = (await client.get(base + "experiments/get-by-name", params={"experiment_name": experiment})).json()
        runs = (await client.post(base + "runs/search", json={
            "experiment_ids": [found["experiment"]["experiment_id"]], "run_view_type": "ALL", "max_results": 1000,
            "filter": f"attributes.run_name LIKE '{POOL_NAME}-%'"})).json().get("runs", [])
    return len(runs)


def unclaimed(mirror: MlflowMirror) -> int:
    """The pool's runs not taken by a run: ready, or being made (its table is written before each is made)."""
    return mirror.pool._db.execute("SELECT count(*) FROM mlflow_pool WHERE run_id IS NULL").fetchone()[0]


async def test_a_pool_that_runs_find_short_grows_up_to_its_bound(tmp_path, mlflow_server):
    async with running(tmp_path, mlflow_server.url, pool_size=1, pool_max_size=4, pool_max_age_seconds=600) as mirror:
        pool = mirror.pool
        # The experiment's first run finds no pool (it waits for its own MLflow run); runs start there now: one.
        assert pool.take("grow", None, "grow_0") is None
        pool.wake()
        await until(lambda: pool.ready_count() == 1, "one ready run")
        experiment_id = pool.experiment_id("grow")
        # Runs come faster than a round trip: the first takes the ready run, each next one finds the pool short
        # of its target, which doubles, but never past pool_max_size.
        assert pool.take("grow", experiment_id, "grow_1") is not None and pool.target("grow") == 1
        assert pool.take("grow", experiment_id, "grow_2") is None and pool.target("grow") == 2
        assert pool.take("grow", experiment_id, "grow_3") is None and pool.target("grow") == 4
        assert pool.take("grow", experiment_id, "grow_4") is None and pool.target("grow") == 4
        pool.wake()
        await until(lambda: pool.ready_count() == 4 and not pool.filling, "four ready runs")
        await trio.sleep(1)   # and no more than that are made
        assert unclaimed(mirror) == 4
        assert await pool_runs_in_mlflow(mlflow_server.url, "grow") == 1 + 4   # the one taken, the four ready
        # As many runs as the target now start at once, each on a ready run, without a round trip.
        assert all(pool.take("grow", experiment_id, f"grow_{5 + i}") is not None for i in range(4))
        assert pool.target("grow") == 4


async def test_runs_started_at_a_sustained_rate_deepen_the_pool_and_take_ready_runs(tmp_path, mlflow_server):
    """Through the path a starting run takes (``run_env``): a stream of runs faster than one refill grows the pool."""
    async with running(tmp_path, mlflow_server.url, pool_size=1, pool_max_size=3, pool_max_age_seconds=600,
                       prepare_timeout_seconds=60) as mirror:
        claimed = []
        for i in range(12):
            record = add_run(mirror.store, f"rate_{i}", "Running", experiment="rate")
            before = mirror.pool_claimed
            env = await mirror.run_env(record)
            assert env is not None and env["MLFLOW_RUN_ID"]
            claimed.append(mirror.pool_claimed > before)
            await trio.sleep(0)   # the next run comes at once: well before a refill's round trips
        assert not claimed[0]   # the first run of the experiment waited for its own MLflow run
        assert mirror.pool.target("rate") == 3   # grown, to its bound
        await until(lambda: mirror.pool.ready_count() == 3 and not mirror.pool.filling, "three ready runs")
        # Taken runs were made the runs' own (out of MLflow's trash at once: the runs' own mlflow needs that).
        for i, took in enumerate(claimed):
            if took:
                entry = mirror.ledger.get(f"rate_{i}")
                await until(lambda: mirror.pool.claimed(f"rate_{i}") is None, f"rate_{i} adopted")
                async with httpx.AsyncClient(timeout=30) as client:
                    run = (await client.get(f"{mlflow_server.url}/api/2.0/mlflow/runs/get",
                                            params={"run_id": entry.mlflow_run_id})).json()["run"]
                assert run["info"]["lifecycle_stage"] == "active"
        assert any(claimed[1:])


async def test_a_pool_deeper_than_runs_need_shrinks_and_goes_when_they_stop(tmp_path, mlflow_server):
    """Ready runs that age out unclaimed bring the target down; with no run starting, nothing is kept or made."""
    max_age = 3.0
    async with running(tmp_path, mlflow_server.url, pool_size=1, pool_max_size=4,
                       pool_max_age_seconds=max_age) as mirror:
        pool = mirror.pool
        assert pool.take("shrink", None, "shrink_0") is None
        pool.wake()
        await until(lambda: pool.ready_count() == 1, "one ready run")
        experiment_id = pool.experiment_id("shrink")
        for i in (1, 2, 3):   # faster than a refill: grown to 4
            pool.take("shrink", experiment_id, f"shrink_{i}")
        assert pool.target("shrink") == 4
        pool.wake()
        # Then one run a second: fewer than four ready runs' worth within their age; those left age out.
        taken = 4
        with trio.fail_after(120):
            while pool.target("shrink") == 4:
                pool.take("shrink", experiment_id, f"shrink_{taken}")
                pool.wake()   # as the run's start does
                taken += 1
                await trio.sleep(1.0)
        assert 1 <= pool.target("shrink") < 4
        # No run starts there any more: within its age, the pool is gone and nothing more is made.
        await until(lambda: pool.target("shrink") == 0 and unclaimed(mirror) == 0 and not pool.filling,
                    "no pool", timeout=max_age * 10)
        made = await pool_runs_in_mlflow(mlflow_server.url, "shrink")
        await trio.sleep(max_age)
        assert await pool_runs_in_mlflow(mlflow_server.url, "shrink") == made
        assert unclaimed(mirror) == 0


async def test_ready_runs_whose_making_mlflow_interrupted_are_trashed_and_made_again(tmp_path, make_mlflow_server):
    """An MLflow outage while the pool fills: nothing half-made is left (in its table or visible in MLflow), and once
    MLflow answers again the pool is full."""
    server = make_mlflow_server()
    async with running(tmp_path, server.url, pool_size=3, pool_max_size=3, pool_max_age_seconds=600,
                       retry_initial_seconds=0.2) \
            as mirror:
        pool = mirror.pool
        assert pool.take("outage", None, "outage_0") is None
        pool.wake()
        await until(lambda: pool.ready_count() == 3 and not pool.filling, "a full pool")
        experiment_id = pool.experiment_id("outage")
        await trio.to_thread.run_sync(server.stop)
        for i in (1, 2, 3):   # runs take them all while MLflow is away; refilling fails part-way or at once
            assert pool.take("outage", experiment_id, f"outage_{i}") is not None
        pool.wake()
        await until(lambda: pool._failure is not None or unclaimed(mirror) > 0, "an attempt to refill")
        await trio.sleep(1)
        await trio.to_thread.run_sync(server.start)
        await until(lambda: pool.ready_count() == pool.target("outage") and not pool.filling, "refilled")
        assert mirror.pool._db.execute("SELECT count(*) FROM mlflow_pool WHERE NOT ready").fetchone()[0] == 0
        base = f"{server.url}/api/2.0/mlflow/"
        async with httpx.AsyncClient(timeout=30) as client:
            active = (await client.post(base + "runs/search", json={
                "experiment_ids": [experiment_id], "run_view_type": "ACTIVE_ONLY",
                "filter": f"attributes.run_name LIKE '{POOL_NAME}-%'"})).json().get("runs", [])
        assert active == []   # nothing made for the pool shows in MLflow's UI
