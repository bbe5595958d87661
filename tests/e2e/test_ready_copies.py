"""Ready copies end to end: a user's repeated tree is copied ahead, as that user, taken by the next run of
it, and no copy outlives the agent, stopped or killed."""

import json
import os
import pwd
import signal

from labrun import Experiment, ScriptRunConfig
from tests.e2e.test_agent import as_nobody, needs_root, nobody_client, shared_source, wait_until  # noqa: F401


def ready_entries(agent) -> list[str]:
    return os.listdir(agent.state_dir / "ready")


SUBMIT = ("import sys\nfrom labrun import Workspace, Experiment, ScriptRunConfig\n"
          "ws = Workspace()\n"
          "for _ in range(int(sys.argv[1])):\n"
          "    run = Experiment(ws, 'sweep').submit(ScriptRunConfig('.', command="
          "'cat data.txt; echo changed > data.txt; stat -c %u:%g data.txt'))\n"
          "    run.wait_for_completion()\n"
          "    print(run.get_log().replace(chr(10), ' '))\n")


@needs_root
def test_a_users_repeated_tree_is_copied_ahead_as_that_user_and_taken_by_the_next_run(agent, shared_source,
                                                                                     nobody_client):
    agent.root.chmod(0o755)
    nobody = pwd.getpwnam("nobody")
    (shared_source / "data.txt").write_bytes(b"original\n")
    (shared_source / "data.txt").chmod(0o644)
    owner = f"{nobody.pw_uid}:{nobody.pw_gid}"

    first = as_nobody(agent, nobody_client, SUBMIT.replace("sys.argv[1]", "'1'"), shared_source)
    assert first.returncode == 0, first.stderr
    assert ready_entries(agent) == []   # a tree submitted once is not copied ahead
    second = as_nobody(agent, nobody_client, SUBMIT.replace("sys.argv[1]", "'1'"), shared_source)
    assert second.returncode == 0, second.stderr
    wait_until(lambda: len(ready_entries(agent)) == 1, what="a ready copy")
    copy = agent.state_dir / "ready" / ready_entries(agent)[0]
    assert (copy.stat().st_uid, oct(copy.stat().st_mode & 0o777)) == (nobody.pw_uid, "0o700")
    assert (copy / "snapshot" / "data.txt").stat().st_uid == nobody.pw_uid

    # Each run changes its snapshot; the next run still sees the tree as submitted, as its user's.
    third = as_nobody(agent, nobody_client, SUBMIT.replace("sys.argv[1]", "'3'"), shared_source)
    assert third.returncode == 0, third.stderr
    assert third.stdout.splitlines() == [f"original {owner} "] * 3
    assert not copy.exists(), "the next run took the copy"
    assert (shared_source / "data.txt").read_bytes() == b"original\n"

    # Root's run of the same tree does not take nobody's copy.
    wait_until(lambda: len(ready_entries(agent)) == 1, what="the next ready copy")
    kept = ready_entries(agent)
    root_run = Experiment(agent.workspace(), "sweep").submit(ScriptRunConfig(str(shared_source), command="cat data.txt"))
    root_run.wait_for_completion()
    assert root_run.get_log() == "original\n" and ready_entries(agent) == kept

    agent.cancel_active()
    agent.stop()
    assert ready_entries(agent) == [], "removed at shutdown"


@needs_root
def test_a_killed_agent_leaves_no_ready_copy_behind(agent, shared_source, nobody_client):
    agent.root.chmod(0o755)
    (shared_source / "data.txt").write_bytes(b"original\n")
    (shared_source / "data.txt").chmod(0o644)
    result = as_nobody(agent, nobody_client, SUBMIT.replace("sys.argv[1]", "'2'"), shared_source)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(ready_entries(agent)) == 1, what="a ready copy")
    agent.stop(signal.SIGKILL)
    assert len(ready_entries(agent)) == 1
    agent.start()
    assert ready_entries(agent) == []


def test_status_counts_ready_copies_with_the_snapshot_store(agent, tmp_path):
    source = tmp_path / "tree"
    source.mkdir()
    (source / "weights.bin").write_bytes(os.urandom(4 << 20))
    experiment = Experiment(agent.workspace(), "sweep")
    for _ in range(2):
        experiment.submit(ScriptRunConfig(str(source), command="true")).wait_for_completion()
    wait_until(lambda: len(ready_entries(agent)) == 1, what="a ready copy")
    disk = json.loads(agent.cli("status", "--json", check=True).stdout)["disk"]
    assert disk["snapshot_store_bytes"] >= 2 * (4 << 20), "the store's content and its ready copy"
