"""The mirror in-process, on a real store and a real MLflow server: nesting, refusals, hostile names."""

import sys
import time

import pytest
import trio

from labrun.agent._events import EventLog
from labrun.agent._mlflow import MlflowConfig, MlflowMirror
from labrun.agent._model import RunRecord
from labrun.agent._store import Store
from tests.mlflow_server import MlflowApi, params, tags


def spec(**extra) -> dict:
    return {"experiment": "nest", "display_name": None, "script": "train.py", "arguments": ["--lr", "0.1"],
            "command": None, "tags": {}, "properties": {}, "compute_target": "local",
            "resources": {"cpus": 1, "memory": None, "gpus": 0}, "max_run_duration_seconds": 60, "priority": 0,
            **extra}


def add_run(store: Store, run_id: str, status: str, parent_id: str | None = None, **extra) -> RunRecord:
    record = RunRecord(run_id=run_id, order=0, experiment=extra.get("experiment", "nest"), number=0, uid=0, gid=0,
                       user="alice", status=status, spec=spec(**extra), environ={}, submitted_at=time.time())
    store.add_run(record, "run.queued", parent_id=parent_id)
    return record


async def mirror_until(mirror: MlflowMirror, store: Store, done) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        with trio.fail_after(120):
            while not done():
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


async def test_child_runs_are_nested_under_their_parent(tmp_path, mlflow_server):
    store = Store(tmp_path / "state.db")
    events = EventLog(store)
    (tmp_path / "runs").mkdir()
    # The child comes first in the log: its parent's MLflow run is created for it.
    child = add_run(store, "nest_1_child", "Completed", parent_id="nest_1_parent")
    store.update_run(child, "run.completed", ended_at=time.time())
    add_run(store, "nest_1_parent", "Running")
    store.add_metrics(child, [{"name": "acc@top-1", "kind": "scalar", "value": 0.5, "step": None, "time": time.time()},
                              {"name": "inf", "kind": "scalar", "value": float("inf"), "step": 3, "time": time.time()}])
    mirror = MlflowMirror(MlflowConfig(tracking_uri=mlflow_server.url), mlflow_server.url, store, events,
                          tmp_path / "runs")
    api = MlflowApi(mlflow_server.url)
    await mirror_until(mirror, store, lambda: mirror.delivered == store.last_seq())
    # (Blocking reads: the mirror has stopped, nothing else runs in this trio loop.)
    parent, nested = api.run_by_labrun_id("nest_1_parent"), api.run_by_labrun_id("nest_1_child")
    assert tags(nested)["mlflow.parentRunId"] == parent["info"]["run_id"]
    assert nested["info"]["experiment_id"] == parent["info"]["experiment_id"]
    assert "mlflow.parentRunId" not in tags(parent)
    assert nested["info"]["status"] == "FINISHED" and parent["info"]["status"] == "RUNNING"
    assert tags(nested)["mlflow.user"] == "alice"
    assert params(nested)["lr"] == "0.1"
    # Names MLflow would refuse are made acceptable rather than stalling delivery.
    assert api.history(nested["info"]["run_id"], "acc_top-1") == [(0, 0.5)]
    assert api.history(nested["info"]["run_id"], "inf") == [(3, sys.float_info.max)]   # MLflow's SQL store clamps
    assert mirror.state == "idle" and mirror.last_error is None

    # A second mirror on the same state (an agent restart) sends nothing twice and creates no second run.
    store.add_metrics(child, [{"name": "late", "kind": "scalar", "value": 1, "step": None, "time": time.time()}])
    again = MlflowMirror(MlflowConfig(tracking_uri=mlflow_server.url), mlflow_server.url, store, events,
                         tmp_path / "runs")
    await mirror_until(again, store, lambda: again.delivered == store.last_seq())
    assert api.run_by_labrun_id("nest_1_child")["info"]["run_id"] == nested["info"]["run_id"]
    assert api.history(nested["info"]["run_id"], "acc_top-1") == [(0, 0.5)]
    store.close()


async def test_a_run_deleted_in_mlflow_does_not_stop_the_others(tmp_path, mlflow_server):
    """Editing or deleting in MLflow never reaches labrun, and never stalls the mirror."""
    import httpx

    store = Store(tmp_path / "state.db")
    events = EventLog(store)
    (tmp_path / "runs").mkdir()
    first = add_run(store, "nest_2_first", "Running")
    mirror = MlflowMirror(MlflowConfig(tracking_uri=mlflow_server.url), mlflow_server.url, store, events,
                          tmp_path / "runs")
    api = MlflowApi(mlflow_server.url)
    await mirror_until(mirror, store, lambda: mirror.delivered == store.last_seq())
    twin = api.run_by_labrun_id("nest_2_first")
    httpx.post(f"{mlflow_server.url}/api/2.0/mlflow/runs/delete", json={"run_id": twin["info"]["run_id"]}).raise_for_status()

    store.add_metrics(first, [{"name": "loss", "kind": "scalar", "value": 1.0, "step": None, "time": time.time()}])
    store.update_run(first, "run.completed", status="Completed", ended_at=time.time())
    add_run(store, "nest_2_second", "Queued")
    again = MlflowMirror(MlflowConfig(tracking_uri=mlflow_server.url), mlflow_server.url, store, events,
                         tmp_path / "runs")
    await mirror_until(again, store, lambda: again.delivered == store.last_seq())
    assert api.run_by_labrun_id("nest_2_second")["info"]["status"] == "SCHEDULED"
    assert again.state == "refused" and "nest_2_first" in again.last_error
    assert store.get_run("nest_2_first").status == "Completed"   # labrun's run is untouched
    store.close()


async def test_the_experiment_id_cache_is_bounded(tmp_path, mlflow_server, monkeypatch):
    """Experiment names are the users': the mirror keeps a bounded number of their ids, and asks again."""
    monkeypatch.setattr("labrun.agent._mlflow.EXPERIMENT_CACHE", 2)
    store = Store(tmp_path / "state.db")
    (tmp_path / "runs").mkdir()
    mirror = MlflowMirror(MlflowConfig(tracking_uri=mlflow_server.url), mlflow_server.url, store, EventLog(store),
                          tmp_path / "runs")
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        ids = [await mirror._experiment_id(name) for name in ("cache-a", "cache-b", "cache-c", "cache-a")]
        nursery.cancel_scope.cancel()
    assert list(mirror._experiments) == ["cache-c", "cache-a"]
    assert ids[0] == ids[3] and len(set(ids)) == 3
    store.close()


@pytest.mark.parametrize("made_by", ["this agent", "an older agent"])
async def test_a_restart_trashes_the_ready_runs_an_earlier_agent_was_making(tmp_path, mlflow_server, made_by):
    """A run made for the pool whose creation's answer was lost is found by its name (an older agent's, by its tag)
    and put in MLflow's trash."""
    import httpx

    from labrun.agent._mlflow_pool import LEGACY_TAG, pool_name

    store = Store(tmp_path / "state.db")
    events = EventLog(store)
    (tmp_path / "runs").mkdir()
    config = MlflowConfig(tracking_uri=mlflow_server.url)
    first = MlflowMirror(config, mlflow_server.url, store, events, tmp_path / "runs")
    api = MlflowApi(mlflow_server.url)
    base = f"{mlflow_server.url}/api/2.0/mlflow/"
    name = f"pool-recovery-{made_by.replace(' ', '-')}"
    experiment_id = httpx.post(base + "experiments/create", json={"name": name}).json()["experiment_id"]
    # What the agent had done when it died: the row written, the run created, the answer never read.
    store._db.execute("INSERT INTO mlflow_pool (tracking_uri, slot, experiment, experiment_id, created_at) VALUES "
                      "(?, 'slot1', ?, ?, ?)", (first.tracking_uri, name, experiment_id, time.time()))
    marked = {"run_name": pool_name("slot1")} if made_by == "this agent" else \
        {"run_name": "labrun-reserved", "tags": [{"key": LEGACY_TAG, "value": "slot1"}]}
    made = httpx.post(base + "runs/create", json={"experiment_id": experiment_id, "start_time": 0,
                                                  **marked}).json()["run"]["info"]
    again = MlflowMirror(config, mlflow_server.url, store, events, tmp_path / "runs")
    await mirror_until(again, store, lambda: store._db.execute("SELECT count(*) FROM mlflow_pool").fetchone()[0] == 0)
    assert api.run(made["run_id"])["info"]["lifecycle_stage"] == "deleted"
    store.close()
