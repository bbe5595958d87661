"""Interactive runs and child runs, in the shape of Microsoft's v1 samples (logging-api, child runs), with
only the import line changed. Each checks what Azure ML would do: statuses, metric shapes, details."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from labrun import Experiment, Run, ScriptRunConfig, Workspace
from labrun.exceptions import AgentError

# A 1x1 PNG: log_image from a file, as the samples do with a saved plot.
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082")


def _source(tmp_path, name: str, text: str):
    """A source directory holding one script."""
    source = tmp_path / "src"
    source.mkdir()
    (source / name).write_text(text)
    return source


def _wait_for_status(run, status, timeout=20.0):
    deadline = time.monotonic() + timeout
    while run.get_status() != status:
        assert time.monotonic() < deadline, f"{run.id} is {run.get_status()}, not {status}"
        time.sleep(0.05)


def test_start_logging_with_the_logging_api(agent, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ws = agent.workspace()
    experiment = Experiment(workspace=ws, name="logging-api-test")
    run = experiment.start_logging(display_name="logging", snapshot_directory=None)
    assert run.get_status() == "Running" and run.display_name == "logging"

    run.log(name="my metric", value=0.1)
    for i in range(3):
        run.log("loss", 1.0 / (i + 1), step=i)
    run.log_list(name="Fibonacci", value=[0, 1, 1, 2, 3, 5, 8])
    run.log_list(name="one element", value=[7])
    for i in range(3):
        run.log_row(name="Cubic", x=i, y=i ** 3)
    run.log_row(name="single row", a=1, b="x")
    run.log_table(name="Sine Wave", value={"angle": [0, 1, 2], "sine": [0.0, 0.84, 0.91]})
    (tmp_path / "plot.png").write_bytes(PNG)
    run.log_image(name="plot", path="plot.png")
    os.makedirs("outputs", exist_ok=True)
    (tmp_path / "outputs" / "model.json").write_text("{}")
    run.tag("stage", "done")
    run.complete()

    assert run.get_status() == "Completed"
    metrics = run.get_metrics()
    assert metrics["my metric"] == 0.1 and metrics["loss"] == [1.0, 0.5, 1.0 / 3]
    assert metrics["Fibonacci"] == [0, 1, 1, 2, 3, 5, 8] and metrics["one element"] == 7
    assert metrics["Cubic"] == {"x": [0, 1, 2], "y": [0, 1, 8]} and metrics["single row"] == {"a": 1, "b": "x"}
    assert metrics["Sine Wave"] == {"angle": [0, 1, 2], "sine": [0.0, 0.84, 0.91]}
    assert metrics["plot"].startswith("aml://artifactId/") and metrics["plot"].endswith("plot.png")
    assert {"plot.png", "outputs/model.json"} <= set(run.get_file_names())
    details = run.get_details()
    assert details["status"] == "Completed" and details["endTimeUtc"] and details["warnings"] == []
    assert run.get_tags()["stage"] == "done"
    # The same experiment lists it, and Run.get finds it again.
    assert [r.id for r in experiment.get_runs()] == [run.id]
    assert Run.get(ws, run.id).get_status() == "Completed"


def test_with_block_completes_or_fails(agent):
    experiment = Experiment(agent.workspace(), "with-block")
    with experiment.start_logging(snapshot_directory=None) as run:
        run.log("a", 1)
    assert run.get_status() == "Completed"
    with pytest.raises(ValueError):
        with experiment.start_logging(snapshot_directory=None) as failing:
            raise ValueError("bad value")
    details = failing.get_details()
    assert details["status"] == "Failed"
    assert details["error"]["error"]["message"] == "User program failed with ValueError: bad value"
    explicit = experiment.start_logging(snapshot_directory=None)
    explicit.fail(error_details="gave up", error_code="MyCode")
    error = explicit.get_details()["error"]["error"]
    assert (error["message"], error["code"]) == ("gave up", "MyCode")


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_an_interpreter_that_exits_without_complete_leaves_the_run_failed(agent, how):
    script = (
        "import os, signal, sys\n"
        "from labrun import Experiment, Workspace\n"
        "run = Experiment(Workspace(), 'abandoned').start_logging(snapshot_directory=None)\n"
        "run.log('x', 1)\n"
        "print(run.id, flush=True)\n"
        f"{'os.kill(os.getpid(), signal.SIGKILL)' if how == 'sigkill' else 'sys.exit(0)'}\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=agent.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == (-signal.SIGKILL if how == "sigkill" else 0), result.stderr
    run = Run.get(agent.workspace(), result.stdout.strip())
    _wait_for_status(run, "Failed")
    details = run.get_details()
    assert run._details["reason"] == "client_exited"
    assert "exited without calling complete() or fail()" in details["error"]["error"]["message"]
    assert run.get_metrics() == {"x": 1}


def test_child_runs(agent):
    ws = agent.workspace()
    experiment = Experiment(ws, "child-runs")
    parent = experiment.start_logging(snapshot_directory=None)
    child = parent.child_run(name="child 1")
    child.log("c", 1)
    child.complete()
    grandchild = parent.create_children(count=3)
    assert [c.get_tags()["azureml.batch_child_number"] for c in grandchild] == ["0", "1", "2"]
    nested = grandchild[0].child_run()
    assert nested.parent.id == grandchild[0].id and child.parent.id == parent.id and parent.parent is None

    children = list(parent.get_children())
    assert [c.id for c in children] == [child.id] + [c.id for c in grandchild]
    assert {c.id for c in parent.get_children(recursive=True)} == {child.id, nested.id, *[c.id for c in grandchild]}
    assert [c.id for c in parent.get_children(status="Completed")] == [child.id]
    assert parent.get_metrics(recursive=True) == {child.id: {"c": 1}}
    # Children stay out of the experiment's run list unless asked for.
    assert [r.id for r in experiment.get_runs()] == [parent.id]
    assert len(list(Run.list(experiment, include_children=True))) == 6

    # `labrun ls` shows children under their parent.
    listing = agent.cli("ls", check=True).stdout.splitlines()
    index = next(i for i, line in enumerate(listing) if line.startswith(parent.id))
    assert listing[index + 1].lstrip().startswith("└") or listing[index + 1].lstrip().startswith("├")
    assert all(any(c.id in line for line in listing[index + 1:index + 6]) for c in [child, *grandchild, nested])

    # Cancelling the parent cancels what is still open below it.
    parent.cancel()
    assert parent.get_status() == "Canceled"
    assert [c.get_status() for c in grandchild] == ["Canceled"] * 3 and nested.get_status() == "Canceled"
    assert child.get_status() == "Completed"


def test_submit_child_and_child_runs_inside_a_script(agent, tmp_path):
    source = _source(
        tmp_path, "train.py",
        "from labrun import Run\n"
        "run = Run.get_context()\n"
        "for i in range(2):\n"
        "    child = run.child_run(name=f'fold{i}')\n"
        "    child.log('fold_acc', 0.5 + i / 10)\n"
        "    child.complete()\n"
        "run.log('acc', 0.9)\n")
    ws = agent.workspace()
    experiment = Experiment(ws, "children-in-script")
    parent = experiment.start_logging(snapshot_directory=None)
    submitted = parent.submit_child(ScriptRunConfig(str(source), script="train.py"))
    assert submitted.wait_for_completion()["status"] == "Completed", submitted.get_log()
    assert submitted.parent.id == parent.id
    folds = list(submitted.get_children())
    assert [c.display_name for c in folds] == ["fold0", "fold1"]
    assert all(c.get_status() == "Completed" for c in folds)
    assert parent.get_metrics(recursive=True) == {submitted.id: {"acc": 0.9}, folds[0].id: {"fold_acc": 0.5},
                                                   folds[1].id: {"fold_acc": 0.6}}
    parent.complete()


def test_run_attributes_and_experiment_tags(agent, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ws = Workspace.from_config()            # no config.json: this machine's agent
    assert (ws.name, ws.location) == ("local", "local")
    ws = agent.workspace()
    ws.write_config()
    config = json.loads((tmp_path / ".azureml" / "config.json").read_text())
    assert config["workspace_name"] == "local" and config["socket"] == str(agent.socket)
    again = Workspace.from_config()
    assert again.get_details()["location"] == "local" and again.get_details()["socket"] == str(agent.socket)

    experiment = Experiment(again, "attributes")
    run = experiment.start_logging(snapshot_directory=None)
    run.display_name = "renamed"
    run.description = "a description"
    assert Run.get(ws, run.id).display_name == "renamed" and Run.get(ws, run.id).description == "a description"
    assert run.get_portal_url() == f"file://{agent.state_dir / 'runs' / run.id}"
    run.complete()
    assert set(run.get_details_with_logs()["logFiles"]) == set()

    experiment.tag("team", "vision")
    experiment.set_tags({"stage": "dev"})
    assert Experiment.list(ws, experiment_name="attributes")[0].tags == {"team": "vision", "stage": "dev"}
    assert "attributes" in ws.experiments
    experiment.archive()
    assert "attributes" not in ws.experiments and experiment.archived_time is not None
    assert [e.name for e in Experiment.list(ws, view_type="ArchivedOnly")] == ["attributes"]
    experiment.reactivate()
    assert "attributes" in ws.experiments


def test_failing_a_submitted_run_from_outside(agent, tmp_path):
    source = _source(tmp_path, "sleep.py", "import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    run = Experiment(agent.workspace(), "fail-outside").submit(ScriptRunConfig(str(source), script="sleep.py"))
    _wait_for_status(run, "Running")
    run.fail("stopped by the operator")
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed" and details["error"]["error"]["message"] == "stopped by the operator"
    with pytest.raises(AgentError, match="already ended"):
        run.cancel()


def test_an_agent_restart_fails_open_interactive_runs(agent):
    run = Experiment(agent.workspace(), "restart").start_logging()
    assert "(interactive: start_logging or child_run)" in agent.cli("show", run.id, check=True).stdout
    agent.restart()
    again = Run.get(agent.workspace(), run.id)
    assert again.get_status() == "Failed" and again._details["reason"] == "agent_lost"
    # This process binds its next interactive run to the new agent.
    fresh = Experiment(agent.workspace(), "restart").start_logging()
    fresh.complete()
    assert fresh.get_status() == "Completed"


def test_the_live_run_inside_a_script(agent, tmp_path):
    source = _source(
        tmp_path, "train.py",
        "from labrun import Run\n"
        "run = Run.get_context()\n"
        "run.display_name = 'renamed inside'\n"
        "run.description = 'set inside'\n"
        "print(run.get_status(), run.parent.id, run.description, run.get_portal_url().startswith('file://'))\n")
    ws = agent.workspace()
    parent = Experiment(ws, "inside").start_logging()
    run = parent.submit_child(ScriptRunConfig(str(source), script="train.py"))
    assert run.wait_for_completion()["status"] == "Completed", run.get_log()
    assert run.get_log().split() == ["Running", parent.id, "set", "inside", "True"]
    assert Run.get(ws, run.id).display_name == "renamed inside"
    parent.complete()
