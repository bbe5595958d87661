"""Scheduling end to end: declared capacity, exclusive GPUs, priorities, fair share between users, memory limits."""

import pytest

from labrun import Experiment, ScriptRunConfig
from tests.e2e.test_agent import as_nobody, needs_root, nobody_client, shared_source, wait_until  # noqa: F401

CAPACITY = '[resources]\ncpus = 2\nmemory = "2G"\ngpus = ["0", "1"]\n'
RECORD = "date +%s.%N > outputs/start; {body}; date +%s.%N > outputs/end"


def submit(agent, source, command, **kwargs):
    return Experiment(agent.workspace(), "sched").submit(ScriptRunConfig(str(source), command=command, **kwargs))


def interval(agent, run):
    outputs = agent.state_dir / "runs" / run.id / "outputs"
    return float((outputs / "start").read_text()), float((outputs / "end").read_text())


def test_concurrency_never_exceeds_declared_cpus(make_agent, source):
    agent = make_agent(CAPACITY)
    runs = [submit(agent, source, RECORD.format(body="sleep 0.5")) for _ in range(5)]
    runs.append(submit(agent, source, RECORD.format(body="sleep 0.5"), resources={"cpus": 2}))
    for run in runs:
        assert run.wait_for_completion()["status"] == "Completed"
    spans = [interval(agent, r) for r in runs]
    for moment in [s for s, _ in spans]:
        cpus = sum(2 if r is runs[-1] else 1 for r, (s, e) in zip(runs, spans) if s <= moment < e)
        assert cpus <= 2


def test_each_run_sees_only_its_gpus(make_agent, source):
    agent = make_agent(CAPACITY)
    show = 'echo "$CUDA_VISIBLE_DEVICES|$NVIDIA_VISIBLE_DEVICES|$CUDA_DEVICE_ORDER"; sleep 1'
    gpu_runs = [submit(agent, source, show, resources={"gpus": 1}) for _ in range(2)]
    no_gpu = submit(agent, source, show)
    seen = []
    for run in gpu_runs:
        run.wait_for_completion()
        devices, nvidia, order = run.get_log().strip().split("|")
        assert devices == nvidia and order == "PCI_BUS_ID"
        assert run._details["allocation"]["gpus"] == [devices]
        seen.append(devices)
    assert sorted(seen) == ["0", "1"]
    no_gpu.wait_for_completion()
    assert no_gpu.get_log().strip() == "|void|PCI_BUS_ID"
    shown = agent.cli("show", gpu_runs[0].id, check=True).stdout
    assert f"gpus={seen[0]}" in shown


def test_runs_are_pinned_to_their_cores(make_agent, source):
    agent = make_agent("[resources]\ncpus = 1\n")
    run = submit(agent, source, "grep Cpus_allowed_list /proc/self/status")
    run.wait_for_completion()
    assert run.get_log().split() == ["Cpus_allowed_list:", "0"]


def test_priority_orders_the_starts_and_ls_says_why(make_agent, source):
    agent = make_agent("[resources]\ncpus = 1\n")
    blocker = submit(agent, source, "sleep 1.5")
    low = submit(agent, source, RECORD.format(body="true"))
    high = submit(agent, source, RECORD.format(body="true"), priority=10)
    listing = agent.cli("ls", check=True).stdout
    assert "waiting: resources (#1)" in next(line for line in listing.splitlines() if high.id in line)
    assert "waiting: resources (#2)" in next(line for line in listing.splitlines() if low.id in line)
    for run in (blocker, low, high):
        run.wait_for_completion()
    assert interval(agent, high)[0] < interval(agent, low)[0]


def test_request_larger_than_the_machine_is_refused(make_agent, source):
    agent = make_agent(CAPACITY)
    result = agent.cli("submit", "--source-dir", str(source), "--gpus", "3", "--", "true")
    assert result.returncode == 125 and "asks for 3 GPUs but the agent has 2" in result.stderr
    result = agent.cli("submit", "--source-dir", str(source), "--memory", "3G", "--", "true")
    assert result.returncode == 125 and "memory" in result.stderr


@needs_root
def test_fair_share_between_users(make_agent, shared_source, nobody_client):
    """With one CPU free, the user holding less of the machine goes first, whatever the submit order."""
    agent = make_agent("[resources]\ncpus = 2\n")
    agent.root.chmod(0o755)
    (shared_source / "outputs").mkdir(exist_ok=True)
    long = submit(agent, shared_source, "sleep 30")
    submit(agent, shared_source, "sleep 2")   # frees a CPU in 2 s, while both wait
    root_run = submit(agent, shared_source, RECORD.format(body="true"))
    code = ("from labrun import Workspace, Experiment, ScriptRunConfig\n"
            f"run = Experiment(Workspace(), 'sched').submit(ScriptRunConfig('.', command={RECORD.format(body='true')!r}))\n"
            "print(run.id)\nprint(run.wait_for_completion()['status'])\n")
    result = as_nobody(agent, nobody_client, code, shared_source)
    assert result.returncode == 0, result.stderr
    nobody_id, status = result.stdout.split()
    assert status == "Completed"
    root_run.wait_for_completion()
    runs = {r["run_id"]: r for r in agent.workspace()._call("list", all=True)}
    assert runs[nobody_id]["started_at"] < runs[root_run.id]["started_at"]
    assert runs[nobody_id]["user"] == "nobody"
    long.cancel()


@pytest.mark.parametrize("enforcement", ["auto", "watchdog"])
def test_memory_hog_fails_with_the_reason(make_agent, source, enforcement):
    agent = make_agent(f'[resources]\nmemory_enforcement = "{enforcement}"\n')
    hog = submit(agent, source, ["python3", "-c", "import time; x = bytearray(600 << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(30)"],
                 resources={"memory": "200M"})
    details = hog.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed"
    assert hog._details["reason"] == "memory_limit_exceeded"
    assert "memory_limit_exceeded" in agent.cli("show", hog.id, check=True).stdout
    fine = submit(agent, source, ["python3", "-c", "x = bytearray(20 << 20); print('ok')"], resources={"memory": "200M"})
    assert fine.wait_for_completion()["status"] == "Completed"


def test_queue_order_survives_restart(make_agent, source):
    agent = make_agent("[resources]\ncpus = 1\n")
    blocker = submit(agent, source, "sleep 1")
    wait_until(lambda: blocker.get_status() == "Running", what="blocker")
    queued = [submit(agent, source, RECORD.format(body="true"), priority=p) for p in (0, 5, 0)]
    agent.restart()
    for run in queued:
        assert run.wait_for_completion()["status"] == "Completed"
    starts = [interval(agent, r)[0] for r in queued]
    assert starts[1] < starts[0] < starts[2]
