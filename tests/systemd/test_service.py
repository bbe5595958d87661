"""The system service under a real systemd (PID 1 in a container), installed as an admin would.

The container is Debian 12 with its own python3 (3.11.2); labrun goes in through
scripts/install-system, from wheels built here (the container reaches no package index).
The tests then use it as users do: runuser as an unprivileged member of "labrun", the CLI
from /usr/local/bin, and systemctl for the service.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = "labrun-systemd:bookworm"
WHEELS = REPO / "build" / "systemd-wheels"
USER = "lrsd-alice"

pytestmark = [pytest.mark.systemd, pytest.mark.slow]


def sh(*argv: str, input: bytes | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, input=input, capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout.decode()}\n"
                             f"{result.stderr.decode()}")
    return result


def docker_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def build_wheels() -> None:
    """Every wheel labrun[agent] needs on the container's Python (same major.minor and platform as here)."""
    if WHEELS.is_dir() and any(WHEELS.glob("trio-*.whl")) and any(WHEELS.glob("setuptools-*.whl")):
        return
    sh(sys.executable, "-m", "pip", "wheel", "-q", "-w", str(WHEELS), f"{REPO}[agent]", "setuptools>=77", "wheel")
    for own in WHEELS.glob("labrun-*.whl"):
        own.unlink()   # the checkout itself is what gets installed


class Container:
    def __init__(self, name: str):
        self.name = name

    def run(self, *argv: str, user: str | None = None, check: bool = True, timeout: float = 300,
            input: bytes | None = None) -> str:
        if user is not None:
            argv = ("runuser", "-u", user, "--", *argv)
        result = sh("docker", "exec", "-i", "-w", "/tmp", self.name, *argv, input=input, check=check, timeout=timeout)
        return result.stdout.decode()

    def labrun(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        return self.run("sh", "-c", 'cd "$HOME" && exec labrun "$@"', "labrun", *args, user=USER, check=check,
                        timeout=timeout)

    def systemctl_show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", unit, "-p", prop, "--value").strip()

    def run_record(self, run_id: str) -> dict:
        return json.loads(self.labrun("show", run_id, "--json"))


@pytest.fixture(scope="module")
def system():
    if not docker_answers():
        if os.environ.get("LABRUN_REQUIRE_DOCKER"):
            pytest.fail("no Docker engine answers, and LABRUN_REQUIRE_DOCKER is set")
        pytest.skip("no Docker engine answers")
    sh("bash", str(REPO / "scripts" / "systemd-container.sh"), "image", timeout=900)
    build_wheels()
    name = f"labrun-systemd-test-{uuid.uuid4().hex[:8]}"
    sh("bash", str(REPO / "scripts" / "systemd-container.sh"), "start", name, timeout=300)
    container = Container(name)
    try:
        tree = sh("tar", "-C", str(REPO), "--exclude=./.venv", "--exclude=./.git", "--exclude=./build",
                  "--exclude=*.egg-info", "--exclude=__pycache__", "-c", ".").stdout
        container.run("mkdir", "-p", "/root/labrun", "/root/wheels")
        container.run("tar", "-C", "/root/labrun", "-x", input=tree)
        wheels = sh("tar", "-C", str(WHEELS), "-c", ".").stdout
        container.run("tar", "-C", "/root/wheels", "-x", input=wheels)
        container.run("/root/labrun/scripts/install-system", "--offline", "/root/wheels", timeout=600)
        container.run("useradd", "-m", "-G", "labrun", "-s", "/bin/sh", USER)
        container.run("sh", "-c", f"echo 'print(\"hello from the snapshot\")' > /home/{USER}/train.py && "
                                  f"chown {USER}: /home/{USER}/train.py")
        yield container
    finally:
        subprocess.run(["docker", "logs", "--tail", "5", name], capture_output=True)
        if os.environ.get("LABRUN_KEEP_CONTAINER") is None:
            sh("bash", str(REPO / "scripts" / "systemd-container.sh"), "stop", name, check=False)


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def submit(system: Container, script: str) -> str:
    out = system.labrun("submit", "--json", "--", "sh", "-c", script)
    return json.loads(out)["run_id"]


def test_units_pass_systemd_analyze_verify(system):
    result = sh("docker", "exec", system.name, "systemd-analyze", "verify",
                "/etc/systemd/system/labrund.service", "/etc/systemd/system/labrund.socket", check=False)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and "labrun" not in output, output


def test_the_first_client_connection_starts_the_agent_through_its_socket(system):
    assert system.systemctl_show("labrund.socket", "ActiveState") == "active"
    assert system.systemctl_show("labrund.service", "ActiveState") == "inactive"
    socket_mode = system.run("stat", "-c", "%a %U %G", "/run/labrun/agent.sock").split()
    assert socket_mode == ["660", "root", "labrun"]
    out = system.labrun("run", "--", "sh", "-c", "id -un; python3 train.py")
    assert USER in out and "hello from the snapshot" in out
    # Type=notify: "active" only after READY=1, and the status line is the agent's own.
    assert system.systemctl_show("labrund.service", "ActiveState") == "active"
    assert system.systemctl_show("labrund.service", "Type") == "notify"
    assert "queued" in system.systemctl_show("labrund.service", "StatusText")
    assert system.systemctl_show("labrund.service", "WatchdogUSec") not in ("", "0", "infinity")


def test_the_agent_runs_on_debians_own_python(system):
    debian = system.run("/usr/bin/python3", "-c", "import sys; print(sys.version.split()[0])").strip()
    agent = system.run("/opt/labrun/bin/python", "-c", "import sys; print(sys.version.split()[0])").strip()
    assert agent == debian


def test_runs_keep_what_their_user_may_do_under_the_hardening(system):
    out = system.labrun("run", "--", "sh", "-c",
                        'echo ok > "$HOME/written-by-run" && echo ok > /tmp/lrsd-written && '
                        'grep NoNewPrivs /proc/self/status && id -u')
    assert "NoNewPrivs:\t0" in out
    uid = system.run("id", "-u", USER).strip()
    assert out.strip().splitlines()[-1] == uid
    assert system.run("stat", "-c", "%U", f"/home/{USER}/written-by-run").strip() == USER


def test_restart_keeps_running_runs_and_their_exit_codes(system):
    runs = [submit(system, f"echo started; sleep 6; echo finished {code}; exit {code}") for code in (0, 3)]
    wait_for(lambda: all(system.run_record(r)["status"] == "Running" for r in runs), what="runs to start")
    pids_before = system.run("pgrep", "-u", USER, "sleep").split()
    system.run("systemctl", "restart", "labrund.service")
    assert system.systemctl_show("labrund.service", "ActiveState") == "active"
    records = wait_for(lambda: [rec for rec in map(system.run_record, runs)
                                if rec["status"] in ("Completed", "Failed")] if all(
        system.run_record(r)["status"] in ("Completed", "Failed") for r in runs) else None, timeout=90,
        what="runs to end")
    by_id = {rec["run_id"]: rec for rec in records}
    assert by_id[runs[0]]["status"] == "Completed"
    assert by_id[runs[1]]["status"] == "Failed" and by_id[runs[1]].get("exit_code") == 3, by_id[runs[1]]
    for code, run_id in zip((0, 3), runs):
        log = system.labrun("logs", run_id)
        assert "started" in log and f"finished {code}" in log, log
    # None was restarted: the processes that ran were those from before the restart.
    assert pids_before


def test_stop_leaves_runs_running_and_the_next_start_reattaches(system):
    run_id = submit(system, "sleep 5; echo done; exit 4")
    wait_for(lambda: system.run_record(run_id)["status"] == "Running", what="run to start")
    system.run("systemctl", "stop", "labrund.service")
    assert system.systemctl_show("labrund.service", "ActiveState") == "inactive"
    assert system.run("pgrep", "-u", USER, "sleep").split(), "the run died with the agent"
    # The socket is still systemd's: the next client connection starts the agent again.
    record = wait_for(lambda: (rec := system.run_record(run_id))["status"] in ("Completed", "Failed") and rec,
                      timeout=90, what="run to end")
    assert record["status"] == "Failed" and record.get("exit_code") == 4, record
    assert "done" in system.labrun("logs", run_id)


def test_upgrade_as_the_readme_says_drain_install_restart_resume(system):
    running = submit(system, "sleep 6; echo old-run-done; exit 5")
    wait_for(lambda: system.run_record(running)["status"] == "Running", what="run to start")
    system.run("labrun", "agent", "drain", "--no-wait")
    waiting = submit(system, "echo after-resume")
    assert "draining" in system.run("labrun", "status")
    system.run("/root/labrun/scripts/install-system", "--offline", "/root/wheels", timeout=600)
    system.run("systemctl", "restart", "labrund.service")
    record = wait_for(lambda: (rec := system.run_record(running))["status"] in ("Completed", "Failed") and rec,
                      timeout=90, what="the running run to end")
    assert record["exit_code"] == 5 and "old-run-done" in system.labrun("logs", running)
    # Draining is kept across the restart: nothing new starts until an admin resumes.
    assert system.run_record(waiting)["status"] == "Queued"
    system.run("labrun", "agent", "resume")
    record = wait_for(lambda: (rec := system.run_record(waiting))["status"] == "Completed" and rec, timeout=60,
                      what="the queued run to complete after resume")
    assert "after-resume" in system.labrun("logs", waiting)
