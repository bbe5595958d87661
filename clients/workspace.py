"""``azureml.core.workspace``, for ``from labrun.workspace import Workspace`` (the import rule)."""

from ._workspace import Workspace

__all__ = ["Workspace"]
