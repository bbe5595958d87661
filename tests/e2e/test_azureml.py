"""The Azure ML v1 run API end to end: the documentation's three examples, environments, distributed
launches, resume_from, in-run metrics, and reading a run's files afterwards."""

import base64
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from labrun import (
    DataPath, Environment, Experiment, MpiConfiguration, PyTorchConfiguration, Run, ScriptRunConfig,
    TensorflowConfiguration, get_run,
)
from labrun.exceptions import BadRequest, UserErrorException

TARGETS = '[targets.MyCluster]\nkind = "local"\n[resources]\ncpus = 2\ngpus = ["0", "1"]\n'


@pytest.fixture
def project(tmp_path):
    src = tmp_path / "project"
    src.mkdir()
    (src / "train.py").write_text(
        "import argparse, os, sys\n"
        "p = argparse.ArgumentParser(); p.add_argument('--arg1'); p.add_argument('--arg2'); p.add_argument('--resume-from')\n"
        "a = p.parse_args()\n"
        "print('arg1', a.arg1, 'arg2', a.arg2, 'python', sys.executable, 'env', os.environ.get('EXAMPLE_ENV_VAR'))\n"
        "if a.resume_from:\n"
        "    print('resume', a.resume_from, os.environ['LABRUN_RESUME_FROM'], open(os.path.join(a.resume_from, 'state')).read())\n"
        "    print('write bits', oct(os.stat(a.resume_from).st_mode & 0o222), oct(os.stat(os.path.join(a.resume_from, 'state')).st_mode & 0o222))\n"
    )
    return src


# -- the three examples of Azure ML's ScriptRunConfig documentation -----------------------------

def test_the_three_documented_examples(make_agent, project):
    agent = make_agent(TARGETS)
    ws = agent.workspace()
    experiment = Experiment(workspace=ws, name="my-experiment")
    cluster = ws.compute_targets["MyCluster"]
    registered = Environment("MyEnvironment")
    registered.python.user_managed_dependencies = True
    assert registered.register(ws).version == "1"
    env = Environment.get(ws, name="MyEnvironment")
    assert env.version == "1" and env.python.user_managed_dependencies

    # (1) script and arguments
    src = ScriptRunConfig(source_directory=str(project), script="train.py", arguments=["--arg1", 1, "--arg2", 2.5],
                          compute_target=cluster, environment=env)
    run = experiment.submit(src)
    run.wait_for_completion()
    assert run.get_details()["target"] == "MyCluster"
    assert "arg1 1 arg2 2.5" in run.get_log() and "env EXAMPLE_VALUE" in run.get_log()

    # (2) command with a script
    src = ScriptRunConfig(source_directory=str(project), command=["python3", "train.py", "--arg1", 7],
                          compute_target=cluster, environment=env)
    run = experiment.submit(src)
    run.wait_for_completion()
    assert "arg1 7 arg2 None" in run.get_log()

    # (3) a plain command
    src = ScriptRunConfig(source_directory=str(project), command=["ls", "-l"], compute_target=cluster, environment=env)
    run = experiment.submit(src)
    assert run.wait_for_completion()["status"] == "Completed"
    assert "train.py" in run.get_log() and "outputs" in run.get_log()


def test_environment_registry_versions(agent):
    ws = agent.workspace()
    first = Environment("env-a").register(ws)
    again = Environment("env-a")
    again.environment_variables = {"X": "2"}
    second = again.register(ws)
    assert (first.version, second.version) == ("1", "2")
    assert Environment.get(ws, "env-a").environment_variables == {"X": "2"}
    assert Environment.get(ws, "env-a", version=1).environment_variables == {"EXAMPLE_ENV_VAR": "EXAMPLE_VALUE"}
    assert sorted(Environment.list(ws)) == ["env-a"]
    with pytest.raises(UserErrorException, match="Only one of version or label"):
        Environment.get(ws, "env-a", version=1, label="x")
    from labrun.exceptions import NotFound

    with pytest.raises(NotFound, match="no environment 'nope'"):
        Environment.get(ws, "nope")


# -- pip environments ---------------------------------------------------------------------------

def _wheel(directory: Path) -> Path:
    """A minimal wheel of a package with a module and a console script, made without any build tool."""
    files = {
        "tinypkg/__init__.py": b"VALUE = 'tiny-ok'\ndef main():\n    print('tiny-cli', VALUE)\n",
        "tinypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
        "tinypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        "tinypkg-1.0.dist-info/entry_points.txt": b"[console_scripts]\ntinycli = tinypkg:main\n",
    }
    record = ""
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{name},sha256={digest},{len(data)}\n"
    record += "tinypkg-1.0.dist-info/RECORD,,\n"
    path = directory / "tinypkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("tinypkg-1.0.dist-info/RECORD", record)
    return path


@pytest.mark.slow
def test_pip_environment_is_built_once_and_reused(agent, project, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"--no-index\n--find-links {wheels}\ntinypkg==1.0\n")
    env = Environment.from_pip_requirements("tiny", str(requirements))
    experiment = Experiment(agent.workspace(), "envs")
    command = ["sh", "-c", "python -c 'import tinypkg, sys; print(tinypkg.VALUE, sys.prefix)'; tinycli"]
    runs = [experiment.submit(ScriptRunConfig(str(project), command=command, environment=env)) for _ in range(2)]
    for run in runs:
        assert run.wait_for_completion()["status"] == "Completed", run.get_log()
        log = run.get_log()
        assert "tiny-ok" in log and "tiny-cli tiny-ok" in log and str(agent.state_dir / "envs") in log
    build_logs = [run.download_file("user_logs/environment_build.txt", str(tmp_path / f"b{i}.txt"))
                  for i, run in enumerate(runs)]
    texts = [Path(p).read_text() for p in build_logs]
    assert sum("labrun: building environment tiny" in t for t in texts) == 1
    assert sum("labrun: reusing environment tiny" in t for t in texts) == 1
    # A script run uses the environment's interpreter.
    script = experiment.submit(ScriptRunConfig(str(project), script="train.py", environment=env))
    script.wait_for_completion()
    assert f"python {agent.state_dir / 'envs'}" in script.get_log()


@pytest.mark.slow
def test_failed_environment_build(agent, project, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"--no-index\n--find-links {tmp_path}\nno-such-package-anywhere==9.9\n")
    run = Experiment(agent.workspace(), "envs").submit(ScriptRunConfig(
        str(project), command=["true"], environment=Environment.from_pip_requirements("broken", str(requirements))))
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed" and run._details["reason"] == "environment_build_failed"
    assert "no-such-package-anywhere" in Path(run.download_file("user_logs/environment_build.txt",
                                                                 str(tmp_path / "b.txt"))).read_text()


def test_conda_without_conda_is_a_clear_error(agent, project, tmp_path):
    if shutil.which("conda"):
        pytest.skip("this machine has conda")
    spec = tmp_path / "env.yml"
    spec.write_text("name: x\ndependencies:\n  - python=3.11\n")
    with pytest.raises(BadRequest, match="conda specification, and this machine has no 'conda' binary"):
        Experiment(agent.workspace(), "envs").submit(ScriptRunConfig(
            str(project), command=["true"], environment=Environment.from_conda_specification("c", str(spec))))


# -- distributed runs on one machine ------------------------------------------------------------

RANK_DUMP = ("import json, os\n"
             "keys = ['MASTER_ADDR', 'MASTER_PORT', 'WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'NODE_RANK', 'CUDA_VISIBLE_DEVICES', 'TF_CONFIG']\n"
             "os.makedirs('outputs', exist_ok=True)\n"
             "name = os.environ.get('RANK') or json.loads(os.environ.get('TF_CONFIG', '{}')).get('task', {}).get('type', 'x') + str(json.loads(os.environ.get('TF_CONFIG', '{}')).get('task', {}).get('index', ''))\n"
             "json.dump({k: os.environ.get(k) for k in keys}, open(f'outputs/rank_{name}.json', 'w'))\n"
             "print('hello from', name)\n")


def test_pytorch_style_launch(make_agent, project):
    agent = make_agent(TARGETS)
    (project / "dist.py").write_text(RANK_DUMP)
    run = Experiment(agent.workspace(), "dist").submit(ScriptRunConfig(
        str(project), script="dist.py", distributed_job_config=PyTorchConfiguration(process_count=2),
        resources={"gpus": 2, "cpus": 2}))
    assert run.wait_for_completion()["status"] == "Completed"
    outputs = agent.state_dir / "runs" / run.id / "outputs"
    ranks = [json.loads((outputs / f"rank_{r}.json").read_text()) for r in range(2)]
    assert {r["MASTER_ADDR"] for r in ranks} == {"127.0.0.1"} and len({r["MASTER_PORT"] for r in ranks}) == 1
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"], r["NODE_RANK"]) for r in ranks] == \
        [("0", "0", "2", "0"), ("1", "1", "2", "0")]
    assert sorted(r["CUDA_VISIBLE_DEVICES"] for r in ranks) == ["0", "1"]
    names = run.get_file_names()
    assert "user_logs/std_log_process_0.txt" in names and "user_logs/std_log_process_1.txt" in names
    assert run.get_log() == "hello from 0\n"   # std_log.txt follows rank 0


def test_one_failing_rank_fails_the_run_and_stops_the_others(agent, project):
    (project / "flaky.py").write_text("import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(4)\ntime.sleep(120)\n")
    run = Experiment(agent.workspace(), "dist").submit(ScriptRunConfig(
        str(project), script="flaky.py", distributed_job_config=PyTorchConfiguration(process_count=3)))
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed" and run._details["exit_code"] == 4


def test_tensorflow_tasks(agent, project):
    (project / "dist.py").write_text(RANK_DUMP + "import time, os\nif 'ps' in os.environ['TF_CONFIG'] and json.loads(os.environ['TF_CONFIG'])['task']['type'] == 'ps':\n    time.sleep(300)\n")
    run = Experiment(agent.workspace(), "dist").submit(ScriptRunConfig(
        str(project), script="dist.py", distributed_job_config=TensorflowConfiguration(worker_count=2)))
    assert run.wait_for_completion()["status"] == "Completed"   # the parameter server is stopped at the end
    outputs = agent.state_dir / "runs" / run.id / "outputs"
    worker = json.loads(json.loads((outputs / "rank_worker1.json").read_text())["TF_CONFIG"])
    assert worker["task"] == {"type": "worker", "index": 1} and len(worker["cluster"]["worker"]) == 2
    assert len(worker["cluster"]["ps"]) == 1 and (outputs / "rank_ps0.json").exists()


def test_mpi_and_multi_node_are_refused_clearly(agent, project):
    experiment = Experiment(agent.workspace(), "dist")
    with pytest.raises(BadRequest, match="node_count=2: this agent runs on one machine"):
        experiment.submit(ScriptRunConfig(str(project), script="train.py",
                                          distributed_job_config=PyTorchConfiguration(process_count=4, node_count=2)))
    if shutil.which("mpirun") is None:
        with pytest.raises(BadRequest, match="MPI runs need 'mpirun'"):
            experiment.submit(ScriptRunConfig(str(project), script="train.py",
                                              distributed_job_config=MpiConfiguration(process_count_per_node=2)))


# -- resume_from --------------------------------------------------------------------------------

def test_resume_from_a_local_path_and_from_a_run(agent, project, tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "state").write_text("epoch=3")
    experiment = Experiment(agent.workspace(), "resume")
    arguments = ["--arg1", "a"]
    run = experiment.submit(ScriptRunConfig(str(project), script="train.py", arguments=arguments,
                                            resume_from=str(checkpoint)))
    assert arguments == ["--arg1", "a"]
    run.wait_for_completion()
    log = run.get_log()
    copied = agent.state_dir / "runs" / run.id / "resume_from" / "ckpt"
    assert f"resume {copied} {copied} epoch=3" in log and "write bits 0o0 0o0" in log

    (project / "save.py").write_text("import os\nos.makedirs('outputs/ckpt')\nopen('outputs/ckpt/state', 'w').write('epoch=9')\n")
    first = experiment.submit(ScriptRunConfig(str(project), script="save.py"))
    first.wait_for_completion()
    second = experiment.submit(ScriptRunConfig(str(project), script="train.py",
                                               resume_from=DataPath.from_run(first, "outputs/ckpt")))
    second.wait_for_completion()
    assert "epoch=9" in second.get_log()
    with pytest.raises(BadRequest, match="has no 'outputs/nothing'"):
        experiment.submit(ScriptRunConfig(str(project), script="train.py",
                                          resume_from=DataPath.from_run(first, "outputs/nothing")))


# -- inside the run, and afterwards -------------------------------------------------------------

METRICS_SCRIPT = """
from labrun import Run
run = Run.get_context()
for i in range(2000):
    run.log('loss', 1.0 / (i + 1), step=i)
run.log('accuracy', 0.9)
run.log_list('lrs', [0.1, 0.01])
run.log_row('by_epoch', epoch=1, acc=0.5)
run.log_row('by_epoch', epoch=2, acc=0.7)
run.log_table('table', {'x': [1, 2, 3], 'y': [4, 5, 6]})
open('plot.png', 'wb').write(b'\\x89PNG\\r\\n\\x1a\\n' + b'0' * 64)
run.log_image('plot', path='plot.png')
run.tag('phase', 'train')
run.set_tags({'owner': 'lab'})
run.add_properties({'dataset': 'v1'})
try:
    run.add_properties({'dataset': 'v2'})
except Exception as exc:
    print('properties are add-only:', type(exc).__name__)
open('notes.txt', 'w').write('some notes')
run.upload_file('extra/notes.txt', 'notes.txt')
import os
os.makedirs('outputs', exist_ok=True)
open('outputs/model.bin', 'wb').write(b'weights')
run.complete()
print('done', run.id == os.environ['LABRUN_RUN_ID'])
"""


def test_in_run_metrics_and_files(agent, project, tmp_path):
    (project / "metrics.py").write_text(METRICS_SCRIPT)
    experiment = Experiment(agent.workspace(), "metrics")
    run = experiment.submit(ScriptRunConfig(str(project), script="metrics.py"))
    run.wait_for_completion()
    assert "properties are add-only: Conflict" in run.get_log() and "done True" in run.get_log()

    again = Run(experiment, run.id)
    metrics = again.get_metrics()
    assert len(metrics["loss"]) == 2000 and metrics["loss"][0] == 1.0
    assert metrics["accuracy"] == 0.9 and metrics["lrs"] == [0.1, 0.01]
    assert metrics["by_epoch"] == {"epoch": [1, 2], "acc": [0.5, 0.7]}
    assert metrics["table"] == {"x": [1, 2, 3], "y": [4, 5, 6]}
    assert metrics["plot"] == f"aml://artifactId/ExperimentRun/dcid.{run.id}/plot.png"
    assert again.get_tags() == {"phase": "train", "owner": "lab"} and again.get_properties() == {"dataset": "v1"}
    assert get_run(experiment, run.id).get_metrics(name="accuracy") == {"accuracy": 0.9}

    names = again.get_file_names()
    assert {"outputs/model.bin", "user_logs/std_log.txt", "extra/notes.txt", "plot.png"} <= set(names)
    target = again.download_file("extra/notes.txt", str(tmp_path / "n.txt"))
    assert Path(target).read_text() == "some notes"
    written = again.download_files(prefix="outputs/", output_directory=str(tmp_path / "dl"))
    assert written == [str(tmp_path / "dl" / "outputs" / "model.bin")]
    logs = again.get_all_logs(destination=str(tmp_path / "logs"))
    assert logs == [str(tmp_path / "logs" / "user_logs" / "std_log.txt")]
    details = again.get_details()
    assert set(details) >= {"runId", "target", "status", "startTimeUtc", "endTimeUtc", "properties", "logFiles",
                            "runDefinition", "submittedBy"}
    assert again.display_name == run.id

    cli = agent.cli("metrics", run.id, "--json", check=True)
    assert json.loads(cli.stdout)["accuracy"] == 0.9
    assert "loss      0.0005 (2000 values)" in agent.cli("metrics", run.id, check=True).stdout
    out = tmp_path / "cli-dl"
    agent.cli("download", run.id, "--prefix", "outputs/", "-o", str(out), check=True)
    assert (out / "outputs" / "model.bin").read_bytes() == b"weights"
    events = [e["type"] for e in agent.workspace().watch(0, run_id=run.id, follow=False)]
    assert "run.metrics_logged" in events


def test_run_token_is_bound_to_its_run_and_its_lifetime(agent, project):
    (project / "leak.py").write_text("import os\nprint(os.environ['LABRUN_RUN_TOKEN'])\n")
    experiment = Experiment(agent.workspace(), "tokens")
    run = experiment.submit(ScriptRunConfig(str(project), script="leak.py"))
    run.wait_for_completion()
    token = run.get_log().strip()
    other = experiment.submit(ScriptRunConfig(str(project), command=["sleep", "30"]))
    from labrun.exceptions import Forbidden

    for run_id in (run.id, other.id):   # expired, and another run's
        with pytest.raises(Forbidden, match="run token is not valid"):
            agent.workspace()._call("log_metrics", run_id=run_id, token=token,
                                    metrics=[{"name": "x", "kind": "scalar", "value": 1, "time": 0.0}])
    other.cancel()


def test_offline_run_prints(capsys, monkeypatch):
    for key in ("LABRUN_RUN_ID", "LABRUN_RUN_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    run = Run.get_context()
    run.log("loss", 0.5)
    run.tag("k", "v")
    assert run.id.startswith("OfflineRun_")
    out = capsys.readouterr().out
    assert "Attempted to log scalar metric loss:\n0.5" in out and "Attempted to add tag k with value v" in out
    from labrun.exceptions import RunEnvironmentException

    with pytest.raises(RunEnvironmentException, match="Could not load a submitted run"):
        Run.get_context(allow_offline=False)


def test_show_output_streams_with_azure_headers(agent, project, capsys):
    run = Experiment(agent.workspace(), "out").submit(ScriptRunConfig(str(project), command=["echo", "streamed"]))
    run.wait_for_completion(show_output=True)
    out = capsys.readouterr().out
    assert out.startswith(f"RunId: {run.id}\nWeb View: None\n\nStreaming user_logs/std_log.txt\n")
    assert "streamed\n" in out and f"Execution Summary\n=================\nRunId: {run.id}" in out


def test_metric_value_rules(agent, project):
    run = Experiment(agent.workspace(), "rules").submit(ScriptRunConfig(str(project), command=["true"]))
    run.wait_for_completion()
    with pytest.raises(UserErrorException, match="run.log does not support list type"):
        run.log("x", [1, 2])
    with pytest.raises(UserErrorException, match="InvalidColumnLength"):
        run.log_table("t", {"a": [1, 2], "b": [1]})
    run.log("owner-can-log-after", 1)
    assert run.get_metrics()["owner-can-log-after"] == 1
