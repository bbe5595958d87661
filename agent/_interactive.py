"""Interactive runs (Azure ML's ``Experiment.start_logging()`` and ``run.child_run()``): runs with no process.

An interactive run is created ``Running`` and ends when its client calls ``complete()``, ``fail()`` or
``cancel()``. It is bound to the connection that created it: when that connection closes while the
run is still open (the interpreter exited, crashed or was killed with SIGKILL; the kernel closes
its socket in every case), the run ends ``Failed`` with the reason ``client_exited``. No heartbeat
is needed, and a dead client is noticed at once. An agent that restarts finds the connection gone
too, so interactive runs it finds open end ``Failed`` with the reason ``agent_lost``.
"""

from __future__ import annotations

import contextlib
import time
import uuid

from labrun.protocol import BadRequest, Conflict
from labrun.protocol._statuses import (
    CANCEL_REQUESTED, CANCELED, COMPLETED, FAILED, FINALIZING, RUNNING, TERMINAL,
)

from ._asuser import acting_as, make_private_dir
from ._model import RunRecord
from ._retention import remove_run_dir
from ._rundir import RunDir
from ._states import EVENT_TYPES

CLIENT_EXITED = ("the process that started this run exited without calling complete() or fail() "
                 "(a run from start_logging() or child_run() is open only while that process runs)")


def is_interactive(record: RunRecord) -> bool:
    return bool(record.spec.get("interactive"))


class InteractiveRuns:
    """Creates, ends and unbinds interactive runs. ``transition`` is the supervisor's checked state change."""

    def __init__(self, store, runs_dir, transition):
        self.store = store
        self.runs_dir = runs_dir
        self.transition = transition

    def start(self, owner, args: dict, parent=None) -> RunRecord:
        """A new ``Running`` run of ``args["experiment"]``; ``parent``: the parent's record, if any."""
        now = time.time()
        run_id = args.get("run_id") or f"{args['experiment']}_{int(now)}_{uuid.uuid4().hex[:8]}"
        if run_id.startswith("."):
            raise BadRequest(f"args.run_id: a run id cannot start with '.', got {run_id!r}",
                             details={"field": "args.run_id"})
        if self.store.get_run(run_id) is not None:
            raise Conflict(f"a run with id {run_id!r} already exists")
        spec = {
            "experiment": args["experiment"], "interactive": True, "display_name": args.get("display_name"),
            "description": args.get("description"), "script": None, "command": None, "arguments": [],
            "compute_target": parent.spec.get("compute_target", "local") if parent else "local",
            "tags": args.get("tags") or {}, "properties": args.get("properties") or {},
            "resources": {"cpus": 0, "memory": None, "gpus": 0}, "priority": 0, "max_run_duration_seconds": None,
            "environment": None, "distributed": None,
        }
        run_dir = self.runs_dir / run_id
        try:
            make_private_dir(run_dir.parent, run_dir.name, owner.credentials())
        except FileExistsError:
            raise Conflict(f"a run with id {run_id!r} already exists") from None
        record = RunRecord(run_id=run_id, order=0, experiment=args["experiment"], number=0, uid=owner.uid,
                           gid=owner.gid, user=owner.user, status=RUNNING, spec=spec, environ={},
                           submitted_at=now, started_at=now)
        try:
            self._fill_run_dir(RunDir(run_dir), owner)
            self.store.add_run(record, EVENT_TYPES[RUNNING], parent_id=parent.run_id if parent else None)
        except BaseException:
            with contextlib.suppress(OSError):   # small, and no run refers to it
                remove_run_dir(RunDir(run_dir))
            raise
        return record

    @staticmethod
    def _fill_run_dir(layout: RunDir, owner) -> None:
        """The same layout a submitted run has, so outputs, logs and uploads work alike.

        Made as a submitted run's is: the agent creates the private directory (it alone may write the
        runs directory), and everything inside it is created with the owner's rights, so nothing in
        the user's tree is ever created or chowned as root.
        """
        with acting_as(owner.credentials()):
            layout.outputs.mkdir(parents=True)
            layout.outputs_link.symlink_to(layout.outputs.relative_to(layout.root))
            layout.logs.mkdir()

    def finish(self, record: RunRecord, status: str, error: str | None = None, reason: str | None = None) -> RunRecord:
        """End an open interactive run as ``status`` (Completed, Failed or Canceled)."""
        if record.status in TERMINAL:
            if record.status == status:
                return record   # completing twice is harmless
            raise Conflict(f"run {record.run_id} has already ended ({record.status})")
        now = time.time()
        if status == COMPLETED:
            self.transition(record, FINALIZING)
            self.transition(record, COMPLETED, ended_at=now)
        elif status == CANCELED:
            self.transition(record, CANCEL_REQUESTED, reason="canceled")
            self.transition(record, CANCELED, ended_at=now, reason="canceled", error="canceled")
        elif status == FAILED:
            self.transition(record, FAILED, ended_at=now, reason=reason or "failed", error=error or "failed")
        else:
            raise BadRequest(f"status: an interactive run ends Completed, Failed or Canceled, not {status}")
        return record

    def disconnected(self, run_ids) -> None:
        """The connection these runs were bound to has closed: those still open fail."""
        for run_id in run_ids:
            record = self.store.get_run(run_id)
            if record is not None and record.status not in TERMINAL:
                self.finish(record, FAILED, error=CLIENT_EXITED, reason="client_exited")
