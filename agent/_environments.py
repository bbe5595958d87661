"""Environments: what Python a run uses, and building pip environments into cached virtualenvs.

- ``user_managed_dependencies``: the run uses ``interpreter_path`` (else the client's interpreter) as is.
- pip requirements: the agent builds a virtualenv from the client's interpreter during ``Preparing``,
  under ``<state>/envs/<uid>/<hash>``, where the hash covers the interpreter and the requirements. A
  later run of the same user with the same definition reuses it; two runs needing the same new one
  build it once (a lock per user and hash). The build's output is the run's
  ``logs/environment_build.txt``.
- Builds run as the run's user (never root: the interpreter and every package's setup code are the
  user's to choose), in isolated mode (``-I``: no ``PYTHONPATH``, no user site, and the working
  directory, which is the user's environment directory and never the snapshot, is not on
  ``sys.path``, so a ``venv.py`` there cannot shadow the standard library), with a minimal
  environment. Each user's environments are theirs (0700), so no user can plant code in another's.
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

import contextlib
import hashlib
import json
import re
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from labrun.protocol import __version__, _conda

from ._asuser import Credentials, agent_dir, acting_as, make_private_dir, open_file_as, run_as
from ._warnings import PIP_FOR_CONDA, PYTHON_NOT_PINNED

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


# Kept in a built environment, so that every run reusing it is told what its build was told.
WARNINGS_FILE = ".labrun-warnings.json"


def needs_conda(definition: dict) -> bool:
    return bool(definition["python"].get("conda_specification")) and not definition["python"]["user_managed_dependencies"]


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


async def _interpreter_for(version: str | None, default: str, build_log, creds, env, warnings: dict) -> str:
    """An interpreter of Python ``version`` (``"3.10"``) if this machine has a working one, else ``default``."""
    if version is None:
        return default
    probe = "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"
    for candidate in (default, shutil.which(f"python{version}")):
        if candidate is None:
            continue
        try:
            result = await trio.run_process([candidate, "-I", "-c", probe], capture_stdout=True, capture_stderr=True,
                                            stdin=subprocess.DEVNULL, env=env, check=False, **creds.popen_options())
        except OSError:
            continue
        if result.returncode == 0 and result.stdout.decode().strip() == version:
            return candidate
    message = (f"the specification pins python={version}, and this machine has no working python{version} "
               f"(with venv): building with {default} instead")
    build_log.write(f"labrun: {message}\n".encode())
    warnings[PYTHON_NOT_PINNED] = f"Environment build: {message}."
    return default


class EnvironmentBuilder:
    def __init__(self, envs_dir: Path):
        self.envs_dir = envs_dir
        self._locks: dict[tuple[int, str], trio.Lock] = {}   # builds under way or awaited, by user and recipe

    async def prepare(self, definition: dict | None, interpreter: str, log_path: Path,
                      creds: Credentials | None = None, warnings: dict | None = None) -> PreparedEnvironment:
        """The run's environment, built if need be. ``warnings`` (if given) gets what the run should be
        warned of, by key, even when the build fails."""
        warnings = {} if warnings is None else warnings
        if definition is None:
            return PreparedEnvironment(python=interpreter)
        python = definition["python"]
        variables = definition.get("environment_variables") or {}
        if python["user_managed_dependencies"]:
            chosen = python["interpreter_path"] or interpreter
            # Azure ML's default interpreter_path is plain "python": the client's interpreter is the better guess.
            return PreparedEnvironment(python=interpreter if chosen == "python" else chosen, variables=variables)
        if python.get("conda_specification") or python.get("pip_requirements"):
            creds = creds or Credentials(os.geteuid(), os.getegid())
            try:
                build_log = os.fdopen(open_file_as(creds, log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "ab")
            except OSError as exc:
                raise PrepareFailed(f"cannot open {log_path.name}: {exc.strerror or exc}") from None
            with build_log:
                return await self._build(definition, interpreter, build_log, creds,
                                         conda=bool(python.get("conda_specification")), log_path=log_path,
                                         warnings=warnings)
        return PreparedEnvironment(python=interpreter, variables=variables)

    @contextlib.asynccontextmanager
    async def _building(self, key: tuple[int, str]):
        """One build of a recipe at a time; the lock goes once nobody holds or awaits it (recipes are the users':
        a lock kept for each one ever built would grow without bound)."""
        lock = self._locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                del self._locks[key]

    def _user_dir(self, creds: Credentials) -> Path:
        """``<envs>/<uid>``: the user's own (0700), made by the agent in its own directory."""
        agent_dir(self.envs_dir, traversable=True)
        user_dir = self.envs_dir / str(creds.uid)
        try:
            make_private_dir(self.envs_dir, user_dir.name, creds)
        except FileExistsError:
            pass
        return user_dir

    def _build_env(self, creds: Credentials, user_dir: Path) -> dict:
        """A minimal environment for the build: the agent's own variables are not the user's business."""
        try:
            home = pwd.getpwuid(creds.uid).pw_dir
        except KeyError:
            home = str(user_dir)
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": home if os.path.isdir(home) else str(user_dir),
               "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        for key in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                    "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
            if key in os.environ:
                env[key] = os.environ[key]
        return env

    async def _build(self, definition: dict, interpreter: str, build_log, creds: Credentials, *, conda: bool,
                     log_path: Path, warnings: dict):
        python = definition["python"]
        recipe = {"interpreter": interpreter, "pip": python.get("pip_requirements"),
                  "conda": python.get("conda_specification"), "client": __version__,
                  "conda_tool": _conda_tool() if conda else None}
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:24]
        user_dir = self._user_dir(creds)
        prefix = user_dir / key
        variables = definition.get("environment_variables") or {}
        async with self._building((creds.uid, key)):
            with acting_as(creds):
                complete = (prefix / ".labrun-complete").exists()
            if complete:
                build_log.write(f"labrun: reusing environment {definition['name']} ({key})\n".encode())
                warnings.update(await run_as(creds, _read_warnings, prefix))
                return PreparedEnvironment(python=str(prefix / "bin" / "python"), bin_dir=prefix / "bin",
                                           variables=variables)
            build_log.write(f"labrun: building environment {definition['name']} ({key})\n".encode())
            build_log.flush()
            # A build an earlier agent left half done.
            await run_as(creds, shutil.rmtree, prefix, True)
            env = self._build_env(creds, user_dir)
            steps = await self._steps(python, interpreter, prefix, user_dir, key, build_log, creds, env, warnings)
            for step in steps:
                shown = ("<put the labrun client in the environment>" if a == _CLIENT_OVERLAY else a for a in step)
                build_log.write(("$ " + " ".join(shown) + "\n").encode())
                build_log.flush()
                try:
                    result = await trio.run_process(step, stdin=subprocess.DEVNULL, stdout=build_log,
                                                    stderr=build_log, cwd=user_dir, env=env, check=False,
                                                    **creds.popen_options())
                except OSError as exc:
                    raise PrepareFailed(f"cannot run {step[0]!r}: {exc.strerror or exc}") from None
                if result.returncode != 0:
                    build_log.flush()
                    missing = _PIP_NOT_FOUND.findall(await run_as(creds, _tail, log_path))
                    if missing:
                        raise PrepareFailed(f"building environment {definition['name']!r} failed: pip cannot "
                                            f"find the package {missing[-1]!r}; see user_logs/environment_build.txt")
                    raise PrepareFailed(f"building environment {definition['name']!r} failed: "
                                        f"{' '.join(step[:4])} ... exited with code {result.returncode}; "
                                        "see user_logs/environment_build.txt")
            await run_as(creds, (prefix / WARNINGS_FILE).write_text, json.dumps(warnings))
            await run_as(creds, (prefix / ".labrun-complete").touch)
            log.info("environment.built", name=definition["name"], key=key, uid=creds.uid)
        return PreparedEnvironment(python=str(prefix / "bin" / "python"), bin_dir=prefix / "bin", variables=variables)

    async def _steps(self, python: dict, interpreter: str, prefix: Path, user_dir: Path, key: str, build_log,
                     creds: Credentials, env: dict, warnings: dict):
        """The commands that build this environment, the last of them putting the labrun client in it."""
        env_python = str(prefix / "bin" / "python")
        tool = _conda_tool() if python.get("conda_specification") else None
        if tool is not None:
            spec = _conda.parse(python["conda_specification"])
            spec["pip"] = _without_azureml(spec["pip"], build_log)
            if not any(_conda.package_name(p) == "python" for p in spec["conda"]):
                # The run, and the labrun client put in the environment, need an interpreter there.
                spec["conda"].append("python")
                build_log.write(b"labrun: the specification names no python: adding python to it\n")
            spec_file = user_dir / f"{key}.yml"
            await run_as(creds, spec_file.write_text, _conda.dump(spec))
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
                    message = ("no conda or micromamba on this machine: installing the conda packages "
                               f"{', '.join(conda)} with pip under the same names")
                    build_log.write(f"labrun: {message}\n".encode())
                    warnings[PIP_FOR_CONDA] = f"Environment build: {message}."
                requirements = [_conda.conda_to_pip(p) for p in conda] + spec["pip"]
                interpreter = await _interpreter_for(_conda.python_version(spec), interpreter, build_log, creds, env,
                                                     warnings)
            requirements = _without_azureml(requirements, build_log)
            steps = [[interpreter, "-I", "-m", "venv", str(prefix)]]
            if requirements:
                requirements_file = user_dir / f"{key}.requirements.txt"
                await run_as(creds, requirements_file.write_text, "\n".join(requirements) + "\n")
                steps.append([env_python, "-I", "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                              "-r", str(requirements_file)])
        steps.append([env_python, "-I", "-c", _CLIENT_OVERLAY, str(prefix / "labrun-client"), *_client_sources()])
        return steps


def _conda_tool() -> str | None:
    return shutil.which("conda") or shutil.which("micromamba")


def _read_warnings(prefix: Path) -> dict:
    """What a reused environment's build warned of (nothing, for one an older labrun built)."""
    try:
        found = json.loads((prefix / WARNINGS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def _tail(path: Path, size: int = 64 * 1024) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - size))
        return f.read().decode("utf-8", errors="replace")
