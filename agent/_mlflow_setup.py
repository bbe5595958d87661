"""The agent's MLflow side, put together: which tracking server, the embedded one if asked, the mirror.

Turned on by the config's ``[mlflow]`` (``tracking_uri`` for an existing server, ``embedded = true``
for the agent's own), or by ``labrun ui`` (the ``ui`` op: a per-user agent's owner, or a system
agent's administrator), which is remembered so the UI comes back with the agent. ``prepare_env`` is what a starting run gets from it.
"""

from __future__ import annotations

from pathlib import Path

import structlog
import trio

from labrun.protocol import Forbidden

from ._artifacts import note_in_log
from ._mlflow import ENV_KEYS, MlflowConfig, MlflowMirror
from ._mlflow_server import EmbeddedServer, free_port, mlflow_installed

log = structlog.get_logger("labrun.mlflow")

UI_META = "mlflow_ui"
PORT_META = "mlflow_port"


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

    async def prepare_env(self, record, env: dict, explicit: dict, log_path: Path) -> None:
        """Point the run's ``mlflow`` at its MLflow run (the variables the run sets itself win)."""
        if self.config is None or not self.config.run_env or "MLFLOW_TRACKING_URI" in explicit:
            return
        for key in ENV_KEYS:   # the submitting shell's, which name some other run
            env.pop(key, None)
        found = await self.mirror.run_env(record) if self.mirror is not None else None
        if found is not None:
            env.update(found)
            return
        note = (f"labrun: MLflow at {self.tracking_uri} did not answer in time; this run has no MLFLOW_RUN_ID, so "
                "mlflow calls in it write to a local store in its working directory. Its labrun metrics, files "
                "and status reach MLflow once it answers.\n")
        # The logs directory is the user's: written as them, never through a link they left there.
        note_in_log(record, log_path, note)
