"""The client checks the server before it sends anything (issue items 5 and 11): squatted sockets and
directories, and a user the system agent does not accept, who must not get a private agent instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.security.conftest import _drop_to, assert_still_serving

pytestmark = pytest.mark.slow

# A squatter's fake agent: accepts connections and records every byte it is sent.
FAKE_SERVER = """
import os, socket, sys
path, record = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o777)
server.listen(8)
open(record + ".ready", "w").close()
while True:
    conn, _ = server.accept()
    conn.settimeout(2)
    try:
        while data := conn.recv(65536):
            with open(record, "ab") as f:
                f.write(data)
    except OSError:
        pass
    conn.close()
"""


@pytest.fixture
def squatter(clients, scratch):
    """Starts bob's fake agent on a socket path; yields a function returning the bytes it received."""
    bob = clients["bob"]
    started = []

    def serve(path: Path) -> Path:
        record = scratch / f"received-{len(started)}"
        process = subprocess.Popen([bob.python, "-c", FAKE_SERVER, str(path), str(record)],
                                   preexec_fn=_drop_to(bob.user), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        started.append(process)
        deadline = time.monotonic() + 20
        while not Path(f"{record}.ready").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the fake server did not start"
            time.sleep(0.02)
        return record

    yield serve
    for process in started:
        process.kill()
        process.wait()


def test_a_socket_served_by_another_user_gets_nothing(clients, scratch, squatter, root_agent, shared_source):
    alice = clients["alice"]
    socket = scratch / "trap.sock"
    record = squatter(socket)
    result = alice.cli("run", "--source-dir", str(shared_source), "--", "echo", "secret",
                       env=alice.env(LABRUN_SOCKET=str(socket), AWS_SECRET_ACCESS_KEY="alice-secret"))
    assert result.returncode == 125   # labrun refused (docker's code)
    assert "runs as lrsec-bob" in result.stderr and "not as you or root" in result.stderr, result.stderr
    assert not record.exists() or record.read_bytes() == b"", "the client sent bytes to the squatter"
    assert_still_serving(alice, shared_source)


def test_a_squatted_tmp_fallback_directory_is_refused(clients, squatter, shared_source, root_agent):
    alice, bob = clients["alice"], clients["bob"]
    fallback = Path(f"/tmp/labrun-{alice.entry.pw_uid}")
    if fallback.exists() or os.path.lexists(fallback):
        shutil.rmtree(fallback) if fallback.is_dir() and not fallback.is_symlink() else fallback.unlink()
    made = bob.run(f"import os; os.mkdir({str(fallback)!r}, 0o755); os.chmod({str(fallback)!r}, 0o755)",
                   prelude=False)
    assert made.returncode == 0, made.stderr
    try:
        record = squatter(fallback / "agent.sock")
        # No LABRUN_SOCKET, no XDG_RUNTIME_DIR, autostart on: the client would use (or start) the fallback.
        env = alice.env(LABRUN_SOCKET=None, LABRUN_NO_AUTOSTART=None, XDG_RUNTIME_DIR=None,
                        XDG_STATE_HOME=None)
        result = alice.cli("run", "--source-dir", str(shared_source), "--", "echo", "secret", env=env)
        if Path("/run/labrun/agent.sock").exists():
            pytest.fail("a system agent answers on this machine; this test needs the per-user fallback")
        assert result.returncode == 125
        assert f"{fallback} belongs to uid {bob.entry.pw_uid}, not to you" in result.stderr, result.stderr
        assert not record.exists() or record.read_bytes() == b"", "the client sent bytes to the squatter"
        # Bob makes it 0700 and his: alice cannot even reach it, and still starts nothing.
        os.chmod(fallback, 0o700)
        again = alice.cli("ls", env=env)
        assert again.returncode == 125 and "not to you" in again.stderr, again.stderr
    finally:
        shutil.rmtree(fallback, ignore_errors=True)


def test_access_denied_by_the_system_agent_starts_no_private_agent(clients, scratch, root_agent):
    outsider = clients["outsider"]
    runtime = scratch / "outsider-runtime"
    code = f"""
import os
os.mkdir({str(runtime)!r}, 0o700)
import labrun.protocol._paths as paths
import labrun._connection as connection
# This agent stands in for the machine's system agent.
paths.SYSTEM_SOCKET = connection.SYSTEM_SOCKET = {str(root_agent.socket)!r}
from labrun._discovery import connect
from labrun.exceptions import AgentAccessDenied
try:
    connect(autostart=True)
    print("connected")
except AgentAccessDenied as exc:
    print(exc)
print(sorted(os.listdir({str(runtime)!r})))
"""
    env = outsider.env(LABRUN_SOCKET=None, LABRUN_NO_AUTOSTART=None, XDG_RUNTIME_DIR=str(runtime),
                       XDG_STATE_HOME=str(runtime / "state"))
    result = outsider.run(code, prelude=False, env=env)
    assert result.returncode == 0, result.stderr
    message, listing = result.stdout.strip().rsplit("\n", 1)
    assert "does not accept you" in message and "add you to the group 'lrsec-users'" in message
    assert "does not start a private agent" in message
    assert listing == "[]", "a private agent was started beside the system one"


def test_an_agent_refuses_a_socket_directory_another_user_made(users, shared_tmp):
    import sys

    directory = shared_tmp("squatted-socket-dir")
    os.chown(directory, users["lrsec-bob"].pw_uid, users["lrsec-bob"].pw_gid)
    result = subprocess.run([sys.executable, "-m", "labrun.agent", "--socket", str(directory / "agent.sock"),
                             "--state-dir", str(shared_tmp("state"))], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"the socket directory {directory} belongs to uid {users['lrsec-bob'].pw_uid}" in result.stderr, result.stderr
    assert not (directory / "agent.sock").exists()
