"""``Environment``: which Python (and later which image) a run uses, as in Azure ML SDK v1.

An environment with pip requirements is built by the agent into a cached virtualenv; one with
``python.user_managed_dependencies = True`` uses ``python.interpreter_path`` as is; one with a
``docker.base_image`` runs in that image when Docker is used. ``register`` stores it in the agent
under an auto-incremented version; ``Environment.get`` and ``Environment.list`` read it back.
"""

from __future__ import annotations

import copy

from ._runconfig import _ConfigElement
from .exceptions import UserErrorException


class PythonSection(_ConfigElement):
    def __init__(self):
        self.user_managed_dependencies = False
        self.interpreter_path = "python"
        self.conda_dependencies = None        # a conda YAML text, for conda environments
        self.pip_requirements = None          # labrun: the requirement lines of from_pip_requirements
        self._seal()


class DockerSection(_ConfigElement):
    def __init__(self):
        self.base_image = None
        self.base_dockerfile = None
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
        try:
            with open(file_path) as f:
                env.python.conda_dependencies = f.read()
        except OSError as exc:
            raise UserErrorException(f"cannot read {file_path}: {exc.strerror or exc}") from None
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
        return Environment._from_wire(workspace._call("env_get", name=name,
                                                      version=int(version) if version is not None else None))

    @staticmethod
    def list(workspace) -> dict:
        return {e["name"]: Environment._from_wire(e) for e in workspace._call("env_list")}

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
                "conda_specification": self.python.conda_dependencies if isinstance(self.python.conda_dependencies, str) else None,
            },
            "docker": {"base_image": self.docker.base_image},
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
        env.python.conda_dependencies = python.get("conda_specification")
        env.docker.base_image = (data.get("docker") or {}).get("base_image")
        return env

    def __repr__(self) -> str:
        return f"Environment(Name: {self.name},\nVersion: {self.version})"
