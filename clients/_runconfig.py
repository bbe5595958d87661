"""Run configuration objects, named and defaulted as in Azure ML SDK v1.

As in Azure ML, assigning an attribute a configuration object does not have raises
``AttributeError`` (a typo such as ``rc.enviroment = ...`` is caught, not ignored).
"""

from __future__ import annotations

from .exceptions import RunConfigurationException


class _ConfigElement:
    """Refuses unknown attributes once ``__init__`` has run."""

    _initialized = False

    def _seal(self) -> None:
        object.__setattr__(self, "_initialized", True)

    def __setattr__(self, name, value):
        if self._initialized and not hasattr(self, name):
            raise AttributeError(f"{type(self).__name__} has no attribute {name}")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class DockerConfiguration(_ConfigElement):
    def __init__(self, use_docker=False, shared_volumes=True, arguments=None, shm_size="2g"):
        self.use_docker = use_docker
        self.shared_volumes = shared_volumes
        self.arguments = list(arguments or [])
        self.shm_size = shm_size
        self._seal()


class PyTorchConfiguration(_ConfigElement):
    def __init__(self, communication_backend="Nccl", process_count=None, node_count=1):
        backend = str(communication_backend).lower()
        if backend not in ("nccl", "gloo"):
            raise RunConfigurationException(
                f"{communication_backend} is not a supported backend. 'communication_backend' must be 'Nccl' or 'Gloo'.")
        self.communication_backend = backend
        self.process_count = process_count
        self.node_count = node_count
        self._seal()


class MpiConfiguration(_ConfigElement):
    def __init__(self, process_count_per_node=1, node_count=1):
        self.process_count_per_node = process_count_per_node
        self.node_count = node_count
        self._seal()


class TensorflowConfiguration(_ConfigElement):
    def __init__(self, worker_count=1, parameter_server_count=1):
        self.worker_count = worker_count
        self.parameter_server_count = parameter_server_count
        self._seal()


class Resources(_ConfigElement):
    """What a run asks of the machine: ``cpus`` (default 1), ``memory`` (``"4G"``, default none), ``gpus``."""

    def __init__(self, cpus=1, memory=None, gpus=0):
        self.cpus = cpus
        self.memory = memory
        self.gpus = gpus
        self._seal()

    @classmethod
    def coerce(cls, value) -> "Resources":
        if value is None:
            return cls()
        if isinstance(value, Resources):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"cpus", "memory", "gpus"}
            if unknown:
                raise RunConfigurationException(f"resources: unknown key {sorted(unknown)[0]!r} "
                                                "(known: cpus, memory, gpus)")
            return cls(**value)
        raise RunConfigurationException(f"resources must be a dict or labrun.Resources, got {type(value).__name__}")

    def to_wire(self) -> dict:
        from labrun.protocol import parse_memory

        try:
            memory = None if self.memory is None else parse_memory(self.memory)
        except ValueError as exc:
            raise RunConfigurationException(f"resources.memory: {exc}") from None
        return {"cpus": self.cpus, "memory": memory, "gpus": self.gpus}


class HistoryConfiguration(_ConfigElement):
    def __init__(self):
        self.output_collection = True
        self.snapshot_project = True
        self.directories_to_watch = ["logs"]
        self._seal()


class RunConfiguration(_ConfigElement):
    def __init__(self, script=None, arguments=None, framework=None, communicator=None, conda_dependencies=None,
                 _history_enabled=None, _path=None, _name=None, command=None):
        from ._environment import Environment

        self.script = script
        self.arguments = list(arguments) if arguments is not None else []
        self.command = command if command is not None else ""
        self.target = "local"
        self.framework = framework or "Python"
        self.communicator = communicator or "None"
        self.max_run_duration_seconds = None
        self.node_count = 1
        self.priority = None
        self.environment = Environment("default-environment")
        if conda_dependencies is not None:
            self.environment.python.conda_dependencies = conda_dependencies
        self.history = HistoryConfiguration()
        self.environment_variables = {}
        self.docker = DockerConfiguration()
        self.mpi = MpiConfiguration()
        self.pytorch = PyTorchConfiguration()
        self.tensorflow = TensorflowConfiguration()
        self.resources = Resources()
        self._seal()

    def _serialize_to_dict(self) -> dict:
        """Azure ML's ``runDefinition``: camelCase keys, ``arguments`` with their types kept."""
        environment = self.environment
        docker = self.docker
        return {
            "script": self.script,
            "command": self.command if isinstance(self.command, str) else " ".join(map(str, self.command)),
            "arguments": list(self.arguments),
            "target": self.target,
            "framework": self.framework,
            "communicator": self.communicator,
            "maxRunDurationSeconds": self.max_run_duration_seconds,
            "nodeCount": self.node_count,
            "priority": self.priority,
            "environment": environment._serialize_to_dict() if hasattr(environment, "_serialize_to_dict") else None,
            "history": {"outputCollection": self.history.output_collection,
                        "snapshotProject": self.history.snapshot_project,
                        "directoriesToWatch": list(self.history.directories_to_watch)},
            "docker": None if docker is None else {"useDocker": docker.use_docker, "sharedVolumes": docker.shared_volumes,
                                                   "arguments": list(docker.arguments), "shmSize": docker.shm_size},
            "tensorflow": {"workerCount": self.tensorflow.worker_count,
                           "parameterServerCount": self.tensorflow.parameter_server_count},
            "mpi": {"processCountPerNode": self.mpi.process_count_per_node, "nodeCount": self.mpi.node_count},
            "pytorch": {"communicationBackend": self.pytorch.communication_backend,
                        "processCount": self.pytorch.process_count, "nodeCount": self.pytorch.node_count},
            "environmentVariables": {str(k): str(v) for k, v in (self.environment_variables or {}).items()},
        }
