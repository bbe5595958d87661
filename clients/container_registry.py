"""``azureml.core.container_registry``, for ``from labrun.container_registry import ContainerRegistry``."""

from ._environment import ContainerRegistry

__all__ = ["ContainerRegistry"]
