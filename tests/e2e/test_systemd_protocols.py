"""sd_notify and socket activation against a real agent process, with the test playing systemd's part.

A real systemd runs in tests/systemd; these cover the same protocols on any machine, fast.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from labrun.agent._server import socket_answers


def read_notifications(sock: socket.socket, until: str, timeout: float = 20.0) -> list[str]:
    """Every field systemd would have received, up to and including the first message containing ``until``."""
    fields = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except socket.timeout:
            break
        fields += message.split("\n")
        if until in message:
            return fields
    raise AssertionError(f"no {until!r} from the agent; got {fields}")


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    yield path, sock
    sock.close()


def start_activated_agent(tmp_path, listen: socket.socket | None, extra_env: dict) -> subprocess.Popen:
    """Start labrund the way systemd does: the listening socket as fd 3, LISTEN_PID the agent's own pid."""
    env = dict(os.environ, LABRUN_NO_AUTOSTART="1", PYTHONUNBUFFERED="1", **extra_env)
    env.pop("LABRUN_SOCKET", None)
    argv = [sys.executable, "-m", "labrun.agent", "--state-dir", str(tmp_path / "state"),
            "--socket", str(tmp_path / "unused.sock")]
    options = {}
    if listen is not None:
        fd = listen.fileno()
        # The shell's pid is the agent's once it execs; its redirection puts the socket at fd 3.
        argv = ["bash", "-c", f'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@" 3<&{fd} {fd}<&-', "labrund", *argv]
        options = dict(pass_fds=(fd,))
    with open(tmp_path / "agent.log", "ab") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, **options)


def test_agent_tells_systemd_it_is_ready_alive_and_stopping(tmp_path, notify_socket):
    path, sock = notify_socket
    agent = start_activated_agent(tmp_path, None, {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
    try:
        fields = read_notifications(sock, "READY=1")
        assert any(f.startswith("STATUS=") and "queued" in f for f in fields), fields
        # Pings keep coming at half the watchdog interval.
        assert read_notifications(sock, "WATCHDOG=1", timeout=5)
        assert read_notifications(sock, "WATCHDOG=1", timeout=5)
        agent.terminate()
        assert "STOPPING=1" in read_notifications(sock, "STOPPING=1")
        assert agent.wait(timeout=20) == 0
    finally:
        agent.kill()
        agent.wait()


def test_socket_activation_uses_the_passed_socket_and_leaves_it_to_its_owner(tmp_path):
    path = tmp_path / "activated.sock"
    listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listen.bind(str(path))
    os.chmod(path, 0o660)
    listen.listen(16)
    # A client may connect before the agent runs: systemd's socket queues it, and the agent answers it.

    for attempt in range(2):   # a restarted agent takes the same socket again
        agent = start_activated_agent(tmp_path, listen, {})
        try:
            status = subprocess.run([sys.executable, "-m", "labrun.cli", "run", "--", "sh", "-c",
                                     'echo "socket=$LABRUN_SOCKET"'],
                                    env=dict(os.environ, LABRUN_SOCKET=str(path), LABRUN_NO_AUTOSTART="1"),
                                    capture_output=True, text=True, timeout=60)
            assert status.returncode == 0, status.stderr
            assert f"socket={path}" in status.stdout
            agent.terminate()
            assert agent.wait(timeout=20) == 0
        finally:
            agent.kill()
            agent.wait()
        # The agent neither unlinked nor changed the socket it was given.
        assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o660
    listen.close()


def test_a_wrong_activation_socket_is_refused_clearly(tmp_path):
    listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listen.bind(("127.0.0.1", 0))
    listen.listen(1)
    agent = start_activated_agent(tmp_path, listen, {})
    assert agent.wait(timeout=30) != 0
    assert "must be a Unix stream socket" in (tmp_path / "agent.log").read_text()
    listen.close()
