"""``Run`` and ``ScriptRun``: a handle to one run on the agent, as in Azure ML SDK v1.

Inside a submitted run, ``Run.get_context()`` returns the live run (``_context``). Interactive runs
(``Experiment.start_logging()``, ``run.child_run()``) are created here too: they stay ``Running``
until ``complete()``, ``fail()`` or ``cancel()``, and fail if this process exits first (``_hierarchy``).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

from labrun.protocol import TERMINAL

from . import _hierarchy, _links, _metrics, _run_files
from .exceptions import (
    ActivityFailedException, ExperimentExecutionException, RunEnvironmentException, UserErrorException,
)

CHUNK = 8 * 1024 * 1024


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
        return self._details_now["number"]

    @property
    def status(self) -> str:
        return self._details_now["status"]

    @property
    def display_name(self) -> str:
        return self._details_now["display_name"]

    @display_name.setter
    def display_name(self, value) -> None:
        self._set_labels("attributes", {"display_name": str(value)})

    @property
    def description(self) -> str | None:
        return self._details_now.get("description")

    @description.setter
    def description(self, value) -> None:
        self._set_labels("attributes", {"description": None if value is None else str(value)})

    @property
    def parent(self):
        """The parent run, or None."""
        parent_id = self._details_now.get("parent_run_id")
        return None if parent_id is None else Run.get(self._workspace, parent_id)

    @property
    def tags(self) -> dict:
        return dict(self._details_now["tags"])

    @property
    def properties(self) -> dict:
        return dict(self._details_now["properties"])

    @property
    def type(self) -> str:
        return getattr(self, "RUN_TYPE", "labrun.run")

    @property
    def _workspace(self):
        return self.experiment.workspace

    @property
    def _details_now(self) -> dict:
        """The cached details (a live run inside a script fetches them on first use)."""
        return self._details

    _token = None   # set on the live run inside a submitted run
    _outputs = None   # an interactive run's tracked outputs folder, uploaded on complete()

    def _refresh(self) -> dict:
        self._details = self.experiment.workspace._call("get", run_id=self._id)
        return self._details

    # -- status ------------------------------------------------------------------------

    def get_status(self) -> str:
        if self._details_now["status"] not in TERMINAL:
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
        """Azure ML's shape, with camelCase keys. ``logFiles`` maps each log to a path this process can open
        (``_run_files``); ``warnings`` are ``{"source", "message"}`` maps, as Azure ML's."""
        d = self._refresh() if self._details["status"] not in TERMINAL or "run_dir" not in self._details \
            else self._details
        details = {
            "runId": d["run_id"],
            "target": d["target"],
            "status": d["status"],
            "startTimeUtc": _utc(d["started_at"]),
            "services": {},
            "properties": d["properties"],
            "inputDatasets": [],
            "outputDatasets": [],
            "runDefinition": _hierarchy.run_definition(d),
            "logFiles": {},
            "submittedBy": d["user"],
            "warnings": list(d.get("warnings") or []),
        }
        if d.get("display_name"):
            details["displayName"] = d["display_name"]
        if d.get("description") is not None:
            details["description"] = d["description"]
        if d["ended_at"] is not None:
            details["endTimeUtc"] = _utc(d["ended_at"])
        details["logFiles"] = _run_files.log_files(self, d)
        if d["status"] in ("Failed", "Canceled") and d.get("error"):
            user_error = d["reason"] in ("exit_code", "signal", "failed", "client_exited", "canceled")
            error = {"code": (d.get("reported_error") or {}).get("code") or ("UserError" if user_error else "SystemError"),
                     "message": d["error"], "reason": d["reason"], "exitCode": d["exit_code"], "signal": d["signal"]}
            if d.get("reported_error"):
                error["reported"] = d["reported_error"]
            details["error"] = {"error": error}
        return details

    # -- waiting and logs --------------------------------------------------------------

    def _log_chunks(self, follow: bool, name: str = "std_log.txt"):
        for item in self.experiment.workspace._stream("logs", run_id=self._id, follow=follow, name=name):
            yield item["data"]

    def wait_for_completion(self, show_output=False, wait_post_processing=False, raise_on_error=True) -> dict:
        """Block until the run ends; with ``show_output``, stream its log as Azure ML does.

        Raises:
            ActivityFailedException: the run ended ``Failed`` and ``raise_on_error`` is true.
        """
        if show_output:
            out = sys.stdout
            # A distributed run's primary log is rank 0's, as Azure ML streams it.
            log_name = "std_log_process_0.txt" if self._refresh().get("distributed") else "std_log.txt"
            header = f"Streaming user_logs/{log_name}"
            out.write(f"RunId: {self._id}\nWeb View: {self.get_portal_url(_wait_seconds=2)}\n\n{header}\n{'=' * len(header)}\n\n")
            out.flush()
            try:
                for chunk in self._log_chunks(follow=True, name=log_name):
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
            sys.stdout.write(f"\nExecution Summary\n=================\nRunId: {self._id}\n"
                             f"Web View: {self.get_portal_url()}\n\n")
            messages = [w.get("message") for w in details["warnings"] if w.get("message")]
            if messages:
                sys.stdout.write("Warnings:\n" + "\n".join(messages) + "\n\n")
            if details["status"] == "Failed" and not raise_on_error:
                sys.stdout.write(f"Error:\n{json.dumps(details.get('error'), indent=4)}\n")
            sys.stdout.flush()
        if details["status"] == "Failed" and raise_on_error:
            error = details.get("error")
            text = json.dumps(error, indent=4) if error else \
                "Detailed error not set on the Run. Please check the logs for details."
            raise ActivityFailedException(error_details=text)
        return details

    def get_portal_url(self, _wait_seconds: float = 0.0) -> str | None:
        """The run's page in the MLflow UI when the agent mirrors into MLflow, else its directory (``_links``)."""
        return _links.run_link(self, _wait_seconds)

    def get_log(self) -> str:
        """The whole of the run's log so far."""
        return b"".join(self._log_chunks(follow=False)).decode("utf-8", errors="replace")

    def cancel(self) -> None:
        """Cancel the run and the runs below it."""
        self._details = self.experiment.workspace._call("cancel", run_id=self._id)

    def get_details_with_logs(self) -> dict:
        """``get_details()``, with each log's contents in ``logFiles``."""
        details = self.get_details()
        details["logFiles"] = {name: b"".join(self._log_chunks(False, name[len("user_logs/"):]))
                               .decode("utf-8", errors="replace") for name in details["logFiles"]}
        return details

    # -- interactive runs and hierarchies (see _hierarchy) --------------------------------

    def complete(self, _set_status=True) -> None:
        """End an interactive run ``Completed``, uploading ``./outputs`` first (as Azure ML does)."""
        _hierarchy.complete(self, _set_status)

    def fail(self, error_details=None, error_code=None, _set_status=True) -> None:
        """End the run ``Failed``: an interactive run at once; a submitted run is stopped first."""
        _hierarchy.fail(self, error_details, error_code, _set_status)

    def start(self) -> None:
        """Interactive runs start ``Running``; kept for Azure ML code that calls it."""

    def child_run(self, name=None, run_id=None, outputs=None) -> "Run":
        return _hierarchy.child_run(self, name, run_id, outputs)

    def create_children(self, count=None, tag_key=None, tag_values=None) -> list:
        return _hierarchy.create_children(self, count, tag_key, tag_values)

    def get_children(self, recursive=False, tags=None, properties=None, type=None, status=None,
                     _rehydrate_runs=True):
        return _hierarchy.get_children(self, recursive, tags, properties, type, status)

    def submit_child(self, config, tags=None, **kwargs) -> "Run":
        return self.experiment.submit(config, tags, _parent_run_id=self._id, **kwargs)

    def register_model(self, model_name, model_path=None, tags=None, properties=None, **kwargs):
        """The model registry is an Azure ML cloud service: refused, saying what to do instead."""
        from ._refused import NotSupportedError, refusal

        raise NotSupportedError(refusal("Model"))

    def restore_snapshot(self, snapshot_id=None, path=None) -> str:
        """A zip of the source the run was submitted with (``_run_files``); returns its path."""
        return _run_files.restore_snapshot(self, snapshot_id, path)

    def get_snapshot_id(self) -> str:
        return _run_files.snapshot_id(self)

    @staticmethod
    def list(experiment, type=None, tags=None, properties=None, status=None, include_children=False):
        """The experiment's runs, newest first (a generator)."""
        return experiment.get_runs(type=type, tags=tags, properties=properties, include_children=include_children,
                                   status=status)

    @staticmethod
    def get(workspace, run_id) -> "Run":
        return _hierarchy.run_from_details(workspace, workspace._call("get", run_id=run_id))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        """``with run:`` completes the run, or fails it with the exception (SystemExit(0) is success)."""
        if exc is None or (isinstance(exc, SystemExit) and exc.code in (None, 0)):
            self.complete()
            return isinstance(exc, SystemExit)
        self.fail(exc)
        return False

    # -- metrics, tags, properties -----------------------------------------------------

    def _send_metrics(self, metrics: list[dict]) -> None:
        self._workspace._call("log_metrics", run_id=self._id, token=self._token, metrics=metrics)

    def _queue_metric(self, name: str, kind: str, value, description: str = "", step=None) -> None:
        self._send_metrics([{"name": str(name), "kind": kind, "value": value, "step": step, "time": time.time(),
                             "description": description or None}])

    def log(self, name, value, description="", step=None):
        _metrics.check_not_list(value)
        self._queue_metric(name, "scalar", _metrics.scalar(value, name), description, step)

    def log_list(self, name, value, description=""):
        self._queue_metric(name, "list", [_metrics.scalar(v, name) for v in value], description)

    def log_row(self, name, description=None, **kwargs):
        row = {}
        for key, value in kwargs.items():
            if isinstance(value, (list, tuple)):
                raise UserErrorException(f"log_row: column {key!r} must be a scalar, got a list")
            row[key] = _metrics.scalar(value, f"{name}.{key}")
        self._queue_metric(name, "row", row, description or "")

    def log_table(self, name, value, description=""):
        if not isinstance(value, dict):
            raise UserErrorException("log_table: value must be a dict of column name -> list of values")
        lengths = {len(v) for v in value.values() if isinstance(v, (list, tuple))}
        if len(lengths) > 1:
            raise UserErrorException(f"log_table: InvalidColumnLength: columns have different lengths {sorted(lengths)}")
        table = {k: [_metrics.scalar(x, f"{name}.{k}") for x in v] if isinstance(v, (list, tuple))
                 else _metrics.scalar(v, f"{name}.{k}") for k, v in value.items()}
        self._queue_metric(name, "table", table, description)

    def log_image(self, name, path=None, plot=None, description=""):
        if (path is None) == (plot is None):
            raise UserErrorException("log_image: give exactly one of 'path' or 'plot'")
        if plot is not None:
            artifact = f"{name}_{int(time.time())}.png"
            import io

            buffer = io.BytesIO()
            plot.savefig(buffer, format="png")
            self._put_bytes(artifact, buffer.getvalue())
        else:
            artifact = os.path.normpath(os.path.relpath(path)) if not os.path.isabs(path) else os.path.basename(path)
            self.upload_file(artifact, path)
        self._queue_metric(name, "image", f"aml://artifactId/ExperimentRun/dcid.{self._id}/{artifact}", description)

    def get_metrics(self, name=None, recursive=False, run_type=None, populate=False) -> dict:
        """``{name: value}``; with ``recursive``, ``{run_id: {name: value}}`` over this run and those below it."""
        self.flush()
        folded = _metrics.fold(self._workspace._call("get_metrics", run_id=self._id, name=name))
        if not recursive:
            return folded
        found = {self._id: folded} if folded else {}
        for child in self.get_children(recursive=True):
            metrics = child.get_metrics(name=name)
            if metrics:
                found[child.id] = metrics
        return found

    def flush(self, timeout_seconds=300) -> None:
        pass

    def _set_labels(self, kind: str, values: dict) -> dict:
        self._details = self._workspace._call("set_labels", run_id=self._id, token=self._token, kind=kind,
                                              values=values)
        return self._details

    def tag(self, key, value=None):
        self.set_tags({key: value})

    def set_tags(self, tags):
        if not isinstance(tags, dict):
            raise UserErrorException("set_tags takes a dict of tag name -> value")
        self._set_labels("tags", {str(k): None if v is None else str(v) for k, v in tags.items()})

    def add_properties(self, properties):
        if properties:
            self._set_labels("properties", {str(k): str(v) for k, v in properties.items()})

    # -- files ---------------------------------------------------------------------------

    def _put_bytes(self, name: str, data: bytes) -> None:
        for start in range(0, max(len(data), 1), CHUNK):
            self._workspace._call("put_file", run_id=self._id, token=self._token, name=name,
                                  data=data[start:start + CHUNK], append=start > 0)

    def upload_file(self, name, path_or_stream, datastore_name=None):
        if hasattr(path_or_stream, "read"):
            data = path_or_stream.read()
        else:
            with open(path_or_stream, "rb") as f:
                data = f.read()
        self._put_bytes(str(name).replace(os.sep, "/"), data if isinstance(data, bytes) else data.encode())

    def upload_files(self, names, paths, return_artifacts=False, timeout_seconds=None, datastore_name=None):
        if len(names) != len(paths):
            raise TypeError("names and paths must be lists of equal lengths. "
                            f"Got {len(names)} names and {len(paths)} paths.")
        for name, path in zip(names, paths):
            self.upload_file(name, path)

    def upload_folder(self, name, path, datastore_name=None):
        for directory, _dirs, files in os.walk(path):
            for file in sorted(files):
                full = os.path.join(directory, file)
                self.upload_file(name + full[len(path):].replace(os.sep, "/"), full)

    def get_file_list(self) -> list[dict]:
        return self._workspace._call("files", run_id=self._id)

    def get_file_names(self) -> list[str]:
        return [f["name"] for f in self.get_file_list()]

    def download_file(self, name, output_file_path=None, _validate_checksum=False):
        target = output_file_path or os.path.basename(name)
        if os.path.isdir(target):
            target = os.path.join(target, os.path.basename(name))
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        with open(target, "wb") as f:
            for item in self._workspace._stream("download", run_id=self._id, name=name):
                f.write(item["data"])
        return target

    def download_files(self, prefix=None, output_directory=None, output_paths=None, batch_size=100,
                       append_prefix=True, timeout_seconds=None) -> list[str]:
        names = [n for n in self.get_file_names() if prefix is None or n.startswith(prefix)]
        if not names:
            raise UserErrorException(f"run {self._id} has no files" + (f" under {prefix!r}" if prefix else ""))
        output_directory = output_directory or os.getcwd()
        written = []
        for i, name in enumerate(names):
            if output_paths is not None:
                target = output_paths[i]
            else:
                relative = name if append_prefix or not prefix else name[len(prefix):].lstrip("/")
                target = os.path.join(output_directory, relative)
            written.append(self.download_file(name, target))
        return written

    def get_all_logs(self, destination=None) -> list[str]:
        destination = destination or os.path.join(os.getcwd(), "assets", self._id)
        return self.download_files(prefix="user_logs/", output_directory=destination)

    def get_environment(self):
        from ._environment import Environment

        definition = self._refresh().get("environment")
        return Environment._from_wire(definition) if definition else None

    # -- inside a run --------------------------------------------------------------------

    @classmethod
    def get_context(cls, allow_offline=True, used_for_context_manager=False, **kwargs):
        """The live run inside a submitted run; an offline run (or an error) elsewhere."""
        run_id, token, socket = (os.environ.get(k) for k in ("LABRUN_RUN_ID", "LABRUN_RUN_TOKEN", "LABRUN_SOCKET"))
        from ._context import OfflineRun, SubmittedRun

        if run_id and token and socket:
            return SubmittedRun.for_run(run_id, token, socket, os.environ.get("LABRUN_EXPERIMENT", "default"))
        if not allow_offline:
            raise RunEnvironmentException(
                "Could not load a submitted run, if outside of an execution context, use "
                "experiment.start_logging to initialize an azureml.core.Run.")
        return OfflineRun(kwargs.get("run_id"))

    def __repr__(self) -> str:
        return f"Run(Experiment: {self.experiment.name},\nId: {self._id},\nType: {self.type},\nStatus: {self.status})"

    def _repr_html_(self) -> str:
        """The table a notebook shows for a run, as Azure ML's does."""
        import html

        link = self.get_portal_url()
        cells = [self.experiment.name, self._id, self.type, self.status]
        row = "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
        page = f"<a href='{html.escape(link)}' target='_blank'>Link to the run</a>" if link else "-"
        return ("<table><tr><th>Experiment</th><th>Id</th><th>Type</th><th>Status</th><th>Details Page</th></tr>"
                f"<tr>{row}<td>{page}</td></tr></table>")


class ScriptRun(Run):
    RUN_TYPE = "azureml.scriptrun"

    def __init__(self, experiment, run_id, directory=None, _run_config=None, **kwargs):
        super().__init__(experiment, run_id, **kwargs)
        self._directory = directory


def get_run(experiment, run_id, rehydrate=True, clean_up=True) -> ScriptRun:
    return ScriptRun(experiment, run_id)
