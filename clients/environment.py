"""``azureml.core.environment``, for ``from labrun.environment import Environment`` (the import rule)."""

from ._conda_dependencies import CondaDependencies
from ._environment import DEFAULT_CPU_IMAGE, DEFAULT_GPU_IMAGE, DockerSection, Environment, PythonSection

__all__ = ["CondaDependencies", "DEFAULT_CPU_IMAGE", "DEFAULT_GPU_IMAGE", "DockerSection", "Environment",
           "PythonSection"]
