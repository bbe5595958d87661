"""Azure ML's view of a run's files for users of a root agent: ``get_details()["logFiles"]``,
``restore_snapshot()`` and interactive runs' directories, by real unprivileged users.

The logs are listed with the run's user's rights and the snapshot comes from what the agent stored at
submit, so both work whether or not a client may open the run's directory: for the owner (who may, by path,
through the agent's 0711 directories) and for an admin reading someone else's run (who may not).
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Changes its working directory (the snapshot's copy), leaves a process behind, and logs.
COMMAND = ("echo to-the-log; echo changed-by-the-run > train.py; echo new > made-by-the-run.txt; "
           "sleep 60 >/dev/null 2>&1 & echo done")

# What a client reports about a run's logs and snapshot (``out`` prints it as JSON).
READ_FILES = """
import tempfile, zipfile
from labrun import Run
run = Run.get(ws, RUN_ID)
details = run.get_details()
path = run.restore_snapshot()
with zipfile.ZipFile(path) as archive:
    files = {{i.filename: archive.read(i).decode() for i in archive.infolist()}}
    modes = {{i.filename: i.external_attr >> 16 for i in archive.infolist()}}
out({{"logFiles": details["logFiles"], "logs": {{n: open(p).read() for n, p in details["logFiles"].items()}},
     "log": run.get_log(), "zip": path, "files": files, "modes": modes, "snapshot_id": run.get_snapshot_id(),
     "warnings": details["warnings"], "tmp": tempfile.gettempdir()}})
"""


def _user_dirs(shared_tmp, user: str) -> dict:
    """A cache and a temporary directory of the user's own (their HOME is /nonexistent)."""
    entry = pwd.getpwnam(user)
    dirs = {}
    for name in ("XDG_CACHE_HOME", "TMPDIR"):
        path = shared_tmp(f"{user}-{name.lower()}")
        os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o700)
        dirs[name] = str(path)
    return dirs


@pytest.fixture
def source(shared_tmp) -> Path:
    root = shared_tmp("src")
    (root / "train.py").write_text("print('trained')\n")
    (root / "tools").mkdir()
    (root / "tools" / "run.sh").write_text("#!/bin/sh\necho tool\n")
    (root / "tools" / "run.sh").chmod(0o755)
    (root / "train.py").chmod(0o644)
    (root / "tools").chmod(0o755)
    return root


def _read(client, shared_tmp, run_id: str) -> dict:
    env = client.env(**_user_dirs(shared_tmp, client.user))
    return client.json(f"RUN_ID = {run_id!r}\n" + READ_FILES.format(), env=env)


def _check_snapshot(seen: dict) -> None:
    # The source as submitted: not what the run changed or made in its working directory, nor outputs/.
    assert seen["files"] == {"train.py": "print('trained')\n", "tools/run.sh": "#!/bin/sh\necho tool\n"}
    assert stat.S_IMODE(seen["modes"]["tools/run.sh"]) == 0o755 and stat.S_IMODE(seen["modes"]["train.py"]) == 0o644
    # Azure ML's place and name: <temporary directory>/<snapshot id>.zip.
    assert seen["zip"] == os.path.join(seen["tmp"], seen["snapshot_id"] + ".zip")


def test_logs_and_snapshot_of_a_system_agents_run_for_its_owner_and_an_admin(clients, source, root_agent,
                                                                             shared_tmp):
    alice, admin = clients["alice"], clients["admin"]
    run_id = alice.submit(source, COMMAND)
    assert alice.wait(run_id)["status"] == "Completed"
    run_dir = root_agent.state_dir / "runs" / run_id

    mine = _read(alice, shared_tmp, run_id)
    assert mine["logs"]["user_logs/std_log.txt"] == mine["log"] == "to-the-log\ndone\n"
    _check_snapshot(mine)
    # Through the 0711 state directory the owner opens the log where it is.
    assert mine["logFiles"]["user_logs/std_log.txt"] == str(run_dir / "logs" / "std_log.txt")
    assert [w["source"] for w in mine["warnings"]] == ["run"]
    assert "1 background process(es)" in mine["warnings"][0]["message"]

    # An admin may read the run but not open its directory: the log is a copy in the admin's own cache.
    theirs = _read(admin, shared_tmp, run_id)
    copy = theirs["logFiles"]["user_logs/std_log.txt"]
    assert not copy.startswith(str(root_agent.state_dir)) and "/labrun/logs/" + run_id + "/" in copy
    assert theirs["logs"]["user_logs/std_log.txt"] == "to-the-log\ndone\n"
    assert Path(copy).stat().st_uid == pwd.getpwnam("lrsec-admin").pw_uid
    _check_snapshot(theirs)


def test_another_users_snapshot_is_refused_and_names_stay_in_the_manifest(clients, source, root_agent):
    alice, bob = clients["alice"], clients["bob"]
    run_id = alice.submit(source, "true")
    assert alice.wait(run_id)["status"] == "Completed"
    refused = bob.json(f"""
out([call("files", run_id={run_id!r}, area="snapshot"), stream("download", run_id={run_id!r}, name="train.py",
     area="snapshot"), call("files", run_id={run_id!r}, area="logs")])
""")
    assert [r.get("error") for r in refused] == ["forbidden"] * 3, refused
    probes = alice.json(f"""
out([stream("download", run_id={run_id!r}, name=name, area="snapshot")
     for name in ("../../../etc/shadow", "/etc/shadow", "etc/shadow", "outputs/x", "tools")])
""")
    assert [p.get("error") for p in probes] == ["bad_request", "bad_request", "not_found", "not_found", "not_found"]
    assert alice.json(f"out(stream('download', run_id={run_id!r}, name='tools/run.sh', area='snapshot'))")["ok"] \
        [0]["data"] == "#!/bin/sh\necho tool\n"


def test_an_interactive_runs_directory_is_made_with_its_users_rights(clients, root_agent):
    alice = clients["alice"]
    seen = alice.json("""
import io
from labrun import Experiment
run = Experiment(ws, "sec-interactive").start_logging(outputs=False)
run.log("loss", 0.5)
run.upload_file("outputs/model.txt", io.BytesIO(b"weights"))
run.complete()
restored = None
try:
    run.restore_snapshot()
except Exception as exc:
    restored = type(exc).__name__ + ": " + str(exc)
out({"id": run.id, "status": run.get_status(), "files": run.get_file_names(), "restore": restored,
     "logFiles": run.get_details()["logFiles"]})
""")
    assert seen["status"] == "Completed" and seen["files"] == ["outputs/model.txt"]
    assert seen["restore"].startswith("SnapshotException") and "interactive" in seen["restore"]
    assert seen["logFiles"] == {}
    uid = pwd.getpwnam("lrsec-alice").pw_uid
    run_dir = root_agent.state_dir / "runs" / seen["id"]
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    # Everything in it is alice's, the outputs link included: nothing was made as root and chowned.
    for path in (run_dir, run_dir / "snapshot", run_dir / "snapshot" / "outputs", run_dir / "logs",
                 run_dir / "outputs", run_dir / "snapshot" / "outputs" / "model.txt"):
        assert os.lstat(path).st_uid == uid, path
    assert os.readlink(run_dir / "outputs") == "snapshot/outputs"
