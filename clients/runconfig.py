"""``azureml.core.runconfig``, for ``from labrun.runconfig import RunConfiguration`` (the import rule)."""

from ._conda_dependencies import CondaDependencies
from ._environment import DEFAULT_CPU_IMAGE, DEFAULT_GPU_IMAGE
from ._environment import Environment as EnvironmentDefinition
from ._runconfig import (
    DockerConfiguration, HistoryConfiguration, MpiConfiguration, PyTorchConfiguration, RunConfiguration,
    TensorflowConfiguration,
)

__all__ = ["CondaDependencies", "DEFAULT_CPU_IMAGE", "DEFAULT_GPU_IMAGE", "DockerConfiguration", "EnvironmentDefinition",
           "HistoryConfiguration", "MpiConfiguration", "PyTorchConfiguration", "RunConfiguration",
           "TensorflowConfiguration"]
