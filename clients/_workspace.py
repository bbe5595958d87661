"""``Workspace``: the handle to one labrun agent (Azure ML's workspace, minus the cloud)."""

from __future__ import annotations

from pathlib import Path

from ._connection import AgentConnection
from ._discovery import connect
from .exceptions import AgentUnavailable

# Safe to send again after the agent restarted mid-call: they change nothing, or nothing twice.
RETRYABLE_OPS = frozenset({"get", "list", "wait", "status", "cancel", "logs"})


class Workspace:
    """The agent that runs this workspace's experiments.

    ``Workspace()`` finds the agent (``LABRUN_SOCKET``, the system socket, the per-user
    socket, starting a per-user agent if none answers); ``Workspace(socket=PATH)``
    names one. Azure ML's ``subscription_id``, ``resource_group`` and ``workspace_name``
    are accepted and kept for display, so existing code need not change.
    """

    def __init__(self, subscription_id=None, resource_group=None, workspace_name=None, *, socket=None,
                 autostart=None, **kwargs):
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.name = workspace_name or "local"
        self._socket = Path(socket) if socket is not None else None
        self._autostart = autostart
        self._connection: AgentConnection | None = None

    @classmethod
    def from_config(cls, path=None, **kwargs) -> "Workspace":
        return cls(**kwargs)

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

    def _stream(self, op: str, **args):
        """Streams get a connection of their own, so a half-read stream never blocks other calls."""
        connection = AgentConnection(self.connection.path)
        try:
            yield from connection.stream(op, **args)
        finally:
            connection.close()

    def status(self) -> dict:
        return self._call("status")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __repr__(self) -> str:
        return f"Workspace.create(name='{self.name}', socket='{self._socket}')"
