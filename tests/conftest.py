"""Shared fixtures: a real ``labrund`` process on a socket under a temporary directory, and the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labrun.agent._server import socket_answers

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


def spawn_until(argv: list[str], log_path: Path, answers, timeout: float, what: str, **popen) -> subprocess.Popen:
    """Start a process with its output in ``log_path``; return it once ``answers()``, else fail with its log."""
    log = open(log_path, "ab")
    process = subprocess.Popen(argv, stdout=log, stderr=log, **popen)
    log.close()
    deadline = time.monotonic() + timeout
    while not answers():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.02)
    return process


class AgentProcess:
    """A real agent process. ``env`` is what a client needs to reach it."""

    def __init__(self, root: Path, config: str | None = None):
        self.root = root
        self.socket = root / "agent.sock"
        self.state_dir = root / "state"
        self.config_path = None
        if config is not None:
            self.config_path = root / "agent.toml"
            self.config_path.write_text(config)
        self.log_path = root / "agent.log"
        self.process: subprocess.Popen | None = None
        self.env = dict(os.environ, LABRUN_SOCKET=str(self.socket), LABRUN_NO_AUTOSTART="1",
                        PYTHONUNBUFFERED="1")

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "labrun.agent", "--socket", str(self.socket), "--state-dir", str(self.state_dir)]
        if self.config_path:
            argv += ["--config", str(self.config_path)]
        return argv

    def start(self) -> "AgentProcess":
        self.process = spawn_until(self.command(), self.log_path, lambda: socket_answers(self.socket), START_TIMEOUT,
                                   "the agent", env=self.env)
        return self

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def cancel_active(self, timeout: float = 30.0) -> None:
        """Cancel the runs still active: they outlive a stopped agent, and a test must not leave them behind."""
        if self.process is None or self.process.poll() is not None:
            return
        from labrun._connection import AgentConnection

        active = ["Preparing", "Starting", "Running", "Finalizing", "CancelRequested"]
        with AgentConnection(self.socket) as connection:
            for run in connection.call("list", status=["Queued", *active]):
                connection.call("cancel", run_id=run["run_id"])
            deadline = time.monotonic() + timeout
            while connection.call("list", status=active) and time.monotonic() < deadline:
                time.sleep(0.05)

    def restart(self) -> "AgentProcess":
        assert self.stop() == 0, self.log_path.read_text()
        return self.start()

    def workspace(self):
        from labrun import Workspace

        return Workspace(socket=self.socket)

    def cli(self, *args, input=None, timeout=60, env=None, check=False, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "labrun.cli", *args], env=env or self.env, input=input,
                                capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"labrun {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result


@pytest.fixture(autouse=True)
def hash_cache(tmp_path_factory, monkeypatch) -> Path:
    """Each test's client hash cache is its own (and never the user's)."""
    cache = Path(tmp_path_factory.mktemp("cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


@pytest.fixture
def make_agent(tmp_path_factory):
    agents = []

    def make(config: str | None = None, start: bool = True) -> AgentProcess:
        # Unix socket paths are limited to 108 bytes: keep the directory short.
        root = Path(tmp_path_factory.mktemp("a", numbered=True))
        agent = AgentProcess(root, config)
        agents.append(agent)
        return agent.start() if start else agent

    yield make
    from labrun.exceptions import AgentError, AgentUnavailable

    for agent in agents:
        try:
            agent.cancel_active()
        except (AgentError, AgentUnavailable, OSError):
            pass   # an agent a test left unable to answer: nothing to cancel through it
        finally:
            agent.stop()
            remove_left_cgroups(agent.state_dir)


def remove_left_cgroups(state_dir: Path) -> None:
    """End and remove what an agent a test killed left in its cgroups (v1): its spare shims' groups, and its runs'.

    A production agent's next start removes them. No later agent of a test's temporary state directory comes, and
    they would pile up on the machine, one root per test, each making the kernel's cgroup work a little slower.
    """
    import contextlib

    from labrun.agent._cgroups import CGROUP_FS, V1_TRACKING, _own_cgroup
    from labrun.agent.executors._base import agent_id

    name = agent_id(state_dir)
    for controller in (*V1_TRACKING, "memory"):
        own = _own_cgroup(controller)
        root = CGROUP_FS / controller / (own or "/").lstrip("/") / "labrun" / name
        if own is None or not root.is_dir():
            continue
        for group in [g for g in root.iterdir() if g.is_dir()] + [root]:
            with contextlib.suppress(OSError):
                for _ in range(100):
                    pids = (group / "cgroup.procs").read_text().split()
                    if not pids:
                        break
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                    time.sleep(0.01)
                if group != root:
                    group.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()


@pytest.fixture
def agent(make_agent) -> AgentProcess:
    return make_agent()


@pytest.fixture
def source(tmp_path) -> Path:
    """A source directory with a script that prints its arguments and writes an output."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.py").write_text(
        "import os, sys\n"
        "print('args', sys.argv[1:])\n"
        "print('cwd', os.getcwd())\n"
        "os.makedirs('outputs', exist_ok=True)\n"
        "open('outputs/model.txt', 'w').write('trained')\n"
    )
    return src


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (MLflow from PyPI) on 127.0.0.1, shared by the tests that only read it."""
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture
def make_mlflow_server(tmp_path_factory):
    """A test's own MLflow server (to stop and start, or to listen elsewhere), stopped after the test."""
    from tests.mlflow_server import MlflowServer

    servers = []

    def make(host: str = "127.0.0.1") -> MlflowServer:
        servers.append(MlflowServer(tmp_path_factory.mktemp("mlflow"), host).start())
        return servers[-1]

    yield make
    for server in servers:
        server.stop()
