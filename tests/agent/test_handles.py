"""Typed, versioned handles: what the store keeps, and how an agent reads handles other versions wrote."""

import pytest

from labrun.agent.executors import HandleError
from labrun.agent.executors._docker import DockerHandle
from labrun.agent.executors._local import LocalHandle
from labrun.agent.executors._slurm import SlurmHandle


def test_a_handle_round_trips_through_its_stored_form():
    handle = LocalHandle(pids=(10, 11), daemons=(False, True), start_time=99, memory=1 << 30, shim=9,
                         cgroups=("/sys/fs/cgroup/pids/labrun/r",), exit_path="/state/runs/r/exit.json")
    stored = handle.to_store()
    assert stored["kind"] == "local" and stored["version"] == LocalHandle.VERSION and stored["pids"] == [10, 11]
    assert LocalHandle.from_store(stored) == handle


def test_a_handle_from_before_versions_is_upgraded():
    old = {"pid": 10, "pids": [10], "daemons": [False], "start_time": 5, "memory": None, "cgroup": "/cg/r"}
    handle = LocalHandle.from_store(old)
    assert handle.shim is None and handle.pids == (10,) and handle.cgroups == ("/cg/r",)
    assert DockerHandle.from_store({"executor": "docker", "container": "abc", "pid": None}).container == "abc"


def test_a_newer_or_foreign_handle_is_refused():
    with pytest.raises(HandleError, match="newer than this agent"):
        DockerHandle.from_store({"kind": "docker", "version": DockerHandle.VERSION + 1, "container": "abc"})
    with pytest.raises(HandleError, match="'docker' handle given to the local executor"):
        LocalHandle.from_store({"kind": "docker", "version": 1, "container": "abc"})


def test_a_slurm_handle_of_an_array_task_and_one_from_before_arrays():
    task = SlurmHandle(job_id="1234_3", run_dir="/shared/r/exp_1_abc_3", uid=1000, gid=1000, groups=(27,),
                       array_job="1234")
    assert SlurmHandle.from_store(task.to_store()) == task and task.to_store()["version"] == 2
    old = {"kind": "slurm", "version": 1, "job_id": "77", "run_dir": "/shared/r/x", "uid": 1000, "gid": 1000,
           "groups": []}
    assert SlurmHandle.from_store(old) == SlurmHandle(job_id="77", run_dir="/shared/r/x", uid=1000, gid=1000)
