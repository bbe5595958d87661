"""``CondaDependencies``: a conda environment specification, edited as in Azure ML SDK v1.

The agent builds it into a cached environment (see the README): with ``conda`` or
``micromamba`` when the machine has one, else with pip under the same package names. The
``azureml-*`` packages Azure ML adds are skipped there, because the labrun client stands in for
them in every built environment.
"""

from __future__ import annotations

import os

from labrun.protocol import _conda

from .exceptions import UserErrorException

PYTHON_DEFAULT_VERSION = "3.10.18"
_BASE = {"name": "project_environment", "channels": ["anaconda", "conda-forge"], "conda": ["python=3.8.13"],
         "pip": ["azureml-defaults"], "variables": {}}


class CondaDependencies:
    """The conda and pip packages, channels and Python version of an environment."""

    def __init__(self, conda_dependencies_file_path=None, _underlying_structure=None):
        if conda_dependencies_file_path is not None:
            try:
                with open(conda_dependencies_file_path) as f:
                    text = f.read()
            except OSError as exc:
                raise UserErrorException(f"cannot read {conda_dependencies_file_path}: {exc.strerror or exc}") from None
            self._spec = self._parse(text, conda_dependencies_file_path)
        elif _underlying_structure is not None:
            self._spec = {**{k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                             for k, v in _BASE.items()}, **_underlying_structure}
        else:
            self._spec = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                          for k, v in _BASE.items()}
        self._pristine = conda_dependencies_file_path is None and _underlying_structure is None

    @staticmethod
    def _parse(text: str, where) -> dict:
        try:
            return _conda.parse(text)
        except ValueError as exc:
            raise UserErrorException(f"{where}: not a conda specification: {exc}") from None

    @classmethod
    def _from_string(cls, text: str) -> "CondaDependencies":
        return cls(_underlying_structure=cls._parse(text, "conda specification"))

    @staticmethod
    def create(pip_indexurl=None, pip_packages=None, conda_packages=None, python_version=PYTHON_DEFAULT_VERSION,
               pin_sdk_version=True) -> "CondaDependencies":
        """A specification with ``python_version``, ``azureml-defaults`` and these packages, as Azure ML makes it."""
        cd = CondaDependencies()
        cd._pristine = False
        if python_version:
            cd.set_python_version(python_version)
        if pip_indexurl:
            cd.set_pip_index_url(pip_indexurl)
        for package in conda_packages or []:
            cd.add_conda_package(package)
        for package in pip_packages or []:
            cd.add_pip_package(package)
        return cd

    @staticmethod
    def merge_requirements(requirements) -> list[str]:
        """Requirements with duplicates of one package name dropped (the first one wins)."""
        seen, merged = set(), []
        for requirement in requirements:
            name = _conda.package_name(requirement)
            if name not in seen:
                seen.add(name)
                merged.append(requirement)
        return merged

    # -- editing ---------------------------------------------------------------------------

    def _changed(self) -> None:
        self._pristine = False

    def _replace(self, key: str, package: str) -> None:
        name = _conda.package_name(package)
        self._spec[key] = [p for p in self._spec[key] if _conda.package_name(p) != name or p.startswith("-")]
        self._spec[key].append(package)
        self._changed()

    def add_conda_package(self, conda_package: str) -> None:
        self._replace("conda", str(conda_package))

    def remove_conda_package(self, conda_package: str) -> None:
        name = _conda.package_name(conda_package)
        self._spec["conda"] = [p for p in self._spec["conda"] if _conda.package_name(p) != name]
        self._changed()

    def add_pip_package(self, pip_package: str) -> None:
        self._replace("pip", str(pip_package))

    def remove_pip_package(self, pip_package: str) -> None:
        name = _conda.package_name(pip_package)
        self._spec["pip"] = [p for p in self._spec["pip"] if p.startswith("-") or _conda.package_name(p) != name]
        self._changed()

    def set_pip_option(self, option: str) -> None:
        """A pip option line such as ``--extra-index-url URL`` (replaces one with the same option name)."""
        flag = option.split()[0]
        self._spec["pip"] = [p for p in self._spec["pip"] if not p.startswith(flag)]
        self._spec["pip"].insert(0, option)
        self._changed()

    def set_pip_index_url(self, index_url: str) -> None:
        self.set_pip_option(f"--index-url {index_url}")

    def add_channel(self, channel: str) -> None:
        if channel not in self._spec["channels"]:
            self._spec["channels"].append(channel)
            self._changed()

    def remove_channel(self, channel: str) -> None:
        self._spec["channels"] = [c for c in self._spec["channels"] if c != channel]
        self._changed()

    def set_python_version(self, version: str) -> None:
        self._replace("conda", f"python={version}")
        # Keep python first, as Azure ML writes it.
        self._spec["conda"].insert(0, self._spec["conda"].pop())

    def add_tensorflow_pip_package(self, core_type="cpu", version=None) -> None:
        name = "tensorflow-gpu" if core_type == "gpu" else "tensorflow"
        self.add_pip_package(f"{name}=={version}" if version else name)

    def add_tensorflow_conda_package(self, core_type="cpu", version=None) -> None:
        name = "tensorflow-gpu" if core_type == "gpu" else "tensorflow"
        self.add_conda_package(f"{name}={version}" if version else name)

    # -- reading ---------------------------------------------------------------------------

    def get_python_version(self) -> str | None:
        for package in self._spec["conda"]:
            if _conda.package_name(package) == "python":
                return package.partition("=")[2].lstrip("=") or None
        return None

    @property
    def conda_packages(self):
        return iter(p for p in self._spec["conda"] if _conda.package_name(p) != "python")

    @property
    def pip_packages(self):
        return iter(p for p in self._spec["pip"] if not p.startswith("-"))

    @property
    def pip_options(self):
        return iter(p for p in self._spec["pip"] if p.startswith("-"))

    @property
    def conda_channels(self):
        return iter(self._spec["channels"])

    def serialize_to_string(self) -> str:
        return _conda.dump(self._spec)

    def save_to_file(self, base_directory, conda_file_path=None) -> str:
        """Write the specification to ``base_directory/conda_file_path`` (default ``myenv.yml``); returns the path."""
        path = os.path.join(base_directory, conda_file_path or "myenv.yml")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(self.serialize_to_string())
        return path

    def save(self, path=None) -> str:
        return self.save_to_file(os.path.dirname(path) if path else ".", os.path.basename(path) if path else None)

    def __eq__(self, other) -> bool:
        return isinstance(other, CondaDependencies) and self._spec == other._spec

    def __repr__(self) -> str:
        return self.serialize_to_string()
