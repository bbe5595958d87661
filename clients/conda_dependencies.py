"""``azureml.core.conda_dependencies``, for ``from labrun.conda_dependencies import CondaDependencies``."""

from ._conda_dependencies import CondaDependencies

__all__ = ["CondaDependencies"]
