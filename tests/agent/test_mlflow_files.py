"""Reading a run's files in a tree its user controls, as that user: nothing outside the run directory, and
nothing the user could not read, is read."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from labrun.agent._asuser import Credentials
from labrun.agent._mlflow_files import run_files
from labrun.agent._rundir import RunDir


def read_all(run_dir, uid):
    found = {}
    for item in run_files(RunDir(run_dir), Credentials(uid, uid, (uid,))):
        try:
            found[item.name] = os.read(item.fd, item.size + 1)
        finally:
            os.close(item.fd)
    return found


def make_run(base):
    run = base / "run"
    (run / "snapshot" / "outputs" / "model").mkdir(parents=True)
    (run / "artifacts" / "notes").mkdir(parents=True)
    (run / "snapshot" / "outputs" / "model" / "w.bin").write_bytes(b"weights")
    (run / "artifacts" / "notes" / "n.txt").write_text("note")
    (run / "outputs").symlink_to("snapshot/outputs")
    return run


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path)


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


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root agent switches to the run's user")
def test_a_root_agent_reads_as_the_run_user():
    # (Under a directory every user may traverse, as the state directory is: pytest's own is root's alone.)
    tmp_path = Path(tempfile.mkdtemp(prefix="labrun-files-"))
    tmp_path.chmod(0o711)
    try:
        reads_as_the_run_user(make_run(tmp_path), tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def reads_as_the_run_user(run_dir, tmp_path):
    nobody = 65534
    for path in (run_dir / "snapshot" / "outputs" / "model" / "w.bin", run_dir / "artifacts" / "notes" / "n.txt"):
        os.chown(path, nobody, nobody)
        path.chmod(0o600)
    theirs = tmp_path / "shadow"
    theirs.write_text("root's")
    theirs.chmod(0o600)
    os.link(theirs, run_dir / "snapshot" / "outputs" / "hardlink")   # a file only root may read, linked in
    private = run_dir / "artifacts" / "private"
    private.mkdir(mode=0o700)
    (private / "p.txt").write_text("theirs, but out of their reach")   # in a directory they may not enter
    os.chown(private / "p.txt", nobody, nobody)
    assert read_all(run_dir, nobody) == {"outputs/model/w.bin": b"weights", "notes/n.txt": b"note"}
    assert read_all(run_dir, 1234) == {}   # another user reads none of them
