"""The Slurm target's pure parts: sbatch arguments, the batch script, srun and rank variables, state mapping."""

import json
import os
import signal
import subprocess
import time

import pytest

from labrun.agent._config import ConfigError, load_config
from labrun.agent.executors._slurm_plan import (
    EXIT_FILE, SbatchArgumentError, SlurmArray, SlurmJob, SlurmSettings, array_batch_script, array_job_of,
    batch_script, check_sbatch_args, format_time, index_ranges, layout, map_state, parse_exit_status, parse_squeue,
    parse_time, rank_wrapper, sbatch_argv, sbatch_job_id, srun_argv, with_array_remainders,
)


def job(**changes) -> SlurmJob:
    fields = dict(run_id="exp_1_abc", argv=["python3", "train.py", "--lr", "0.1"], cwd="/shared/r/exp_1_abc/snapshot",
                  logs="/shared/r/exp_1_abc/logs", run_dir="/shared/r/exp_1_abc", duration=3600)
    fields.update(changes)
    return SlurmJob(**fields)


def options(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_resources_map_to_sbatch_options():
    argv = sbatch_argv(job(duration=90, cpus=4, memory=4 * 1024**3, gpus=2), SlurmSettings(), script="/s.sh")
    got = options(argv)
    assert got["--time"] == "0-00:02:00"   # Slurm counts whole minutes
    assert got["--cpus-per-task"] == "4" and got["--mem"] == "4096M" and got["--gres"] == "gpu:2"
    assert got["--nodes"] == "1" and got["--ntasks"] == "1"
    assert got["--output"] == "/shared/r/exp_1_abc/logs/std_log.txt" and got["--open-mode"] == "append"
    assert got["--chdir"] == "/shared/r/exp_1_abc/snapshot" and got["--export"] == "ALL"
    assert argv[0] == "sbatch" and argv[-1] == "/s.sh" and "--parsable" in argv
    # Never on someone's behalf: the job's user is whoever runs sbatch.
    assert not any(a.startswith(("--uid", "--gid")) for a in argv)
    assert "--partition" not in got and "--gres" not in options(sbatch_argv(job(), SlurmSettings(), "/s.sh"))


def test_target_settings_and_extra_arguments():
    settings = SlurmSettings(partition="gpu", account="lab", qos="high", sbatch_args=["--constraint", "a100"])
    argv = sbatch_argv(job(), settings, script="-")
    assert {"--partition": "gpu", "--account": "lab", "--qos": "high"}.items() <= options(argv).items()
    assert argv[-3:] == ["--constraint", "a100", "-"]


def test_node_count_becomes_nodes_and_tasks():
    pytorch = {"kind": "pytorch", "process_count": 8, "node_count": 2}
    got = options(sbatch_argv(job(distributed=pytorch), SlurmSettings(), "-"))
    assert (got["--nodes"], got["--ntasks"], got["--ntasks-per-node"]) == ("2", "8", "4")
    # Azure ML: no process count means one process per node.
    assert layout({"kind": "pytorch", "process_count": None, "node_count": 3}).tasks == 3
    mpi = {"kind": "mpi", "process_count_per_node": 2, "node_count": 3}
    got = options(sbatch_argv(job(distributed=mpi), SlurmSettings(), "-"))
    assert (got["--nodes"], got["--ntasks"], got["--ntasks-per-node"]) == ("3", "6", "2")
    tensorflow = {"kind": "tensorflow", "worker_count": 3, "parameter_server_count": None, "node_count": 1}
    got = options(sbatch_argv(job(distributed=tensorflow), SlurmSettings(), "-"))
    assert got["--ntasks"] == "4" and "--nodes" not in got   # Slurm places the tasks; TF_CONFIG names where


@pytest.mark.parametrize("arguments", [
    ["--constraint=a100"], ["--constraint", "a100", "-w", "node1"], ["--exclusive"], ["--exclusive=user"],
    ["--no-requeue"], ["--signal=B:USR1@60", "--comment", "a b"], [],
])
def test_allowed_sbatch_arguments(arguments):
    assert check_sbatch_args(arguments) == arguments


@pytest.mark.parametrize("arguments, named", [
    (["--output=/tmp/x"], "--output"), (["--uid=0"], "--uid"), (["--wrap", "id"], "--wrap"),
    (["--export=NONE"], "--export"), (["--chdir=/"], "--chdir"), (["--mem=1G"], "--mem"),
    (["--constraint"], "needs a value"), (["--no-requeue=1"], "takes no value"), (["--comment=a\nb"], "newline"),
    (["-Ca100"], "-Ca100"),
])
def test_refused_sbatch_arguments_are_named(arguments, named):
    with pytest.raises(SbatchArgumentError, match=named):
        check_sbatch_args(arguments)


def test_times():
    assert format_time(1) == "0-00:01:00" and format_time(60) == "0-00:01:00" and format_time(61) == "0-00:02:00"
    assert format_time(2592000) == "30-00:00:00" and format_time(90061) == "1-01:02:00"
    assert parse_time(90) == 90 and parse_time("90") == 5400 and parse_time("1:30") == 90
    assert parse_time("02:00:00") == 7200 and parse_time("1-00:00:00") == 86400 and parse_time("2-12") == 216000
    assert parse_time("1-01:30") == 86400 + 5400
    for bad in ("", "abc", "-5", "1:2:3:4", 0, True, 1.5, "0"):
        with pytest.raises(ValueError):
            parse_time(bad)


@pytest.mark.parametrize("state, status, reason", [
    ("PENDING", "Queued", None), ("CONFIGURING", "Starting", None), ("RUNNING", "Running", None),
    ("COMPLETING", "Finalizing", None), ("COMPLETED", "Completed", None), ("FAILED", "Failed", "exit_code"),
    ("NODE_FAIL", "Failed", "node_fail"), ("OUT_OF_MEMORY", "Failed", "memory_limit_exceeded"),
    ("TIMEOUT", "Canceled", "max_run_duration_exceeded"), ("CANCELLED", "Canceled", "canceled"),
    ("CANCELLED by 0", "Canceled", "canceled"), ("PREEMPTED", "Queued", None), ("REQUEUED", "Queued", None),
])
def test_state_mapping(state, status, reason):
    assert map_state(state) == (status, reason)


def test_parsing_slurm_output():
    states = parse_squeue("12|RUNNING|None|node1\n13|PENDING|Resources|\ngarbage\n")
    assert states["12"].state == "RUNNING" and states["13"].reason == "Resources" and len(states) == 2
    assert sbatch_job_id("4242\n") == "4242" and sbatch_job_id("4242;cluster\n") == "4242"
    with pytest.raises(ValueError):
        sbatch_job_id("sbatch: error: something\n")
    assert parse_exit_status("0\n") == (0, None) and parse_exit_status("3") == (3, None)
    assert parse_exit_status("143") == (None, 15) and parse_exit_status(None) == (None, None)
    assert parse_exit_status("junk") == (None, None)


def test_array_tasks_in_squeue_output():
    assert array_job_of("1234_3") == "1234" and array_job_of("1234") is None and array_job_of("1234_[3-4]") is None
    # Tasks canceled before they started are one record under the array's id; a task still listed keeps its own.
    found = with_array_remainders(parse_squeue("1234|CANCELLED|None|\n1234_1|FAILED|NonZeroExitCode|n1\n"),
                                  ["1234_1", "1234_3", "99_1"])
    assert found["1234_3"].state == "CANCELLED" and found["1234_3"].job_id == "1234_3"
    assert found["1234_1"].state == "FAILED" and "99_1" not in found


def test_an_array_is_one_sbatch_array_job():
    assert index_ranges([8, 1, 2, 3, 5, 7]) == "1-3,5,7-8" and index_ranges([4]) == "4"
    tasks = {i: job(run_id=f"exp_1_abc_{i}", cwd=f"/shared/r/exp_1_abc_{i}/snapshot",
                    logs=f"/shared/r/exp_1_abc_{i}/logs", run_dir=f"/shared/r/exp_1_abc_{i}", cpus=2)
             for i in (1, 2, 3, 5)}
    array = SlurmArray(array_id="exp_1_abc", run_root="/shared/r", tasks=tasks, throttle=2)
    got = options(sbatch_argv(array.job(), SlurmSettings(partition="gpu"), "-", array=array.array_option()))
    assert got["--array"] == "1-3,5%2" and got["--job-name"] == "labrun-exp_1_abc"
    assert got["--output"] == "/shared/r/exp_1_abc_%a/logs/std_log.txt" and got["--chdir"] == "/shared/r"
    assert got["--cpus-per-task"] == "2" and got["--partition"] == "gpu"
    assert "--array" not in options(sbatch_argv(job(), SlurmSettings(), "-"))
    unthrottled = SlurmArray(array_id="exp_1_abc", run_root="/shared/r", tasks=tasks)
    assert unthrottled.array_option() == "1-3,5"


def test_the_array_batch_script_runs_each_task_as_its_run(tmp_path):
    tasks, env = {}, {}
    for index in (1, 2):
        run_dir = tmp_path / f"arr_{index}"
        (run_dir / "snapshot").mkdir(parents=True)
        tasks[index] = job(run_id=f"arr_{index}", run_dir=str(run_dir), cwd=str(run_dir / "snapshot"),
                           argv=["python3", "-c", "import os; e = os.environ; print(e['LABRUN_RUN_ID'], os.getcwd(), "
                                 "e['ODD-NAME.x']); raise SystemExit(int(e['CODE']))"])
        env[index] = {"LABRUN_RUN_ID": f"arr_{index}", "CODE": str(index * 3), "ODD-NAME.x": "it's $x"}
    script = tmp_path / "batch.sh"
    script.write_text(array_batch_script(SlurmArray("arr", str(tmp_path), tasks, env, throttle=1), SlurmSettings()))
    # A run's own variables (its token among them) are exported, never arguments others on the node could read.
    assert "  export LABRUN_RUN_ID=arr_1" in script.read_text() and "LABRUN_RUN_ID=arr_1 " not in script.read_text()
    for index in (1, 2):
        result = subprocess.run(["/bin/sh", str(script)], capture_output=True, text=True,
                                env={"PATH": os.defpath, "SLURM_ARRAY_TASK_ID": str(index)})
        assert result.returncode == index * 3
        assert result.stdout == f"arr_{index} {tmp_path / f'arr_{index}' / 'snapshot'} it's $x\n"
        assert (tmp_path / f"arr_{index}" / EXIT_FILE).read_text() == f"{index * 3}\n"
    stranger = subprocess.run(["/bin/sh", str(script)], capture_output=True, text=True,
                              env={"PATH": os.defpath, "SLURM_ARRAY_TASK_ID": "7"})
    assert stranger.returncode == 127 and "not one of this array's runs" in stranger.stderr


def _rank_env(plan, slurm_env: dict, extra: dict | None = None) -> dict:
    """What a task sees: the wrapper run by sh, as srun would, with Slurm's variables."""
    result = subprocess.run(["/bin/sh", "-c", rank_wrapper(plan), "labrun-rank", "env", "-0"],
                            env={"PATH": os.defpath, **slurm_env, **(extra or {})}, capture_output=True, check=True)
    return dict(item.split("=", 1) for item in result.stdout.decode().split("\0") if item)


def test_pytorch_ranks_come_from_slurm_variables():
    plan = layout({"kind": "pytorch", "process_count": 8, "node_count": 2})
    seen = _rank_env(plan, {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NODEID": "1"})
    assert {k: seen[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE")} == \
        {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "4"}


def test_tf_config_is_built_from_the_task_hosts():
    plan = layout({"kind": "tensorflow", "worker_count": 2, "parameter_server_count": 1, "node_count": 1})
    env = {"LABRUN_TASK_HOSTS": "n1 n1 n2", "LABRUN_TF_WORKERS": "2", "LABRUN_TF_PORT": "5000"}
    configs = [json.loads(_rank_env(plan, {**env, "SLURM_PROCID": str(i)})["TF_CONFIG"]) for i in range(3)]
    assert configs[0]["cluster"] == {"worker": ["n1:5000", "n1:5001"], "ps": ["n2:5002"]}
    assert [c["task"] for c in configs] == [{"type": "worker", "index": 0}, {"type": "worker", "index": 1},
                                            {"type": "ps", "index": 0}]
    alone = layout({"kind": "tensorflow", "worker_count": 1, "parameter_server_count": 0, "node_count": 1})
    config = json.loads(_rank_env(alone, {**env, "LABRUN_TF_WORKERS": "1", "LABRUN_TASK_HOSTS": "n3",
                                          "SLURM_PROCID": "0"})["TF_CONFIG"])
    assert config["cluster"] == {"worker": ["n3:5000"]} and config["environment"] == "cloud"


def test_srun_for_distributed_runs():
    pytorch = srun_argv(job(distributed={"kind": "pytorch", "process_count": 2, "node_count": 1}), SlurmSettings())
    assert pytorch[:5] == ["srun", "--kill-on-bad-exit=1", "--ntasks=2", "--open-mode=append",
                           "--output=/shared/r/exp_1_abc/logs/std_log_process_%t.txt"]
    assert pytorch[5:7] == ["/bin/sh", "-c"] and pytorch[-4:] == ["python3", "train.py", "--lr", "0.1"]
    mpi = srun_argv(job(distributed={"kind": "mpi", "process_count_per_node": 4, "node_count": 2}),
                    SlurmSettings(mpi="pmix"))
    assert "--mpi=pmix" in mpi and "--ntasks=8" in mpi and mpi[-4:] == ["python3", "train.py", "--lr", "0.1"]
    script = batch_script(job(distributed={"kind": "pytorch", "process_count": 2, "node_count": 1}), SlurmSettings())
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "export MASTER_ADDR MASTER_PORT" in script and "srun --kill-on-bad-exit=1" in script


def test_the_batch_script_records_the_exit_status(tmp_path):
    (tmp_path / "snapshot").mkdir()
    script = tmp_path / "batch.sh"
    argv = ["printf", "%s|", "it's", 'a "b"', "$HOME", "x y", "`id`"]
    script.write_text(batch_script(job(argv=argv, cwd=str(tmp_path / "snapshot"), run_dir=str(tmp_path)),
                                   SlurmSettings()))
    result = subprocess.run(["/bin/sh", str(script)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "|".join(argv[2:]) + "|"   # every argument intact
    assert (tmp_path / EXIT_FILE).read_text() == "0\n"
    script.write_text(batch_script(job(argv=["sh", "-c", "exit 7"], cwd=str(tmp_path / "snapshot"),
                                       run_dir=str(tmp_path)), SlurmSettings()))
    assert subprocess.run(["/bin/sh", str(script)]).returncode == 7
    assert (tmp_path / EXIT_FILE).read_text() == "7\n"


def test_slurm_target_config(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[targets.cluster]\nkind = "slurm"\nrun_root = "/shared/labrun"\npartition = "gpu"\n'
                    'account = "lab"\nqos = "normal"\ntime = "1-00:00:00"\nsbatch_args = ["--constraint=a100"]\n')
    slurm = load_config(path).targets["cluster"].slurm
    assert (str(slurm.run_root), slurm.partition, slurm.account, slurm.qos, slurm.time, slurm.sbatch_args) == \
        ("/shared/labrun", "gpu", "lab", "normal", 86400, ["--constraint=a100"])
    for body, named in [
        ('kind = "slurm"\n', "run_root: required"),
        ('kind = "slurm"\nrun_root = "relative"\n', "absolute"),
        ('kind = "slurm"\nrun_root = "/s"\nimage = "x"\n', "unknown key 'image'"),
        ('kind = "slurm"\nrun_root = "/s"\nsbatch_args = ["--output=/tmp/x"]\n', "sbatch_args: '--output=/tmp/x'"),
        ('kind = "slurm"\nrun_root = "/s"\ntime = "soon"\n', "time:"),
        ('kind = "slurm"\nrun_root = "/s"\npartition = "a b"\n', "partition"),
        ('kind = "cloud"\n', "'local', 'docker', 'slurm'"),
    ]:
        path.write_text("[targets.cluster]\n" + body)
        with pytest.raises(ConfigError, match=named):
            load_config(path)


def test_the_exit_status_file_is_read_safely(tmp_path):
    from labrun.agent.executors._slurm import read_status_file

    (tmp_path / "status").write_text("3\n")
    assert read_status_file(tmp_path / "status") == "3\n"
    os.mkfifo(tmp_path / "fifo")   # a user's trap: reading would block the agent
    assert read_status_file(tmp_path / "fifo") is None
    (tmp_path / "link").symlink_to(tmp_path / "status")
    assert read_status_file(tmp_path / "link") is None and read_status_file(tmp_path / "missing") is None


def _started_batch_script(tmp_path, command: str, **changes) -> subprocess.Popen:
    """The batch script of ``command`` run by sh, once the command has touched ``started``."""
    (tmp_path / "snapshot").mkdir()
    script = tmp_path / "batch.sh"
    script.write_text(batch_script(job(argv=["sh", "-c", command], cwd=str(tmp_path / "snapshot"),
                                       run_dir=str(tmp_path), **changes), SlurmSettings()))
    process = subprocess.Popen(["/bin/sh", str(script)])
    deadline = time.monotonic() + 10
    while not (tmp_path / "snapshot" / "started").exists():
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.02)
    return process


@pytest.mark.parametrize("command, ended_by", [
    ("touch started; exec sleep 30", signal.SIGTERM),
    ("trap '' TERM; touch started; sleep 30", signal.SIGKILL),   # ignores SIGTERM: SIGKILL after the grace
])
def test_a_sigterm_to_the_batch_script_ends_the_command_and_records_how(tmp_path, command, ended_by):
    """scancel --signal=TERM --batch signals the script, which passes it on and outlives the command."""
    process = _started_batch_script(tmp_path, command, grace=0.5)
    began = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=10) == 128 + ended_by
    if ended_by == signal.SIGKILL:
        assert time.monotonic() - began >= 0.5
    assert parse_exit_status((tmp_path / EXIT_FILE).read_text()) == (None, ended_by)
