"""``Run`` and ``ScriptRun``: a handle to one run on the agent, as in Azure ML SDK v1."""

from __future__ import annotations

import datetime
import json
import sys

from labrun.protocol import TERMINAL

from .exceptions import ActivityFailedException, ExperimentExecutionException

LOG_NAME = "user_logs/std_log.txt"


def _utc(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class Run:
    def __init__(self, experiment, run_id: str, outputs=None, *, _details: dict | None = None, **kwargs):
        self.experiment = experiment
        self._id = run_id
        self._details = _details if _details is not None else experiment.workspace._call("get", run_id=run_id)

    # -- cached identity ---------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._id

    @property
    def number(self) -> int:
        return self._details["number"]

    @property
    def status(self) -> str:
        return self._details["status"]

    @property
    def display_name(self) -> str:
        return self._details["display_name"]

    @property
    def tags(self) -> dict:
        return dict(self._details["tags"])

    @property
    def properties(self) -> dict:
        return dict(self._details["properties"])

    @property
    def type(self) -> str:
        return getattr(self, "RUN_TYPE", "labrun.run")

    def _refresh(self) -> dict:
        self._details = self.experiment.workspace._call("get", run_id=self._id)
        return self._details

    # -- status ------------------------------------------------------------------------

    def get_status(self) -> str:
        if self._details["status"] not in TERMINAL:
            self._refresh()
        return self._details["status"]

    def get_detailed_status(self) -> dict:
        details = self._refresh()
        waiting = details.get("waiting")
        message = f"waiting for {waiting['reason']} (position {waiting['position']})" if waiting else None
        return {"status": details["status"], "details": message}

    def get_tags(self) -> dict:
        return dict(self._refresh()["tags"])

    def get_properties(self) -> dict:
        return dict(self._refresh()["properties"])

    def get_details(self) -> dict:
        """Azure ML's shape, with camelCase keys."""
        d = self._refresh() if self._details["status"] not in TERMINAL else self._details
        details = {
            "runId": d["run_id"],
            "target": d["target"],
            "status": d["status"],
            "startTimeUtc": _utc(d["started_at"]),
            "services": {},
            "properties": d["properties"],
            "inputDatasets": [],
            "outputDatasets": [],
            "runDefinition": {
                "script": d["script"],
                "command": d["command"],
                "arguments": d["arguments"],
                "target": d["target"],
                "maxRunDurationSeconds": d["max_run_duration_seconds"],
                "resources": d["resources"],
                "priority": d["priority"],
            },
            "logFiles": {LOG_NAME: LOG_NAME},
            "submittedBy": d["user"],
        }
        if d["ended_at"] is not None:
            details["endTimeUtc"] = _utc(d["ended_at"])
        if d["status"] in ("Failed", "Canceled") and d.get("error"):
            details["error"] = {"error": {"code": "UserError" if d["reason"] in ("exit_code", "signal") else "SystemError",
                                          "message": d["error"], "reason": d["reason"],
                                          "exitCode": d["exit_code"], "signal": d["signal"]}}
        return details

    # -- waiting and logs --------------------------------------------------------------

    def _log_chunks(self, follow: bool):
        for item in self.experiment.workspace._stream("logs", run_id=self._id, follow=follow):
            yield item["data"]

    def wait_for_completion(self, show_output=False, wait_post_processing=False, raise_on_error=True) -> dict:
        """Block until the run ends; with ``show_output``, stream its log as Azure ML does.

        Raises:
            ActivityFailedException: the run ended ``Failed`` and ``raise_on_error`` is true.
        """
        if show_output:
            out = sys.stdout
            out.write(f"RunId: {self._id}\nWeb View: None\n\nStreaming {LOG_NAME}\n"
                      f"{'=' * (len('Streaming ') + len(LOG_NAME))}\n\n")
            out.flush()
            try:
                for chunk in self._log_chunks(follow=True):
                    out.write(chunk.decode("utf-8", errors="replace"))
                    out.flush()
            except KeyboardInterrupt:
                raise ExperimentExecutionException(
                    "The output streaming for the run was interrupted; the run is still going. "
                    f"Cancel it with labrun cancel {self._id}.") from None
        else:
            self.experiment.workspace.wait_for_run(self._id)
        details = self.get_details()
        if show_output:
            sys.stdout.write(f"\nExecution Summary\n=================\nRunId: {self._id}\nWeb View: None\n\n")
            if details["status"] == "Failed" and not raise_on_error:
                sys.stdout.write(f"Error:\n{json.dumps(details.get('error'), indent=4)}\n")
            sys.stdout.flush()
        if details["status"] == "Failed" and raise_on_error:
            error = details.get("error")
            text = json.dumps(error, indent=4) if error else \
                "Detailed error not set on the Run. Please check the logs for details."
            raise ActivityFailedException(error_details=text)
        return details

    def get_log(self) -> str:
        """The whole of the run's log so far."""
        return b"".join(self._log_chunks(follow=False)).decode("utf-8", errors="replace")

    def cancel(self) -> None:
        self._details = self.experiment.workspace._call("cancel", run_id=self._id)

    def __repr__(self) -> str:
        return f"Run(Experiment: {self.experiment.name},\nId: {self._id},\nType: {self.type},\nStatus: {self.status})"


class ScriptRun(Run):
    RUN_TYPE = "azureml.scriptrun"

    def __init__(self, experiment, run_id, directory=None, _run_config=None, **kwargs):
        super().__init__(experiment, run_id, **kwargs)
        self._directory = directory


def get_run(experiment, run_id, rehydrate=True, clean_up=True) -> ScriptRun:
    return ScriptRun(experiment, run_id)
