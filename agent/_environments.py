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
- conda specifications need a ``conda`` binary on the agent's machine.

The run's ``PATH`` starts with the environment's ``bin/``, so ``python`` and console scripts in a
``command`` are the environment's.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from ._asuser import Credentials, agent_dir, acting_as, make_private_dir, open_file_as, run_as

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


def needs_conda(definition: dict) -> bool:
    return bool(definition["python"].get("conda_specification")) and not definition["python"]["user_managed_dependencies"]


class EnvironmentBuilder:
    def __init__(self, envs_dir: Path):
        self.envs_dir = envs_dir
        self._locks: dict[tuple[int, str], trio.Lock] = defaultdict(trio.Lock)

    async def prepare(self, definition: dict | None, interpreter: str, log_path: Path,
                      creds: Credentials | None = None) -> PreparedEnvironment:
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
                                         conda=bool(python.get("conda_specification")))
        return PreparedEnvironment(python=interpreter, variables=variables)

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

    async def _build(self, definition: dict, interpreter: str, build_log, creds: Credentials, *, conda: bool):
        python = definition["python"]
        recipe = {"interpreter": interpreter, "pip": python.get("pip_requirements"),
                  "conda": python.get("conda_specification")}
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:24]
        user_dir = self._user_dir(creds)
        prefix = user_dir / key
        variables = definition.get("environment_variables") or {}
        async with self._locks[(creds.uid, key)]:
            with acting_as(creds):
                complete = (prefix / ".labrun-complete").exists()
            if complete:
                build_log.write(f"labrun: reusing environment {definition['name']} ({key})\n".encode())
                return PreparedEnvironment(python=str(prefix / "bin" / "python"), bin_dir=prefix / "bin",
                                           variables=variables)
            build_log.write(f"labrun: building environment {definition['name']} ({key})\n".encode())
            build_log.flush()
            # A build an earlier agent left half done.
            await run_as(creds, shutil.rmtree, prefix, True)
            if conda:
                spec_file = user_dir / f"{key}.yml"
                await run_as(creds, spec_file.write_text, python["conda_specification"])
                steps = [["conda", "env", "create", "--yes", "--prefix", str(prefix), "--file", str(spec_file)]]
            else:
                requirements = user_dir / f"{key}.requirements.txt"
                await run_as(creds, requirements.write_text, "\n".join(python["pip_requirements"]) + "\n")
                steps = [[interpreter, "-I", "-m", "venv", str(prefix)],
                         [str(prefix / "bin" / "python"), "-I", "-m", "pip", "install", "--disable-pip-version-check",
                          "--no-input", "-r", str(requirements)]]
            env = self._build_env(creds, user_dir)
            for step in steps:
                build_log.write(("$ " + " ".join(step) + "\n").encode())
                build_log.flush()
                try:
                    result = await trio.run_process(step, stdin=subprocess.DEVNULL, stdout=build_log,
                                                    stderr=build_log, cwd=user_dir, env=env, check=False,
                                                    **creds.popen_options())
                except OSError as exc:
                    raise PrepareFailed(f"cannot run {step[0]!r}: {exc.strerror or exc}") from None
                if result.returncode != 0:
                    raise PrepareFailed(f"building environment {definition['name']!r} failed: "
                                        f"{' '.join(step[:4])} ... exited with code {result.returncode}; "
                                        "see user_logs/environment_build.txt")
            await run_as(creds, (prefix / ".labrun-complete").touch)
            log.info("environment.built", name=definition["name"], key=key, uid=creds.uid)
        return PreparedEnvironment(python=str(prefix / "bin" / "python"), bin_dir=prefix / "bin", variables=variables)
