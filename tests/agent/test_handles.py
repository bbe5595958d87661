"""Typed, versioned handles: what the store keeps, and how an agent reads handles other versions wrote."""

import pytest

from labrun.agent.executors import HandleError
from labrun.agent.executors._docker import DockerHandle
from labrun.agent.executors._local import LocalHandle


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
