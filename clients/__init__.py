"""labrun: run scripts on this machine's labrun agent, with the Azure ML SDK v1 API.

``from labrun import Workspace, Experiment, ScriptRunConfig`` where Azure ML code had
``from azureml.core import ...``: the import rule is ``azureml.core`` -> ``labrun`` (also for its
submodules: ``labrun.runconfig``, ``labrun.conda_dependencies``, ...) and ``azureml.widgets`` ->
``labrun.widgets``. Azure ML cloud services (``Model``, ``Dataset``, ...) import, and refuse
clearly when used (``_refused``). This package imports only the standard library,
msgpack and pathspec, and loads its submodules on first use so that ``import labrun``
(and the CLI) start fast in any environment.
"""

from labrun.protocol._lazy import lazy_exports

from labrun.protocol._version import __version__

VERSION = __version__   # azureml.core.VERSION

_EXPORTS = {
    "Workspace": "._workspace",
    "Experiment": "._experiment",
    "ScriptRunConfig": "._script_run_config",
    "Run": "._run",
    "ScriptRun": "._run",
    "get_run": "._run",
    "RunConfiguration": "._runconfig",
    "DockerConfiguration": "._runconfig",
    "PyTorchConfiguration": "._runconfig",
    "MpiConfiguration": "._runconfig",
    "TensorflowConfiguration": "._runconfig",
    "Resources": "._runconfig",
    "Environment": "._environment",
    "DataPath": "._datapath",
    "ComputeTarget": "._compute",
    "ContainerRegistry": "._environment",
    **{name: "._refused" for name in (
        "Dataset", "Datastore", "Image", "Keyvault", "Model", "PrivateEndPoint", "PrivateEndPointConfig", "Webservice",
        "LinkedService", "SynapseWorkspaceLinkedServiceConfiguration", "attach_legacy_compute_target",
        "is_compute_target_prepared", "prepare_compute_target", "remove_legacy_compute_target", "diagnostic_log")},
}

__all__ = sorted([*_EXPORTS, "__version__", "VERSION"])


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
