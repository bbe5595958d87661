"""``azureml.core.model``: the model registry is an Azure ML cloud service, so these refuse clearly when used."""

from ._refused import InferenceConfig, Model

__all__ = ["InferenceConfig", "Model"]
