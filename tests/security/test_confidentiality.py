"""Secrets and other users' data (issue items 4 and 6): file modes, environment names and variables."""

from __future__ import annotations

import stat

import pytest

from tests.security.conftest import assert_still_serving

pytestmark = pytest.mark.slow


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_and_run_directories_are_private(clients, shared_source, root_agent):
    alice, bob, outsider = clients["alice"], clients["bob"], clients["outsider"]
    run_id = alice.submit(shared_source, ["sh", "-c", "echo secret-output > outputs/model.txt"])
    assert alice.wait(run_id)["status"] == "Completed"
    state = root_agent.state_dir
    # Root's; others may only pass through it to reach their own run directories.
    assert state.stat().st_uid == 0 and _mode(state) == 0o711
    assert _mode(state / "runs") == 0o711
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        if (state / name).exists():
            assert _mode(state / name) == 0o600 and (state / name).stat().st_uid == 0, name
    run_dir = state / "runs" / run_id
    assert run_dir.stat().st_uid == alice.entry.pw_uid and _mode(run_dir) == 0o700
    assert (run_dir / "logs" / "std_log.txt").stat().st_uid == alice.entry.pw_uid
    assert (run_dir / "snapshot" / "train.py").stat().st_uid == alice.entry.pw_uid
    probe = f"""
import os
for path in [{str(state / 'state.db')!r}, {str(run_dir / 'logs' / 'std_log.txt')!r},
             {str(run_dir / 'snapshot' / 'outputs' / 'model.txt')!r}]:
    try:
        open(path).read()
        print("read", path)
    except PermissionError:
        print("denied")
try:
    os.listdir({str(state)!r})
    print("listed")
except PermissionError:
    print("denied")
"""
    for user in (bob, outsider):
        result = user.run(probe, prelude=False)
        assert result.stdout.split() == ["denied"] * 4, (user.user, result.stdout, result.stderr)
    # The owner reads their own files directly too.
    mine = alice.run(f"print(open({str(run_dir / 'snapshot' / 'outputs' / 'model.txt')!r}).read())", prelude=False)
    assert mine.stdout.strip() == "secret-output", mine.stderr


def test_environment_names_are_owned(clients, shared_source, root_agent):
    alice, bob, admin = clients["alice"], clients["bob"], clients["admin"]
    register = """
from labrun import Environment
from labrun.exceptions import Forbidden
env = Environment("lrsec-env")
env.python.user_managed_dependencies = True
env.python.interpreter_path = {interpreter!r}
env.environment_variables = {variables!r}
try:
    out(env.register(ws).version)
except Forbidden as exc:
    out("forbidden: " + str(exc))
"""
    assert alice.json(register.format(interpreter="/usr/bin/python3", variables={"API_KEY": "alice-key"})) == "1"
    stolen = bob.json(register.format(interpreter="/tmp/evil", variables={"LD_PRELOAD": "/tmp/evil.so"}))
    assert stolen.startswith("forbidden: ") and "belongs to lrsec-alice" in stolen
    # The victim still gets their own environment; others see it without its variables.
    get = """
from labrun import Environment
env = Environment.get(ws, "lrsec-env")
out([env.version, env.python.interpreter_path, env.environment_variables,
     {e: v.environment_variables for e, v in Environment.list(ws).items() if e == "lrsec-env"}])
"""
    assert alice.json(get) == ["1", "/usr/bin/python3", {"API_KEY": "alice-key"}, {"lrsec-env": {"API_KEY": "alice-key"}}]
    assert bob.json(get) == ["1", "/usr/bin/python3", {}, {"lrsec-env": {}}]
    # An admin may publish a new version (and sees the variables); the name stays alice's.
    assert admin.json(register.format(interpreter="/usr/bin/python3", variables={"API_KEY": "rotated"})) == "2"
    assert bob.json(get)[2] == {} and alice.json(get)[:3] == ["2", "/usr/bin/python3", {"API_KEY": "rotated"}]
    assert alice.json(register.format(interpreter="/usr/bin/python3", variables={})) == "3"
    assert_still_serving(bob, shared_source)


def test_a_user_outside_the_socket_group_is_told_which_group_to_ask_for(clients, shared_source, root_agent):
    result = clients["outsider"].cli("ls")
    assert result.returncode == 125   # labrun refused (docker's code)
    assert "does not accept you" in result.stderr and "'lrsec-users'" in result.stderr, result.stderr
    assert_still_serving(clients["alice"], shared_source)
