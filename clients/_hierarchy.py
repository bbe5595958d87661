"""Interactive runs and run hierarchies: ``start_logging``, ``child_run``, ``create_children``,
``get_children``, ``complete``/``fail``, and Azure ML's ``runDefinition`` of a run.

An interactive run is bound to a connection this process keeps open for its lifetime (one per agent
socket): when the process exits, however it exits, the agent sees the connection close and fails
the runs it opened and did not end.
"""

from __future__ import annotations

import os

from .exceptions import UserErrorException

_BINDINGS: dict = {}
MAX_CHILDREN = 100


def _binding(workspace):
    """This process's connection for opening interactive runs on ``workspace``'s agent."""
    from ._connection import AgentConnection

    path = workspace.connection.path
    connection = _BINDINGS.get(path)
    if connection is None or os.getpid() != connection.pid:
        connection = _BINDINGS[path] = AgentConnection(path)
        connection.pid = os.getpid()
    return connection


def start_run(experiment, *, parent=None, run_id=None, display_name=None, description=None, tags=None,
              properties=None, outputs=None):
    """A new interactive run of ``experiment`` (a child of ``parent``), ``Running`` until it ends."""
    from ._run import Run
    from .exceptions import AgentUnavailable

    args = dict(experiment=experiment.name, run_id=run_id, display_name=display_name, description=description,
                tags={str(k): "" if v is None else str(v) for k, v in (tags or {}).items()},
                properties={str(k): str(v) for k, v in (properties or {}).items()},
                parent_run_id=parent.id if parent is not None else None)
    try:
        details = _binding(experiment.workspace).call("start_run", **args)
    except AgentUnavailable:
        # The agent restarted since this process last opened a run: bind to the new one.
        _BINDINGS.pop(experiment.workspace.connection.path, None)
        details = _binding(experiment.workspace).call("start_run", **args)
    run = Run(experiment, details["run_id"], _details=details)
    # None or True: ./outputs is uploaded on complete(); a path names another folder; False: nothing.
    run._outputs = "./outputs" if outputs in (None, True) else (outputs or None)
    return run


def child_run(parent, name=None, run_id=None, outputs=None):
    name = None if name is None else str(name)
    return start_run(parent.experiment, parent=parent, run_id=run_id, display_name=name, outputs=outputs)


def create_children(parent, count=None, tag_key=None, tag_values=None) -> list:
    """``count`` children tagged ``azureml.batch_child_number`` 0..n-1, or one per value of ``tag_values``."""
    if tag_values is not None:
        if tag_key is None:
            raise UserErrorException("create_children: tag_values needs a tag_key")
        tags = [{tag_key: str(v)} for v in tag_values]
    elif count is not None:
        tags = [{"azureml.batch_child_number": str(i)} for i in range(int(count))]
    else:
        raise UserErrorException("create_children: give count, or tag_key with tag_values")
    if len(tags) > MAX_CHILDREN:
        raise UserErrorException(f"create_children: at most {MAX_CHILDREN} children at once, got {len(tags)}")
    return [start_run(parent.experiment, parent=parent, tags=t) for t in tags]


def get_children(parent, recursive=False, tags=None, properties=None, type=None, status=None):
    """The runs below ``parent``, oldest first (a generator)."""
    from ._experiment import _matches

    workspace = parent._workspace
    frontier = [parent.id]
    while frontier:
        found = []
        for run_id in frontier:
            found.extend(reversed(list(workspace.list_runs(parent=run_id))))
        for details in found:
            if status is not None and details["status"] != status:
                continue
            if not _matches(details["tags"], tags) or not _matches(details["properties"], properties):
                continue
            run = run_from_details(workspace, details, parent.experiment)
            if type is None or run.type == type:
                yield run
        frontier = [d["run_id"] for d in found] if recursive else []


def run_from_details(workspace, details, experiment=None):
    from ._experiment import Experiment
    from ._run import Run, ScriptRun

    if experiment is None or experiment.name != details["experiment"]:
        experiment = Experiment(workspace, details["experiment"], _skip_name_validation=True)
    cls = Run if details.get("interactive") else ScriptRun
    return cls(experiment, details["run_id"], _details=details)


def _error_message(error_details) -> str:
    if isinstance(error_details, BaseException):
        return f"User program failed with {type(error_details).__name__}: {error_details}"
    if error_details is None or isinstance(error_details, str):
        return error_details or ""
    raise TypeError("error_details must be instance of string or BaseException.")


def complete(run, set_status=True) -> None:
    outputs = getattr(run, "_outputs", None)
    if outputs and os.path.isdir(outputs):
        existing = set(run.get_file_names())
        for directory, _dirs, files in os.walk(outputs):
            for file in sorted(files):
                full = os.path.join(directory, file)
                name = "outputs/" + os.path.relpath(full, outputs).replace(os.sep, "/")
                if name not in existing:
                    run.upload_file(name, full)
    run.flush()
    if set_status:
        run._details = run._workspace._call("finish", run_id=run.id, token=run._token, status="Completed")


def fail(run, error_details=None, error_code=None, set_status=True) -> None:
    message = _error_message(error_details)
    run.flush()
    if set_status:
        run._details = run._workspace._call("finish", run_id=run.id, token=run._token, status="Failed",
                                            error=message or None, error_code=error_code)


def run_definition(d: dict) -> dict:
    """Azure ML's ``runDefinition``: the one the client sent at submit, else one made from the run's fields."""
    if d.get("run_definition"):
        return d["run_definition"]
    distributed = d.get("distributed") or {}
    framework = {"pytorch": "PyTorch", "tensorflow": "TensorFlow"}.get(distributed.get("kind"), "Python")
    command = d["command"]
    return {
        "script": d["script"], "command": command if isinstance(command, str) else " ".join(command or []),
        "arguments": d["arguments"], "target": d["target"], "framework": framework,
        "communicator": {"pytorch": distributed.get("backend") or "None", "tensorflow": "ParameterServer",
                         "mpi": "IntelMpi"}.get(distributed.get("kind"), "None"),
        "maxRunDurationSeconds": d["max_run_duration_seconds"], "nodeCount": distributed.get("node_count", 1),
        "priority": d["priority"], "environment": d.get("environment"), "docker": None,
        "environmentVariables": d.get("environment_variables", {}),
    }
