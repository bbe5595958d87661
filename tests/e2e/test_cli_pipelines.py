"""Dependencies (``--after``/``--afterok``) and arrays (``--array 0-9%2``) through the real CLI and agent."""

import json
import re
import time

from labrun import Experiment, ScriptRunConfig
from tests.e2e.test_agent import wait_until


def submit(agent, source, *args) -> str:
    return agent.cli("submit", "--source-dir", str(source), *args, check=True).stdout.strip()


def show(agent, run_id) -> dict:
    return json.loads(agent.cli("show", run_id, "--json", check=True).stdout)


# Runs until the test lets it go (a file in its working directory), so "still running" never depends on timing.
HELD = "while [ ! -e go ]; do sleep 0.05; done"


def let_go(agent, run_id):
    (agent.state_dir / "runs" / run_id / "snapshot" / "go").touch()


def test_afterok_chain_where_the_middle_run_fails(agent, source):
    first = submit(agent, source, "--", "sh", "-c", HELD)
    middle = submit(agent, source, "--afterok", first, "--", "sh", "-c", "exit 3")
    last = submit(agent, source, "--afterok", middle, "--", "echo", "never")
    anyway = submit(agent, source, "--after", middle, "--", "echo", "cleanup")
    listing = agent.cli("ls", check=True).stdout
    assert re.search(rf"{middle} .*waiting: dependency \({first}\)", listing), listing
    assert re.search(rf"{last} .*waiting: dependency \({middle}\)", listing), listing
    let_go(agent, first)

    assert agent.cli("wait", first, middle, last, anyway).returncode == 3
    first_run, middle_run, last_run, anyway_run = (show(agent, r) for r in (first, middle, last, anyway))
    assert first_run["status"] == "Completed"
    assert middle_run["status"] == "Failed" and middle_run["started_at"] >= first_run["ended_at"]
    assert middle_run["afterok"] == [first]
    assert last_run["status"] == "Canceled" and last_run["reason"] == "dependency_failed"
    assert last_run["started_at"] is None and middle in last_run["error"]
    assert anyway_run["status"] == "Completed" and anyway_run["started_at"] >= middle_run["ended_at"]
    assert agent.cli("logs", anyway, check=True).stdout == "cleanup\n"
    assert agent.cli("wait", last).returncode == 130


def test_slurm_dependency_spelling(agent, source):
    first = submit(agent, source, "--", "true")
    second = submit(agent, source, "--", "true")
    both = show(agent, submit(agent, source, "--dependency", f"afterok:{first}:{second},afterany:{first}", "--",
                              "true"))
    assert (both["afterok"], both["after"]) == ([first, second], [first])
    refused = agent.cli("submit", "--source-dir", str(source), "-d", f"afternotok:{first}", "--", "true")
    assert refused.returncode == 2 and "afterok:RUN" in refused.stderr


def test_unknown_dependency_is_refused_at_submit(agent, source):
    refused = agent.cli("submit", "--source-dir", str(source), "--after", "default_1_deadbeef", "--", "true")
    assert refused.returncode == 125 and "no run or array with id 'default_1_deadbeef'" in refused.stderr
    assert json.loads(agent.cli("ls", "--all", "--json", check=True).stdout) == []


def test_dependencies_survive_an_agent_restart(make_agent, source):
    agent = make_agent("[resources]\ncpus = 1\n")
    blocker = submit(agent, source, "--", "sleep", "60")
    first = submit(agent, source, "--", "sh", "-c", HELD)
    second = submit(agent, source, "--afterok", first, "--", "echo", "second")
    agent.restart()   # the blocker outlives it (reattached, or queued again if it had not started)
    assert show(agent, second)["status"] == "Queued" and show(agent, second)["afterok"] == [first]
    assert show(agent, blocker)["status"] in ("Running", "Queued")
    agent.cli("cancel", blocker, check=True)   # so first starts
    wait_until(lambda: show(agent, first)["status"] == "Running", what="first to start")
    let_go(agent, first)
    assert agent.cli("wait", first, second, check=True).stdout.count("Completed") == 2
    assert show(agent, second)["started_at"] >= show(agent, first)["ended_at"]


def test_python_after(agent, source):
    experiment = Experiment(agent.workspace(), "deps")
    first = experiment.submit(ScriptRunConfig(str(source), command="sleep 1; exit 1"))
    second = experiment.submit(ScriptRunConfig(str(source), command=["true"], afterok=[first]))
    third = experiment.submit(ScriptRunConfig(str(source), command=["true"], after=[first.id]))
    third.wait_for_completion()
    assert second.get_status() == "Canceled" and third.get_status() == "Completed"
    assert show(agent, second.id)["reason"] == "dependency_failed"


STAMP = """\
import os, time
print("start", time.time(), flush=True)
time.sleep(1)
print("end", time.time(), os.environ["LABRUN_ARRAY_INDEX"], os.environ["SLURM_ARRAY_TASK_ID"],
      os.environ["SLURM_ARRAY_TASK_COUNT"])
"""


def test_array_of_ten_runs_two_at_a_time(make_agent, source):
    agent = make_agent("[resources]\ncpus = 4\n")
    (source / "stamp.py").write_text(STAMP)
    array_id = submit(agent, source, "--array", "0-9%2", "--script", "stamp.py")
    members = json.loads(agent.cli("ls", "--array", array_id, "--json", check=True).stdout)
    assert sorted(m["array"]["index"] for m in members) == list(range(10))
    assert {m["array"]["throttle"] for m in members} == {2} and {m["array"]["id"] for m in members} == {array_id}
    assert sorted(m["run_id"] for m in members) == sorted(f"{array_id}_{i}" for i in range(10))
    grouped = agent.cli("ls", check=True).stdout
    assert f"{array_id}_[0-9%2]" in grouped and f"{array_id}_3 " not in grouped
    row = next(line for line in grouped.splitlines() if line.startswith(f"{array_id}_["))
    assert row.split()[1] == "-"   # no --name: no display name, not the first run's id

    follower = submit(agent, source, "--afterok", array_id, "--", "echo", "all done")
    assert show(agent, follower)["afterok"] == [f"{array_id}_{i}" for i in range(10)]   # the array's runs
    assert agent.cli("wait", array_id, follower, check=True).stdout.count("Completed") == 11
    assert show(agent, follower)["started_at"] >= max(m["ended_at"] for m in
                                                     json.loads(agent.cli("ls", "--array", array_id, "--json").stdout))
    logs = agent.cli("logs", array_id, check=True).stdout
    spans = []
    for index, chunk in enumerate(logs.split("==> ")[1:]):
        header, _, body = chunk.partition(" <==\n")
        assert header == f"{array_id}_{index}"
        start = float(re.search(r"^start (\S+)$", body, re.M)[1])
        end, seen_index, slurm_index, count = re.search(r"^end (\S+) (\d+) (\d+) (\d+)$", body, re.M).groups()
        assert int(seen_index) == int(slurm_index) == index and count == "10"
        spans.append((start, float(end)))
    # The runs' own clocks: how many ran at once, at each start.
    at_once = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert at_once == 2, spans


def test_array_cancel_and_forms(agent, source):
    array_id = submit(agent, source, "--array", "1,3,5%1", "--", "sleep", "60")
    while show(agent, f"{array_id}_1")["status"] != "Running":
        time.sleep(0.05)
    canceled = json.loads(agent.cli("cancel", array_id, "--json", check=True).stdout)
    # The queued runs go first, so canceling the running one frees no slot for them.
    assert [r["array"]["index"] for r in canceled] == [3, 5, 1]
    assert agent.cli("wait", array_id).returncode == 130
    assert [show(agent, f"{array_id}_{i}")["started_at"] is None for i in (1, 3, 5)] == [False, True, True]
    stepped = json.loads(agent.cli("submit", "--source-dir", str(source), "--array", "0-15:4", "--json", "--",
                                   "true", check=True).stdout)
    assert [r["array"]["index"] for r in stepped["runs"]] == [0, 4, 8, 12]
    bad = agent.cli("submit", "--source-dir", str(source), "--array", "5-1", "--", "true")
    assert bad.returncode == 2 and "empty range" in bad.stderr
