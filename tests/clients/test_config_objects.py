"""Configuration objects behave as Azure ML's do, minus its traps."""

import logging

import pytest

from labrun import (
    DockerConfiguration, Experiment, PyTorchConfiguration, RunConfiguration, ScriptRunConfig, TensorflowConfiguration,
    Workspace,
)
from labrun.exceptions import RunConfigurationException, UserErrorException


def test_defaults():
    config = ScriptRunConfig(".", script="train.py")
    assert ScriptRunConfig.MAX_DURATION_SECONDS_DEFAULT == 2592000
    assert config.run_config.target == "local" and config.run_config.max_run_duration_seconds == 2592000
    assert DockerConfiguration().shm_size == "2g" and TensorflowConfiguration().parameter_server_count == 1


def test_unknown_attribute_is_refused():
    rc = RunConfiguration()
    with pytest.raises(AttributeError, match="RunConfiguration has no attribute enviroment"):
        rc.enviroment = None
    rc.environment_variables = {"A": "1"}


def test_arguments_are_copied_not_mutated():
    arguments = ["--a", 1]
    config = ScriptRunConfig(".", script="x.py", arguments=arguments)
    config.arguments.append("--b")
    assert arguments == ["--a", 1]


def test_run_config_wins_with_a_warning(caplog):
    rc = RunConfiguration(script="a.py", arguments=["--x"])
    rc.target = "gpu-box"
    with caplog.at_level(logging.WARNING, logger="labrun"):
        config = ScriptRunConfig(".", run_config=rc, compute_target="ignored", max_run_duration_seconds=5)
    assert "will be ignored" in caplog.text
    assert config.script == "a.py" and config.arguments == ["--x"] and config.run_config is rc
    assert config.run_config.target == "gpu-box"


def test_compute_target_object_with_name():
    class Cluster:
        name = "MyCluster"

    assert ScriptRunConfig(".", script="x.py", compute_target=Cluster()).run_config.target == "MyCluster"


def test_distributed_config_type_is_checked():
    with pytest.raises(RunConfigurationException, match="must be an 'azureml.core.runconfig.TensorflowConfiguration'"):
        ScriptRunConfig(".", script="x.py", distributed_job_config="pytorch")
    with pytest.raises(RunConfigurationException, match="not a supported backend"):
        PyTorchConfiguration(communication_backend="mpi")
    assert PyTorchConfiguration("Gloo").communication_backend == "gloo"


def test_resources_keyword():
    config = ScriptRunConfig(".", command=["true"], resources={"cpus": 2, "memory": "4G", "gpus": 1}, priority=5)
    spec = config._to_spec("e")
    assert spec["resources"] == {"cpus": 2, "memory": 4 << 30, "gpus": 1} and spec["priority"] == 5
    with pytest.raises(RunConfigurationException, match="unknown key 'gpu'"):
        ScriptRunConfig(".", command=["true"], resources={"gpu": 1})


def test_command_list_is_joined_for_the_shell_as_in_azure_ml(tmp_path):
    spec = ScriptRunConfig(str(tmp_path), command=["python", "train.py", "--arg1", 3, "--rank", "$NODE_RANK"])._to_spec("e")
    assert spec["command"] == "python train.py --arg1 3 --rank $NODE_RANK" and spec["script"] is None
    assert spec["run_definition"]["command"] == spec["command"]


@pytest.mark.parametrize("name", ["", "has space", "-leading", "x" * 256, "ünï"])
def test_experiment_name_rule(name):
    with pytest.raises(UserErrorException, match="Experiment name must be between 1 and 255"):
        Experiment(Workspace(socket="/nonexistent"), name)


def test_experiment_name_ok():
    assert Experiment(Workspace(socket="/nonexistent"), "a" * 255).name == "a" * 255
