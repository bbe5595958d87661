"""``Workspace``: the handle to one labrun agent (Azure ML's workspace, minus the cloud)."""

from __future__ import annotations

import os

from ._connection import AgentConnection
from ._discovery import connect
from .exceptions import AgentAccessDenied, AgentUnavailable, AgentUntrusted, UserErrorException

# Safe to send again after the agent restarted mid-call: they change nothing, or nothing twice.
RETRYABLE_OPS = frozenset({"get", "list", "wait", "status", "cancel", "logs"})


class Workspace:
    """The agent that runs this workspace's experiments.

    ``Workspace()`` finds the agent (``LABRUN_SOCKET``, the system socket, the per-user
    socket, starting a per-user agent if none answers); ``Workspace(socket=PATH)``
    names one. Azure ML's ``subscription_id``, ``resource_group`` and ``workspace_name``
    are accepted and kept for display, so existing code need not change.
    """

    location = "local"

    def __init__(self, subscription_id=None, resource_group=None, workspace_name=None, *, socket=None,
                 autostart=None, **kwargs):
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.name = workspace_name or "local"
        self._socket = os.fspath(socket) if socket is not None else None
        self._autostart = autostart
        self._connection: AgentConnection | None = None

    @classmethod
    def from_config(cls, path=None, auth=None, _logger=None, _file_name=None, **kwargs) -> "Workspace":
        """The workspace a ``config.json`` describes (as Azure ML finds it), else this machine's agent.

        Looked for, as in Azure ML: ``path`` itself if it is a file, else ``config.json`` or
        ``.azureml/config.json`` in ``path`` (default: the current directory) and its parents. Its
        ``subscription_id``, ``resource_group`` and ``workspace_name`` are kept for display; a
        ``socket`` key names the agent.
        """
        found = _find_config(path, _file_name or "config.json")
        if found is None:
            return cls(**kwargs)
        import json

        try:
            with open(found) as f:
                config = json.load(f)
        except (OSError, ValueError) as exc:
            raise UserErrorException(f"cannot read the workspace configuration {found}: {exc}") from None
        if not isinstance(config, dict):
            raise UserErrorException(f"{found}: a workspace configuration is a JSON object")
        kwargs.setdefault("socket", config.get("socket"))
        return cls(config.get("subscription_id"), config.get("resource_group"), config.get("workspace_name"),
                   **kwargs)

    def write_config(self, path=None, file_name=None) -> str:
        """Write ``<path>/.azureml/<file_name>`` (default ``config.json``) for ``from_config``; returns its path."""
        import json

        directory = os.path.join(path or ".", ".azureml")
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, file_name or "config.json")
        config = {"subscription_id": self.subscription_id, "resource_group": self.resource_group,
                  "workspace_name": self.name}
        if self._socket is not None:
            config["socket"] = self._socket
        with open(target, "w") as f:
            json.dump(config, f, indent=4)
        return target

    def get_details(self) -> dict:
        """Azure ML's workspace details, for this agent."""
        status = self.status()
        return {"id": f"labrun://{status['socket']}", "name": self.name, "location": self.location,
                "type": "labrun", "friendlyName": self.name, "resourceGroup": self.resource_group,
                "subscriptionId": self.subscription_id, "agentVersion": status["agent_version"],
                "socket": status["socket"], "stateDirectory": status["state_dir"], "system": status["system"],
                "workspaceid": status["socket"]}

    @property
    def experiments(self) -> dict:
        """``{name: Experiment}`` for the agent's active experiments."""
        from ._experiment import Experiment

        return {e.name: e for e in Experiment.list(self)}


    @classmethod
    def get(cls, name=None, **kwargs) -> "Workspace":
        return cls(workspace_name=name, **kwargs)

    @property
    def connection(self) -> AgentConnection:
        if self._connection is None:
            self._connection = connect(self._socket, autostart=self._autostart)
            self._socket = self._connection.path
        return self._connection

    def _reconnect(self) -> None:
        self.close()
        self._connection = AgentConnection(self._socket)

    def _call(self, op: str, **args):
        """One request. If the agent restarted meanwhile, a read-only or idempotent request is sent again."""
        try:
            return self.connection.call(op, **args)
        except AgentUnavailable:
            if op not in RETRYABLE_OPS or self._socket is None:
                raise
            self._reconnect()
            return self._connection.call(op, **args)

    def _stream(self, op: str, *, timeout: float | None = None, **args):
        """Streams get a connection of their own, so a half-read stream never blocks other calls."""
        connection = AgentConnection(self.connection.path)
        try:
            yield from connection.stream(op, timeout=timeout, **args)
        finally:
            connection.close()

    def watch(self, since: int | None = None, *, run_id: str | None = None, experiment: str | None = None,
              user: str | None = None, types=None, follow: bool = True, resume: bool = True,
              timeout: float | None = None):
        """Yield lifecycle events (``{"seq", "id", "time", "type", "run_id", "experiment", "user", "data"}``).

        ``since``: replay events after this seq first (0: all that are kept); None: only new ones.
        A subscriber that falls behind the agent's buffer gets a gap; with ``resume`` (the default)
        this iterator reconnects from the last event it yielded, so nothing is skipped. Without it,
        the gap is yielded as ``{"gap": {"first_missed": seq, "last_delivered": seq}}`` and the
        iteration ends. The agent restarting is resumed from the same way.
        """
        filters = {"run_id": run_id, "experiment": experiment, "user": user,
                   "types": list(types) if types is not None else None}
        last = since
        while True:
            try:
                for item in self._stream("watch", timeout=timeout, since=last, follow=follow, **filters):
                    if "gap" in item:
                        if not resume:
                            yield item
                            return
                        last = item["gap"]["last_delivered"]
                        break
                    event = item["event"]
                    last = event["seq"]
                    yield event
                else:
                    return
            except (AgentAccessDenied, AgentUntrusted):
                raise   # not an agent going away: waiting would not help
            except AgentUnavailable:
                if not resume or not follow:
                    raise
                self._reconnect_when_back()

    def _reconnect_when_back(self, attempts: int = 100, interval: float = 0.1) -> None:
        import time

        for _ in range(attempts):
            try:
                self._reconnect()
                return
            except (AgentAccessDenied, AgentUntrusted):
                raise
            except AgentUnavailable:
                time.sleep(interval)
        raise AgentUnavailable(f"the agent at {self._socket} did not come back")

    def wait_for_run(self, run_id: str, timeout: float | None = None) -> dict:
        """Block until the run has ended, following its events; returns the run."""
        import time

        from labrun.protocol import TERMINAL

        run = self._call("get", run_id=run_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        if run["status"] not in TERMINAL:
            try:
                for event in self.watch(run["event_seq"], run_id=run_id, timeout=timeout):
                    if event["data"].get("status") in TERMINAL:
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        break
            except TimeoutError:
                pass
            run = self._call("get", run_id=run_id)
        return run

    def status(self) -> dict:
        return self._call("status")

    def drain(self, wait: bool = True, timeout: float | None = None) -> dict:
        """Admins: start no more runs; with ``wait``, return once no run is active (or at ``timeout``)."""
        return self._call("drain", wait=wait, timeout=timeout)

    def resume(self) -> dict:
        """Admins: start runs again after ``drain``."""
        return self._call("resume")

    def list_runs(self, **filters):
        """Every run matching ``filters`` (the ``list`` op's), newest first, following the agent's pages."""
        before = None
        while True:
            page = self._call("list", before=before, **filters)
            yield from page
            if not page or before is not None and page[-1]["order"] >= before:
                return
            before = page[-1]["order"]

    def get_mlflow_tracking_uri(self) -> str:
        """The MLflow tracking server this agent mirrors runs into, as Azure ML's method returns the workspace's.

        Inside a run of this agent, the run's own ``MLFLOW_TRACKING_URI`` where it has one: the address the run
        reaches MLflow at (a container on a bridge network gets the host's gateway address, not the agent's
        127.0.0.1), or the one the run's environment sets.

        Raises:
            UserErrorException: the agent has no MLflow server (``[mlflow]`` in its config, or ``labrun ui``).
        """
        own = self._runs_tracking_uri()
        if own:
            return own
        mlflow = self._call("status").get("mlflow")
        if not mlflow:
            from .exceptions import UserErrorException

            raise UserErrorException("this labrun agent has no MLflow tracking server: set [mlflow] tracking_uri "
                                     "or embedded = true in its config, or run 'labrun ui' for a per-user agent")
        return mlflow["tracking_uri"]

    def _runs_tracking_uri(self) -> str | None:
        """``MLFLOW_TRACKING_URI`` of the run this process belongs to, if this workspace is that run's agent.

        Outside a run the variable is the shell's own, which says nothing about this agent's server.
        """
        env = os.environ
        if not (env.get("LABRUN_RUN_ID") and env.get("LABRUN_RUN_TOKEN")):
            return None
        if self._socket is not None and self._socket != env.get("LABRUN_SOCKET"):
            return None
        return env.get("MLFLOW_TRACKING_URI") or None

    @property
    def compute_targets(self) -> dict:
        """The agent's named targets (its config's ``[targets.NAME]``), as ``ComputeTarget`` objects."""
        from ._compute import ComputeTarget

        targets = self._call("status")["targets"]
        return {name: ComputeTarget(self, name, definition) for name, definition in targets.items() if name != "local"}

    @property
    def environments(self) -> dict:
        from ._environment import Environment

        return Environment.list(self)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __repr__(self) -> str:
        return f"Workspace.create(name='{self.name}', socket='{self._socket}')"


def _find_config(path, file_name: str) -> str | None:
    if path is not None and os.path.isfile(path):
        return os.fspath(path)
    directory = os.path.abspath(path or os.getcwd())
    while True:
        for candidate in (os.path.join(directory, file_name), os.path.join(directory, ".azureml", file_name)):
            if os.path.isfile(candidate):
                return candidate
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent
