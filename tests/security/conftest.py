"""A real root agent, real users, and clients running as them.

The setup creates (idempotently) the users ``lrsec-alice`` and ``lrsec-bob`` in the socket group
``lrsec-users``, ``lrsec-admin`` in that group and in the admin group ``lrsec-admins``, and
``lrsec-outsider`` in neither. Clients run as those users from a world-readable copy of the thin
client, exactly as a user's training script would. These tests need root: CI runs as root, and a
run without it fails rather than skips, since the point is to prove the root agent safe.
"""

from __future__ import annotations

import grp
import itertools
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import AgentProcess

SOCKET_GROUP = "lrsec-users"
ADMIN_GROUP = "lrsec-admins"
USERS = {"lrsec-alice": [SOCKET_GROUP], "lrsec-bob": [SOCKET_GROUP], "lrsec-admin": [SOCKET_GROUP, ADMIN_GROUP],
         "lrsec-outsider": []}
AGENT_CONFIG = f"""
[agent]
socket_group = "{SOCKET_GROUP}"
admin_group = "{ADMIN_GROUP}"
stop_grace_seconds = 1
[resources]
cpus = 2
"""

# What each client script starts with: a workspace and helpers that turn agent errors into data.
PRELUDE = """
import json, os, sys
from labrun import Workspace
from labrun.protocol import AgentError
ws = Workspace()
def call(op, **args):
    try:
        return {"ok": ws._call(op, **args)}
    except AgentError as exc:
        return {"error": exc.code, "message": exc.message}
def stream(op, **args):
    try:
        return {"ok": list(ws._stream(op, **args))}
    except AgentError as exc:
        return {"error": exc.code, "message": exc.message}
def out(value):
    print(json.dumps(value, default=lambda b: b.decode(errors="replace")))
"""


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def users() -> dict[str, pwd.struct_passwd]:
    """The test users and groups, created if missing (system tools: groupadd, useradd, usermod)."""
    if os.geteuid() != 0:
        pytest.fail("tests/security need root: they run a root agent and clients as other users")
    for group in (SOCKET_GROUP, ADMIN_GROUP):
        try:
            grp.getgrnam(group)
        except KeyError:
            _run("groupadd", "--system", group)
    for user, groups in USERS.items():
        try:
            pwd.getpwnam(user)
        except KeyError:
            _run("useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
                 "/usr/sbin/nologin", "--user-group", user)
        if groups:
            _run("usermod", "--append", "--groups", ",".join(groups), user)
    return {user: pwd.getpwnam(user) for user in USERS}


def _world_readable(path: Path) -> None:
    for parent in [path, *path.parents]:
        if str(parent).startswith("/tmp/") or parent == path:
            parent.chmod(parent.stat().st_mode | 0o755)


@pytest.fixture(scope="session")
def shared_tmp():
    """A directory the test users can traverse. Not under pytest's own temporary root, which every
    pytest session on the machine makes 0700 again when it starts."""
    root = Path(tempfile.mkdtemp(prefix="lrsec-", dir="/tmp"))
    root.chmod(0o755)
    counter = itertools.count()

    def make(name: str) -> Path:
        path = root / f"{name}{next(counter)}"
        path.mkdir(mode=0o755)
        path.chmod(0o755)
        return path
    yield make
    shutil.rmtree(root, ignore_errors=True)


def _drop_to(user: str):
    entry = pwd.getpwnam(user)

    def drop():
        os.setgroups(os.getgrouplist(user, entry.pw_gid))
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    return drop


@pytest.fixture(scope="session")
def thin_client(shared_tmp, users):
    """An interpreter every test user may run, and a world-readable copy of the thin client."""
    import msgpack
    import pathspec

    import labrun
    import labrun.protocol

    site = shared_tmp("client")
    shutil.copytree(Path(labrun.__file__).parent, site / "labrun", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Path(labrun.protocol.__file__).parent, site / "labrun" / "protocol",
                    ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    for module in (msgpack, pathspec):
        shutil.copytree(Path(module.__file__).parent, site / module.__name__,
                        ignore=shutil.ignore_patterns("__pycache__"))
    _world_readable(site)
    subprocess.run(["chmod", "-R", "a+rX", str(site)], check=True)
    for python in ("/usr/bin/python3", sys.executable):
        probe = subprocess.run([python, "-c", "import labrun, msgpack"], env={"PYTHONPATH": str(site)},
                               preexec_fn=_drop_to("lrsec-alice"), capture_output=True, cwd="/")
        if probe.returncode == 0:
            return python, site
    pytest.fail("no Python interpreter that the test users may run")


class Client:
    """Runs client code as one of the test users against an agent."""

    def __init__(self, agent, thin_client, user: str):
        self.agent, self.python, self.site, self.user = agent, thin_client[0], thin_client[1], user
        self.entry = pwd.getpwnam(user)

    def env(self, **extra) -> dict:
        env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": str(self.site),
               "LABRUN_SOCKET": str(self.agent.socket), "LABRUN_NO_AUTOSTART": "1", "LANG": "C.UTF-8"}
        env.update(extra)
        return {k: v for k, v in env.items() if v is not None}

    def run(self, code: str, *, cwd: Path | str = "/", env: dict | None = None, prelude: bool = True,
            timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run([self.python, "-c", (PRELUDE if prelude else "") + code], cwd=cwd,
                              env=env or self.env(), preexec_fn=_drop_to(self.user), capture_output=True,
                              text=True, timeout=timeout)

    def json(self, code: str, **kwargs):
        """Run ``code`` (which ends by ``out(...)``) and return what it printed, as JSON."""
        result = self.run(code, **kwargs)
        assert result.returncode == 0, f"{self.user}: {result.stderr}"
        return json.loads(result.stdout.strip().splitlines()[-1])

    def cli(self, *args, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([self.python, "-m", "labrun.cli", *args], env=env or self.env(), cwd="/",
                              preexec_fn=_drop_to(self.user), capture_output=True, text=True, timeout=90)

    def submit(self, source: Path, command, **kwargs) -> str:
        """Submit a run (a shell command) and return its id."""
        extra = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        return self.json(f"""
from labrun import Experiment, ScriptRunConfig
run = Experiment(ws, 'sec').submit(ScriptRunConfig({str(source)!r}, command={command!r}{', ' + extra if extra else ''}))
out(run.id)
""")

    def wait(self, run_id: str) -> dict:
        return self.json(f"out(ws._call('wait', run_id={run_id!r}))")


@pytest.fixture
def root_agent(shared_tmp, users):
    """A real root agent with the test groups; its directory is traversable, as /var/lib is."""
    agent = AgentProcess(shared_tmp("a"), AGENT_CONFIG)
    try:
        yield agent.start()
    finally:
        agent.stop()


@pytest.fixture
def clients(root_agent, thin_client):
    return {user.removeprefix("lrsec-"): Client(root_agent, thin_client, user) for user in USERS}


@pytest.fixture
def shared_source(shared_tmp) -> Path:
    """A source directory every test user can read."""
    root = shared_tmp("src")
    (root / "train.py").write_text("print('trained')\n")
    (root / "train.py").chmod(0o644)
    return root


@pytest.fixture
def scratch(shared_tmp) -> Path:
    """A sticky, world-writable directory (like /tmp) where users leave evidence for the test."""
    root = shared_tmp("scratch")
    root.chmod(0o1777)
    return root


def assert_still_serving(client: Client, source: Path) -> None:
    """The agent keeps serving everyone: a fresh run of another user completes."""
    run_id = client.submit(source, ["echo", "still-serving"])
    assert client.wait(run_id)["status"] == "Completed"
