"""The run as seen from inside a submitted script, and the offline stand-in used everywhere else.

``SubmittedRun`` is authenticated by the run's token (``LABRUN_RUN_TOKEN``), one per run and
valid only while it is active. Metrics are buffered and sent in batches (at 500 values, after a
second of logging, on ``flush``/``complete``, and at exit), so a loop logging thousands of values a
second is not slowed. When the agent cannot take them (it is restarting, or its disk is full), they are
held and sent at a later flush; the script goes on. ``OfflineRun`` prints what it would have logged, as Azure ML's does.
"""

from __future__ import annotations

import atexit
import sys
import time

from labrun.protocol._errors import Unavailable

from ._run import Run
from .exceptions import AgentUnavailable

FLUSH_COUNT = 500
FLUSH_SECONDS = 1.0
MAX_BATCH = 10_000       # values per log_metrics request
MAX_HELD = 1_000_000     # values kept while the agent cannot take them


def _warn(message: str) -> None:
    try:
        print(message, file=sys.stderr)
    except OSError:
        pass   # the run's log is on the same full disk: the warning must not end the script


class SubmittedRun(Run):
    """The run a submitted script is part of. Metrics are buffered and sent in batches."""

    _instances: dict = {}

    @classmethod
    def for_run(cls, run_id, token, socket, experiment_name):
        key = (socket, run_id)
        if key not in cls._instances:
            from ._experiment import Experiment
            from ._workspace import Workspace

            experiment = Experiment(Workspace(socket=socket, autostart=False), experiment_name,
                                    _skip_name_validation=True)
            cls._instances[key] = cls(experiment, run_id, token)
        return cls._instances[key]

    def __init__(self, experiment, run_id, token):
        self.experiment = experiment
        self._id = run_id
        self._token = token
        self._details = None
        self._buffer: list[dict] = []
        self._held = False   # the last send failed: wait for the next flush time instead of every 500 values
        self._last_flush = time.monotonic()
        atexit.register(self.flush)

    @property
    def _details_now(self):
        if self._details is None:
            self._refresh()
        return self._details

    def _refresh(self) -> dict:
        self._details = self._workspace._call("get", run_id=self._id)
        return self._details

    number = property(lambda self: self._details_now["number"])
    status = property(lambda self: self._details_now["status"])
    display_name = property(lambda self: self._details_now["display_name"])
    tags = property(lambda self: dict(self._details_now["tags"]))
    properties = property(lambda self: dict(self._details_now["properties"]))

    def get_details(self) -> dict:
        self._refresh()
        return super().get_details()

    def _queue_metric(self, name, kind, value, description="", step=None):
        self._buffer.append({"name": str(name), "kind": kind, "value": value, "step": step, "time": time.time(),
                             "description": description or None})
        if time.monotonic() - self._last_flush >= FLUSH_SECONDS or (
                len(self._buffer) >= FLUSH_COUNT and not self._held):
            self.flush()

    def flush(self, timeout_seconds=300) -> None:
        self._last_flush = time.monotonic()
        while self._buffer:
            try:
                self._send_metrics(self._buffer[:MAX_BATCH])
            except (AgentUnavailable, Unavailable) as exc:
                # The agent is restarting or cannot write now (a full disk): keep the metrics and send them at
                # a later flush; the training goes on. Past MAX_HELD the oldest go, with a word on stderr.
                if not self._held:
                    _warn(f"labrun: metrics held for later, the agent cannot take them now: {exc}")
                self._held = True
                if len(self._buffer) > MAX_HELD:
                    dropped = len(self._buffer) - MAX_HELD
                    del self._buffer[:dropped]
                    _warn(f"labrun: dropped the {dropped} oldest metrics held for the agent")
                return
            del self._buffer[:MAX_BATCH]
            self._held = False

    def complete(self, _set_status=True):
        # The agent sets the status when the script exits; this only sends what is buffered.
        self.flush()

    def fail(self, error_details=None, error_code=None, _set_status=True):
        self.flush()
        if isinstance(error_details, BaseException):
            message = f"User program failed with {type(error_details).__name__}: {error_details}"
        elif error_details is None or isinstance(error_details, str):
            message = error_details or ""
        else:
            raise TypeError("error_details must be instance of string or BaseException.")
        self._set_labels("error", {"code": error_code or "UserError", "message": message})

    def cancel(self):
        print("cancel is not supported for submitted runs.", file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and not isinstance(exc, SystemExit):
            self.fail(exc)
        self.complete()
        return False


class OfflineRun:
    """Outside a submitted run: prints what it would have logged, as Azure ML's offline run does."""

    def __init__(self, run_id=None):
        import uuid

        self.id = run_id or f"OfflineRun_{uuid.uuid4()}"

    def _print(self, kind, name, value):
        print(f"Attempted to log {kind} metric {name}:\n{value}")

    def log(self, name, value, description=""):
        self._print("scalar", name, value)

    def log_list(self, name, value, description=""):
        self._print("list", name, value)

    def log_table(self, name, value, description=""):
        self._print("table", name, value)

    def log_row(self, name, description=None, **kwargs):
        self._print("row", name, kwargs)

    def log_image(self, name, path=None, plot=None, description=""):
        self._print("image", name, path if path is not None else plot)

    def add_properties(self, properties):
        print(f"Attempted to add properties {properties}")

    def set_tags(self, tags):
        print(f"Attempted to set tags {tags}")

    def tag(self, key, value=None):
        print(f"Attempted to add tag {key} with value {value}")

    def upload_file(self, name, path_or_stream, datastore_name=None):
        print(f"Attempted to track file {name} at {path_or_stream}")

    def upload_files(self, names, paths, return_artifacts=False, timeout_seconds=None, datastore_name=None):
        print(f"Attempted to track files {names} at {paths}")

    def upload_folder(self, name, path, datastore_name=None):
        print(f"Attempted to track folder {name} at {path}")

    def flush(self, timeout_seconds=300):
        print(f"Attempted to flush run with id {self.id}")

    def complete(self, _set_status=True):
        pass

    def cancel(self):
        pass

    def fail(self, error_details=None, error_code=None, _set_status=True):
        print(f"Run failed with error code {error_code}:\n{error_details}")

    def child_run(self, name=None, run_id=None, outputs=None):
        import uuid

        return OfflineRun(f"{self.id}.{name or uuid.uuid4()}")

    def __enter__(self):
        print(f"[START] Run {self.id} context")
        return self

    def __exit__(self, *exc):
        print(f"[STOP] Run {self.id} context")
        return False
