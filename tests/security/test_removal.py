"""Deleting a run's directory (``labrun rm``, ``clean``, retention) against a real root agent, by a real user who
plants links and read-only directories in it: only the run's own files go, and only what its owner could delete."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import AgentProcess
from tests.e2e.test_agent import wait_until
from tests.security.conftest import AGENT_CONFIG, Client, assert_still_serving

pytestmark = pytest.mark.slow


def _victim(scratch: Path) -> Path:
    """A root-owned directory holding a root-owned file and a read-only subdirectory."""
    victim = scratch / "victim"
    (victim / "ro").mkdir(parents=True)
    (victim / "precious.txt").write_text("root's\n")
    (victim / "ro" / "kept.txt").write_text("root's too\n")
    (victim / "ro").chmod(0o555)
    return victim


def _intact(victim: Path) -> bool:
    return ((victim / "precious.txt").read_text() == "root's\n" and (victim / "ro" / "kept.txt").exists()
            and victim.stat().st_uid == 0 and (victim / "ro").stat().st_mode & 0o777 == 0o555)


def _planting_run(alice: Client, source: Path, victim: Path) -> str:
    """A run that leaves links to the victim in its outputs and in place of its own logs/ directory, and
    directories it made read-only and unreadable."""
    plant = (f"ln -s {victim} outputs/dir && ln -s {victim}/precious.txt outputs/file && "
             "mkdir -p outputs/ro/deep && echo x > outputs/ro/deep/f && chmod 500 outputs/ro/deep outputs/ro && "
             "mkdir outputs/locked && echo x > outputs/locked/f && chmod 000 outputs/locked && "
             f"mv ../logs ../logs.old && ln -s {victim} ../logs")
    run_id = alice.submit(source, ["sh", "-c", plant])
    assert alice.wait(run_id)["status"] == "Completed"
    return run_id


def test_rm_deletes_links_never_what_they_point_at(clients, shared_source, root_agent, scratch):
    alice = clients["alice"]
    victim = _victim(scratch)
    run_id = _planting_run(alice, shared_source, victim)
    run_dir = root_agent.state_dir / "runs" / run_id
    assert (run_dir / "logs").is_symlink()
    removed = alice.cli("rm", run_id)
    assert removed.returncode == 0, removed.stderr
    assert not os.path.lexists(run_dir)
    assert _intact(victim)
    assert_still_serving(clients["bob"], shared_source)


def test_rm_deletes_only_what_the_owner_could(clients, shared_source, root_agent):
    """Deletion runs with the owner's rights: a directory the owner cannot write (as one raced into the walk
    would be) is left alone, and the removal is refused saying why, not done as root."""
    alice = clients["alice"]
    run_id = alice.submit(shared_source, ["true"])
    assert alice.wait(run_id)["status"] == "Completed"
    run_dir = root_agent.state_dir / "runs" / run_id
    roots = run_dir / "snapshot" / "outputs" / "roots"
    roots.mkdir()
    (roots / "file").write_text("root's\n")   # root's, 0755: alice may not delete in it
    refused = alice.cli("rm", run_id)
    assert refused.returncode == 125 and f"could not remove the directory of run {run_id}: Permission denied" \
        in refused.stderr, refused.stderr
    assert (roots / "file").read_text() == "root's\n"
    assert "files removed" not in alice.cli("show", run_id).stdout
    # Once what alice could not delete is gone, the same command finishes the job.
    (roots / "file").unlink()
    assert alice.cli("rm", run_id).returncode == 0
    assert not os.path.lexists(run_dir)


def test_retention_sweeps_a_planted_run_directory(clients, thin_client, shared_source, shared_tmp, scratch):
    """The periodic sweep removes a hostile run's directory as its owner, with the agent running throughout."""
    agent = AgentProcess(shared_tmp("r"), AGENT_CONFIG + '[runs]\nretention_days = 0.00002\nretention_interval = "1s"\n')
    try:
        agent.start()
        alice = Client(agent, thin_client, "lrsec-alice")
        victim = _victim(scratch)
        run_id = _planting_run(alice, shared_source, victim)
        wait_until(lambda: not os.path.lexists(agent.state_dir / "runs" / run_id), 30, "the retention sweep")
        assert _intact(victim)
        assert alice.json(f"out(ws._call('get', run_id={run_id!r})['status'])") == "Completed"
    finally:
        agent.stop()
