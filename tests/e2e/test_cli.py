"""The ``labrun`` command line against a real agent."""

import json
import signal
import subprocess
import sys
import time



def test_run_streams_the_log_and_exits_with_the_runs_code(agent, source):
    result = agent.cli("run", "--source-dir", str(source), "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.returncode == 7
    assert result.stdout == "out\nerr\n"
    assert "labrun: submitted default_" in result.stderr and "exited with code 7" in result.stderr


def test_run_script_with_arguments_env_and_tags(agent, source):
    result = agent.cli("run", "--source-dir", str(source), "-e", "cli-exp", "--name", "nice", "--script", "train.py",
                       "--env", "A=1", "--tag", "k=v", "--json", "--", "--lr", "0.5", check=True)
    assert "args ['--lr', '0.5']" in result.stderr   # with --json the log goes to stderr
    run = json.loads(result.stdout)
    assert run["experiment"] == "cli-exp" and run["display_name"] == "nice" and run["tags"] == {"k": "v"}
    assert run["environment_variables"] == {"A": "1"} and run["status"] == "Completed"


def test_shell_line(agent, source):
    assert agent.cli("run", "--source-dir", str(source), "--", "echo a && echo b").stdout == "a\nb\n"


def test_submit_ls_show_logs_wait(agent, source):
    run_id = agent.cli("submit", "--source-dir", str(source), "--", "sh", "-c", "sleep 1; echo hi; exit 3",
                       check=True).stdout.strip()
    listing = agent.cli("ls", check=True).stdout
    assert run_id in listing and listing.splitlines()[0].split() == ["RUN", "NAME", "STATUS", "USER", "EXPERIMENT",
                                                                      "SUBMITTED", "TIME", "INFO", "TAGS"]
    follow = agent.cli("logs", "-f", run_id, check=True)
    assert follow.stdout == "hi\n" and follow.stderr == f"labrun: run {run_id} Failed: exited with code 3\n"
    wait = agent.cli("wait", run_id)
    assert wait.returncode == 3 and f"{run_id}: Failed (exited with code 3)" in wait.stdout
    shown = agent.cli("show", run_id, check=True).stdout
    assert "Status:       Failed" in shown and "Exit code:    3" in shown and "Command:      sh -c" in shown
    as_json = json.loads(agent.cli("show", run_id, "--json", check=True).stdout)
    assert as_json["exit_code"] == 3 and as_json["reason"] == "exit_code"
    listed = json.loads(agent.cli("ls", "--all", "--json", check=True).stdout)
    assert [r["run_id"] for r in listed] == [run_id]


def test_cancel_and_wait_codes(agent, source):
    run_id = agent.cli("submit", "--source-dir", str(source), "--", "sleep", "60", check=True).stdout.strip()
    assert agent.cli("cancel", run_id, check=True).stdout.startswith(f"{run_id}: Cancel")
    assert agent.cli("wait", run_id).returncode == 130
    missing = agent.cli("cancel", "nope")
    assert missing.returncode == 125 and "no run with id 'nope'" in missing.stderr
    limited = agent.cli("run", "--source-dir", str(source), "--max-duration", "1s", "--", "sleep", "60")
    assert limited.returncode == 124 and "max_run_duration_seconds" in limited.stderr


def _sigint_as_at_a_terminal() -> None:
    # A suite started in the background (``scripts/test &``) inherits SIGINT ignored, and so would the CLI
    # under test: it would then rightly ignore Ctrl-C, as background jobs do.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_cancels_the_run(agent, source):
    process = subprocess.Popen([sys.executable, "-m", "labrun.cli", "run", "--source-dir", str(source), "--",
                                "sh", "-c", "echo ready; sleep 60"], env=agent.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_at_a_terminal)
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130 and "canceling" in err
    runs = json.loads(agent.cli("ls", "--json", check=True).stdout)
    assert runs[0]["status"] == "Canceled"


def test_status(make_agent, source):
    agent = make_agent('[resources]\ncpus = 2\nmemory = "4G"\ngpus = ["0", "1"]\n')
    run_id = agent.cli("submit", "--source-dir", str(source), "--gpus", "1", "--memory", "1G", "--", "sleep", "60",
                       check=True).stdout.strip()
    time.sleep(0.5)
    status = json.loads(agent.cli("status", "--json", check=True).stdout)
    assert status["capacity"]["cpus"] == 2 and status["capacity"]["gpus"] == ["0", "1"]
    assert status["in_use"] == {"cpus": 1, "memory": 1 << 30, "gpus": ["0"]}
    assert list(status["by_user"].values())[0]["runs"] == 1
    human = agent.cli("status", check=True).stdout
    assert "cpus      1/2 in use" in human and "gpus      1/2 in use (0 of 0,1)" in human
    agent.cli("cancel", run_id, check=True)


def test_usage_errors(agent, source):
    nothing = agent.cli("run", "--source-dir", str(source))
    assert nothing.returncode == 2 and "nothing to run" in nothing.stderr
    bad_env = agent.cli("submit", "--source-dir", str(source), "--env", "NOEQUALS", "--", "true")
    assert bad_env.returncode == 2 and "--env must be KEY=VALUE" in bad_env.stderr
    bad_duration = agent.cli("submit", "--max-duration", "soon", "--", "true")
    assert bad_duration.returncode == 2 and "duration must be" in bad_duration.stderr


def test_no_agent(tmp_path):
    from tests.conftest import AgentProcess

    agent = AgentProcess(tmp_path)   # never started
    result = agent.cli("ls")
    assert result.returncode == 125 and "no labrun agent answers" in result.stderr


def test_agent_takes_labrund_options(tmp_path):
    """``labrun agent [labrund options]``: every option after ``agent`` is labrund's, as the README says."""
    from tests.conftest import AgentProcess, socket_answers

    agent = AgentProcess(tmp_path)
    assert agent.cli("agent", "--help", check=True).stdout.startswith("usage: labrund")
    process = subprocess.Popen([sys.executable, "-m", "labrun.cli", "agent", "--socket", str(agent.socket),
                                "--state-dir", str(agent.state_dir)], env=agent.env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not socket_answers(agent.socket):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.05)
        status = json.loads(agent.cli("status", "--json", check=True).stdout)
        assert status["socket"] == str(agent.socket) and status["state_dir"] == str(agent.state_dir)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        process.stderr.close()
