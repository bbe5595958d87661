"""A run's warnings (Azure ML's ``get_details()["warnings"]``): what the run should know that did not fail it.

They are kept as the run's labels of kind ``warnings`` (so they need no table of their own), one per key:
each kind of warning has its key below, and telling it again replaces the message. Those known at submit are
in the run's spec (``spec["warnings"]``), stored with the run itself. Clients can set neither.
"""

from __future__ import annotations

KIND = "warnings"

# The environment build installed conda packages with pip (no conda or micromamba on the machine).
PIP_FOR_CONDA = "environment.pip_for_conda"
# The conda specification pins a Python version this machine has no interpreter for.
PYTHON_NOT_PINNED = "environment.python_version"
# The snapshot is close to the agent's [snapshot] limits.
SNAPSHOT_NEAR_LIMITS = "snapshot.near_limits"
# Processes of the run were still running when its program ended, and were ended.
BACKGROUND_PROCESSES = "run.background_processes"
# The run got no MLFLOW_* variables: MLflow did not answer in time, or its container cannot reach the server.
MLFLOW_NO_RUN_ENV = "mlflow.run_env"


def shown(spec: dict, labels: dict) -> list[dict]:
    """Azure ML's shape: ``[{"source", "message"}]``, in a stable order."""
    found = {**(spec.get(KIND) or {}), **labels.get(KIND, {})}
    return [{"source": key.partition(".")[0], "message": message} for key, message in sorted(found.items())]
