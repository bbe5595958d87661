"""The embedded MLflow tracking server: a real ``mlflow server`` the agent starts, watches and restarts.

It keeps its SQLite database (``mlflow.db``) and its artifacts under ``<state>/mlflow/``, listens
on 127.0.0.1 only, and serves artifacts itself (``--serve-artifacts``), so the agent uploads runs'
files through it. The port is chosen once (a free one, unless the config names it) and kept in
the store, so the UI's address stays the same across agent restarts.

``mlflow server`` runs its web server as a child process: the whole process group is the server.
If any of it dies, the rest is killed and it starts again after a backoff (1 s, doubling to 30 s,
back to 1 s once it has stayed up for a minute). Stopping the agent stops it.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import structlog
import trio

log = structlog.get_logger("labrun.mlflow.server")

STARTUP_TIMEOUT_SECONDS = 120.0
STOP_GRACE_SECONDS = 5.0
STABLE_SECONDS = 60.0
BACKOFF_MAX_SECONDS = 30.0
NICENESS = 10


def mlflow_installed() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _answers(host: str, port: int) -> bool:
    """True once the server answers MLflow's health check."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(f"GET /health HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
            return sock.recv(64).split(b" ")[1:2] == [b"200"]
    except OSError:
        return False


class EmbeddedServer:
    def __init__(self, directory: Path, host: str, port: int, user: str | None = None):
        self.directory = directory
        self.host = host
        self.port = port
        self.user = user   # run it as this account rather than the agent's (a system agent is root)
        self.pid: int | None = None
        self.restarts = 0
        self.last_error: str | None = None
        self.state = "starting"
        self.ready = trio.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def status(self) -> dict:
        return {"url": self.url, "state": self.state, "pid": self.pid, "restarts": self.restarts,
                "last_error": self.last_error, "directory": str(self.directory)}

    def command(self) -> list[str]:
        # At a lower priority than the runs, for CPU and disk: the UI must never slow training down.
        nice = ["nice", "-n", str(NICENESS)] if shutil.which("nice") else []
        ionice = ["ionice", "-c", "3"] if shutil.which("ionice") else []
        return [*nice, *ionice, sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
                "--artifacts-destination", str(self.directory / "artifacts"),
                "--serve-artifacts", "--host", self.host, "--port", str(self.port), "--workers", "1"]

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep the server up until cancelled (agent shutdown), then stop it."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.user is not None:
            account = pwd.getpwnam(self.user)
            for path in (self.directory, *self.directory.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
        task_status.started()
        backoff = 1.0
        while True:
            started = time.monotonic()
            try:
                await self._run_once()
            except (OSError, KeyError) as exc:   # cannot start it (permissions, no interpreter, no account): retry
                log.error("mlflow.server.start_failed", error=f"{type(exc).__name__}: {exc}")
                self.last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() - started > STABLE_SECONDS:
                backoff = 1.0
            self.restarts += 1
            self.state = "restarting"
            log.warning("mlflow.server.exited", restart_in=backoff, log=str(self.directory / "server.log"))
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)

    async def _run_once(self) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONUNBUFFERED="1")
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
            env.pop(key, None)
        identity = {}
        if self.user is not None:
            account = pwd.getpwnam(self.user)
            identity = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            env.update(HOME=str(self.directory), USER=self.user, LOGNAME=self.user)
        with open(self.directory / "server.log", "ab") as output:
            process = await trio.lowlevel.open_process(
                self.command(), stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=env,
                cwd=self.directory, start_new_session=True, **identity)
        self.pid = process.pid
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._announce_when_ready, process)
                await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            # The web server is a child of `mlflow server`: end the whole group, whatever happened.
            with trio.move_on_after(STOP_GRACE_SECONDS + 2, shield=True):
                await _stop_group(process)
            self.pid = None

    async def _announce_when_ready(self, process) -> None:
        deadline = trio.current_time() + STARTUP_TIMEOUT_SECONDS
        while process.returncode is None and trio.current_time() < deadline:
            if await trio.to_thread.run_sync(_answers, self.host, self.port):
                self.state = "running"
                log.info("mlflow.server.started", url=self.url, pid=process.pid)
                self.ready.set()
                return
            await trio.sleep(0.5)


async def _stop_group(process) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with trio.move_on_after(STOP_GRACE_SECONDS):
        while True:
            process.poll()   # reap the leader, so that only live members keep the group
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            await trio.sleep(0.1)
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await process.wait()
