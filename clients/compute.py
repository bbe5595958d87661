"""``azureml.core.compute``, for ``from labrun.compute import ComputeTarget`` (the import rule).

``ComputeTarget`` names a target of the agent's config. Provisioning managed compute (``AmlCompute``,
``ComputeInstance``) is an Azure ML cloud service: those import, and refuse clearly when used.
"""

from ._compute import ComputeTarget
from ._refused import AmlCompute, ComputeInstance

__all__ = ["AmlCompute", "ComputeInstance", "ComputeTarget"]
