"""Azure ML names labrun deliberately does not provide: importing them works, using them says why.

These are Azure ML cloud services (the model registry and deployment, datasets and datastores, image
building, key vaults, private endpoints, linked services, and provisioning managed compute). The
import line of existing code keeps working; the first use raises ``NotSupportedError`` naming the
class and what to do instead.
"""

from __future__ import annotations

from .exceptions import UserErrorException

# name -> what to do instead (shown in the error, and listed in the README).
REFUSED = {
    "Model": "keep models as run outputs (./outputs) and fetch them with run.download_files(prefix='outputs/')",
    "InferenceConfig": "serving models is not part of labrun",
    "Webservice": "serving models is not part of labrun",
    "Dataset": "read data from a local path; pass it in the run's arguments",
    "Datastore": "read data from a local path; pass it in the run's arguments",
    "Image": "build images with docker and use Environment.from_docker_image",
    "Keyvault": "give secrets to runs through run_config.environment_variables or files only you can read",
    "PrivateEndPoint": "the agent is reached through a local socket",
    "PrivateEndPointConfig": "the agent is reached through a local socket",
    "LinkedService": "Synapse and other linked services are cloud-only",
    "SynapseWorkspaceLinkedServiceConfiguration": "Synapse and other linked services are cloud-only",
    "AmlCompute": "declare compute targets in the agent's config ([targets.NAME]) and use ws.compute_targets[NAME]",
    "ComputeInstance": "declare compute targets in the agent's config ([targets.NAME]) and use ws.compute_targets[NAME]",
    "attach_legacy_compute_target": "declare compute targets in the agent's config ([targets.NAME])",
    "remove_legacy_compute_target": "declare compute targets in the agent's config ([targets.NAME])",
    "prepare_compute_target": "targets need no preparation: environments are built when a run starts",
    "is_compute_target_prepared": "targets need no preparation: environments are built when a run starts",
    "diagnostic_log": "the agent's log is in its state directory (agent.log) or the journal",
}


class NotSupportedError(UserErrorException, NotImplementedError):
    """An Azure ML cloud feature that labrun does not provide."""


def refusal(name: str) -> str:
    return f"labrun does not provide {name}: it is an Azure ML cloud service. Instead, {REFUSED[name]}."


class _RefusedMeta(type):
    def __call__(cls, *args, **kwargs):
        raise NotSupportedError(refusal(cls.__name__))

    def __getattr__(cls, attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        raise NotSupportedError(refusal(cls.__name__))


def _refused_function(name: str):
    def refused(*args, **kwargs):
        raise NotSupportedError(refusal(name))

    refused.__name__ = refused.__qualname__ = name
    refused.__doc__ = refusal(name)
    return refused


def __getattr__(name: str):
    if name not in REFUSED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _refused_function(name) if name[0].islower() else _RefusedMeta(name, (), {"__doc__": refusal(name)})
    globals()[name] = value
    return value
