"""Where a user can look at a run or an experiment (``get_portal_url()``, the ``Web View:`` line).

The one place links are made: the run's page in the MLflow UI when the agent mirrors into MLflow,
else the best local link, the run's directory on this machine.
"""

from __future__ import annotations

import time
from urllib.parse import quote


def run_link(run, wait_seconds: float = 0.0) -> str | None:
    """The run's MLflow page (until the run exists in MLflow, moments after it is queued, the experiment's
    page: up to ``wait_seconds`` are spent waiting for the run's own), else ``file://<run dir>``."""
    deadline = time.monotonic() + wait_seconds
    while True:
        details = run._refresh()
        link = details.get("mlflow")
        if link is None or link["run_id"] is not None or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if link is not None:
        return link["url"]
    run_dir = details.get("run_dir")
    return f"file://{quote(run_dir)}" if run_dir else None


def experiment_link(experiment) -> str | None:
    """No local page lists an experiment's runs (``labrun ls`` does); with MLflow, its server's page."""
    mlflow = experiment.workspace._call("status").get("mlflow")
    server = (mlflow or {}).get("server") or {}
    return server.get("url") or (mlflow or {}).get("tracking_uri")
