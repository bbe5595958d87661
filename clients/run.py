"""``azureml.core.run``, for ``from labrun.run import Run`` (the import rule)."""

from ._run import Run, get_run

__all__ = ["Run", "get_run"]
