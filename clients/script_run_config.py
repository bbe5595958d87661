"""``azureml.core.script_run_config``, for ``from labrun.script_run_config import ScriptRunConfig``."""

from ._script_run_config import ScriptRunConfig

__all__ = ["ScriptRunConfig"]
