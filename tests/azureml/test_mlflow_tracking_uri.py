"""``Workspace.get_mlflow_tracking_uri()`` inside a run is the address that run reaches MLflow at."""

import textwrap

import pytest

from labrun import Experiment, ScriptRunConfig
from labrun.exceptions import UserErrorException

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    from labrun import Run, Workspace
    from labrun.exceptions import UserErrorException

    for name, workspace in (("context", Run.get_context().experiment.workspace), ("found", Workspace())):
        try:
            print(name, workspace.get_mlflow_tracking_uri())
        except UserErrorException as exc:
            print(name, "refused:", exc)
""")


def seen(run) -> dict:
    return dict(line.split(" ", 1) for line in run.get_log().splitlines() if line.startswith(("context ", "found ")))


def test_a_run_gets_its_own_tracking_uri(agent, tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    (source / "uri.py").write_text(SCRIPT)
    experiment = Experiment(agent.workspace(), "mlflow-uri")
    # As a container on a bridge network gets it: the host's gateway, where the agent's own is 127.0.0.1.
    config = ScriptRunConfig(str(source), script="uri.py")
    config.run_config.environment_variables = {"MLFLOW_TRACKING_URI": "http://172.17.0.1:5000"}
    run = experiment.submit(config)
    assert run.wait_for_completion()["status"] == "Completed", run.get_log()
    assert seen(run) == {"context": "http://172.17.0.1:5000", "found": "http://172.17.0.1:5000"}

    # A run without one asks the agent, which has no MLflow server here.
    plain = experiment.submit(ScriptRunConfig(str(source), script="uri.py"))
    assert plain.wait_for_completion()["status"] == "Completed", plain.get_log()
    assert all(value.startswith("refused: this labrun agent has no MLflow") for value in seen(plain).values())

    # Outside a run, the shell's variable says nothing about the agent's server.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    with pytest.raises(UserErrorException, match="no MLflow tracking server"):
        agent.workspace().get_mlflow_tracking_uri()
