"""The per-run shim as a real process, without cgroups (the fallback: its descendants, sessions and process
groups), the forkserver that forks shims, and the agent's strict reading of the exit record it leaves."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labrun.agent.executors._local import SHIM, read_exit_record
from labrun.agent.executors._shim import REQUEST_HEADER

DAEMON = "(setsid sh -c \"trap '' TERM; echo $$ > daemon.pid; sleep 300\" &); "


def start_shim(tmp_path, command: str, grace: float = 0.5, **more) -> tuple[subprocess.Popen, dict]:
    read_end, write_end = os.pipe()
    plan = {"ranks": [{"argv": ["sh", "-c", command], "env": {"PATH": os.defpath}, "log": str(tmp_path / "log"),
                       "daemon": False}],
            "cwd": str(tmp_path), "cgroups": [], "grace": grace, "exit_path": str(tmp_path / "exit.json"), **more}
    shim = subprocess.Popen([sys.executable, "-I", "-S", str(SHIM), str(write_end)], stdin=subprocess.PIPE,
                            pass_fds=(write_end,), start_new_session=True)
    os.close(write_end)
    shim.stdin.write(json.dumps(plan).encode())
    shim.stdin.close()
    with os.fdopen(read_end) as status:
        report = json.loads(status.readline())
    return shim, report


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return int(path.read_text())


def test_the_run_ends_with_its_double_forked_daemon_when_its_main_process_exits(tmp_path):
    shim, report = start_shim(tmp_path, DAEMON + "while [ ! -e daemon.pid ]; do sleep 0.01; done; exit 3")
    assert len(report["pids"]) == 1
    assert shim.wait(timeout=30) == 0
    daemon = wait_for(tmp_path / "daemon.pid")
    assert not alive(daemon)   # it ignored SIGTERM: SIGKILL after the grace period
    record = json.loads((tmp_path / "exit.json").read_text())
    assert record["exit_code"] == 3 and record["signal"] is None
    assert read_exit_record(str(tmp_path / "exit.json")).exit_code == 3


def test_sigterm_stops_the_whole_run(tmp_path):
    shim, _ = start_shim(tmp_path, DAEMON + "sleep 300")
    daemon = wait_for(tmp_path / "daemon.pid")
    shim.send_signal(signal.SIGTERM)
    assert shim.wait(timeout=30) == 0
    assert not alive(daemon)
    assert read_exit_record(str(tmp_path / "exit.json")).signal == signal.SIGTERM


def test_a_command_that_cannot_start_is_reported(tmp_path):
    read_end, write_end = os.pipe()
    plan = {"ranks": [{"argv": ["/no/such/program"], "env": {}, "log": str(tmp_path / "log")}],
            "cwd": str(tmp_path), "exit_path": str(tmp_path / "exit.json")}
    shim = subprocess.Popen([sys.executable, "-I", "-S", str(SHIM), str(write_end)], stdin=subprocess.PIPE,
                            pass_fds=(write_end,))
    os.close(write_end)
    shim.communicate(json.dumps(plan).encode(), timeout=30)
    with os.fdopen(read_end) as status:
        assert "cannot start '/no/such/program'" in json.loads(status.readline())["error"]
    assert shim.returncode == 127 and not (tmp_path / "exit.json").exists()


@pytest.mark.parametrize("content", [b"not json", b"[1]", b'{"exit_code": "0"}', b'{"exit_code": true}', b"{}"])
def test_an_exit_record_that_is_not_one_is_ignored(tmp_path, content):
    (tmp_path / "exit.json").write_bytes(content)
    assert read_exit_record(str(tmp_path / "exit.json")) is None


def test_an_exit_record_is_never_read_through_a_link_or_from_a_fifo(tmp_path):
    (tmp_path / "real.json").write_text('{"exit_code": 0}')
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    os.mkfifo(tmp_path / "fifo.json")
    assert read_exit_record(str(tmp_path / "link.json")) is None
    assert read_exit_record(str(tmp_path / "fifo.json")) is None   # and no hang
    assert read_exit_record(str(tmp_path / "real.json")).exit_code == 0


# -- the forkserver --------------------------------------------------------------------------------

def start_forkserver() -> tuple[subprocess.Popen, socket.socket]:
    ours, theirs = socket.socketpair()
    server = subprocess.Popen([sys.executable, "-I", "-S", str(SHIM), "--forkserver", str(theirs.fileno())],
                              pass_fds=(theirs.fileno(),), start_new_session=True)
    theirs.close()
    return server, ours


def fork_shim(sock: socket.socket, plan: dict, groups: list[str] = ()) -> dict:
    """Ask for a shim in ``groups``, then give it ``plan``; the report: the forkserver's line and the shim's."""
    read_end, write_end = os.pipe()
    plan_read, plan_write = os.pipe()
    body = json.dumps({"cgroups": list(groups)}).encode()
    socket.send_fds(sock, [REQUEST_HEADER.pack(len(body)) + body], [write_end, plan_read])
    os.close(write_end)
    os.close(plan_read)
    with os.fdopen(plan_write, "wb") as pipe:
        pipe.write(json.dumps(plan).encode())
    with os.fdopen(read_end, "rb") as status:
        report = {}
        for line in status.read().splitlines():
            report.update(json.loads(line))
    return report


def session_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[3])


def test_forked_shims_run_in_sessions_of_their_own_and_outlive_the_forkserver(tmp_path):
    server, sock = start_forkserver()
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        plans = {name: {"ranks": [{"argv": ["sh", "-c", "echo $$ > pid; while [ ! -e go ]; do sleep 0.02; done; "
                                                  f"echo out; exit {code}"],
                                   "env": {"PATH": os.defpath}, "log": str(tmp_path / name / "log")}],
                        "cwd": str(tmp_path / name), "exit_path": str(tmp_path / name / "exit.json")}
                 for name, code in (("a", 0), ("b", 4))}
        reports = {name: fork_shim(sock, plan) for name, plan in plans.items()}
        for name, report in reports.items():
            shim = report["shim"]
            assert session_of(shim) == shim != server.pid
            assert Path(f"/proc/{shim}/comm").read_text() == "labrun-shim\n"
            assert report["start_time"] is not None
            rank = wait_for(tmp_path / name / "pid")
            assert report["pids"] == [rank] and session_of(rank) == rank   # the rank's session is its own too
    finally:
        sock.close()
    assert server.wait(timeout=10) == 0   # its socket closed: it exits, and its shims go on
    for name, report in reports.items():
        assert alive(report["shim"])
        (tmp_path / name / "go").touch()
    for name, code in (("a", 0), ("b", 4)):
        deadline = time.monotonic() + 10
        while read_exit_record(str(tmp_path / name / "exit.json")) is None:
            assert time.monotonic() < deadline, "no exit record"
            time.sleep(0.02)
        assert read_exit_record(str(tmp_path / name / "exit.json")).exit_code == code
        assert (tmp_path / name / "log").read_text() == "out\n"


def test_the_forkserver_reports_what_cannot_start_and_serves_on(tmp_path):
    server, sock = start_forkserver()
    try:
        missing = fork_shim(sock, {"ranks": [{"argv": ["no-such-program-here"], "env": {"PATH": os.defpath},
                                              "log": str(tmp_path / "log")}],
                                   "cwd": str(tmp_path), "exit_path": str(tmp_path / "exit.json")})
        assert "cannot start 'no-such-program-here'" in missing["error"] and missing["errno"] == errno.ENOENT
        gone = fork_shim(sock, {"ranks": [{"argv": ["true"], "env": {}, "log": str(tmp_path / "log")}],
                                "cwd": str(tmp_path / "gone"), "exit_path": str(tmp_path / "exit.json")})
        assert "cannot enter" in gone["error"]
        ok = fork_shim(sock, {"ranks": [{"argv": ["true"], "env": {"PATH": os.defpath}, "log": str(tmp_path / "log")}],
                              "cwd": str(tmp_path), "exit_path": str(tmp_path / "exit.json")})
        assert len(ok["pids"]) == 1
    finally:
        sock.close()
        server.wait(timeout=10)


def test_a_bare_name_is_looked_up_in_the_runs_path_and_signals_are_the_runs_own(tmp_path):
    """The rank starts from the run's PATH (not the shim's), with no signal blocked or ignored."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "mytool"
    tool.write_text("#!/bin/sh\nPATH=/usr/bin:/bin exec grep -E '^Sig(Blk|Ign)' /proc/self/status > signals\n")
    tool.chmod(0o755)
    read_end, write_end = os.pipe()
    plan = {"ranks": [{"argv": ["mytool"], "env": {"PATH": f"{tmp_path / 'nothing'}:{bin_dir}"},
                       "log": str(tmp_path / "log")}],
            "cwd": str(tmp_path), "exit_path": str(tmp_path / "exit.json")}
    shim = subprocess.Popen([sys.executable, "-I", "-S", str(SHIM), str(write_end)], stdin=subprocess.PIPE,
                            pass_fds=(write_end,))
    os.close(write_end)
    shim.communicate(json.dumps(plan).encode(), timeout=30)
    os.close(read_end)
    assert shim.returncode == 0
    masks = dict(line.split(":") for line in (tmp_path / "signals").read_text().splitlines())
    assert int(masks["SigBlk"], 16) == 0
    ignored = int(masks["SigIgn"], 16)
    assert not ignored & (1 << (signal.SIGHUP - 1)) and not ignored & (1 << (signal.SIGPIPE - 1))


@pytest.mark.parametrize("left_over", [False, True])
def test_an_empty_snapshot_left_to_the_shim_is_made_fresh_before_the_run_starts(tmp_path, left_over):
    snapshot = tmp_path / "snapshot"
    if left_over:   # an earlier start of the same run made it, and its run wrote there
        (snapshot / "outputs").mkdir(parents=True)
        (snapshot / "stale.txt").write_text("earlier")
    shim, report = start_shim(tmp_path, "ls -A > ../listing; ls -A outputs > ../outputs", cwd=str(snapshot),
                              empty_snapshot=str(snapshot))
    assert len(report["pids"]) == 1 and shim.wait(timeout=30) == 0
    assert (tmp_path / "listing").read_text() == "outputs\n" and (tmp_path / "outputs").read_text() == ""
    assert (snapshot.stat().st_mode & 0o777, (snapshot / "outputs").stat().st_mode & 0o777) == (0o755, 0o755)


def test_an_empty_snapshot_the_shim_cannot_make_fails_the_start_saying_so(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "snapshot").symlink_to(tmp_path / "elsewhere")   # planted in the run directory: not followed
    shim, report = start_shim(tmp_path, "true", cwd=str(tmp_path / "snapshot"),
                              empty_snapshot=str(tmp_path / "snapshot"))
    assert "pids" not in report and "cannot make the run's snapshot" in report["error"]
    assert shim.wait(timeout=30) != 0 and list((tmp_path / "elsewhere").iterdir()) == []
