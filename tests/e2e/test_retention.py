"""``labrun rm``, ``labrun clean`` and ``[runs] retention_days``: the disk is really freed, the database stays
consistent, and ``ls`` and ``metrics`` keep working."""

import json
import os
import sqlite3
import time

import pytest

from labrun.agent._retention import disk_usage, remove_tree
from tests.e2e.test_agent import as_nobody, needs_root, nobody_client, shared_source, wait_until  # noqa: F401
from tests.e2e.test_slurm import cluster_agent, cluster_source, slurm_cluster  # noqa: F401
from tests.stored_contents import stored

# A run that writes 4 MiB of outputs and a metric, and plants what a hostile user would: links out of the run
# directory (to a file and to a directory) and a directory it made read-only.
WRITER = """\
import os, sys
from labrun import Run
os.makedirs("outputs/ro", exist_ok=True)
open("outputs/big.bin", "wb").write(os.urandom(4 << 20))
open("outputs/ro/kept.txt", "w").write("x")
os.chmod("outputs/ro", 0o500)
os.symlink(sys.argv[1], "outputs/link-to-dir")
os.symlink(os.path.join(sys.argv[1], "precious.txt"), "outputs/link-to-file")
Run.get_context().log("score", 1.5)
"""


def make_run(agent, source, victim, *args) -> str:
    (source / "writer.py").write_text(WRITER)
    result = agent.cli("run", "--source-dir", str(source), "--json", *args, "--script", "writer.py", "--",
                       str(victim), check=True)
    return json.loads(result.stdout)["run_id"]


def victim_dir(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    return victim


def rows(agent, table: str, run_id: str) -> int:
    with sqlite3.connect(agent.state_dir / "state.db") as db:
        return db.execute(f"SELECT COUNT(*) FROM {table} WHERE run_id = ?", (run_id,)).fetchone()[0]


def test_rm_frees_the_disk_and_keeps_the_run(agent, source, tmp_path):
    victim = victim_dir(tmp_path)
    run_id = make_run(agent, source, victim)
    run_dir = agent.state_dir / "runs" / run_id
    before = disk_usage(agent.state_dir / "runs")
    assert before > 4 << 20

    running = agent.cli("submit", "--source-dir", str(source), "--", "sleep", "60", check=True).stdout.strip()
    refused = agent.cli("rm", running)
    assert refused.returncode == 125 and "only finished runs can be removed" in refused.stderr
    agent.cli("cancel", running, check=True)

    removed = agent.cli("rm", run_id, check=True)
    assert removed.stdout.startswith(f"removed {run_id} (") and "freed" in removed.stderr
    assert not run_dir.exists()
    assert (victim / "precious.txt").read_text() == "keep me"   # the links were deleted, never followed
    assert before - disk_usage(agent.state_dir / "runs") >= 4 << 20

    listed = json.loads(agent.cli("ls", "--all", "--json", check=True).stdout)
    assert [r["files_removed_at"] is not None for r in listed if r["run_id"] == run_id] == [True]
    assert "files removed" in agent.cli("ls", "--all", check=True).stdout
    assert "score   1.5" in agent.cli("metrics", run_id, check=True).stdout
    gone = agent.cli("logs", run_id)
    assert gone.returncode == 125 and "were removed" in gone.stderr
    assert rows(agent, "runs", run_id) == 1 and rows(agent, "metrics", run_id) == 1

    agent.cli("wait", running)
    assert stored(agent.state_dir) != set()
    purged = agent.cli("rm", "--purge", run_id, running, check=True)
    assert purged.stdout.count("removed ") == 2
    assert rows(agent, "runs", run_id) == rows(agent, "metrics", run_id) == rows(agent, "removed_run_dirs", run_id) == 0
    assert agent.cli("show", run_id).returncode == 125
    # The snapshot store's contents went with the last runs using them.
    wait_until(lambda: stored(agent.state_dir) == set(), what="the snapshot store's contents to go")


@needs_root
def test_only_the_owner_or_an_admin_may_remove(agent, source, nobody_client, shared_source):
    agent.root.chmod(0o755)   # lets nobody reach the socket
    run_id = json.loads(agent.cli("run", "--source-dir", str(source), "--json", "--", "true", check=True).stdout)["run_id"]
    code = f"import sys; from labrun.cli import main; sys.exit(main(['rm', '{run_id}']))"
    result = as_nobody(agent, nobody_client, code, shared_source)
    assert result.returncode == 125 and "only its owner or an admin may remove it" in result.stderr
    assert (agent.state_dir / "runs" / run_id).exists()


def test_clean_by_status_and_age(agent, source):
    ok = agent.cli("run", "--source-dir", str(source), "--json", "--", "true", check=True)
    failed = agent.cli("run", "--source-dir", str(source), "--json", "--", "sh", "-c", "exit 1")
    ok_id, failed_id = json.loads(ok.stdout)["run_id"], json.loads(failed.stdout)["run_id"]
    assert json.loads(agent.cli("clean", "--older-than", "1h", "--json", check=True).stdout)["removed"] == []
    only_failed = json.loads(agent.cli("clean", "--status", "Failed", "--json", check=True).stdout)
    assert [r["run_id"] for r in only_failed["removed"]] == [failed_id]
    assert (agent.state_dir / "runs" / ok_id).exists() and not (agent.state_dir / "runs" / failed_id).exists()
    rest = agent.cli("clean", check=True)
    assert f"removed {ok_id}" in rest.stdout
    assert json.loads(agent.cli("clean", "--json", check=True).stdout)["removed"] == []   # nothing twice
    status = json.loads(agent.cli("status", "--json", check=True).stdout)
    assert status["runs"] == {"Completed": 1, "Failed": 1}
    assert "run directories kept until labrun rm/clean" in agent.cli("status", check=True).stdout


def test_retention_days_removes_old_run_directories(make_agent, source, tmp_path):
    agent = make_agent("[runs]\nretention_days = 0.00002\n")   # about 1.7 s
    victim = victim_dir(tmp_path)
    old = make_run(agent, source, victim)
    time.sleep(2)
    agent.restart()   # retention runs at start, then hourly
    deadline = time.monotonic() + 30
    while (agent.state_dir / "runs" / old).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (agent.state_dir / "runs" / old).exists()
    assert (victim / "precious.txt").read_text() == "keep me"
    assert "score   1.5" in agent.cli("metrics", old, check=True).stdout
    assert json.loads(agent.cli("show", old, "--json", check=True).stdout)["files_removed_at"] is not None
    assert "kept 2e-05 days" in agent.cli("status", check=True).stdout


def store_objects(agent) -> list:
    return sorted(stored(agent.state_dir))


def test_retention_interval_sweeps_while_the_agent_runs(make_agent, source, tmp_path):
    agent = make_agent('[runs]\nretention_days = 0.00002\nretention_interval = "1s"\n')   # about 1.7 s
    assert "kept 2e-05 days (checked every 1s)" in agent.cli("status", check=True).stdout
    assert json.loads(agent.cli("status", "--json", check=True).stdout)["disk"]["retention_interval_seconds"] == 1
    victim = victim_dir(tmp_path)
    old = make_run(agent, source, victim)
    # The same source, so the same contents in the snapshot store; running, so retention leaves it alone.
    running = agent.cli("submit", "--source-dir", str(source), "--", "sleep", "120", check=True).stdout.strip()
    # No restart: the periodic sweep did it (the row is written once the directory is gone).
    wait_until(lambda: rows(agent, "removed_run_dirs", old) == 1, 30, "the sweep")
    assert not (agent.state_dir / "runs" / old).exists() and (victim / "precious.txt").read_text() == "keep me"
    assert rows(agent, "runs", old) == rows(agent, "metrics", old) == 1
    assert "score   1.5" in agent.cli("metrics", old, check=True).stdout
    assert (agent.state_dir / "runs" / running).is_dir()
    assert store_objects(agent) != []   # still used by the running run
    agent.cli("cancel", running, check=True)
    wait_until(lambda: rows(agent, "removed_run_dirs", running) == 1, 30, "the next sweep")
    assert not (agent.state_dir / "runs" / running).exists()
    # The contents went with the last run using them (released just after its directory); both runs are still listed.
    wait_until(lambda: store_objects(agent) == [], 10, "the snapshot store's contents to go")
    listed = json.loads(agent.cli("ls", "--all", "--json", check=True).stdout)
    assert sorted((r["run_id"], r["files_removed_at"] is not None) for r in listed) == sorted([(old, True),
                                                                                              (running, True)])


def test_retention_with_purge_forgets_the_runs(make_agent, source, tmp_path):
    agent = make_agent("[runs]\nretention_days = 0.00002\npurge = true\n")
    old = make_run(agent, source, victim_dir(tmp_path))
    time.sleep(2)
    agent.restart()
    deadline = time.monotonic() + 30
    while rows(agent, "runs", old) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rows(agent, "runs", old) == rows(agent, "metrics", old) == 0
    assert not (agent.state_dir / "runs" / old).exists()
    assert json.loads(agent.cli("ls", "--all", "--json", check=True).stdout) == []


def test_remove_tree_never_follows_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("keep")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "data").write_bytes(b"x" * 10000)
    (tree / "a" / "escape").symlink_to(outside)
    (tree / "a" / "file-link").symlink_to(outside / "f")
    os.chmod(tree / "a" / "b", 0o500)
    deep = tree
    for _ in range(300):   # deeper than a recursive walk's stack would like
        deep = deep / "d"
    deep.mkdir(parents=True)
    assert remove_tree(tmp_path, "tree") >= 10000
    assert not tree.exists() and (outside / "f").read_text() == "keep"
    (tmp_path / "link").symlink_to(outside)
    remove_tree(tmp_path, "link")   # a top-level link: the link goes, not what it points at
    assert not (tmp_path / "link").exists() and (outside / "f").exists()
    assert remove_tree(tmp_path, "missing") == 0


@pytest.mark.slurm
def test_rm_of_a_cluster_run_removes_its_directory_in_run_root(cluster_agent, cluster_source, tmp_path):
    victim = victim_dir(tmp_path)
    run_id = make_run(cluster_agent, cluster_source, victim, "--target", "cluster")
    link, real = cluster_agent.state_dir / "runs" / run_id, cluster_agent.run_root / run_id
    assert link.is_symlink() and (real / "outputs" / "big.bin").exists()
    removed = cluster_agent.cli("rm", run_id, check=True)
    assert removed.stdout.startswith(f"removed {run_id} (") and "freed 4" in removed.stderr
    assert not os.path.lexists(link) and not os.path.lexists(real)
    assert (victim / "precious.txt").read_text() == "keep me"
    assert "score   1.5" in cluster_agent.cli("metrics", run_id, check=True).stdout
