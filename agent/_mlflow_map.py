"""How a labrun run looks in MLflow: pure functions from the agent's records to MLflow's REST shapes.

- tags: ``labrun.*`` (run id, user, target, experiment, number, script or command), MLflow's own
  (``mlflow.runName``, ``mlflow.user``, ``mlflow.source.name``, ``mlflow.parentRunId``) and the run's
  labrun tags under their own names (a user tag may not pose as an ``mlflow.*`` or ``labrun.*`` one);
- params: the script's ``--name value`` arguments under their names, and the run configuration
  under ``labrun.*``;
- metrics: ``log`` values (steps as logged, else 0, 1, 2... per name), ``log_list`` items and
  ``log_row`` columns (``<name>/<column>``), numbers only, with their times in milliseconds;
- statuses: labrun's Azure ML strings to MLflow's five.

MLflow refuses names outside ``[A-Za-z0-9_\\-. :/]`` and over its length limits, and a refused
batch would stall delivery: every name and value is made acceptable here.
"""

from __future__ import annotations

import math
import re

from labrun.protocol._statuses import CANCELED, COMPLETED, FAILED, QUEUED

# MLflow's limits (mlflow/utils/validation.py) and batch sizes (MAX_METRICS_PER_BATCH...).
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
BATCH_METRICS = 1000
BATCH_PARAMS = 100
BATCH_TAGS = 100

_BAD_NAME_CHARS = re.compile(r"[^\w\-. :/]", re.ASCII)

STATUS = {QUEUED: "SCHEDULED", COMPLETED: "FINISHED", FAILED: "FAILED", CANCELED: "KILLED"}


def mlflow_status(status: str) -> str:
    """Queued is SCHEDULED, the terminal ones map one to one, everything in between is RUNNING."""
    return STATUS.get(status, "RUNNING")


def name(key: str) -> str:
    """A key MLflow accepts: unknown characters become ``_``; no empty, ``.``/``..`` or absolute names."""
    cleaned = _BAD_NAME_CHARS.sub("_", str(key))[:MAX_KEY].strip("/")
    if cleaned in ("", ".", "..") or "/../" in f"/{cleaned}/" or "/./" in f"/{cleaned}/" or "//" in cleaned:
        cleaned = "_" + re.sub(r"/+", "_", cleaned)
    return cleaned[:MAX_KEY]


def _text(value, limit: int) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def script_params(arguments: list[str]) -> dict[str, str]:
    """``--lr 0.01 --epochs=5 --verbose`` -> ``{"lr": "0.01", "epochs": "5", "verbose": "true"}``.

    Positional arguments are not parameters; a repeated flag keeps its last value, as argparse does.
    """
    params: dict[str, str] = {}
    index = 0
    while index < len(arguments):
        argument = str(arguments[index])
        index += 1
        if not argument.startswith("-") or argument in ("-", "--") or _is_number(argument):
            continue
        key, equals, value = argument.lstrip("-").partition("=")
        if not key:
            continue
        if not equals:
            following = str(arguments[index]) if index < len(arguments) else None
            if following is not None and (not following.startswith("-") or _is_number(following)):
                value, index = following, index + 1
            else:
                value = "true"
        params[name(key)] = _text(value, MAX_PARAM_VALUE)
    return params


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def config_params(spec: dict) -> dict[str, str]:
    """The run configuration, under ``labrun.*`` so that it never meets a script's own parameter."""
    resources = spec.get("resources") or {}
    params = {
        "labrun.target": spec.get("compute_target", "local"),
        "labrun.cpus": resources.get("cpus"),
        "labrun.memory": resources.get("memory"),
        "labrun.gpus": resources.get("gpus"),
        "labrun.max_run_duration_seconds": spec.get("max_run_duration_seconds"),
        "labrun.priority": spec.get("priority"),
    }
    environment = spec.get("environment")
    if environment:
        params["labrun.environment"] = environment["name"] + (
            f":{environment['version']}" if environment.get("version") else "")
        image = (environment.get("docker") or {}).get("base_image")
        if image:
            params["labrun.image"] = image
    distributed = spec.get("distributed")
    if distributed:
        params["labrun.distributed"] = distributed["kind"]
        for key in ("process_count", "process_count_per_node", "worker_count", "parameter_server_count"):
            if distributed.get(key) is not None:
                params[f"labrun.{key}"] = distributed[key]
    return {key: _text(value, MAX_PARAM_VALUE) for key, value in params.items() if value is not None}


def params(spec: dict) -> dict[str, str]:
    found = script_params(spec.get("arguments") or []) if spec.get("script") else {}
    found.update(config_params(spec))
    return found


def command_text(spec: dict) -> str:
    if spec.get("script"):
        return " ".join(["python", spec["script"], *map(str, spec.get("arguments") or [])])
    command = spec.get("command")
    return command if isinstance(command, str) else " ".join(command or [])


def tags(record, labels: dict[str, str], parent_mlflow_id: str | None, display_name: str | None = None) -> dict[str, str]:
    """Every tag of the MLflow run: labrun's identity, MLflow's own, and the run's labrun tags."""
    spec = record.spec
    found: dict[str, str] = {}
    for key, value in {**spec.get("tags", {}), **labels}.items():
        if value is None:
            continue
        key = name(key)
        if key.startswith(("mlflow.", "labrun.")):
            key = "tag." + key
        found[key] = value
    found.update({
        "labrun.run_id": record.run_id,
        "labrun.experiment": record.experiment,
        "labrun.number": str(record.number),
        "labrun.user": record.user,
        "labrun.target": spec.get("compute_target", "local"),
        "labrun.command": command_text(spec),
        "mlflow.runName": display_name or spec.get("display_name") or record.run_id,
        "mlflow.user": record.user,
        "mlflow.source.name": spec.get("script") or command_text(spec),
        "mlflow.source.type": "JOB",
    })
    if spec.get("script"):
        found["labrun.script"] = spec["script"]
    if parent_mlflow_id is not None:
        found["mlflow.parentRunId"] = parent_mlflow_id
    return {key: _text(value, MAX_TAG_VALUE) for key, value in found.items()}


def _number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _wire(value: float):
    # MLflow's JSON is protobuf's: non-finite doubles travel as these strings.
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def metrics(rows: list[dict], counters: dict[str, int]) -> list[dict]:
    """Stored metric rows (oldest first) -> MLflow metrics; ``counters`` (next step per name) is updated.

    Only numbers are metrics: strings, tables and images stay in labrun (an image's file becomes an
    artifact when the run ends).
    """
    found = []

    def add(key: str, value, step: int | None, millis: int) -> None:
        number = _number(value)
        key = name(key)
        if step is None:
            step = counters.get(key, 0)
        counters[key] = max(counters.get(key, 0), step + 1)
        if number is not None:
            found.append({"key": key, "value": _wire(number), "timestamp": millis, "step": step})

    for row in rows:
        millis = int(row["time"] * 1000)
        kind, value = row["kind"], row["value"]
        if kind == "scalar":
            add(row["name"], value, row.get("step"), millis)
        elif kind == "list":
            for item in value:
                add(row["name"], item, None, millis)
        elif kind == "row":
            for column, item in value.items():
                add(f"{row['name']}/{column}", item, None, millis)
    return found


def run_url(tracking_uri: str, experiment_id: str, mlflow_run_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{mlflow_run_id}"


def experiment_url(tracking_uri: str, experiment_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}"
