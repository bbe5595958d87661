"""Environments: what Python a run uses, and building pip and conda environments into cached ones.

- ``user_managed_dependencies``: the run uses ``interpreter_path`` (else the client's interpreter) as is.
- pip requirements: the agent builds a virtualenv from the client's interpreter during ``Preparing``,
  under ``<state>/envs/<hash>``, where the hash covers the interpreter and the requirements. A later
  run with the same definition reuses it; two runs needing the same new one build it once (a lock per
  hash). The build's output is the run's ``logs/environment_build.txt``.
- conda specifications are built with ``conda`` or ``micromamba`` when the machine has one. Without
  either, the same virtualenv recipe is used: the conda packages are installed with pip under the same
  names (the build log says so), from an interpreter of the pinned Python version if the machine has
  one (else the client's, and the log says that too). A package pip cannot find fails the build,
  naming it.
- Azure ML's own packages (``azureml-defaults``, ``azureml-core``, ...) are left out: every built
  environment gets the labrun client instead, through a ``.pth`` file and a copy of the client's
  packages inside the environment, so ``Run.get_context()`` works without listing labrun.

The run's ``PATH`` starts with the environment's ``bin/``, so ``python`` and console scripts in a
``command`` are the environment's.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from labrun.protocol import __version__, _conda

log = structlog.get_logger("labrun.environments")


class PrepareFailed(Exception):
    """Preparing a run failed; ``reason`` is the run's failure reason."""

    def __init__(self, message: str, reason: str = "environment_build_failed"):
        super().__init__(message)
        self.reason = reason


@dataclass
class PreparedEnvironment:
    python: str                     # the interpreter a script runs with
    bin_dir: Path | None = None     # put first on PATH
    variables: dict | None = None


# Left out of builds: the labrun client stands in for Azure ML's SDK.
_AZUREML_PACKAGES = re.compile(r"^azureml([-_.]|$)", re.IGNORECASE)
# Conda packages with no pip counterpart to install: the interpreter and pip come with the virtualenv.
_PROVIDED = {"python", "pip"}
_PIP_NOT_FOUND = re.compile(r"(?:No matching distribution found for|Could not find a version that satisfies "
                            r"the requirement)\s+(\S+)")

# Copies the labrun client into the environment and puts it on its path (after its own site-packages,
# so a labrun the environment installs itself wins). Runs with the environment's interpreter.
_CLIENT_OVERLAY = """
import os, shutil, sys, sysconfig
dest, labrun_dir, protocol_dir, *others = sys.argv[1:]
ignore = shutil.ignore_patterns("__pycache__", "agent")
shutil.rmtree(dest, ignore_errors=True)
shutil.copytree(labrun_dir, os.path.join(dest, "labrun"), ignore=ignore)
if not os.path.isdir(os.path.join(dest, "labrun", "protocol")):
    shutil.copytree(protocol_dir, os.path.join(dest, "labrun", "protocol"), ignore=ignore)
for other in others:
    shutil.copytree(other, os.path.join(dest, os.path.basename(other)), ignore=ignore)
with open(os.path.join(sysconfig.get_paths()["purelib"], "labrun-client.pth"), "w") as f:
    f.write(dest + "\\n")
"""


def _client_sources() -> list[str]:
    """The directories of the client's packages: labrun, labrun.protocol, msgpack (and pathspec, for submits)."""
    import importlib

    import labrun
    import labrun.protocol

    sources = [list(labrun.__path__)[0], list(labrun.protocol.__path__)[0]]
    for name in ("msgpack", "pathspec"):
        try:
            sources.append(list(importlib.import_module(name).__path__)[0])
        except ImportError:
            pass
    return sources


def _without_azureml(requirements: list[str], build_log) -> list[str]:
    kept = []
    for requirement in requirements:
        if _AZUREML_PACKAGES.match(_conda.package_name(requirement)):
            build_log.write(f"labrun: leaving out {requirement}: the labrun client stands in for it\n".encode())
        else:
            kept.append(requirement)
    return kept


async def _interpreter_for(version: str | None, default: str, build_log) -> str:
    """An interpreter of Python ``version`` (``"3.10"``) if this machine has a working one, else ``default``."""
    if version is None:
        return default
    probe = "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"
    for candidate in (default, shutil.which(f"python{version}")):
        if candidate is None:
            continue
        try:
            result = await trio.run_process([candidate, "-c", probe], capture_stdout=True, capture_stderr=True,
                                            check=False)
        except OSError:
            continue
        if result.returncode == 0 and result.stdout.decode().strip() == version:
            return candidate
    build_log.write(f"labrun: the specification pins python={version}, and this machine has no working "
                    f"python{version} (with venv): building with {default} instead\n".encode())
    return default


class EnvironmentBuilder:
    def __init__(self, envs_dir: Path):
        self.envs_dir = envs_dir
        self._locks: dict[str, trio.Lock] = defaultdict(trio.Lock)

    async def prepare(self, definition: dict | None, interpreter: str, log_path: Path, cwd: Path) -> PreparedEnvironment:
        if definition is None:
            return PreparedEnvironment(python=interpreter)
        python = definition["python"]
        variables = definition.get("environment_variables") or {}
        if python["user_managed_dependencies"]:
            chosen = python["interpreter_path"] or interpreter
            # Azure ML's default interpreter_path is plain "python": the client's interpreter is the better guess.
            return PreparedEnvironment(python=interpreter if chosen == "python" else chosen, variables=variables)
        if python.get("conda_specification"):
            return await self._build(definition, interpreter, log_path, cwd, conda=True)
        if python.get("pip_requirements"):
            return await self._build(definition, interpreter, log_path, cwd, conda=False)
        return PreparedEnvironment(python=interpreter, variables=variables)

    async def _build(self, definition: dict, interpreter: str, log_path: Path, cwd: Path, *, conda: bool):
        python = definition["python"]
        recipe = {"interpreter": interpreter, "pip": python.get("pip_requirements"),
                  "conda": python.get("conda_specification"), "client": __version__,
                  "conda_tool": _conda_tool() if conda else None}
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:24]
        prefix = self.envs_dir / key
        variables = definition.get("environment_variables") or {}
        with open(log_path, "ab") as build_log:
            async with self._locks[key]:
                if (prefix / ".labrun-complete").exists():
                    build_log.write(f"labrun: reusing environment {definition['name']} ({key})\n".encode())
                    return PreparedEnvironment(python=str(prefix / "bin" / "python"), bin_dir=prefix / "bin",
                                               variables=variables)
                build_log.write(f"labrun: building environment {definition['name']} ({key})\n".encode())
                build_log.flush()
                if prefix.exists():
                    await trio.to_thread.run_sync(shutil.rmtree, prefix)   # a build an earlier agent left half done
                prefix.parent.mkdir(parents=True, exist_ok=True)
                steps = await self._steps(python, interpreter, prefix, key, build_log)
                for step in steps:
                    shown = ("<put the labrun client in the environment>" if a == _CLIENT_OVERLAY else a for a in step)
                    build_log.write(("$ " + " ".join(shown) + "\n").encode())
                    build_log.flush()
                    try:
                        result = await trio.run_process(step, stdout=build_log, stderr=build_log, cwd=cwd, check=False)
                    except OSError as exc:
                        raise PrepareFailed(f"cannot run {step[0]!r}: {exc.strerror or exc}") from None
                    if result.returncode != 0:
                        build_log.flush()
                        missing = _PIP_NOT_FOUND.findall(_tail(log_path))
                        if missing:
                            raise PrepareFailed(f"building environment {definition['name']!r} failed: pip cannot "
                                                f"find the package {missing[-1]!r}; see user_logs/environment_build.txt")
                        raise PrepareFailed(f"building environment {definition['name']!r} failed: "
                                          f"{' '.join(step[:4])} ... exited with code {result.returncode}; "
                                          "see user_logs/environment_build.txt")
                (prefix / ".labrun-complete").touch()
                log.info("environment.built", name=definition["name"], key=key)
        return PreparedEnvironment(python=str(prefix / "bin" / "python"), bin_dir=prefix / "bin", variables=variables)

    async def _steps(self, python: dict, interpreter: str, prefix: Path, key: str, build_log):
        """The commands that build this environment, the last of them putting the labrun client in it."""
        env_python = str(prefix / "bin" / "python")
        tool = _conda_tool() if python.get("conda_specification") else None
        if tool is not None:
            spec = _conda.parse(python["conda_specification"])
            spec["pip"] = _without_azureml(spec["pip"], build_log)
            spec_file = prefix.parent / f"{key}.yml"
            spec_file.write_text(_conda.dump(spec))
            if Path(tool).name == "micromamba":
                steps = [[tool, "create", "--yes", "--prefix", str(prefix), "--file", str(spec_file)]]
            else:
                steps = [[tool, "env", "create", "--yes", "--prefix", str(prefix), "--file", str(spec_file)]]
        else:
            requirements = list(python.get("pip_requirements") or [])
            if python.get("conda_specification"):
                spec = _conda.parse(python["conda_specification"])
                conda = [p for p in spec["conda"] if _conda.package_name(p) not in _PROVIDED]
                if conda:
                    build_log.write(("labrun: no conda or micromamba on this machine: installing the conda "
                                     f"packages {', '.join(conda)} with pip under the same names\n").encode())
                requirements = [_conda.conda_to_pip(p) for p in conda] + spec["pip"]
                interpreter = await _interpreter_for(_conda.python_version(spec), interpreter, build_log)
            requirements = _without_azureml(requirements, build_log)
            steps = [[interpreter, "-m", "venv", str(prefix)]]
            if requirements:
                requirements_file = prefix.parent / f"{key}.requirements.txt"
                requirements_file.write_text("\n".join(requirements) + "\n")
                steps.append([env_python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                              "-r", str(requirements_file)])
        steps.append([env_python, "-I", "-c", _CLIENT_OVERLAY, str(prefix / "labrun-client"), *_client_sources()])
        return steps


def _conda_tool() -> str | None:
    return shutil.which("conda") or shutil.which("micromamba")


def _tail(path: Path, size: int = 64 * 1024) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - size))
        return f.read().decode("utf-8", errors="replace")
