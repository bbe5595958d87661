"""Where a user can look at a run or an experiment (``get_portal_url()``, the ``Web View:`` line).

The one place links are made: today the best local link is the run's directory on this machine;
an MLflow mirror of the agent would answer with its page here.
"""

from __future__ import annotations

from urllib.parse import quote


def run_link(run) -> str | None:
    run_dir = run._details_now.get("run_dir")
    return f"file://{quote(run_dir)}" if run_dir else None


def experiment_link(experiment) -> str | None:
    """No local page lists an experiment's runs; ``labrun ls`` does."""
    return None


def mlflow_tracking_uri(workspace) -> str | None:
    """The MLflow tracking server the agent mirrors runs into, if it reports one."""
    return (workspace._call("status").get("mlflow") or {}).get("tracking_uri")
