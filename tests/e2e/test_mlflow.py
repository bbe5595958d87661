"""Runs mirrored into a real MLflow tracking server (MLflow from PyPI on 127.0.0.1), checked through its REST API."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from labrun import Experiment, ScriptRunConfig
from tests.e2e.test_agent import as_nobody, nobody_client, wait_until  # noqa: F401 (a fixture)
from tests.e2e.test_docker import image  # noqa: F401 (a fixture)
from tests.mlflow_server import MlflowApi, answers, free_port, params, tags

MIRRORED = 120.0   # MLflow on a busy 2-core machine answers in tens of milliseconds, sometimes seconds


def config(url: str, **extra) -> str:
    lines = [f'tracking_uri = "{url}"', "retry_initial_seconds = 0.2", "retry_max_seconds = 1",
             *(f"{k} = {json.dumps(v)}" for k, v in extra.items())]
    return "[mlflow]\n" + "\n".join(lines) + "\n"


def source_with(tmp_path, name: str, text: str):
    source = tmp_path / "src"
    source.mkdir()
    (source / name).write_text(text)
    return source


def mirrored(agent, api: MlflowApi, run_id: str, status: str) -> dict:
    """The run's MLflow twin once the agent has mirrored all there is (a script's mlflow may set FINISHED first)."""
    found = {}

    def done():
        if agent.workspace().status()["mlflow"]["mirror"]["backlog"]:
            return False
        twin = api.run_by_labrun_id(run_id)
        found["run"] = twin
        return twin is not None and twin["info"]["status"] == status

    wait_until(done, MIRRORED, f"{run_id} {status} in MLflow")
    return found["run"]


TRAIN = """
import os, sys, time
from labrun import Run
run = Run.get_context()
print("env", {k: v for k, v in sorted(os.environ.items()) if k.startswith("MLFLOW_")})
for i in range(50):
    run.log("loss", 1.0 / (i + 1))
    run.log("acc", i / 50, step=i * 10)
run.log_list("lr_schedule", [0.1, 0.05, 0.01])
run.log_row("eval", epoch=1, f1=0.5)
run.log_row("eval", epoch=2, f1=0.75)
run.log("note", "not a number")
run.tag("phase", "train")
run.upload_file("notes/readme.txt", __file__)
os.makedirs("outputs/model", exist_ok=True)
open("outputs/model/weights.bin", "wb").write(b"w" * 1000)
os.symlink("/etc/passwd", "outputs/leak")
run.flush()
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
"""


def test_logged_metrics_params_status_and_artifacts(make_agent, mlflow_server, tmp_path):
    """Run.log/log_list/log_row reach MLflow with full history; params, tags, files; FINISHED and FAILED."""
    agent = make_agent(config(mlflow_server.url))
    api = MlflowApi(mlflow_server.url)
    source = source_with(tmp_path, "train.py", TRAIN)
    experiment = Experiment(agent.workspace(), "mirror")
    run = experiment.submit(ScriptRunConfig(str(source), script="train.py",
                                            arguments=["data.csv", "--lr", 0.01, "--epochs=3", "--verbose"]),
                            tags={"team": "vision"})
    run.wait_for_completion()
    config_failing = ScriptRunConfig(str(source), script="train.py", arguments=["--lr", 0.1])
    config_failing.run_config.environment_variables = {"EXIT_CODE": "3"}
    failed = experiment.submit(config_failing)
    failed.wait_for_completion(raise_on_error=False)

    twin = mirrored(agent, api, run.id, "FINISHED")
    info = twin["info"]
    details = agent.workspace()._call("get", run_id=run.id)
    assert info["start_time"] == int(details["submitted_at"] * 1000)   # queued runs are SCHEDULED from submit on
    assert info["end_time"] >= info["start_time"]
    assert params(twin) == {"lr": "0.01", "epochs": "3", "verbose": "true", "labrun.target": "local",
                            "labrun.cpus": "1", "labrun.gpus": "0", "labrun.max_run_duration_seconds": "2592000",
                            "labrun.priority": "0", "labrun.environment": "default-environment"}
    found_tags = tags(twin)
    assert found_tags["labrun.run_id"] == run.id
    assert found_tags["labrun.user"] == found_tags["mlflow.user"] == run.get_details()["submittedBy"]
    assert found_tags["labrun.target"] == "local"
    assert found_tags["labrun.script"] == "train.py"
    assert found_tags["labrun.command"] == "python train.py data.csv --lr 0.01 --epochs=3 --verbose"
    assert found_tags["team"] == "vision" and found_tags["phase"] == "train"
    mlflow_id = info["run_id"]
    assert api.history(mlflow_id, "loss") == [(i, pytest.approx(1.0 / (i + 1))) for i in range(50)]
    assert api.history(mlflow_id, "acc") == [(i * 10, pytest.approx(i / 50)) for i in range(50)]
    assert api.history(mlflow_id, "lr_schedule") == [(0, 0.1), (1, 0.05), (2, 0.01)]
    assert api.history(mlflow_id, "eval/f1") == [(0, 0.5), (1, 0.75)]
    assert api.history(mlflow_id, "note") == []
    timestamps = [m["timestamp"] for m in api.get("metrics/get-history", run_id=mlflow_id, metric_key="loss")["metrics"]]
    assert timestamps == sorted(timestamps) and abs(timestamps[0] / 1000 - time.time()) < 600
    # Files: outputs and uploads; the symlink out of the run directory is not followed.
    assert api.artifacts(mlflow_id) == {"outputs/model/weights.bin", "notes/readme.txt"}

    # Inside the run, mlflow's variables named this very MLflow run.
    log = run.get_log()
    assert f"'MLFLOW_RUN_ID': '{mlflow_id}'" in log
    assert f"'MLFLOW_TRACKING_URI': '{mlflow_server.url}'" in log
    assert f"'MLFLOW_EXPERIMENT_ID': '{info['experiment_id']}'" in log

    # Links: the run's page in the MLflow UI, from the client, the CLI and wait_for_completion.
    page = f"{mlflow_server.url}/#/experiments/{info['experiment_id']}/runs/{mlflow_id}"
    assert run.get_portal_url() == page
    assert "MLflow:" in (shown := agent.cli("show", run.id, check=True).stdout) and page in shown
    assert agent.workspace().get_mlflow_tracking_uri() == mlflow_server.url

    failed_twin = mirrored(agent, api, failed.id, "FAILED")
    assert failed_twin["info"]["experiment_id"] == info["experiment_id"]
    assert len(api.history(failed_twin["info"]["run_id"], "loss")) == 50


def test_wait_for_completion_prints_the_mlflow_page(make_agent, mlflow_server, tmp_path):
    agent = make_agent(config(mlflow_server.url))
    source = tmp_path / "src"
    source.mkdir()
    script = ("from labrun import ScriptRunConfig, Workspace, Experiment\n"
              f"run = Experiment(Workspace(socket={str(agent.socket)!r}), 'webview').submit("
              f"ScriptRunConfig({str(source)!r}, command=['true']))\n"
              "run.wait_for_completion(show_output=True)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=agent.env, timeout=120)
    assert out.returncode == 0, out.stderr
    head, summary = out.stdout.split("Execution Summary")
    for part in (head, summary):
        assert f"Web View: {mlflow_server.url}/#/experiments/" in part and "/runs/" in part


AUTOLOG = """
import mlflow
mlflow.autolog()
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
X, y = load_iris(return_X_y=True)
LogisticRegression(max_iter=300, C=0.5).fit(X, y)
import os
os.makedirs("outputs", exist_ok=True)
open("outputs/done.txt", "w").write("ok")
"""


def test_mlflow_autolog_with_scikit_learn_writes_into_the_same_run(make_agent, mlflow_server, tmp_path):
    agent = make_agent(config(mlflow_server.url))
    api = MlflowApi(mlflow_server.url)
    source = source_with(tmp_path, "fit.py", AUTOLOG)
    run = Experiment(agent.workspace(), "autolog").submit(
        ScriptRunConfig(str(source), script="fit.py", arguments=["--C", "0.5", "--max_iter", "300"]))
    run.wait_for_completion()
    twin = mirrored(agent, api, run.id, "FINISHED")
    found = params(twin)
    # sklearn's own params (autolog) and the script's arguments side by side; C=0.5 was logged by autolog first.
    assert found["max_iter"] == "300" and found["C"] == "0.5" and found["solver"] == "lbfgs"
    assert found["labrun.target"] == "local"
    assert tags(twin)["mlflow.autologging"] == "sklearn"
    metrics = {m["key"] for m in twin["data"]["metrics"]}
    assert {"training_score", "training_accuracy_score"} <= metrics
    files = api.artifacts(twin["info"]["run_id"])
    assert "outputs/done.txt" in files
    assert "training_confusion_matrix.png" in files   # written by autolog through MLflow's artifact proxy


SLOW = """
import os, time
from labrun import Run
run = Run.get_context()
for i in range(10):
    run.log("step_loss", float(i))
run.flush()
while not os.path.exists(os.environ["GO_FILE"]):
    time.sleep(0.05)
for i in range(10, 30):
    run.log("step_loss", float(i))
run.upload_file("late/notes.txt", __file__)
os.makedirs("outputs", exist_ok=True)
open("outputs/final.txt", "w").write("done")
"""


@pytest.mark.slow
def test_mlflow_down_mid_run_and_an_agent_restart_lose_nothing(make_agent, make_mlflow_server, tmp_path):
    server = make_mlflow_server()
    api = MlflowApi(server.url)
    agent = make_agent(config(server.url, prepare_timeout_seconds=1.0))
    source = source_with(tmp_path, "slow.py", SLOW)
    go = tmp_path / "go"
    rc = ScriptRunConfig(str(source), script="slow.py")
    rc.run_config.environment_variables = {"GO_FILE": str(go)}
    experiment = Experiment(agent.workspace(), "outage")
    run = experiment.submit(rc)
    wait_until(lambda: (twin := api.run_by_labrun_id(run.id)) is not None
               and len(api.history(twin["info"]["run_id"], "step_loss")) == 10, MIRRORED, "first metrics")
    mlflow_id = api.run_by_labrun_id(run.id)["info"]["run_id"]

    server.stop()
    go.touch()
    run.wait_for_completion()
    wait_until(lambda: agent.workspace().status()["mlflow"]["mirror"]["state"] == "retrying", 30, "retrying")
    # A run started while MLflow is known to be down starts at once, without MLflow's variables, and says so.
    t0 = time.monotonic()
    later = experiment.submit(ScriptRunConfig(str(source), command="env | grep ^MLFLOW_ || echo none"))
    later.wait_for_completion()
    assert time.monotonic() - t0 < 30
    assert "none" in later.get_log() and "did not answer in time" in later.get_log()
    assert [w["source"] for w in later.get_details()["warnings"]] == ["mlflow"]
    assert agent.cli("status", check=True).stdout.count("mlflow") >= 1

    agent.restart()   # the backlog survives the agent too
    server.start()
    twin = mirrored(agent, api, run.id, "FINISHED")
    assert twin["info"]["run_id"] == mlflow_id   # the same MLflow run, not a second one
    assert api.history(mlflow_id, "step_loss") == [(i, float(i)) for i in range(30)]
    assert api.artifacts(mlflow_id) == {"late/notes.txt", "outputs/final.txt"}
    assert mirrored(agent, api, later.id, "FINISHED") is not None
    wait_until(lambda: agent.workspace().status()["mlflow"]["mirror"]["backlog"] == 0, MIRRORED, "no backlog")


@pytest.mark.slow
def test_embedded_server_starts_with_the_agent_and_comes_back_after_being_killed(make_agent):
    port = free_port()
    agent = make_agent(f"[mlflow]\nembedded = true\nport = {port}\n")
    result = agent.cli("ui", timeout=300, check=True)
    url = result.stdout.strip()
    assert url == f"http://127.0.0.1:{port}"
    assert answers(url)
    status = agent.workspace().status()["mlflow"]
    assert status["embedded"] and status["server"]["state"] == "running"
    assert (agent.state_dir / "mlflow" / "mlflow.db").exists()
    first = status["server"]["pid"]
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: (s := agent.workspace().status()["mlflow"]["server"])["pid"] not in (None, first)
               and s["state"] == "running" and answers(url), 300, "the server back")
    assert agent.workspace().status()["mlflow"]["server"]["restarts"] == 1

    # A run mirrored into it; its page is on the embedded server.
    source = agent.root / "src"   # not the agent's root: its log changes while the snapshot is taken
    source.mkdir()
    run = Experiment(agent.workspace(), "embedded").submit(ScriptRunConfig(str(source), command=["true"]))
    run.wait_for_completion()
    twin = mirrored(agent, MlflowApi(url), run.id, "FINISHED")
    assert run.get_portal_url() == f"{url}/#/experiments/{twin['info']['experiment_id']}/runs/{twin['info']['run_id']}"

    # The agent stops it on the way out, and starts it again on the same port.
    agent.stop()
    wait_until(lambda: not answers(url), 30, "the server stopped with the agent")
    agent.start()
    assert agent.cli("ui", timeout=300, check=True).stdout.strip() == url


@pytest.mark.slow
def test_labrun_ui_starts_the_embedded_server(make_agent, nobody_client, tmp_path):
    """The agent's owner (or an admin) starts the UI with ``labrun ui``; nobody else may."""
    agent = make_agent()
    assert agent.workspace().status()["mlflow"] is None
    assert agent.cli("ui", "--no-start").returncode == 125
    if os.geteuid() == 0:
        agent.root.chmod(0o755)
        refused = as_nobody(agent, nobody_client, "from labrun import Workspace\nWorkspace()._call('ui')", tmp_path)
        assert refused.returncode != 0 and "an administrator starts one" in refused.stderr
    url = agent.cli("ui", timeout=300, check=True).stdout.strip()
    assert url.startswith("http://127.0.0.1:") and answers(url)
    agent.restart()   # remembered
    assert agent.workspace().status()["mlflow"]["tracking_uri"] == url
    wait_until(lambda: answers(url), 300, "the UI back after a restart")


PARENT = """
from labrun import Run
run = Run.get_context()
run.log("parent_loss", 0.5)
child = run.child_run(name="fold-0")
child.log("fold_acc", 0.9)
child.complete()
for i, kid in enumerate(run.create_children(count=2)):
    kid.log("batch_acc", float(i))
    kid.complete()
"""


def test_child_runs_from_the_client_api_are_nested_in_mlflow(make_agent, mlflow_server, tmp_path):
    """child_run, create_children and submit_child become MLflow nested runs with their own metrics."""
    agent = make_agent(config(mlflow_server.url))
    api = MlflowApi(mlflow_server.url)
    source = source_with(tmp_path, "parent.py", PARENT)
    (source / "child.py").write_text("from labrun import Run\nRun.get_context().log('submitted_acc', 0.75)\n")
    parent = Experiment(agent.workspace(), "nested").submit(ScriptRunConfig(str(source), script="parent.py"))
    parent.wait_for_completion()
    submitted = parent.submit_child(ScriptRunConfig(str(source), script="child.py"))
    submitted.wait_for_completion()
    children = list(parent.get_children())
    assert len(children) == 4

    parent_twin = mirrored(agent, api, parent.id, "FINISHED")
    parent_mlflow_id = parent_twin["info"]["run_id"]
    assert api.history(parent_mlflow_id, "parent_loss") == [(0, 0.5)]
    assert "mlflow.parentRunId" not in tags(parent_twin)
    logged = {}
    for child in children:
        twin = mirrored(agent, api, child.id, "FINISHED")
        assert tags(twin)["mlflow.parentRunId"] == parent_mlflow_id, child.id
        assert twin["info"]["experiment_id"] == parent_twin["info"]["experiment_id"]
        logged[child.id] = {m["key"]: m["value"] for m in twin["data"]["metrics"]}
    fold = next(c for c in children if c.display_name == "fold-0")
    assert tags(mirrored(agent, api, fold.id, "FINISHED"))["mlflow.runName"] == "fold-0"
    assert logged.pop(fold.id) == {"fold_acc": 0.9}
    assert logged.pop(submitted.id) == {"submitted_acc": 0.75}
    assert sorted(m["batch_acc"] for m in logged.values()) == [0.0, 1.0]
    # MLflow's own search for a parent's children (what its UI's nesting uses) finds all four.
    found = api.search_children(parent_twin["info"]["experiment_id"], parent_mlflow_id)
    assert {tags(r)["labrun.run_id"] for r in found} == {c.id for c in children}


POOLED = """
import os
import mlflow
print("env", os.environ.get("MLFLOW_RUN_ID"))
mlflow.log_metric("own", 2.0)   # the run's own mlflow, straight away: the run must be out of MLflow's trash
"""


def active_runs(api: MlflowApi, experiment_id: str) -> list[dict]:
    return httpx.post(api.base + "runs/search", timeout=30, json={
        "experiment_ids": [experiment_id], "run_view_type": "ACTIVE_ONLY"}).json().get("runs", [])


def test_runs_that_start_at_once_take_a_ready_mlflow_run(make_agent, mlflow_server, tmp_path):
    """A run takes an MLflow run made ahead (no round trip before it starts), shown with its own name and tags."""
    agent = make_agent(config(mlflow_server.url, pool_max_age_seconds=120))
    api = MlflowApi(mlflow_server.url)
    source = source_with(tmp_path, "pooled.py", POOLED)
    experiment = Experiment(agent.workspace(), "pooled")
    first = experiment.submit(ScriptRunConfig(str(source), script="pooled.py"))
    first.wait_for_completion()
    first_twin = mirrored(agent, api, first.id, "FINISHED")
    experiment_id = first_twin["info"]["experiment_id"]
    # The first run of the experiment waited for its own MLflow run; now runs keep starting there: a pool.
    wait_until(lambda: agent.workspace().status()["mlflow"]["mirror"]["pool_ready"] == 2, MIRRORED, "a pool")
    assert [r["info"]["run_id"] for r in active_runs(api, experiment_id)] == [first_twin["info"]["run_id"]]

    second = experiment.submit(ScriptRunConfig(str(source), script="pooled.py", arguments=["--seed", "7"]))
    second.display_name = "second"
    second.wait_for_completion()
    twin = mirrored(agent, api, second.id, "FINISHED")
    mlflow_id = twin["info"]["run_id"]
    assert f"env {mlflow_id}" in second.get_log()
    assert agent.workspace().status()["mlflow"]["mirror"]["pool_claimed"] == 1
    assert twin["info"]["lifecycle_stage"] == "active" and twin["info"]["run_name"] == "second"
    found_tags = tags(twin)
    assert "labrun.pool" not in found_tags and found_tags["mlflow.user"] == found_tags["labrun.user"]
    assert found_tags["labrun.run_id"] == second.id and found_tags["mlflow.runName"] == "second"
    assert params(twin)["seed"] == "7"
    assert api.history(mlflow_id, "own") == [(0, 2.0)]
    # MLflow cannot change a start time: a ready run is one made at most pool_max_age_seconds before the submit.
    submitted = agent.workspace()._call("get", run_id=second.id)["submitted_at"]
    assert submitted - 120 <= twin["info"]["start_time"] / 1000 <= submitted

    # Nothing else is visible in MLflow; the ready runs wait in its trash, and a restart keeps or trashes them.
    wait_until(lambda: agent.workspace().status()["mlflow"]["mirror"]["pool_ready"] == 2, MIRRORED, "refilled")
    agent.restart()
    third = experiment.submit(ScriptRunConfig(str(source), script="pooled.py"))
    third.wait_for_completion()
    third_twin = mirrored(agent, api, third.id, "FINISHED")
    assert f"env {third_twin['info']['run_id']}" in third.get_log()
    assert agent.workspace().status()["mlflow"]["mirror"]["pool_claimed"] == 1   # kept across the restart
    visible = {tags(r)["labrun.run_id"] for r in active_runs(api, experiment_id)}
    assert visible == {first.id, second.id, third.id}


DOCKER_ENV = "env | grep ^MLFLOW_ | sort; echo end"


def docker_run(agent, source, image, arguments=()):
    from labrun import DockerConfiguration, Environment

    config = ScriptRunConfig(str(source), command=DOCKER_ENV, environment=Environment.from_docker_image("bb", image),
                             docker_runtime_config=DockerConfiguration(use_docker=True, arguments=list(arguments)))
    run = Experiment(agent.workspace(), "in-docker").submit(config)
    run.wait_for_completion()
    return run


def seen(run) -> dict:
    return dict(line.split("=", 1) for line in run.get_log().splitlines() if line.startswith("MLFLOW_"))


@pytest.mark.docker
def test_docker_runs_get_mlflow_variables_they_can_use(make_agent, mlflow_server, make_mlflow_server, image,
                                                       tmp_path):
    """On the host's network as on the host; on the bridge, through the host's gateway address or not at all."""
    import subprocess

    api = MlflowApi(mlflow_server.url)
    source = source_with(tmp_path, "x.txt", "")
    agent = make_agent(config(mlflow_server.url) + "[docker]\nallow_host_network = true\n")
    host = docker_run(agent, source, image, ["--network=host"])
    twin = mirrored(agent, api, host.id, "FINISHED")
    assert seen(host) == {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_RUN_ID": twin["info"]["run_id"],
                          "MLFLOW_EXPERIMENT_ID": twin["info"]["experiment_id"]}
    # The bridge: 127.0.0.1 is the container itself, and this server listens on 127.0.0.1 only.
    bridged = docker_run(agent, source, image)
    assert seen(bridged) == {} and "cannot reach MLflow" in bridged.get_log()
    warnings = bridged.get_details()["warnings"]
    assert warnings[0]["source"] == "mlflow" and "does not listen on the host's address there" in warnings[0]["message"]
    assert mirrored(agent, api, bridged.id, "FINISHED") is not None   # mirrored all the same

    # A server that listens on every address: the container reaches it through the bridge's gateway.
    everywhere = make_mlflow_server(host="0.0.0.0")
    gateway = subprocess.run(["docker", "network", "inspect", "bridge", "--format",
                              "{{(index .IPAM.Config 0).Gateway}}"], capture_output=True, text=True,
                             check=True).stdout.strip()
    other = make_agent(config(everywhere.url))
    run = docker_run(other, source, image)
    twin = mirrored(other, MlflowApi(everywhere.url), run.id, "FINISHED")
    assert seen(run) == {"MLFLOW_TRACKING_URI": f"http://{gateway}:{everywhere.port}",
                         "MLFLOW_RUN_ID": twin["info"]["run_id"], "MLFLOW_EXPERIMENT_ID": twin["info"]["experiment_id"]}
