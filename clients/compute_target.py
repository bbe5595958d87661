"""``azureml.core.compute_target``, for ``from labrun.compute_target import ComputeTargetException``."""

from ._compute import ComputeTarget, ComputeTargetException

__all__ = ["ComputeTarget", "ComputeTargetException"]
