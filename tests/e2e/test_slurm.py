"""Runs on a Slurm target, against a real single-node Slurm (slurmctld, slurmd, munge; scripts/test starts it)."""

import json
import os
import pwd
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from labrun import Experiment, PyTorchConfiguration, ScriptRunConfig, TensorflowConfiguration
from tests.e2e.test_agent import nobody_client, processes_of, wait_until  # noqa: F401

pytestmark = pytest.mark.slurm
TEST_USER = "lrslurm-user"   # scripts/test creates it: Slurm runs jobs as the submitting user
# The single node has at least two CPUs; a run asking for all of them keeps the next one pending.
NODE_CPUS = 2


def _slurm(*argv, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=check)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A Slurm controller that answers, with an idle node."""
    answers = shutil.which("sinfo") is not None and _slurm("scontrol", "ping", check=False).stdout.count("UP")
    if not answers:
        if os.environ.get("LABRUN_REQUIRE_SLURM") == "1":
            pytest.fail("LABRUN_REQUIRE_SLURM=1 but no Slurm controller answers (scripts/slurm-single-node.sh)")
        pytest.skip("no Slurm controller answers (scripts/test starts a single-node one)")
    cpus = int(_slurm("sinfo", "-h", "-o", "%c").stdout.split()[0])
    assert cpus >= NODE_CPUS, "the test cluster needs a node with two CPUs"


def _open_up(path: Path) -> None:
    """Let the run's user reach ``path`` (tests' temporary directories are root's own)."""
    for parent in [path, *path.parents]:
        if str(parent).startswith("/tmp/"):
            parent.chmod(parent.stat().st_mode | 0o755)


@pytest.fixture
def cluster_agent(make_agent, slurm_cluster, tmp_path_factory):
    run_root = tmp_path_factory.mktemp("slurm-runs")
    _open_up(run_root)
    agent = make_agent(f'[agent]\nstop_grace_seconds = 1\n[targets.cluster]\nkind = "slurm"\nrun_root = "{run_root}"\n')
    agent.run_root = run_root
    yield agent
    # Nothing of this agent's is left in Slurm's queue.
    for run_id in os.listdir(run_root):
        if not (run_root / run_id / "logs").is_dir():
            continue   # envs/: the pip environments of the runs
        job = _job_of(agent, run_id)
        if job is not None:
            _slurm("scancel", job, check=False)


@pytest.fixture
def cluster_source(source) -> Path:
    """The shared source directory (train.py), with scripts that report ranks and log metrics."""
    src = source
    (src / "ranks.py").write_text(
        "import json, os\n"
        "keys = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'TF_CONFIG')\n"
        "seen = {k: os.environ.get(k) for k in keys}\n"
        "task = json.loads(seen['TF_CONFIG'])['task'] if seen['TF_CONFIG'] else None\n"
        "name = seen['RANK'] if task is None else f\"{task['type']}{task['index']}\"\n"
        "open(f'outputs/rank_{name}.json', 'w').write(json.dumps(seen))\n"
        "print('rank', name)\n"
    )
    (src / "metrics.py").write_text(
        "from labrun import Run\n"
        "run = Run.get_context()\n"
        "for step in range(3):\n    run.log('loss', 1.0 / (step + 1), step=step)\n"
        "run.log('accuracy', 0.9)\n"
    )
    _open_up(src)
    return src


def _job_of(agent, run_id: str) -> str | None:
    waiting = agent.workspace()._call("get", run_id=run_id).get("waiting") or {}
    if waiting.get("job_id"):
        return waiting["job_id"]
    # Else from Slurm: the handle is not shown to clients, and the job's name ends with the run id.
    listed = _slurm("squeue", "-h", "-t", "all", "-o", "%i|%j", check=False).stdout.split()
    return next((line.split("|")[0] for line in listed if line.endswith(run_id)), None)


def _submit(agent, source, **kwargs):
    workspace = agent.workspace()
    kwargs.setdefault("compute_target", workspace.compute_targets["cluster"])
    return Experiment(workspace, "slurm").submit(ScriptRunConfig(str(source), **kwargs))


def _waiting(agent, run) -> dict | None:
    return agent.workspace()._call("get", run_id=run.id).get("waiting")


def _status(agent, run) -> str:
    return agent.workspace()._call("get", run_id=run.id)["status"]


def _cli_events(agent, run) -> list[str]:
    result = agent.cli("events", "--run", run.id, "--jsonl", check=True)
    return [json.loads(line)["type"] for line in result.stdout.splitlines()]


def test_script_with_arguments_completes_with_log_and_outputs(cluster_agent, cluster_source):
    run = _submit(cluster_agent, cluster_source, script="train.py", arguments=["--lr", 0.1, "--epochs", 2])
    details = run.wait_for_completion()
    assert details["status"] == "Completed" and details["target"] == "cluster"
    log = run.get_log()
    real = cluster_agent.run_root / run.id
    assert "args ['--lr', '0.1', '--epochs', '2']" in log
    assert f"cwd {real / 'snapshot'}" in log   # in run_root, which the nodes share
    assert _job_of(cluster_agent, run.id) is not None   # it really ran as a Slurm job
    assert "outputs/model.txt" in run.get_file_names()
    assert (real / "outputs" / "model.txt").read_text() == "trained"
    # The same events as a local run, with the wait in Slurm's queue between Preparing and Starting.
    assert _cli_events(cluster_agent, run) == ["run.queued", "run.preparing", "run.queued", "run.starting",
                                               "run.started", "run.finalizing", "run.completed"]
    status = cluster_agent.workspace()._call("status")
    assert status["targets"]["cluster"]["kind"] == "slurm" and status["in_use"]["cpus"] == 0


def test_cli_failing_run_fails_with_its_exit_code(cluster_agent, cluster_source):
    result = cluster_agent.cli("run", "--source-dir", str(cluster_source), "--target", "cluster", "--",
                               "sh", "-c", "echo about to fail; exit 3")
    assert result.returncode == 3, result.stderr
    assert "about to fail" in result.stdout
    shown = json.loads(cluster_agent.cli("ls", "--all", "--json", check=True).stdout)
    run = next(r for r in shown if r["target"] == "cluster")
    assert (run["status"], run["exit_code"], run["reason"]) == ("Failed", 3, "exit_code")


def test_cancel_running_and_pending_runs(cluster_agent, cluster_source):
    """A run holding the whole node keeps the next one pending, with Slurm's reason shown in ls."""
    busy = _submit(cluster_agent, cluster_source, command="echo busy; exec sleep 300", resources={"cpus": NODE_CPUS})
    wait_until(lambda: _status(cluster_agent, busy) == "Running", 60, "the first run to start")
    pending = _submit(cluster_agent, cluster_source, command=["echo", "never"], resources={"cpus": NODE_CPUS})
    # Slurm's reason: Resources, or Priority when someone else's job also waits for the node.
    reasons = ("slurm: Resources", "slurm: Priority")
    wait_until(lambda: (_waiting(cluster_agent, pending) or {}).get("reason") in reasons, 60,
               "the second run to wait in Slurm's queue for resources")
    listed = cluster_agent.cli("ls", check=True).stdout
    line = next(line for line in listed.splitlines() if pending.id in line)
    assert "Queued" in line and ("slurm: Resources" in line or "slurm: Priority" in line), listed
    wait_until(lambda: "busy" in busy.get_log(), 30, "the first run's output")
    busy_job = _job_of(cluster_agent, busy.id)
    pending_job = _job_of(cluster_agent, pending.id)

    assert cluster_agent.cli("cancel", pending.id, busy.id).returncode == 0
    assert cluster_agent.workspace().wait_for_run(pending.id)["status"] == "Canceled"
    finished = cluster_agent.workspace().wait_for_run(busy.id)
    assert (finished["status"], finished["reason"]) == ("Canceled", "canceled")
    assert "never" not in pending.get_log()
    # Neither job is left running in Slurm, and the sleep is gone.
    for job in (busy_job, pending_job):
        state = _slurm("squeue", "-h", "-t", "all", "-j", job, "-o", "%T", check=False).stdout.strip()
        assert state not in ("RUNNING", "PENDING", "CONFIGURING"), (job, state)
    wait_until(lambda: not processes_of(busy.id), 10, "the run's processes to end")


def test_time_limit_cancels_with_max_run_duration_exceeded(cluster_agent, cluster_source):
    run = _submit(cluster_agent, cluster_source, command="echo started; sleep 300", max_run_duration_seconds=3)
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Canceled"
    shown = cluster_agent.workspace()._call("get", run_id=run.id)
    assert shown["reason"] == "max_run_duration_exceeded"
    assert shown["ended_at"] - shown["started_at"] < 3 + 10
    assert "started" in run.get_log()


def test_two_task_pytorch_run_sees_correct_ranks(cluster_agent, cluster_source):
    run = _submit(cluster_agent, cluster_source, script="ranks.py",
                  distributed_job_config=PyTorchConfiguration(process_count=2, node_count=1))
    assert run.wait_for_completion()["status"] == "Completed", run.get_log()
    outputs = cluster_agent.run_root / run.id / "outputs"
    ranks = [json.loads((outputs / f"rank_{rank}.json").read_text()) for rank in range(2)]
    node = _slurm("hostname", "-s").stdout.strip()
    for rank, seen in enumerate(ranks):
        got = (seen["RANK"], seen["LOCAL_RANK"], seen["WORLD_SIZE"], seen["NODE_RANK"])
        assert got == (str(rank), str(rank), "2", "0")
        assert seen["MASTER_ADDR"] == node and seen["MASTER_PORT"].isdigit()
    assert ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"]
    names = run.get_file_names()
    assert "user_logs/std_log_process_0.txt" in names and "user_logs/std_log_process_1.txt" in names
    assert "rank 1" in (cluster_agent.run_root / run.id / "logs" / "std_log_process_1.txt").read_text()


def test_tensorflow_run_gets_tf_config_from_the_node_list(cluster_agent, cluster_source):
    run = _submit(cluster_agent, cluster_source, script="ranks.py",
                  distributed_job_config=TensorflowConfiguration(worker_count=2, parameter_server_count=0))
    assert run.wait_for_completion()["status"] == "Completed", run.get_log()
    outputs = cluster_agent.run_root / run.id / "outputs"
    node = _slurm("hostname", "-s").stdout.strip()
    configs = [json.loads(json.loads((outputs / f"rank_worker{i}.json").read_text())["TF_CONFIG"]) for i in range(2)]
    workers = configs[0]["cluster"]["worker"]
    assert len(workers) == 2 and all(w.startswith(f"{node}:") for w in workers) and workers[0] != workers[1]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": 0}, {"type": "worker", "index": 1}]
    assert configs[1]["cluster"] == configs[0]["cluster"]


def test_agent_restart_loses_neither_a_pending_nor_a_running_run(cluster_agent, cluster_source):
    running = _submit(cluster_agent, cluster_source, command="echo first; sleep 6; echo first done",
                      resources={"cpus": NODE_CPUS})
    wait_until(lambda: _status(cluster_agent, running) == "Running", 60, "the first run to start")
    pending = _submit(cluster_agent, cluster_source, command=["echo", "second done"], resources={"cpus": NODE_CPUS})
    wait_until(lambda: (_waiting(cluster_agent, pending) or {}).get("job_id"), 30,
               "the second run to wait in Slurm's queue")
    cluster_agent.restart()
    # The new agent finds both where Slurm has them, and follows each to its end.
    assert _status(cluster_agent, running) == "Running"
    assert _status(cluster_agent, pending) == "Queued"
    assert cluster_agent.workspace().wait_for_run(running.id, timeout=120)["status"] == "Completed"
    assert cluster_agent.workspace().wait_for_run(pending.id, timeout=120)["status"] == "Completed"
    assert "first done" in running.get_log() and "second done" in pending.get_log()
    assert _cli_events(cluster_agent, pending)[-4:] == ["run.starting", "run.started", "run.finalizing",
                                                        "run.completed"]


def test_in_run_metrics(cluster_agent, cluster_source):
    run = _submit(cluster_agent, cluster_source, script="metrics.py")
    assert run.wait_for_completion()["status"] == "Completed", run.get_log()
    metrics = run.get_metrics()
    assert metrics["loss"] == [1.0, 0.5, 1.0 / 3] and metrics["accuracy"] == 0.9


def _drop_to_test_user():
    user = pwd.getpwnam(TEST_USER)
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)


def _as_test_user(agent, client, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` run by the thin client as the test user, against a root agent."""
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        if os.environ.get("LABRUN_REQUIRE_SLURM") == "1":
            pytest.fail(f"scripts/test creates the user {TEST_USER}")
        pytest.skip(f"no user {TEST_USER} (scripts/test creates it)")
    if os.geteuid() != 0:
        pytest.skip("a run of another user needs a root agent")
    agent.root.chmod(0o755)
    python, site = client
    return subprocess.run([python, "-c", code], cwd=cwd, preexec_fn=_drop_to_test_user, capture_output=True,
                          text=True, timeout=120, env=dict(agent.env, HOME="/nonexistent", PYTHONPATH=str(site)))


def test_sbatch_runs_as_the_submitting_user(cluster_agent, cluster_source, nobody_client):
    code = ("from labrun import Workspace, Experiment, ScriptRunConfig\n"
            "ws = Workspace()\n"
            "config = ScriptRunConfig('.', command='id -u; id -g; echo job $SLURM_JOB_ID', compute_target='cluster')\n"
            "run = Experiment(ws, 'users').submit(config)\n"
            "print(run.wait_for_completion()['status'])\nprint(run.id)\nprint(run.get_log(), end='')\n")
    result = _as_test_user(cluster_agent, nobody_client, code, cluster_source)
    assert result.returncode == 0, result.stderr
    user = pwd.getpwnam(TEST_USER)
    status, run_id, uid, gid, job = result.stdout.splitlines()[:5]
    assert status == "Completed"
    assert (int(uid), int(gid)) == (user.pw_uid, user.pw_gid)
    real = cluster_agent.run_root / run_id
    assert real.stat().st_uid == user.pw_uid and (real / "logs" / "std_log.txt").stat().st_uid == user.pw_uid


def test_cancel_a_run_that_ignores_sigterm_kills_it_after_the_grace_period(cluster_agent, cluster_source):
    run = _submit(cluster_agent, cluster_source, command="trap '' TERM; echo started; sleep 300; echo survived")
    wait_until(lambda: "started" in run.get_log(), 60, "the run to start")
    began = time.monotonic()
    run.cancel()
    finished = cluster_agent.workspace().wait_for_run(run.id, timeout=60)
    assert (finished["status"], finished["reason"]) == ("Canceled", "canceled")
    assert time.monotonic() - began >= 1   # the grace period (1 s here) before SIGKILL
    wait_until(lambda: not processes_of(run.id), 10, "the run's processes to end")
    assert "survived" not in run.get_log()


def test_resume_from_and_environment_variables_reach_the_node(cluster_agent, cluster_source, tmp_path):
    checkpoint = tmp_path / "ckpt.txt"
    checkpoint.write_text("epoch 7")
    # The final echo prints the "--resume-from PATH" that labrun appends.
    config = ScriptRunConfig(str(cluster_source), command='echo seed=$SEED; cat "$LABRUN_RESUME_FROM"; echo',
                             compute_target="cluster", resume_from=str(checkpoint))
    config.run_config.environment_variables = {"SEED": "42"}
    run = Experiment(cluster_agent.workspace(), "slurm").submit(config)
    assert run.wait_for_completion()["status"] == "Completed", run.get_log()
    log = run.get_log()
    copy = cluster_agent.run_root / run.id / "resume_from" / "ckpt.txt"
    assert "seed=42" in log and "epoch 7" in log and copy.read_text() == "epoch 7"
    assert f"--resume-from {copy}" in log   # the node's path: in run_root


async def test_a_run_an_agent_died_submitting_is_not_submitted_twice(slurm_cluster, tmp_path):
    """sbatch returned, the agent died before recording the job: the next agent finds the job by its name."""
    from labrun.agent.executors import LaunchSpec, Rank
    from labrun.agent.executors._slurm import SlurmExecutor
    from labrun.agent.executors._slurm_plan import SlurmJob, SlurmSettings

    run_dir = tmp_path / f"slurm_{int(time.time())}_{os.urandom(4).hex()}"
    (run_dir / "snapshot").mkdir(parents=True)
    (run_dir / "logs").mkdir()
    job = SlurmJob(run_id=run_dir.name, argv=["sleep", "30"], cwd=str(run_dir / "snapshot"),
                   logs=str(run_dir / "logs"), run_dir=str(run_dir), duration=120, grace=1)
    launch = LaunchSpec(run_id=job.run_id, argv=job.argv, env={"PATH": os.defpath}, cwd=run_dir / "snapshot",
                        ranks=[Rank(log_path=run_dir / "logs" / "std_log.txt")], uid=os.getuid(), gid=os.getgid(),
                        slurm={"job": job, "settings": SlurmSettings()})
    first = await SlurmExecutor(grace=1).start(launch)
    try:
        again = await SlurmExecutor(grace=1).start(launch)   # the next agent, preparing the same run again
        assert again == first
        named = _slurm("squeue", "-h", "-t", "all", f"--name=labrun-{job.run_id}", "-o", "%i").stdout.split()
        assert named == [first.job_id]
    finally:
        _slurm("scancel", first.job_id, check=False)


async def test_an_array_an_agent_died_submitting_is_not_submitted_twice(slurm_cluster, tmp_path):
    """sbatch --array returned, the agent died before recording the tasks: the next agent finds the job array."""
    from labrun.agent.executors import LaunchSpec, Rank
    from labrun.agent.executors._slurm import SlurmExecutor
    from labrun.agent.executors._slurm_plan import SlurmJob, SlurmSettings

    array_id = f"slurm_{int(time.time())}_{os.urandom(4).hex()}"
    launches = []
    for index in (1, 2):
        run_dir = tmp_path / f"{array_id}_{index}"
        (run_dir / "snapshot").mkdir(parents=True)
        (run_dir / "logs").mkdir()
        job = SlurmJob(run_id=run_dir.name, argv=["sleep", "30"], cwd=str(run_dir / "snapshot"),
                       logs=str(run_dir / "logs"), run_dir=str(run_dir), duration=120, grace=1)
        launches.append(LaunchSpec(run_id=job.run_id, argv=job.argv, env={"PATH": os.defpath, "I": str(index)},
                                   cwd=run_dir / "snapshot", ranks=[Rank(log_path=run_dir / "logs" / "std_log.txt")],
                                   uid=os.getuid(), gid=os.getgid(),
                                   slurm={"job": job, "settings": SlurmSettings(),
                                          "array": {"id": array_id, "index": index, "size": 2, "throttle": 1}}))
    first = await SlurmExecutor(grace=1).start_array(launches, 1)
    try:
        job_id = first[0].array_job
        assert [h.job_id for h in first] == [f"{job_id}_1", f"{job_id}_2"]
        again = await SlurmExecutor(grace=1).start_array(launches, 1)   # the next agent, starting them again
        assert again == first
        named = _slurm("squeue", "-h", "-t", "all", f"--name=labrun-{array_id}", "-o", "%F").stdout.split()
        assert set(named) == {job_id}
    finally:
        _slurm("scancel", first[0].array_job, check=False)


@pytest.mark.slow
def test_a_pip_environment_is_built_in_run_root_where_the_nodes_see_it(cluster_agent, cluster_source, tmp_path):
    from labrun import Environment
    from tests.e2e.test_azureml import _wheel

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"--no-index\n--find-links {wheels}\ntinypkg==1.0\n")
    # A command string runs through the shell (a list would be joined with spaces, as Azure ML does).
    command = "python -c 'import tinypkg, sys; print(tinypkg.VALUE, sys.prefix)'"
    run = _submit(cluster_agent, cluster_source, command=command,
                  environment=Environment.from_pip_requirements("tiny", str(requirements)))
    assert run.wait_for_completion()["status"] == "Completed", run.get_log()
    assert f"tiny-ok {cluster_agent.run_root / 'envs'}" in run.get_log()


# -- arrays: one sbatch --array job ------------------------------------------------------------------------------

# Each task says when it started and ended, by its own clock, and which index it saw; index 4 fails.
ARRAY_TASK = ('echo "start $(date +%s.%N) $LABRUN_ARRAY_INDEX $SLURM_ARRAY_TASK_ID $SLURM_ARRAY_JOB_ID"; sleep 2; '
              'echo "end $(date +%s.%N)"; [ "$LABRUN_ARRAY_INDEX" != 4 ] || exit 5')


def _array_tasks(array_id: str) -> dict[str, str]:
    """The Slurm job array of a labrun array, from Slurm: task id (``JOBID_INDEX``) -> state."""
    listed = _slurm("squeue", "-h", "-t", "all", "-r", f"--name=labrun-{array_id}", "-o", "%i|%T").stdout.split()
    return dict(line.split("|") for line in listed)


def _submit_array(agent, source, indices: str, command: str) -> str:
    return agent.cli("submit", "--source-dir", str(source), "--target", "cluster", "--array", indices, "--", command,
                     check=True).stdout.strip()


def test_an_array_is_one_slurm_job_array_throttled_by_slurm(cluster_agent, cluster_source):
    array_id = _submit_array(cluster_agent, cluster_source, "1-6%2", ARRAY_TASK)
    wait_until(lambda: len(_array_tasks(array_id)) == 6, 60, "the array's six tasks in Slurm's queue")
    tasks = _array_tasks(array_id)
    job_id = next(iter(tasks)).split("_")[0]
    assert sorted(tasks) == sorted(f"{job_id}_{i}" for i in range(1, 7))   # one job array
    assert "ArrayTaskThrottle=2" in _slurm("scontrol", "show", "job", job_id).stdout   # Slurm's throttle, not ours

    waited = cluster_agent.cli("wait", array_id, timeout=180)
    assert waited.returncode == 5, waited.stderr   # the failed run's own code
    members = {m["array"]["index"]: m for m in json.loads(cluster_agent.cli("ls", "--array", array_id, "--json",
                                                                             check=True).stdout)}
    assert {i: (m["status"], m["exit_code"]) for i, m in members.items()} == \
        {1: ("Completed", 0), 2: ("Completed", 0), 3: ("Completed", 0), 4: ("Failed", 5), 5: ("Completed", 0),
         6: ("Completed", 0)}
    assert members[4]["reason"] == "exit_code" and {m["target"] for m in members.values()} == {"cluster"}
    spans = []
    for index in range(1, 7):
        log = cluster_agent.cli("logs", f"{array_id}_{index}", check=True).stdout
        start, seen, slurm_index, slurm_job = re.search(r"^start (\S+) (\d+) (\d+) (\d+)$", log, re.M).groups()
        assert int(seen) == int(slurm_index) == index and slurm_job == job_id
        spans.append((float(start), float(re.search(r"^end (\S+)$", log, re.M)[1])))
    # The tasks' own clocks: never more than two at once.
    at_once = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert at_once <= 2, spans
    assert "==> " in cluster_agent.cli("logs", array_id, check=True).stdout   # the array's logs, run after run


def test_canceling_one_task_and_then_the_whole_array(cluster_agent, cluster_source):
    array_id = _submit_array(cluster_agent, cluster_source, "1-4%1", "echo started; exec sleep 300")
    first = f"{array_id}_1"
    wait_until(lambda: "started" in cluster_agent.cli("logs", first).stdout, 60, "the first task to start")
    tasks = _array_tasks(array_id)
    job_id = next(iter(tasks)).split("_")[0]
    assert tasks[f"{job_id}_1"] == "RUNNING" and tasks[f"{job_id}_2"] == "PENDING"
    # Slurm holds the others back, and ls says so.
    wait_until(lambda: (cluster_agent.workspace()._call("get", run_id=f"{array_id}_2").get("waiting") or {}).get(
        "reason") == "slurm: JobArrayTaskLimit", 30, "the waiting reason of Slurm's throttle")
    listed = cluster_agent.cli("ls", "--array", array_id, check=True).stdout
    assert "slurm: JobArrayTaskLimit" in listed, listed

    # One run: scancel of its task alone.
    assert cluster_agent.cli("cancel", f"{array_id}_2", check=True).stdout.startswith(f"{array_id}_2: Cancel")
    assert cluster_agent.workspace().wait_for_run(f"{array_id}_2", timeout=60)["status"] == "Canceled"
    tasks = _array_tasks(array_id)
    assert tasks[f"{job_id}_1"] == "RUNNING" and tasks.get(f"{job_id}_3") == "PENDING", tasks

    # The array: one scancel of the job array, for the running task and the pending ones.
    canceled = json.loads(cluster_agent.cli("cancel", array_id, "--json", check=True).stdout)
    assert sorted(r["run_id"] for r in canceled) == [f"{array_id}_{i}" for i in (1, 3, 4)]
    assert cluster_agent.cli("wait", array_id, timeout=120).returncode == 130
    for index in range(1, 5):
        shown = cluster_agent.workspace()._call("get", run_id=f"{array_id}_{index}")
        assert (shown["status"], shown["reason"]) == ("Canceled", "canceled"), shown
    assert not {s for s in _array_tasks(array_id).values() if s in ("RUNNING", "PENDING", "CONFIGURING")}
    scancels = [json.loads(line) for line in cluster_agent.log_path.read_text().splitlines()
                if '"slurm.scancel"' in line]
    assert {tuple(e["argv"]) for e in scancels} >= {(f"{job_id}_2",), ("--state=PENDING", job_id), (job_id,)}
    assert not any(e["argv"][-1] in (f"{job_id}_3", f"{job_id}_4") for e in scancels)
    wait_until(lambda: not processes_of(first), 10, "the running task's processes to end")


def test_an_agent_restart_reattaches_each_task_of_an_array(cluster_agent, cluster_source):
    array_id = _submit_array(cluster_agent, cluster_source, "1-3%1",
                             'echo "go $LABRUN_ARRAY_INDEX"; sleep 3; echo "done $SLURM_ARRAY_TASK_ID"')
    first = cluster_agent.workspace()
    wait_until(lambda: first._call("get", run_id=f"{array_id}_1")["status"] == "Running", 60, "the first task to run")
    cluster_agent.restart()
    statuses = [cluster_agent.workspace()._call("get", run_id=f"{array_id}_{i}")["status"] for i in (1, 2, 3)]
    assert statuses[0] in ("Running", "Completed") and statuses[1:] in (["Queued", "Queued"], ["Running", "Queued"])
    assert cluster_agent.cli("wait", array_id, timeout=120).returncode == 0
    for index in (1, 2, 3):
        assert f"done {index}" in cluster_agent.cli("logs", f"{array_id}_{index}", check=True).stdout
    assert len({task.split("_")[0] for task in _array_tasks(array_id)}) == 1   # not submitted again


# -- run directories in run_root, as their user: resume_from and removal ---------------------------------------

RESUME_AND_REMOVE = """
from labrun import DataPath, Experiment, ScriptRunConfig, Workspace
ws = Workspace()
experiment = Experiment(ws, 'resumes')
first = experiment.submit(ScriptRunConfig('.', compute_target='cluster', command=(
    'mkdir -p outputs/ckpt && echo epoch 3 > outputs/ckpt/state.txt && ln -s {victim} outputs/escape && '
    'mkdir outputs/locked && touch outputs/locked/f && chmod 500 outputs/locked')))
assert first.wait_for_completion(raise_on_error=False)['status'] == 'Completed', first.get_log()
second = experiment.submit(ScriptRunConfig('.', compute_target='cluster',
                                           command='cat "$LABRUN_RESUME_FROM/state.txt"; echo',
                                           resume_from=DataPath.from_run(first, 'outputs/ckpt')))
assert second.wait_for_completion(raise_on_error=False)['status'] == 'Completed', second.get_log()
print(first.id)
print(second.id)
print(second.get_log().splitlines()[0])
print(ws._call('remove', run_id=first.id)['freed_bytes'])
# A run_root its users may write (a shared scratch, sticky like /tmp): a run's directory swapped for a link.
import os
third = experiment.submit(ScriptRunConfig('.', compute_target='cluster', command='true'))
assert third.wait_for_completion(raise_on_error=False)['status'] == 'Completed', third.get_log()
os.rename('{run_root}/' + third.id, '{run_root}/' + third.id + '.moved')
os.symlink('{victim}', '{run_root}/' + third.id)
print(third.id)
print(ws._call('remove', run_id=third.id)['freed_bytes'])
"""
# labrun clean (and retention, which cleans by age) takes the rest of a user's finished runs the same way.
CLEAN = "from labrun import Workspace\nprint(sorted(r['run_id'] for r in Workspace()._call('clean')['removed']))\n"


def test_a_slurm_runs_outputs_resume_a_later_run_and_its_removal_stays_in_run_root(cluster_agent, cluster_source,
                                                                                    nobody_client, tmp_path):
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    (victim / "keep" / "file").write_text("not yours")
    _open_up(victim)
    cluster_agent.run_root.chmod(0o1777)
    code = RESUME_AND_REMOVE.format(victim=victim, run_root=cluster_agent.run_root)
    result = _as_test_user(cluster_agent, nobody_client, code, cluster_source)
    assert result.returncode == 0, result.stderr + result.stdout
    first, second, log, freed, third, _ = result.stdout.splitlines()
    user = pwd.getpwnam(TEST_USER)
    # The later run resumed from a copy its user made of the first run's outputs, in run_root where its node sees it.
    copy = cluster_agent.run_root / second / "resume_from" / "ckpt" / "state.txt"
    assert log.strip() == "epoch 3" and copy.read_text() == "epoch 3\n" and copy.stat().st_uid == user.pw_uid
    # Removed: the first run's directory in run_root and the agent's link to it; nothing the run's links point to.
    assert int(freed) > 0
    assert not (cluster_agent.run_root / first).exists() and not (cluster_agent.state_dir / "runs" / first).is_symlink()
    assert (victim / "keep" / "file").read_text() == "not yours"
    assert (cluster_agent.run_root / second / "logs" / "std_log.txt").exists()
    shown = cluster_agent.workspace()._call("get", run_id=first)
    assert shown["status"] == "Completed" and shown["files_removed_at"] is not None
    assert "removed" in cluster_agent.cli("logs", first).stderr
    # The swapped-in link went, as a link: not what it points to.
    assert not (cluster_agent.run_root / third).is_symlink() and (victim / "keep" / "file").exists()
    moved = cluster_agent.run_root / f"{third}.moved"
    assert moved.is_dir()   # where its user put it: theirs to delete
    shutil.rmtree(moved)
    cleaned = _as_test_user(cluster_agent, nobody_client, CLEAN, cluster_source)
    assert cleaned.stdout.strip() == repr([second]), cleaned.stderr
    assert not (cluster_agent.run_root / second).exists()
    assert not (cluster_agent.state_dir / "runs" / second).is_symlink()


def test_an_array_slurm_refuses_fails_each_run_with_slurms_message(cluster_agent, cluster_source):
    # Beyond the cluster's MaxArraySize (1001 unless configured): sbatch refuses the job array.
    array_id = _submit_array(cluster_agent, cluster_source, "5000,5002", "true")
    assert cluster_agent.cli("wait", array_id, timeout=60).returncode != 0
    for index in (5000, 5002):
        shown = cluster_agent.workspace()._call("get", run_id=f"{array_id}_{index}")
        assert shown["status"] == "Failed" and shown["reason"] == "start_failed", shown
        assert "Slurm refused the job" in shown["error"]
        assert "Slurm refused the job" in cluster_agent.cli("logs", f"{array_id}_{index}").stdout
