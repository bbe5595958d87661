"""``ScriptRunConfig``: what to run, where, and with which limits, as in Azure ML SDK v1.

Differences from Azure ML, on purpose (the README lists them):
- the caller's ``arguments`` list is copied, never mutated;
- setting both ``command`` and ``script`` is an error at once, not a service error later;
- non-string elements of a ``command`` list are converted with ``str()`` (Azure ML raises TypeError).

As in Azure ML, a ``command`` list is joined with spaces (no quoting) and the line runs through
``/bin/sh -c``, so ``$NODE_RANK`` and friends expand; so does a ``command`` string. (The CLI's
``labrun run -- CMD...`` execs its argv instead, as ``docker run`` does.)
"""

from __future__ import annotations

import os
import sys

from labrun.protocol import MAX_DURATION_SECONDS_DEFAULT

from ._runconfig import (
    DockerConfiguration, MpiConfiguration, PyTorchConfiguration, Resources, RunConfiguration,
    TensorflowConfiguration,
)
from .exceptions import ExperimentExecutionException, RunConfigurationException, UserErrorException



def _warn(message: str) -> None:
    import logging   # only when there is something to warn about

    logging.getLogger("labrun").warning(message)

_RUN_CONFIG_WARNING = ("If 'run_config' is specified, the following parameters will be ignored: 'compute_target', "
                       "'environment', 'distributed_job_config', 'max_run_duration_seconds', and "
                       "'docker_runtime_config'.")


def _target_name(compute_target) -> str:
    if compute_target is None:
        return "local"
    if isinstance(compute_target, str):
        return compute_target
    name = getattr(compute_target, "name", None)
    if not isinstance(name, str):
        raise RunConfigurationException("compute_target must be a name or an object with a 'name' attribute, "
                                        f"got {type(compute_target).__name__}")
    return name


class ScriptRunConfig:
    MAX_DURATION_SECONDS_DEFAULT = MAX_DURATION_SECONDS_DEFAULT

    def __init__(self, source_directory, script=None, arguments=None, run_config=None, _telemetry_values=None,
                 compute_target=None, environment=None, distributed_job_config=None, resume_from=None,
                 max_run_duration_seconds=MAX_DURATION_SECONDS_DEFAULT, command=None, docker_runtime_config=None,
                 *, resources=None, priority=None, snapshot=True, after=None, afterok=None):
        if script is not None and command:
            raise RunConfigurationException("Both 'command' and 'script' are set; use either 'command', or "
                                            "'script' with 'arguments'.")
        self.source_directory = source_directory
        # labrun's addition: snapshot=False runs in source_directory itself (no copy, no size limits).
        self.snapshot = bool(snapshot)
        self.script = script
        self.command = command
        self.arguments = list(arguments) if arguments is not None else None
        self._telemetry_values = _telemetry_values
        self._resume_from = resume_from
        self._distributed_job_config = None
        # labrun additions: start after these runs (Run objects or ids) have ended / only if they completed.
        self.after = _run_ids(after, "after")
        self.afterok = _run_ids(afterok, "afterok")

        if run_config:
            if (max_run_duration_seconds != MAX_DURATION_SECONDS_DEFAULT or compute_target or environment
                    or distributed_job_config or docker_runtime_config):
                _warn(_RUN_CONFIG_WARNING)
            for name in ("script", "arguments", "command"):
                mine, theirs = getattr(self, name), getattr(run_config, name)
                if mine and theirs:
                    _warn(f"If '{name}' has been provided here and in 'run_config', '{name}' provided "
                                    "in ScriptRunConfig initialization will take precedence.")
                elif not mine and theirs:
                    setattr(self, name, list(theirs) if name == "arguments" else theirs)
            self.run_config = run_config
        else:
            run_config = RunConfiguration()
            run_config.target = _target_name(compute_target)
            if environment:
                run_config.environment = environment
            run_config.max_run_duration_seconds = max_run_duration_seconds
            if distributed_job_config is not None:
                if isinstance(distributed_job_config, TensorflowConfiguration):
                    run_config.tensorflow, run_config.node_count = distributed_job_config, distributed_job_config.worker_count
                    run_config.framework, run_config.communicator = "TensorFlow", "ParameterServer"
                elif isinstance(distributed_job_config, MpiConfiguration):
                    run_config.mpi, run_config.node_count = distributed_job_config, distributed_job_config.node_count
                    run_config.framework, run_config.communicator = "Python", "IntelMpi"
                elif isinstance(distributed_job_config, PyTorchConfiguration):
                    run_config.pytorch, run_config.node_count = distributed_job_config, distributed_job_config.node_count
                    run_config.framework = "PyTorch"
                    run_config.communicator = distributed_job_config.communication_backend
                else:
                    raise RunConfigurationException(
                        "'distributed_job_config' must be an 'azureml.core.runconfig.TensorflowConfiguration', "
                        "'azureml.core.runconfig.MpiConfiguration', or 'azureml.core.runconfig.PyTorchConfiguration' "
                        "object.")
                self._distributed_job_config = distributed_job_config
            if docker_runtime_config is not None:
                if not isinstance(docker_runtime_config, DockerConfiguration):
                    raise RunConfigurationException("'docker_runtime_config' must be a 'DockerConfiguration' object.")
                run_config.docker = docker_runtime_config
            elif environment is not None and getattr(environment, "docker", None) is not None:
                section = environment.docker
                run_config.docker = DockerConfiguration(use_docker=section.enabled, shm_size=section.shm_size,
                                                        shared_volumes=section.shared_volumes,
                                                        arguments=section.arguments)
            self.run_config = run_config
        if resources is not None:
            self.run_config.resources = Resources.coerce(resources)
        if priority is not None:
            self.run_config.priority = priority

    # -- building the wire spec ----------------------------------------------------------

    def _distributed_wire(self) -> dict | None:
        rc = self.run_config
        config = self._distributed_job_config
        if config is None and rc.framework in ("PyTorch", "TensorFlow") or rc.communicator in ("IntelMpi", "OpenMpi"):
            config = {"PyTorch": rc.pytorch, "TensorFlow": rc.tensorflow}.get(rc.framework, rc.mpi)
        if isinstance(config, PyTorchConfiguration):
            return {"kind": "pytorch", "process_count": config.process_count, "node_count": config.node_count,
                    "backend": config.communication_backend}
        if isinstance(config, MpiConfiguration):
            return {"kind": "mpi", "process_count_per_node": config.process_count_per_node,
                    "node_count": config.node_count}
        if isinstance(config, TensorflowConfiguration):
            # Azure ML counts TensorFlow workers as nodes; here every task is a process on this machine.
            return {"kind": "tensorflow", "worker_count": config.worker_count,
                    "parameter_server_count": config.parameter_server_count, "node_count": 1}
        if rc.node_count not in (1, None):
            return {"kind": "pytorch", "process_count": None, "node_count": rc.node_count, "backend": None}
        return None

    def _resume_wire(self) -> dict | None:
        resume = self._resume_from
        if resume is None:
            return None
        from ._datapath import DataPath

        if isinstance(resume, (str, os.PathLike)):
            resume = DataPath(resume)
        if not isinstance(resume, DataPath):
            raise UserErrorException(f"resume_from parameter should be of type DataPath or a path. "
                                     f"Found {type(resume)}.")
        wire = resume._to_wire()
        if wire["run_id"] is None and not os.path.exists(wire["path"]):
            raise UserErrorException(f"resume_from: {wire['path']} does not exist")
        return wire

    def _environment_wire(self) -> dict | None:
        environment = self.run_config.environment
        if environment is None:
            return None
        if not hasattr(environment, "_to_wire"):
            raise RunConfigurationException(f"environment must be a labrun.Environment, got {type(environment).__name__}")
        return environment._to_wire()

    def _docker_wire(self) -> dict | None:
        docker = self.run_config.docker
        if docker is None:
            return None
        return {"use_docker": bool(docker.use_docker), "shm_size": docker.shm_size,
                "shared_volumes": bool(docker.shared_volumes), "arguments": [str(a) for a in docker.arguments]}

    def _to_spec(self, experiment_name: str) -> dict:
        """The submit spec, without the snapshot. Raises on anything the agent would refuse."""
        rc = self.run_config
        script, command = self.script or rc.script, self.command or rc.command or None
        if script is not None and command:
            raise RunConfigurationException("Both 'command' and 'script' are set; use either 'command', or "
                                            "'script' with 'arguments'.")
        if script is None and not command:
            raise RunConfigurationException("Nothing to run: set 'script' (with 'arguments') or 'command'.")
        typed_arguments = list(self.arguments if self.arguments else rc.arguments)
        arguments = [str(a) for a in typed_arguments]
        if command and arguments:
            raise RunConfigurationException("'arguments' go with 'script'; with 'command', put them in the command.")
        source = self.source_directory or "."
        if script is not None:
            full = os.path.join(source, script)
            if not os.path.isfile(full):
                raise ExperimentExecutionException(
                    f"{full} script path doesn't exist. The script should be inside the project folder")
            script = os.path.relpath(os.path.normpath(full), source)
        if isinstance(command, (list, tuple)):
            command = " ".join(str(part) for part in command)
        resources = Resources.coerce(rc.resources)
        duration = rc.max_run_duration_seconds or MAX_DURATION_SECONDS_DEFAULT
        return {
            "experiment": experiment_name,
            "script": script,
            "arguments": arguments,
            "command": command,
            "interpreter": sys.executable,
            "environ": dict(os.environ),
            "environment_variables": {str(k): str(v) for k, v in (rc.environment_variables or {}).items()},
            "max_run_duration_seconds": int(duration),
            "resources": resources.to_wire(),
            "priority": int(rc.priority or 0),
            "compute_target": _target_name(rc.target),
            "environment": self._environment_wire(),
            "distributed": self._distributed_wire(),
            "resume_from": self._resume_wire(),
            "docker": self._docker_wire(),
            "run_definition": self._run_definition(script, command, typed_arguments),
            **({"after": self.after} if self.after else {}),
            **({"afterok": self.afterok} if self.afterok else {}),
        }

    def _run_definition(self, script, command, arguments) -> dict:
        """Azure ML's ``runDefinition`` of this submit: what ``get_details()`` shows, types kept."""
        definition = self.run_config._serialize_to_dict()
        definition.update(script=script, command=command or "", arguments=arguments)
        try:
            from labrun.protocol._framing import pack_frame

            pack_frame(definition)   # anything msgpack cannot carry is shown as its str()
        except (TypeError, ValueError, OverflowError):
            definition["arguments"] = [a if isinstance(a, (str, int, float, bool, type(None))) else str(a)
                                       for a in arguments]
        return definition

    def __repr__(self) -> str:
        what = f"command={self.command!r}" if self.command else f"script={self.script!r}, arguments={self.arguments!r}"
        return f"ScriptRunConfig(source_directory={self.source_directory!r}, {what}, target={self.run_config.target!r})"


def _run_ids(runs, name: str) -> list[str]:
    """Run objects or run ids (``after=[prep]``) -> run ids."""
    if runs is None:
        return []
    if isinstance(runs, str) or hasattr(runs, "id"):
        runs = [runs]
    ids = [run if isinstance(run, str) else getattr(run, "id", None) for run in runs]
    if not all(isinstance(i, str) and i for i in ids):
        raise RunConfigurationException(f"'{name}' takes runs or run ids, got {runs!r}")
    return ids
