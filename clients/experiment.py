"""``azureml.core.experiment``, for ``from labrun.experiment import Experiment`` (the import rule)."""

from ._experiment import Experiment, ViewType

__all__ = ["Experiment", "ViewType"]
