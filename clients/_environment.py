"""``Environment``: which Python (and later which image) a run uses, as in Azure ML SDK v1.

An environment with pip requirements is built by the agent into a cached virtualenv; one with
``python.user_managed_dependencies = True`` uses ``python.interpreter_path`` as is; one with a
``docker.base_image`` runs in that image when Docker is used. ``register`` stores it in the agent
under an auto-incremented version; ``Environment.get`` and ``Environment.list`` read it back.

``python.conda_dependencies`` is a ``CondaDependencies``, Azure ML's default one until it is edited
or replaced: an untouched default means "the client's interpreter", nothing to build.
"""

from __future__ import annotations

from ._conda_dependencies import CondaDependencies
from ._runconfig import _ConfigElement
from .exceptions import NotFound, UserErrorException

DEFAULT_CPU_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:20251130.v1"
DEFAULT_GPU_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04"


class ContainerRegistry(_ConfigElement):
    """Where a base image comes from. labrun's agent uses the images its Docker engine has."""

    def __init__(self):
        self.address = None
        self.username = None
        self.password = None
        self.registry_identity = None
        self._seal()

    def __repr__(self) -> str:
        password = None if self.password is None else "***"
        return f"ContainerRegistry(address={self.address!r}, username={self.username!r}, password={password})"


class PythonSection(_ConfigElement):
    def __init__(self):
        self.user_managed_dependencies = False
        self.interpreter_path = "python"
        self.conda_dependencies = CondaDependencies()
        self.conda_dependencies_file = None
        self.base_conda_environment = None
        self.pip_requirements = None          # labrun: the requirement lines of from_pip_requirements
        self._seal()

    def _conda_wire(self) -> str | None:
        """The conda specification to build, or None when it is Azure ML's untouched default."""
        deps = self.conda_dependencies
        if isinstance(deps, str):
            return deps
        if deps is None or getattr(deps, "_pristine", False):
            return None
        return deps.serialize_to_string()


class DockerSection(_ConfigElement):
    def __init__(self):
        self.base_image = DEFAULT_CPU_IMAGE
        self.base_image_registry = ContainerRegistry()
        self.base_dockerfile = None
        self.build_context = None
        self.platform = None
        self.gpu_support = True
        self.enabled = False
        self.shm_size = "2g"
        self.shared_volumes = True
        self.arguments = []
        self._seal()


def _read_lines(path) -> list[str]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise UserErrorException(f"cannot read {path}: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


class Environment(_ConfigElement):
    def __init__(self, name, **kwargs):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"Environment name expected str, {type(name).__name__} found")
        self.name = name
        self.version = None
        self.environment_variables = {"EXAMPLE_ENV_VAR": "EXAMPLE_VALUE"}
        self.python = PythonSection()
        self.docker = DockerSection()
        self._seal()

    # -- factories ---------------------------------------------------------------------

    @classmethod
    def from_pip_requirements(cls, name, file_path, pip_version=None) -> "Environment":
        env = cls(name)
        lines = _read_lines(file_path)
        if pip_version:
            lines.insert(0, f"pip=={pip_version}")
        env.python.pip_requirements = lines
        return env

    @classmethod
    def from_conda_specification(cls, name, file_path) -> "Environment":
        env = cls(name)
        env.python.conda_dependencies = CondaDependencies(conda_dependencies_file_path=file_path)
        return env

    @classmethod
    def from_docker_image(cls, name, image, container_registry=None, conda_specification=None,
                          pip_requirements=None) -> "Environment":
        env = cls(name)
        env.docker.base_image = image
        if pip_requirements:
            env.python.pip_requirements = _read_lines(pip_requirements)
        elif conda_specification:
            env.python.conda_dependencies = cls.from_conda_specification(name, conda_specification).python.conda_dependencies
        else:
            env.python.user_managed_dependencies = True
        return env

    def clone(self, new_name) -> "Environment":
        import copy

        env = copy.deepcopy(self)
        object.__setattr__(env, "name", new_name)
        object.__setattr__(env, "version", None)
        return env

    # -- the agent's registry ----------------------------------------------------------

    def register(self, workspace) -> "Environment":
        """Store this environment in the agent; it gets the next version of its name."""
        if not self.name:
            raise UserErrorException("an environment needs a name to be registered")
        stored = workspace._call("env_register", environment=self._to_wire())
        registered = self.clone(self.name)
        registered.version = str(stored["version"])
        return registered

    @staticmethod
    def get(workspace, name, version=None, label=None) -> "Environment":
        if version is not None and label is not None:
            raise UserErrorException("Only one of version or label can be specified")
        if label is not None:
            raise UserErrorException("environment labels are not supported by labrun; use a version")
        try:
            return Environment._from_wire(workspace._call("env_get", name=name,
                                                          version=int(version) if version is not None else None))
        except NotFound as exc:
            if not name.startswith(("AzureML-", "Microsoft")):
                raise
            raise NotFound(f"{exc.message}. Azure ML's curated environments are not on this machine: describe the "
                           "packages yourself (CondaDependencies.create, Environment.from_pip_requirements) or "
                           "register one under this name with env.register(ws)") from None

    @staticmethod
    def list(workspace) -> dict:
        found, after = {}, None
        while page := workspace._call("env_list", after=after):   # the agent answers a page at a time
            found.update((e["name"], Environment._from_wire(e)) for e in page)
            after = page[-1]["name"]
        return found

    def _serialize_to_dict(self) -> dict:
        """Azure ML's serialized environment (as in ``runDefinition.environment``)."""
        deps = self.python.conda_dependencies
        if isinstance(deps, str):
            deps = CondaDependencies._from_string(deps)
        conda = None
        if deps is not None:
            spec = deps._spec
            conda = {"name": spec.get("name"), "channels": list(spec["channels"]),
                     "dependencies": [*spec["conda"], *([{"pip": list(spec["pip"])}] if spec["pip"] else [])]}
        registry = self.docker.base_image_registry
        return {
            "name": self.name,
            "version": self.version,
            "environmentVariables": dict(self.environment_variables or {}),
            "python": {"userManagedDependencies": self.python.user_managed_dependencies,
                       "interpreterPath": self.python.interpreter_path, "condaDependencies": conda,
                       "baseCondaEnvironment": self.python.base_conda_environment},
            "docker": {"enabled": self.docker.enabled, "baseImage": self.docker.base_image,
                       "baseDockerfile": self.docker.base_dockerfile, "sharedVolumes": self.docker.shared_volumes,
                       "shmSize": self.docker.shm_size, "arguments": list(self.docker.arguments),
                       "baseImageRegistry": {"address": registry.address, "username": registry.username,
                                             "password": None if registry.password is None else "***"}},
        }

    # -- wire ------------------------------------------------------------------------

    def _to_wire(self) -> dict:
        return {
            "name": self.name or "unnamed",
            "version": int(self.version) if self.version else None,
            "environment_variables": {str(k): str(v) for k, v in (self.environment_variables or {}).items()},
            "python": {
                "user_managed_dependencies": bool(self.python.user_managed_dependencies),
                "interpreter_path": self.python.interpreter_path,
                "pip_requirements": list(self.python.pip_requirements) if self.python.pip_requirements else None,
                "conda_specification": None if self.python.user_managed_dependencies else self.python._conda_wire(),
            },
            # Azure ML's default image is not on this machine: without one of its own, a Docker run
            # uses its target's image.
            "docker": {"base_image": None if self.docker.base_image == DEFAULT_CPU_IMAGE else self.docker.base_image},
        }

    @staticmethod
    def _from_wire(data: dict) -> "Environment":
        env = Environment(data["name"])
        env.version = str(data["version"]) if data.get("version") else None
        env.environment_variables = dict(data.get("environment_variables") or {})
        python = data.get("python") or {}
        env.python.user_managed_dependencies = python.get("user_managed_dependencies", False)
        env.python.interpreter_path = python.get("interpreter_path") or "python"
        env.python.pip_requirements = python.get("pip_requirements")
        if python.get("conda_specification"):
            env.python.conda_dependencies = CondaDependencies._from_string(python["conda_specification"])
        env.docker.base_image = (data.get("docker") or {}).get("base_image") or DEFAULT_CPU_IMAGE
        return env

    def __repr__(self) -> str:
        return f"Environment(Name: {self.name},\nVersion: {self.version})"
