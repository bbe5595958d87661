"""``azureml.core.script_run``, for ``from labrun.script_run import ScriptRun`` (the import rule)."""

from ._run import ScriptRun

__all__ = ["ScriptRun"]
