"""Environments: what Python a run uses, and building pip environments into cached virtualenvs.

- ``user_managed_dependencies``: the run uses ``interpreter_path`` (else the client's interpreter) as is.
- pip requirements: the agent builds a virtualenv from the client's interpreter during ``Preparing``,
  under ``<state>/envs/<hash>``, where the hash covers the interpreter and the requirements. A later
  run with the same definition reuses it; two runs needing the same new one build it once (a lock per
  hash). The build's output is the run's ``logs/environment_build.txt``.
- conda specifications need a ``conda`` binary on the agent's machine.

The run's ``PATH`` starts with the environment's ``bin/``, so ``python`` and console scripts in a
``command`` are the environment's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

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
                  "conda": python.get("conda_specification")}
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
                if conda:
                    spec_file = prefix.parent / f"{key}.yml"
                    spec_file.write_text(python["conda_specification"])
                    steps = [["conda", "env", "create", "--yes", "--prefix", str(prefix), "--file", str(spec_file)]]
                else:
                    requirements = prefix.parent / f"{key}.requirements.txt"
                    requirements.write_text("\n".join(python["pip_requirements"]) + "\n")
                    steps = [[interpreter, "-m", "venv", str(prefix)],
                             [str(prefix / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                              "--no-input", "-r", str(requirements)]]
                for step in steps:
                    build_log.write(("$ " + " ".join(step) + "\n").encode())
                    build_log.flush()
                    try:
                        result = await trio.run_process(step, stdout=build_log, stderr=build_log, cwd=cwd, check=False)
                    except OSError as exc:
                        raise PrepareFailed(f"cannot run {step[0]!r}: {exc.strerror or exc}") from None
                    if result.returncode != 0:
                        raise PrepareFailed(f"building environment {definition['name']!r} failed: "
                                          f"{' '.join(step[:4])} ... exited with code {result.returncode}; "
                                          "see user_logs/environment_build.txt")
                (prefix / ".labrun-complete").touch()
                log.info("environment.built", name=definition["name"], key=key)
        return PreparedEnvironment(python=str(prefix / "bin" / "python"), bin_dir=prefix / "bin", variables=variables)
