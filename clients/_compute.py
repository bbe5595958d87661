"""Compute targets: the names an agent's config defines, for ``workspace.compute_targets['MyCluster']``."""

from __future__ import annotations

from .exceptions import UserErrorException


class ComputeTargetException(UserErrorException):
    """A compute target that does not exist (Azure ML's name, so ``except ComputeTargetException`` works)."""


class ComputeTarget:
    def __init__(self, workspace, name: str, _definition: dict | None = None):
        if _definition is None:
            targets = workspace._call("status")["targets"]
            if name not in targets:
                raise ComputeTargetException(f"ComputeTarget {name!r} is not defined by the agent "
                                         f"(it has: {', '.join(sorted(targets))})")
            _definition = targets[name]
        self.workspace = workspace
        self.name = name
        self.type = _definition.get("kind", "local")
        self._definition = _definition

    def __repr__(self) -> str:
        return f"ComputeTarget(name={self.name!r}, type={self.type!r})"
