"""Training samples in the shape of Microsoft's v1 notebooks (train-on-local, the 1.0-era RunConfiguration
form, distributed PyTorch and TensorFlow), with only the import line changed and synthetic data."""

import json
import os
import textwrap
from pathlib import Path

import pytest

from labrun import Environment, Experiment, PyTorchConfiguration, ScriptRunConfig, TensorflowConfiguration
from labrun.exceptions import ActivityFailedException
from labrun.runconfig import RunConfiguration

# A ridge regression on synthetic data, standard library only, as train-on-local's train.py does with sklearn.
TRAIN = textwrap.dedent("""
    import argparse, json, os, pickle, random
    from labrun.run import Run

    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    if args.alpha < 0:
        raise ValueError(f"alpha must not be negative, got {args.alpha}")
    run = Run.get_context()
    random.seed(0)
    xs = [random.random() for _ in range(200)]
    ys = [3 * x + random.gauss(0, 0.1) for x in xs]
    w = 0.0
    for epoch in range(args.epochs):
        for x, y in zip(xs, ys):
            w -= 0.1 * ((w * x - y) * x + args.alpha * w / len(xs))
        mse = sum((w * x - y) ** 2 for x, y in zip(xs, ys)) / len(xs)
        run.log("mse", mse)
    run.log("alpha", args.alpha)
    os.makedirs("outputs", exist_ok=True)
    with open("outputs/ridge_{}.pkl".format(args.alpha), "wb") as f:
        pickle.dump({"w": w}, f)
    print("python", os.environ.get("VIRTUAL_ENV"), "weight", round(w, 2))
""")


@pytest.fixture
def project(tmp_path):
    source = tmp_path / "project"
    source.mkdir()
    (source / "train.py").write_text(TRAIN)
    return source


def test_train_on_local_with_a_user_managed_environment(agent, project, capsys):
    ws = agent.workspace()
    print(ws.name, ws.resource_group, ws.location, ws.subscription_id, sep="\n")
    experiment = Experiment(workspace=ws, name="train-on-local")
    user_managed_env = Environment("user-managed-env")
    user_managed_env.python.user_managed_dependencies = True
    src = ScriptRunConfig(source_directory=str(project), script="train.py", arguments=["--alpha", 0.3, "--epochs", 2],
                          environment=user_managed_env)
    run = experiment.submit(src)
    details = run.wait_for_completion(show_output=True)
    assert details["status"] == "Completed"
    assert "weight 2." in capsys.readouterr().out

    metrics = run.get_metrics()
    assert len(metrics["mse"]) == 2 and metrics["alpha"] == 0.3
    assert "outputs/ridge_0.3.pkl" in run.get_file_names()
    definition = details["runDefinition"]
    assert definition["script"] == "train.py" and definition["arguments"] == ["--alpha", 0.3, "--epochs", 2]
    assert (definition["target"], definition["framework"], definition["communicator"], definition["nodeCount"]) == \
        ("local", "Python", "None", 1)
    assert definition["environment"]["python"]["userManagedDependencies"] is True
    assert definition["maxRunDurationSeconds"] == 2592000 and definition["docker"]["useDocker"] is False
    log_path = details["logFiles"]["user_logs/std_log.txt"]
    assert os.path.isabs(log_path) and "weight" in Path(log_path).read_text()


def test_the_1_0_era_run_configuration_form(agent, project):
    ws = agent.workspace()
    run_config_user_managed = RunConfiguration()
    run_config_user_managed.environment.python.user_managed_dependencies = True
    assert run_config_user_managed.environment.docker.base_image.startswith("mcr.microsoft.com/azureml/")
    assert run_config_user_managed.environment.docker.base_image_registry.address is None
    run_config_user_managed.target = "local"
    run_config_user_managed.environment_variables = {"EPOCH_HINT": "1"}
    src = ScriptRunConfig(source_directory=str(project), script="train.py", run_config=run_config_user_managed)
    run = Experiment(workspace=ws, name="sklearn-mnist").submit(config=src)
    assert run.wait_for_completion()["status"] == "Completed"
    assert run.get_details()["runDefinition"]["environmentVariables"] == {"EPOCH_HINT": "1"}
    assert run.get_metrics()["alpha"] == 0.5


def test_a_failing_script_names_its_exception(agent, project):
    run = Experiment(agent.workspace(), "failing").submit(
        ScriptRunConfig(source_directory=str(project), script="train.py", arguments=["--alpha", -1]))
    with pytest.raises(ActivityFailedException) as raised:
        run.wait_for_completion()
    error = run.get_details()["error"]["error"]
    assert error["message"] == "User program failed with ValueError: alpha must not be negative, got -1.0"
    assert error["code"] == "UserError" and "User program failed with ValueError" in str(raised.value)
    assert run.get_status() == "Failed"


def test_cancel(agent, project):
    (project / "slow.py").write_text("import time\nprint('working', flush=True)\ntime.sleep(60)\n")
    run = Experiment(agent.workspace(), "cancel").submit(ScriptRunConfig(str(project), script="slow.py"))
    for chunk in run._log_chunks(follow=True):
        if b"working" in chunk:
            break
    run.cancel()
    details = run.wait_for_completion()   # Canceled does not raise, as in Azure ML
    assert details["status"] == "Canceled"


PER_PROCESS = textwrap.dedent("""
    import json, os
    keys = ["MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"]
    seen = json.dumps({k: os.environ.get(k) for k in keys})
    print(seen)
    os.makedirs("outputs", exist_ok=True)
    with open(f"outputs/rank{os.environ['RANK']}.json", "w") as f:
        f.write(seen)
""")

# A stand-in for torch.distributed.launch: it reads its arguments as the real one does, and starts
# --nproc_per_node copies of the script with LOCAL_RANK and RANK set.
FAKE_LAUNCH = textwrap.dedent("""
    import argparse, os, subprocess, sys
    p = argparse.ArgumentParser()
    p.add_argument("--nproc_per_node", type=int)
    p.add_argument("--nnodes", type=int)
    p.add_argument("--node_rank", type=int)
    p.add_argument("--master_addr")
    p.add_argument("--master_port", type=int)
    p.add_argument("script")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    a = p.parse_args()
    procs = []
    for local in range(a.nproc_per_node):
        env = dict(os.environ, LOCAL_RANK=str(local), RANK=str(a.node_rank * a.nproc_per_node + local),
                   WORLD_SIZE=str(a.nnodes * a.nproc_per_node), MASTER_ADDR=a.master_addr, MASTER_PORT=str(a.master_port))
        procs.append(subprocess.Popen([sys.executable, a.script, *a.rest], env=env))
    sys.exit(max(p.wait() for p in procs))
""")


def test_pytorch_per_process_launch(agent, project, capsys):
    (project / "ddp.py").write_text(PER_PROCESS)
    distr_config = PyTorchConfiguration(process_count=2, node_count=1)
    src = ScriptRunConfig(source_directory=str(project), script="ddp.py", distributed_job_config=distr_config)
    run = Experiment(agent.workspace(), "pytorch-distr").submit(src)
    details = run.wait_for_completion(show_output=True)
    out = capsys.readouterr().out
    assert "Streaming user_logs/std_log_process_0.txt\n" in out and '"RANK": "0"' in out
    ranks = [json.loads(Path(details["logFiles"][f"user_logs/std_log_process_{r}.txt"]).read_text()) for r in (0, 1)]
    assert [r["RANK"] for r in ranks] == ["0", "1"] and {r["WORLD_SIZE"] for r in ranks} == {"2"}
    assert {r["NODE_RANK"] for r in ranks} == {"0"} and ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"]
    definition = details["runDefinition"]
    assert (definition["framework"], definition["communicator"], definition["nodeCount"]) == ("PyTorch", "nccl", 1)
    assert definition["pytorch"]["processCount"] == 2
    assert {"outputs/rank0.json", "outputs/rank1.json"} <= set(run.get_file_names())


def test_per_node_torch_distributed_launch_through_a_command(agent, project):
    (project / "torch" / "distributed").mkdir(parents=True)
    (project / "torch" / "__init__.py").write_text("")
    (project / "torch" / "distributed" / "__init__.py").write_text("")
    (project / "torch" / "distributed" / "launch.py").write_text(FAKE_LAUNCH)
    (project / "ddp.py").write_text(PER_PROCESS)
    launch_cmd = ("python -m torch.distributed.launch --nproc_per_node 2 --nnodes 1 --node_rank $NODE_RANK "
                  "--master_addr $MASTER_ADDR --master_port $MASTER_PORT ddp.py").split()
    src = ScriptRunConfig(source_directory=str(project), command=launch_cmd,
                          distributed_job_config=PyTorchConfiguration(communication_backend="Gloo", node_count=1))
    run = Experiment(agent.workspace(), "pytorch-launch").submit(src)
    assert run.wait_for_completion()["status"] == "Completed", run.get_log()
    # Both processes write to the one log: each leaves its view in a file of its own as well.
    outputs = Path(run.get_details()["logFiles"]["user_logs/std_log.txt"]).parent.parent / "outputs"
    ranks = [json.loads((outputs / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["RANK"], r["LOCAL_RANK"], r["NODE_RANK"]) for r in ranks] == [("0", "0", "0"), ("1", "1", "0")]
    assert ranks[0]["MASTER_ADDR"] == "127.0.0.1" and ranks[0]["MASTER_PORT"].isdigit()
    assert run.get_details()["runDefinition"]["command"] == " ".join(launch_cmd)


def test_tensorflow_tf_config(agent, project):
    (project / "tf.py").write_text(
        "import json, os\nconfig = json.loads(os.environ['TF_CONFIG'])\n"
        "print(config['task']['type'], config['task']['index'], len(config['cluster']['worker']), config['environment'])\n")
    distributed = TensorflowConfiguration(worker_count=2, parameter_server_count=0)
    run = Experiment(agent.workspace(), "tf-distr").submit(
        ScriptRunConfig(source_directory=str(project), script="tf.py", distributed_job_config=distributed))
    details = run.wait_for_completion()
    logs = [Path(details["logFiles"][f"user_logs/std_log_process_{i}.txt"]).read_text().split() for i in (0, 1)]
    assert logs == [["worker", "0", "2", "cloud"], ["worker", "1", "2", "cloud"]]
    definition = details["runDefinition"]
    assert (definition["framework"], definition["communicator"], definition["nodeCount"]) == \
        ("TensorFlow", "ParameterServer", 2)


def test_the_compute_target_pattern_of_the_samples(make_agent):
    from labrun.compute import AmlCompute, ComputeTarget
    from labrun.compute_target import ComputeTargetException
    from labrun.exceptions import UserErrorException

    agent = make_agent('[targets.cpu-cluster]\nkind = "local"\n')
    ws = agent.workspace()
    assert ComputeTarget(workspace=ws, name="cpu-cluster").name == "cpu-cluster"
    with pytest.raises(ComputeTargetException, match="not defined by the agent"):
        ComputeTarget(workspace=ws, name="gpu-cluster")
    # The samples' except branch provisions a cluster: a cloud service, refused with what to do instead.
    with pytest.raises(UserErrorException, match=r"declare compute targets in the agent's config \(\[targets.NAME\]\)"):
        AmlCompute.provisioning_configuration(vm_size="STANDARD_D2_V2", max_nodes=4)
