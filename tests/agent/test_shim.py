"""The per-run shim as a real process, without cgroups (the fallback: its descendants, sessions and process
groups), and the agent's strict reading of the exit record it leaves."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from labrun.agent.executors._local import SHIM, read_exit_record

DAEMON = "(setsid sh -c \"trap '' TERM; echo $$ > daemon.pid; sleep 300\" &); "


def start_shim(tmp_path, command: str, grace: float = 0.5) -> tuple[subprocess.Popen, dict]:
    read_end, write_end = os.pipe()
    plan = {"ranks": [{"argv": ["sh", "-c", command], "env": {"PATH": os.defpath}, "log": str(tmp_path / "log"),
                       "daemon": False}],
            "cwd": str(tmp_path), "cgroups": [], "grace": grace, "exit_path": str(tmp_path / "exit.json")}
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
