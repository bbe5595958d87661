"""Reading a run's files as root in a tree its user controls: nothing outside the run directory is read."""

import os

import pytest

from labrun.agent._mlflow_files import run_files


def read_all(run_dir, uid):
    found = {}
    for item in run_files(run_dir, uid):
        try:
            found[item.name] = os.read(item.fd, item.size + 1)
        finally:
            os.close(item.fd)
    return found


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "snapshot" / "outputs" / "model").mkdir(parents=True)
    (run / "artifacts" / "notes").mkdir(parents=True)
    (run / "snapshot" / "outputs" / "model" / "w.bin").write_bytes(b"weights")
    (run / "artifacts" / "notes" / "n.txt").write_text("note")
    (run / "outputs").symlink_to("snapshot/outputs")
    return run


def test_outputs_and_uploads_are_read(run_dir):
    assert read_all(run_dir, os.getuid()) == {"outputs/model/w.bin": b"weights", "notes/n.txt": b"note"}


def test_symlinks_fifos_and_swapped_directories_are_skipped(run_dir, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("do not read")
    outputs = run_dir / "snapshot" / "outputs"
    (outputs / "link").symlink_to(secret / "key")
    (outputs / "dirlink").symlink_to(secret)
    os.mkfifo(outputs / "fifo")   # opening it for reading would block forever
    assert read_all(run_dir, os.getuid()) == {"outputs/model/w.bin": b"weights", "notes/n.txt": b"note"}
    # The whole outputs directory replaced by a link out of the run directory.
    (run_dir / "snapshot" / "outputs").rename(run_dir / "old")
    (run_dir / "snapshot" / "outputs").symlink_to(secret)
    (run_dir / "artifacts").rename(run_dir / "old2")
    (run_dir / "artifacts").symlink_to(secret)
    assert read_all(run_dir, os.getuid()) == {}
    assert read_all(tmp_path / "no-such-run", os.getuid()) == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root agent checks the owner")
def test_a_root_agent_reads_only_the_run_users_files(run_dir, tmp_path):
    nobody = 65534
    for path in (run_dir / "snapshot" / "outputs" / "model" / "w.bin", run_dir / "artifacts" / "notes" / "n.txt"):
        os.chown(path, nobody, nobody)
    theirs = tmp_path / "shadow"
    theirs.write_text("root's")
    os.link(theirs, run_dir / "snapshot" / "outputs" / "hardlink")   # a root-owned file, linked in
    assert set(read_all(run_dir, nobody)) == {"outputs/model/w.bin", "notes/n.txt"}
    assert read_all(run_dir, 1234) == {}
