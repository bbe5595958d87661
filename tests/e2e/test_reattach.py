"""Runs outlive the agent: kill -9 and restarts, reattaching to shims and containers, a run ending with all
its processes, draining.

Runs that must outlive a restart wait for a ``go`` file in their own working directory (the
test creates it), so nothing here depends on how long a restart takes.
"""

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from labrun import Experiment, PyTorchConfiguration, Run, ScriptRunConfig
from tests.e2e.test_agent import processes_of, submit, wait_until
from tests.e2e.test_docker import container_run, image  # noqa: F401 (a fixture)

GATED = "echo start; while [ ! -e go ]; do sleep 0.05; done; echo end; exit {code}"
# Rank 1 of the failing run fails only once rank 0 is done: a failing rank stops the others.
GATED_RANKS = ("import os, sys, time\n"
               "rank = os.environ['RANK']\n"
               "print('start', rank, flush=True)\n"
               "while not os.path.exists('go'):\n"
               "    time.sleep(0.05)\n"
               "print('end', rank, flush=True)\n"
               "if rank == '0':\n"
               "    open('rank0-done', 'w').close()\n"
               "elif 'fail' in sys.argv:\n"
               "    while not os.path.exists('rank0-done'):\n"
               "        time.sleep(0.05)\n"
               "    sys.exit(6)\n")


def ranks_of(run_id: str) -> list[int]:
    """The run's rank processes: its shim's children (their shells sleep in a loop: the sleeps come and go)."""
    shims = set(_shims())
    return [pid for pid in processes_of(run_id) if _parent(pid) in shims]


def go(agent, run):
    (agent.state_dir / "runs" / run.id / "snapshot" / "go").touch()


@pytest.mark.slow
@pytest.mark.docker
def test_kill_9_with_runs_running_and_queued(make_agent, source, image):  # noqa: F811
    agent = make_agent("[resources]\ncpus = 10\n[agent]\nstop_grace_seconds = 1\n")
    (source / "ranks.py").write_text(GATED_RANKS)
    local = [submit(agent, source, ["sh", "-c", GATED.format(code=code)]) for code in range(6)]
    distributed = [Experiment(agent.workspace(), "dist").submit(ScriptRunConfig(
        str(source), script="ranks.py", arguments=arguments, distributed_job_config=PyTorchConfiguration(process_count=2)))
        for arguments in ([], ["fail"])]
    containers = [container_run(agent, source, GATED.format(code=code)) for code in (10, 11)]
    running = local + distributed + containers
    queued = [submit(agent, source, ["echo", str(i)]) for i in range(100)]
    wait_until(lambda: all(r.get_status() == "Running" for r in running), timeout=60, what="10 runs running")
    wait_until(lambda: all("start" in r.get_log() for r in running), timeout=30, what="every run started")
    leaders = {r.id: ranks_of(r.id) for r in local + distributed}
    assert all(leaders.values())

    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    agent.start()

    # Reattached, not restarted: the same processes, each run started once, the queue untouched.
    assert all(r.get_status() == "Running" for r in running)
    assert {r.id: ranks_of(r.id) for r in local + distributed} == leaders
    assert all(r.get_status() == "Queued" for r in queued)
    for run in running:
        go(agent, run)
    for run in running + queued:
        run.wait_for_completion(raise_on_error=False)

    assert [r._details["exit_code"] for r in local] == list(range(6))
    assert [r.get_status() for r in local] == ["Completed"] + ["Failed"] * 5
    assert [r._details["exit_code"] for r in containers] == [10, 11]
    for run in local + containers:
        assert run.get_log() == "start\nend\n"
    assert [r.get_status() for r in distributed] == ["Completed", "Failed"]
    assert distributed[1]._details["exit_code"] == 6
    for run in distributed:
        logs = agent.state_dir / "runs" / run.id / "logs"
        for rank in (0, 1):
            assert (logs / f"std_log_process_{rank}.txt").read_text() == f"start {rank}\nend {rank}\n"
    for i, run in enumerate(queued):
        assert run.get_status() == "Completed" and run.get_log() == f"{i}\n"
    events = list(agent.workspace().watch(0, follow=False))
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # The queue kept its order: the scheduler took the queued runs in the order they were submitted.
    ids = {r.id for r in queued}
    assert [e["run_id"] for e in events if e["type"] == "run.preparing" and e["run_id"] in ids] == \
        [r.id for r in queued]
    for run in running:
        assert [e["type"] for e in events if e["run_id"] == run.id].count("run.started") == 1
    assert all(processes_of(r.id) == [] for r in local + distributed)


def test_a_run_that_ended_while_the_agent_was_down_keeps_its_exit_code_and_log(make_agent, source):
    agent = make_agent()
    run = submit(agent, source, ["sh", "-c", GATED.format(code=9)])
    wait_until(lambda: "start" in run.get_log(), what="started")
    agent.stop(signal.SIGKILL)
    go(agent, run)
    wait_until(lambda: processes_of(run.id) == [], what="the run to end")
    agent.start()
    assert run.get_status() == "Failed" and run._details["exit_code"] == 9 and run._details["reason"] == "exit_code"
    assert run.get_log() == "start\nend\n"


def test_agent_lost_only_when_the_shim_is_really_gone(make_agent, source):
    agent = make_agent()
    run = submit(agent, source, ["sh", "-c", GATED.format(code=0)])
    wait_until(lambda: "start" in run.get_log(), what="started")
    agent.stop(signal.SIGKILL)
    shims = {_parent(pid) for pid in processes_of(run.id)} & set(_shims())
    assert len(shims) == 1, "the run's shim outlived the agent"
    os.kill(shims.pop(), signal.SIGKILL)
    agent.start()
    assert run.get_status() == "Failed" and run._details["reason"] == "agent_lost"
    assert processes_of(run.id) == []   # what the shim left is killed


def test_runs_start_and_go_on_when_the_forkserver_dies(make_agent, source):
    """The agent's forkserver forks the runs' shims: a run outlives it, and a new one is started for the next run."""
    agent = make_agent()
    first = submit(agent, source, ["sh", "-c", GATED.format(code=0)])
    wait_until(lambda: "start" in first.get_log(), what="started")
    forkserver = _forkserver_of(agent.process.pid)
    os.kill(forkserver, signal.SIGKILL)
    wait_until(lambda: _forkserver_of(agent.process.pid) != forkserver, what="the forkserver to go")
    second = submit(agent, source, ["echo", "second"])
    assert second.wait_for_completion()["status"] == "Completed" and second.get_log() == "second\n"
    assert _forkserver_of(agent.process.pid) not in (None, forkserver)
    assert first.get_status() == "Running"
    go(agent, first)
    assert first.wait_for_completion()["status"] == "Completed"
    # It goes with the agent: its socket closes.
    forkserver = _forkserver_of(agent.process.pid)
    agent.stop(signal.SIGKILL)
    wait_until(lambda: not _alive(forkserver), what="the forkserver to exit with the agent")


def test_spare_shims_go_with_the_agent_or_with_the_next_one(make_agent, source):
    """With cgroups, shims wait in spare groups for the next runs; a stopped agent ends them and removes their
    groups; those of an agent that was killed end with it, and the next agent removes their groups."""
    from labrun.agent._cgroups import RunCgroups
    from labrun.agent.executors._base import agent_id

    agent = make_agent()
    cgroups = RunCgroups.detect(name=agent_id(agent.state_dir))
    if cgroups is None:
        pytest.skip("no cgroup can be made here: spare shims wait only in cgroups")

    def spares() -> list[Path]:
        return [g for g in cgroups.tracking.iterdir() if g.name.startswith("spare-")]

    def waiting() -> list[int]:
        return [int(pid) for group in spares() for pid in (group / "cgroup.procs").read_text().split()]

    assert submit(agent, source, ["true"]).wait_for_completion()["status"] == "Completed"
    wait_until(lambda: len(waiting()) == 2, what="two spare shims in their groups")
    shims = waiting()
    agent.stop()
    assert all(not _alive(pid) for pid in shims) and not cgroups.tracking.exists()

    agent.start()
    assert submit(agent, source, ["true"]).wait_for_completion()["status"] == "Completed"
    wait_until(lambda: len(waiting()) == 2, what="two spare shims in their groups")
    left, shims = {group.name for group in spares()}, waiting()
    agent.stop(signal.SIGKILL)
    # Their plan pipes closed with the agent: they end, and leave their groups to the next agent.
    wait_until(lambda: all(not _alive(pid) for pid in shims), what="the old spares to end")
    assert left <= {group.name for group in spares()}
    agent.start()
    assert not left & {group.name for group in spares()}


def test_an_ended_runs_empty_group_becomes_the_next_spares(make_agent, source):
    """A run takes a spare shim's tracking group as it is (no rename on its way to start), and the ended run's
    group goes to the next spare (no rmdir and mkdir per run); a group that carries a limit (a v1 memory group)
    is removed."""
    from labrun.agent._cgroups import RunCgroups
    from labrun.agent.executors._base import agent_id

    agent = make_agent("[resources]\nmax_concurrent_runs = 1\n")
    cgroups = RunCgroups.detect(name=agent_id(agent.state_dir))
    if cgroups is None:
        pytest.skip("no cgroup can be made here: spare shims wait only in cgroups")
    assert submit(agent, source, ["true"]).wait_for_completion()["status"] == "Completed"
    wait_until(lambda: len([g for g in cgroups.tracking.iterdir() if g.name.startswith("spare-")
                            and (g / "cgroup.procs").read_text().split()]) == 2, what="two spare shims")
    run = submit(agent, source, "sleep 1", resources={"memory": "64M"})

    def group_of_sleep() -> Path | None:
        for group in cgroups.tracking.iterdir():
            with contextlib.suppress(OSError):   # (a group removed meanwhile, a process gone)
                for pid in (group / "cgroup.procs").read_text().split() if group.is_dir() else ():
                    if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"1"]:
                        return group
        return None

    wait_until(lambda: group_of_sleep() is not None, what="the run's group")
    group = group_of_sleep()
    assert group.name.startswith("spare-") and not (cgroups.tracking / run.id).exists()
    inode = group.stat().st_ino
    memory = cgroups.memory / run.id if cgroups.version == 1 and cgroups.memory is not None else None
    assert memory is None or memory.is_dir()
    assert run.wait_for_completion()["status"] == "Completed"

    wait_until(lambda: memory is None or not memory.exists(), what="the run's memory group removed")
    assert submit(agent, source, ["true"]).wait_for_completion()["status"] == "Completed"

    def waits_in_it() -> bool:   # a spare shim forked since, for the run after
        with contextlib.suppress(OSError):
            return group.stat().st_ino == inode and bool((group / "cgroup.procs").read_text().split())
        return False

    if cgroups.reusable(str(group)):
        wait_until(waits_in_it, what="a new spare in the ended run's group")


def test_a_run_keeps_its_spares_group_and_an_ended_runs_group_keeps_a_spares_name(tmp_path):
    from labrun.agent._cgroups import RunCgroups

    cgroups = RunCgroups(version=1, tracking=tmp_path / "pids")
    cgroups.tracking.mkdir()
    spare = cgroups.create_spare("spare-1abc-1")
    assert cgroups.claim(spare, "exp_1_cafe", None) == [spare]   # no rename on the way to a start
    assert cgroups.recycle(spare, "spare-1abc-2") == spare
    made = cgroups.create("exp_2_beef", None)[0]   # no spare was waiting: named after its run
    assert cgroups.recycle(made, "spare-1abc-3") == str(tmp_path / "pids" / "spare-1abc-3")
    assert sorted(p.name for p in (tmp_path / "pids").iterdir()) == ["spare-1abc-1", "spare-1abc-3"]


def test_groups_with_limits_or_counts_are_not_recycled(tmp_path):
    from labrun.agent._cgroups import RunCgroups

    v1 = RunCgroups(version=1, tracking=tmp_path / "pids", memory=tmp_path / "memory")
    assert v1.reusable(str(tmp_path / "pids" / "run")) and not v1.reusable(str(tmp_path / "memory" / "run"))
    v2 = RunCgroups(version=2, tracking=tmp_path / "runs", memory=tmp_path / "runs")
    assert not v2.reusable(str(tmp_path / "runs" / "run"))   # memory.max and memory.events live on it
    assert RunCgroups(version=2, tracking=tmp_path / "runs").reusable(str(tmp_path / "runs" / "run"))


def test_short_runs_back_to_back_all_start(make_agent, source):
    """Runs starting faster than spare shims join their groups: each run gets a spare that is ready, or a
    shim of its own."""
    agent = make_agent("[resources]\nmax_concurrent_runs = 2\n")
    runs = [submit(agent, source, ["true"]) for _ in range(40)]
    assert [run.wait_for_completion(raise_on_error=False)["status"] for run in runs] == ["Completed"] * 40


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _forkserver_of(agent_pid: int) -> int | None:
    for pid in _shims():
        if _parent(pid) == agent_pid and b"--forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


def _shims() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if b"_shim.py" in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def test_the_time_limit_and_cancel_work_after_a_reattach(make_agent, source):
    agent = make_agent("[agent]\nstop_grace_seconds = 1\n")
    limited = submit(agent, source, ["sleep", "300"], max_run_duration_seconds=8)
    canceled = submit(agent, source, ["sleep", "300"])
    wait_until(lambda: limited.get_status() == canceled.get_status() == "Running", what="running")
    agent.stop(signal.SIGKILL)
    agent.start()
    canceled.cancel()
    assert canceled.wait_for_completion(raise_on_error=False)["status"] == "Canceled"
    details = limited.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Canceled" and limited._details["reason"] == "max_run_duration_exceeded"
    assert processes_of(limited.id) == processes_of(canceled.id) == []


def test_the_run_token_works_after_a_restart(make_agent, source):
    agent = make_agent()
    (source / "log_after.py").write_text(
        "import os, time\nfrom labrun import Run\n"
        "while not os.path.exists('go'):\n    time.sleep(0.05)\n"
        "Run.get_context().log('after_restart', 1.5)\n")
    run = Experiment(agent.workspace(), "token").submit(ScriptRunConfig(str(source), script="log_after.py"))
    wait_until(lambda: run.get_status() == "Running", what="running")
    agent.stop(signal.SIGKILL)
    agent.start()
    go(agent, run)
    assert run.wait_for_completion()["status"] == "Completed"
    assert run.get_metrics() == {"after_restart": 1.5}


# -- a run ends with all its processes -----------------------------------------------------

ESCAPE = "(setsid sh -c \"trap '' TERM; sleep 300\" &); echo escaped"


@pytest.mark.parametrize("ending", ["cancel", "time limit", "main process exits"])
def test_a_double_forked_daemon_does_not_survive_its_run(make_agent, source, ending):
    agent = make_agent("[agent]\nstop_grace_seconds = 1\n")
    command = ESCAPE if ending == "main process exits" else ESCAPE + "; sleep 300"
    limit = {"max_run_duration_seconds": 5} if ending == "time limit" else {}
    run = submit(agent, source, ["sh", "-c", command], **limit)
    wait_until(lambda: "escaped" in run.get_log(), what="the daemon to start")
    if ending == "cancel":
        run.cancel()
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == {"cancel": "Canceled", "time limit": "Canceled",
                                 "main process exits": "Completed"}[ending]
    assert processes_of(run.id) == []


def test_status_says_how_runs_are_contained(agent):
    status = agent.workspace().status()
    assert status["containment"]["local"].startswith(("cgroup v", "process groups"))
    assert "contain" in agent.cli("status").stdout


# -- draining --------------------------------------------------------------------------------

def test_drain_waits_for_active_runs_and_starts_none_until_resumed(make_agent, source):
    agent = make_agent()
    running = submit(agent, source, ["sh", "-c", GATED.format(code=0)])
    wait_until(lambda: running.get_status() == "Running", what="running")
    result = agent.cli("agent", "drain", "--no-wait")
    assert result.returncode == 0 and "1 active run" in result.stdout
    queued = submit(agent, source, ["echo", "later"])
    status = agent.workspace().status()
    assert status["draining"] and not status["drained"]
    go(agent, running)
    assert agent.cli("agent", "drain", timeout=60).returncode == 0   # returns once nothing is active
    assert running.get_status() == "Completed" and queued.get_status() == "Queued"
    agent.restart()   # draining is kept across a restart
    assert agent.workspace().status()["draining"] and queued.get_status() == "Queued"
    assert "drained" in agent.cli("status").stdout
    assert agent.cli("agent", "resume").returncode == 0
    assert queued.wait_for_completion()["status"] == "Completed"
    types = [e["type"] for e in agent.workspace().watch(0, follow=False)]
    assert "agent.draining" in types and "agent.resumed" in types


def test_a_run_no_record_owns_is_killed_at_start(make_agent, source):
    """The agent died between starting a run and recording it: the run is queued again, and what it had
    started must not keep running beside its second start."""
    from labrun.agent._cgroups import RunCgroups
    from labrun.agent.executors._base import agent_id

    agent = make_agent()
    cgroups = RunCgroups.detect(name=agent_id(agent.state_dir))
    if cgroups is None:
        pytest.skip("no cgroup can be made here: orphans are found through cgroups")
    group = cgroups.tracking / "exp_1_deadbeef"
    group.mkdir()
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        (group / "cgroup.procs").write_text(str(orphan.pid))
        agent.stop(signal.SIGKILL)
        agent.start()
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert not group.exists()
    finally:
        orphan.kill()
        orphan.wait()


def submit_argv(agent, source, argv):
    """A run of ``argv`` exec'd as it is, as the CLI submits it (the Python API joins a list for a shell)."""
    run_id = agent.cli("submit", "--source-dir", str(source), "--", *argv, check=True).stdout.strip()
    return Run(Experiment(agent.workspace(), "default"), run_id)


def test_a_command_that_cannot_start_fails_the_run_and_its_log_says_why(agent, source):
    missing = submit_argv(agent, source, ["/no/such/program", "x"])
    assert missing.wait_for_completion(raise_on_error=False)["status"] == "Failed"
    assert missing._details["reason"] == "command_not_found"
    assert "cannot start '/no/such/program': No such file or directory" in missing.get_log()
    (source / "plain.txt").write_text("not a program")
    refused = submit_argv(agent, source, ["./plain.txt"])
    assert refused.wait_for_completion(raise_on_error=False)["status"] == "Failed"
    assert refused._details["reason"] == "start_failed" and "Permission denied" in refused.get_log()


async def test_a_recovered_run_that_ended_leaves_alone_the_group_another_run_took_since(tmp_path):
    """An ended run's group goes to the next spare: should the agent have stopped before it recorded how that run
    ended, the next agent recovers both, and must not end the second run as what is left of the first."""
    from labrun.agent._cgroups import RunCgroups
    from labrun.agent.executors._local import LocalExecutor, LocalHandle

    group = tmp_path / "pids" / "spare-1-abc-1"
    group.mkdir(parents=True)
    second = subprocess.Popen(["sleep", "300"])
    try:
        (group / "cgroup.procs").write_text(f"{second.pid}\n")   # (a stand-in: the file a cgroup would have)
        executor = LocalExecutor(RunCgroups(version=1, tracking=tmp_path / "pids"))
        ended = LocalHandle(pids=(2**22 + 1,), daemons=(False,), start_time=1, shim=2**22 + 1,
                            cgroups=(str(group),), exit_path=str(tmp_path / "exit.json"))
        taken = LocalHandle(pids=(second.pid,), daemons=(False,), start_time=None, shim=second.pid,
                            cgroups=(str(group),))
        executor.recovering([ended, taken])
        await executor.recover(ended)
        assert second.poll() is None and group.is_dir()
        executor.recovering([ended])   # alone, what is in its group is what is left of it
        await executor.recover(ended)
        assert second.wait(timeout=10) == -signal.SIGKILL
    finally:
        second.kill()
        second.wait()
