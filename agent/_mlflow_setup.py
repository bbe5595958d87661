"""The agent's MLflow side, put together: which tracking server, the embedded one if asked, the mirror.

Turned on by the config's ``[mlflow]`` (``tracking_uri`` for an existing server, ``embedded = true``
for the agent's own), or by ``labrun ui`` (the ``ui`` op: a per-user agent's owner, or a system
agent's administrator), which is remembered so the UI comes back with the agent. ``prepare_env`` is what a starting run gets from it.

A run in a container reaches the server as its network allows (``container_uri``): on the host's
network as on the host; on a bridge network, a server on a loopback address only through the
network's gateway (the host's address there), and only if the server listens on it: else the run
gets no ``MLFLOW_*`` variables, and its log says why.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import structlog
import trio

from labrun.protocol import Forbidden

from ._artifacts import note_in_log
from ._mlflow import ENV_KEYS, MlflowConfig, MlflowMirror
from ._mlflow_server import EmbeddedServer, free_port, mlflow_installed
from ._warnings import KIND as WARNINGS, MLFLOW_NO_RUN_ENV

log = structlog.get_logger("labrun.mlflow")

UI_META = "mlflow_ui"
PORT_META = "mlflow_port"
PROBE_SECONDS = 0.5


@dataclass(frozen=True)
class ContainerNetwork:
    """A container's network: Docker's ``NetworkMode``, and the host's address on it (asked only when needed)."""
    mode: str
    gateway: Callable[[], Awaitable[str | None]]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def container_uri(tracking_uri: str, mode: str, gateway: str | None, listens: bool) -> tuple[str | None, str]:
    """The tracking URI as a container on network ``mode`` reaches it, or None and why not.

    ``gateway``: the host's address on that network; ``listens``: whether the server answers there.
    """
    parts = urlsplit(tracking_uri)
    host = parts.hostname or ""
    if not _loopback(host) or mode == "host":
        return tracking_uri, ""
    if mode == "none":
        return None, "the container has no network"
    if gateway is None:
        return None, f"{host} in a container on network {mode!r} is the container itself"
    if not listens:
        return None, (f"{host} in a container on network {mode!r} is the container itself, and the server does not "
                      f"listen on the host's address there, {gateway}")
    netloc = (f"{parts.username}@" if parts.username else "") + \
        (f"[{gateway}]" if ":" in gateway else gateway) + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), ""


async def _listens(address: str, port: int) -> bool:
    """Whether something accepts connections on ``address:port`` (an address of this machine: answered at once)."""
    with trio.move_on_after(PROBE_SECONDS):
        try:
            stream = await trio.open_tcp_stream(address, port)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False


class Mlflow:
    def __init__(self, agent_config, store, events, supervisor):
        self.agent_config = agent_config
        self.config: MlflowConfig | None = agent_config.mlflow
        self.store = store
        self.events = events
        self.supervisor = supervisor
        self.server: EmbeddedServer | None = None
        self.mirror: MlflowMirror | None = None
        self._enabled = trio.Event()
        if self.config is None and store.get_meta(UI_META, False) and mlflow_installed():
            self.config = MlflowConfig(embedded=True)

    @property
    def tracking_uri(self) -> str | None:
        if self.config is None:
            return None
        return self.server.url if self.server is not None else self.config.tracking_uri

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve MLflow until cancelled; started (for ``nursery.start``) once the mirror has its cursor."""
        if self.config is None:
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await self._enabled.wait()
        config = self.config
        uri = config.tracking_uri
        if config.embedded:
            port = config.port or self.store.get_meta(PORT_META) or free_port(config.host)
            self.store.set_meta(PORT_META, port)
            self.server = EmbeddedServer(self.agent_config.state_dir / "mlflow", config.host, port, config.user)
            uri = self.server.url
        # Made before it runs: retention asks it at once what it has not taken yet.
        self.mirror = MlflowMirror(config, uri, self.store, self.events, self.agent_config.state_dir / "runs",
                                   live_record=self.supervisor.live_record)
        async with trio.open_nursery() as nursery:
            if self.server is not None:
                await nursery.start(self.server.run)
            await nursery.start(self.mirror.run)
            task_status.started()

    def enable_ui(self, admin: bool) -> None:
        """``labrun ui``: start the embedded server on an agent that has no MLflow yet (its owner or an admin)."""
        if self.config is not None:
            return
        if not admin:
            raise Forbidden("this agent has no MLflow server; an administrator starts one with 'labrun ui', or "
                            "with [mlflow] embedded = true (or tracking_uri = ...) in the agent's configuration")
        if not mlflow_installed():
            raise Forbidden("the MLflow UI needs MLflow next to the agent: pip install 'labrun[mlflow]'")
        self.config = MlflowConfig(embedded=True)
        self.store.set_meta(UI_META, True)
        self._enabled.set()

    async def wait_ready(self, timeout: float) -> bool:
        """Until the embedded server answers (at most ``timeout``); True for an external one."""
        if self.config is None:
            return False
        with trio.move_on_after(timeout):
            while self.mirror is None:   # ``run`` is being woken up by enable_ui
                await trio.sleep(0.05)
            if self.server is not None:
                await self.server.ready.wait()
            return True
        return False

    def status(self) -> dict | None:
        if self.config is None:
            return None
        found = {"tracking_uri": self.tracking_uri, "embedded": self.config.embedded, "run_env": self.config.run_env}
        if self.server is not None:
            found["server"] = self.server.status()
        if self.mirror is not None:
            found["mirror"] = self.mirror.status()
        return found

    def link(self, run_id: str) -> dict | None:
        return self.mirror.link(run_id) if self.mirror is not None else None

    async def prepare_env(self, record, env: dict, explicit: dict, log_path: Path,
                          container: ContainerNetwork | None = None) -> None:
        """Point the run's ``mlflow`` at its MLflow run (the variables the run sets itself win).

        ``container``: the network of the container the run executes in, if it does.
        """
        if self.config is None or not self.config.run_env or "MLFLOW_TRACKING_URI" in explicit:
            return
        for key in ENV_KEYS:   # the submitting shell's, which name some other run
            env.pop(key, None)
        uri, why = self.tracking_uri, ""
        if container is not None and uri is not None:
            uri, why = container_uri(uri, container.mode, None, False)
            if uri is None and container.mode != "none":
                gateway = await container.gateway()
                parts = urlsplit(self.tracking_uri)
                port = parts.port or (443 if parts.scheme == "https" else 80)
                listens = gateway is not None and await _listens(gateway, port)
                uri, why = container_uri(self.tracking_uri, container.mode, gateway, listens)
        found = await self.mirror.run_env(record) if self.mirror is not None and uri is not None else None
        if found is not None:
            env.update(found, MLFLOW_TRACKING_URI=uri)
            return
        if uri is None:
            note = (f"labrun: this run's container cannot reach MLflow at {self.tracking_uri}: {why}. It has no "
                    "MLFLOW_* variables, so mlflow calls in it write to a local store in its working directory; "
                    "its labrun metrics, files and status reach MLflow all the same. (Run it with --network host "
                    "where the agent allows that, or serve MLflow on an address the container reaches.)\n")
        else:
            note = (f"labrun: MLflow at {self.tracking_uri} did not answer in time; this run has no MLFLOW_RUN_ID, "
                    "so mlflow calls in it write to a local store in its working directory. Its labrun metrics, "
                    "files and status reach MLflow once it answers.\n")
        # The logs directory is the user's: written as them, never through a link they left there.
        note_in_log(record, log_path, note)
        self.store.set_labels(record.run_id, WARNINGS, {MLFLOW_NO_RUN_ENV: note.removeprefix("labrun: ").strip()})
